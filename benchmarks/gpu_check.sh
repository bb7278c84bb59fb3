#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a machine with GPUs, in at most 8 minutes, the paper recipe's
# training steps (ViT-B/16 at 384, bf16), the same under torchrun/DDP on every visible GPU, DeepLab v2
# ResNet-101 steps, and 960-px inference + dense CRF on 20 VOC slice images. It prints images/s, peak GPU memory
# and the card, and writes benchmarks/results/gpu-check.json (nothing is downloaded: random weights).
#
#   benchmarks/gpu_check.sh                                  # the check, as it should be run on the GPU machine
#   GPU_CHECK_NPROC=2 benchmarks/gpu_check.sh --steps 50     # options go to gpu_check.py (--help lists them)
#   benchmarks/gpu_check.sh --device cpu --backbone test_vit --img-size 64 ...   # the test suite's CPU fallback
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_NPROC (DDP processes; default the
# visible GPUs, at least 1), GPU_CHECK_OUT (the JSON; --out is set from it), CPCX_DATA (the folder holding voc2012-mini/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu-check.json}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
NPROC=${GPU_CHECK_NPROC:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}

# Time limits keep the whole check inside 8 minutes; the JSON is rewritten after each part, so a part cut short
# loses only itself.
timeout --kill-after 10 330 "$PY" benchmarks/gpu_check.py "$@" --out "$OUT"
# One process per GPU; OMP_NUM_THREADS=1 as torchrun sets by default (said here so it does not warn).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} timeout --kill-after 10 120 \
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    benchmarks/gpu_check.py "$@" --parts train_ddp --merge --out "$OUT"
