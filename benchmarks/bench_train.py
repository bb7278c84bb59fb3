"""Seconds per training epoch with the frozen-backbone feature cache vs without it, on the VOC slice.

    .venv/bin/python benchmarks/bench_train.py                    # all 311 train images (slow on a CPU)
    .venv/bin/python benchmarks/bench_train.py --limit 64         # a quicker estimate (time is linear in N)
    .venv/bin/python benchmarks/bench_train.py --device cuda --threads 8

Both runs use ``recipes/voc-mini.yaml`` (DINOv2 ViT-S/14 at 448², frozen, views orig + hflip, batch 16) in a
temporary runs folder; only ``train.feature_cache`` differs. Without the weights file (``make weights``) a
randomly initialised ViT-S/14 is used: the time is the same. The cached epoch time excludes the one-time
extraction (reported beside it, with the break-even epoch count). Results: ``benchmarks/results/train.{json,md}``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def _run(args, runs: Path, cached: bool) -> dict:
    from rich.console import Console

    from cpcx import train
    from cpcx.clusters import run_clusters
    from cpcx.recipe import load_recipe

    weights = ROOT / "weights" / "dinov2_vits14.safetensors"
    overrides = [
        f"name=bench-{'cached' if cached else 'uncached'}", f"runs_dir={runs}", f"train.epochs={args.epochs}",
        f"train.feature_cache={str(cached).lower()}", f"train.device={args.device}", f"train.workers={args.workers}",
        "train.unfreeze_blocks=0", "train.log_every=1000",
    ]
    if args.limit:
        overrides.append(f"dataset.limit={args.limit}")
    if not weights.is_file():
        overrides.append("model.weights=null")
    recipe = load_recipe(ROOT / "recipes" / "voc-mini.yaml", overrides)
    run_clusters(recipe, console=Console(quiet=True))
    cpu: list[float] = []
    loader_cpu: list[float] = []
    epoch, loader = train.Trainer._epoch, train.Trainer._loader

    def timed_epoch(self, index: int) -> None:  # CPU seconds of this process, minus the cache extraction
        start = time.process_time()
        epoch(self, index)
        cpu.append(round(time.process_time() - start - loader_cpu.pop(), 2))

    def timed_loader(self, *a):
        start = time.process_time()
        result = loader(self, *a)
        loader_cpu.append(time.process_time() - start)
        return result

    train.Trainer._epoch, train.Trainer._loader = timed_epoch, timed_loader
    try:
        start = time.perf_counter()
        train.run_train(recipe, console=Console(quiet=True))
        total = time.perf_counter() - start
    finally:
        train.Trainer._epoch, train.Trainer._loader = epoch, loader
    with open(recipe.run_dir("train") / "metrics.csv") as handle:
        wall = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return {"epoch_seconds": wall, "epoch_cpu_seconds": cpu, "total_seconds": round(total, 2),
            "setup_seconds": round(total - sum(wall), 2),
            "weights": str(weights.relative_to(ROOT)) if weights.is_file() else "random init", "recipe": recipe}


def _steady_steps(recipe, reps: int, device: str) -> tuple[float, float]:
    """Min over ``reps`` interleaved repetitions of one training step (batch 16, data preparation included)
    from cached tokens and from images: the per-step cost without the noise of a shared machine."""
    import torch
    from torch.utils.data import default_collate

    from cpcx.augment import TrainTransform
    from cpcx.data import ImageLabelDataset, build_dataset
    from cpcx.feature_cache import FeatureCache
    from cpcx.model import cluster_vectors, load_checkpoint
    from cpcx.train import TrainingItems, forward_loss

    net, meta = load_checkpoint(recipe.run_dir("train") / "weights" / "best.pt")
    net.to(device).train()
    images = ImageLabelDataset(build_dataset(recipe.dataset, "train"))
    cache = FeatureCache(next(recipe.feature_cache_root().glob("*/meta.json")).parent)
    u = torch.from_numpy(cluster_vectors(images.labels.numpy(), meta["cluster_matrix"]))
    t = recipe.train
    transform = TrainTransform(t.augment, recipe.model.img_size, net.mean, net.std, views=t.views)
    sources = {"cached": TrainingItems(images.labels, u, 0, cache=cache),
               "images": TrainingItems(images.labels, u, 0, images=images, transform=transform)}
    optimizer = torch.optim.Adam(net.head_parameters(), lr=1e-4)
    best = {"cached": float("inf"), "images": float("inf")}
    for rep in range(reps):
        for mode, items in sources.items():
            start = time.perf_counter()
            batch = default_collate([items[(rep, i % len(items))] for i in range(t.batch_size)])
            loss = forward_loss(net, net, batch, recipe.loss, torch.device(device), t.precision,
                                mode == "cached")["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            best[mode] = min(best[mode], time.perf_counter() - start)
    return round(best["cached"], 2), round(best["images"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N train images.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per setting.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--reps", type=int, default=5, help="Repetitions of the interleaved step timing.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import torch

    from cpcx import atomic

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cpcx-bench-train-") as tmp:
        cached = _run(args, Path(tmp), cached=True)
        uncached = _run(args, Path(tmp), cached=False)
        step_cached, step_images = _steady_steps(cached.pop("recipe"), args.reps, args.device)
        uncached.pop("recipe")
    # Wall time is the min over epochs (other processes on a shared machine only ever add to it);
    # CPU seconds of the training process are the steadier figure on a loaded machine.
    wall_cached, wall_uncached = min(cached["epoch_seconds"]), min(uncached["epoch_seconds"])
    cpu_cached = sum(cached["epoch_cpu_seconds"]) / len(cached["epoch_cpu_seconds"])
    cpu_uncached = sum(uncached["epoch_cpu_seconds"]) / len(uncached["epoch_cpu_seconds"])
    extraction = cached["setup_seconds"] - uncached["setup_seconds"]  # same set-up otherwise
    result = {
        "images": args.limit or 311, "epochs": args.epochs, "device": args.device, "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu", "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "backbone": "vit_small_patch14_dinov2 @ 448, views orig+hflip, batch 16", "weights": cached["weights"],
        "cached_s_per_epoch": wall_cached, "uncached_s_per_epoch": wall_uncached,
        "speedup": round(wall_uncached / wall_cached, 1),
        "cached_cpu_s_per_epoch": round(cpu_cached, 1), "uncached_cpu_s_per_epoch": round(cpu_uncached, 1),
        "speedup_cpu_time": round(cpu_uncached / cpu_cached, 1), "cache_extraction_s": round(extraction, 1),
        "cached_s_per_step_min": step_cached, "uncached_s_per_step_min": step_images,
        "speedup_per_step": round(step_images / step_cached, 1),
        "break_even_epochs": round(extraction / max(wall_uncached - wall_cached, 1e-9), 2),
        "cached": cached, "uncached": uncached,
    }
    atomic.write_json(args.out / "train.json", result)
    table = (
        "# Training speed: feature cache vs none (benchmarks/bench_train.py)\n\n"
        f"{result['images']} VOC train images, {result['backbone']}, {args.device} × {args.threads} threads, "
        f"weights: {result['weights']}; load average at the end {result['load_average']}.\n\n"
        "| setting | s / epoch (wall, best) | CPU s / epoch |\n|---|---|---|\n"
        f"| uncached (ViT every step) | {wall_uncached} | {result['uncached_cpu_s_per_epoch']} |\n"
        f"| cached (tokens from disk) | {wall_cached} | {result['cached_cpu_s_per_epoch']} |\n\n"
        f"Speed-up **{result['speedup']}×** wall, **{result['speedup_cpu_time']}×** CPU time; one-time "
        f"extraction {result['cache_extraction_s']} s (pays off after {result['break_even_epochs']} epochs).\n\n"
        f"One step of 16 images, data included, best of {args.reps} interleaved repetitions: "
        f"uncached {step_images} s, cached {step_cached} s (**{result['speedup_per_step']}×**).\n"
    )
    atomic.write_text(args.out / "train.md", table)
    print(table)


if __name__ == "__main__":
    main()
