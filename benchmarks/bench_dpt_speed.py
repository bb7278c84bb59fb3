"""Seconds per image of ``segment.arch: dpt`` on voc-mini's ViT-S/14 weights at 384², on this CPU, 1 thread.

    .venv/bin/python benchmarks/bench_dpt_speed.py [WEIGHTS]   # → benchmarks/results/dpt-speed.{json,md}

WEIGHTS: the ViT-S/14 file (default weights/dinov2_vits14.safetensors, from `make weights`).

One training step (SGD, cross-entropy, batch 2: the least `cpcx segment` trains with) with the encoder frozen
and fine-tuned, 1 warm-up step and 3 timed ones each (the fastest kept: the least disturbed by other jobs); a
forward split into the ViT and DPT's decoder + head; and one 500×375 image predicted (padded to 512×384). The
machine's load average is recorded beside the figures: on a shared machine they are upper bounds.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SIZE, BATCH, STEPS = 384, 2, 3
WEIGHTS = ROOT / "weights/dinov2_vits14.safetensors"


def build(frozen: bool):
    from cpcx.recipe import SegmentConfig
    from cpcx.segment.networks import build_segnet

    cfg = SegmentConfig(arch="dpt", encoder="tu-vit_small_patch14_dinov2", encoder_weights=None,
                        encoder_file=WEIGHTS, crop_size=SIZE, freeze_encoder=frozen)
    return build_segnet(cfg, 21)


def train_seconds_per_image(model) -> tuple[float, list[float]]:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 21, (BATCH, SIZE, SIZE), generator=generator)
    model.train()
    seconds = []
    for _ in range(1 + STEPS):  # the first step allocates: not timed
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:]) / BATCH, [round(v, 2) for v in seconds]


def main() -> None:
    import torch

    from results_exec import save_results

    torch.set_num_threads(1)
    rows, steps, loads = {}, {}, [os.getloadavg()[0]]
    for frozen in (True, False):
        torch.manual_seed(0)
        model = build(frozen)
        name = f"train step, encoder {'frozen' if frozen else 'fine-tuned'}"
        rows[name], steps[name] = train_seconds_per_image(model)
        loads.append(os.getloadavg()[0])
    net = model.eval().net
    x = torch.rand(BATCH, 3, SIZE, SIZE)
    with torch.inference_mode():
        for _ in range(2):  # the second pass is the one kept
            start = time.perf_counter()
            features, prefix = net.encoder(x)
            middle = time.perf_counter()
            net.segmentation_head(net.decoder(features, prefix))
            end = time.perf_counter()
        rows["forward: ViT-S encoder"] = (middle - start) / BATCH
        rows["forward: decoder + head"] = (end - middle) / BATCH
        image = torch.rand(1, 3, 375, 500)
        model(image)
        start = time.perf_counter()
        model(image)
        rows["predict one 500×375 image"] = time.perf_counter() - start
    loads.append(os.getloadavg()[0])
    results = {"seconds_per_image": rows, "step_seconds_batch": steps, "size": SIZE, "batch": BATCH, "threads": 1,
               "load_average_1min": [round(v, 1) for v in loads],
               "trainable_millions": {
                   "frozen": sum(p.numel() for p in build(True).parameters() if p.requires_grad) / 1e6,
                   "all": sum(p.numel() for p in model.parameters()) / 1e6}}

    def render(r: dict) -> str:
        lines = [f"# dpt on the ViT-S/14 weights, {SIZE}², 1 thread (s per image)", "", "| what | s / image |",
                 "|---|---:|", *[f"| {k} | {v:.2f} |" for k, v in r["seconds_per_image"].items()], "",
                 f"Trainable parameters: {r['trainable_millions']['frozen']:.1f} M frozen, "
                 f"{r['trainable_millions']['all']:.1f} M fine-tuned. Machine: {r['machine']}; 1-minute load average "
                 f"during the run {r['load_average_1min']} (other jobs shared the cores: upper bounds).", ""]
        return "\n".join(lines)

    save_results(results, ROOT / "benchmarks" / "results", "dpt-speed", render)
    print(render(results))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if len(sys.argv) > 1:
        WEIGHTS = Path(sys.argv[1])
    main()
