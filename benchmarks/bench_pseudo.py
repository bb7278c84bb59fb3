"""Speed of the pseudo-label stage on the VOC slice: images/s with 1 and 2 CRF workers, and CRF ms/image.

    .venv/bin/python benchmarks/bench_pseudo.py                      # 64 train images, tiny network
    .venv/bin/python benchmarks/bench_pseudo.py --limit 311 --checkpoint runs/voc-mini/train/weights/best.pt

Without ``--checkpoint`` the network is timm's ``test_vit`` (untrained): it costs almost nothing, as a
ViT-B does on a GPU, so the numbers measure what the worker pool is for, overlapping the CRFs with each
other and with the network. Each setting labels the same images into a fresh folder (the pool start-up
is included). Results go to ``benchmarks/results/pseudo.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

# Set before numpy/torch load: the parent's network gets one thread, like each CRF worker.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def _setup(args):
    import numpy as np
    import torch

    from cpcx.data import build_dataset
    from cpcx.model import build_model, cluster_vectors, load_checkpoint
    from cpcx.pseudo.infer import PatchPredictor
    from cpcx.recipe import ModelConfig, VOCDatasetConfig

    cfg = VOCDatasetConfig(root=args.voc, limit=args.limit)
    dataset = build_dataset(cfg, "train")
    if args.checkpoint:
        net, meta = load_checkpoint(args.checkpoint)
        u = cluster_vectors(dataset.labels, meta.get("cluster_matrix")) if meta.get("num_clusters") else None
        network = f"{meta['model_cfg']['backbone']} ({args.checkpoint})"
    else:
        torch.manual_seed(0)
        model_cfg = ModelConfig(backbone="test_vit", pretrained=False, cluster_dim=8, lstm_hidden=8)
        net = build_model(model_cfg, dataset.num_classes, 2, load_weights=False)
        u = cluster_vectors(dataset.labels, np.eye(20, 2))
        network = "test_vit (untrained, tiny)"
    predictor = PatchPredictor(net, torch.device("cpu"), "fp32", args.img_size, flip=True, class_max_norm=True)
    return dataset, predictor, u, network


def _label(dataset, predictor, u, workers: int, batch_size: int, folder: Path) -> tuple[float, float, float]:
    """Wall seconds, and CPU seconds of this process and of the (finished) worker processes."""
    import resource

    from cpcx.crf import CRFParams
    from cpcx.pseudo import label_images

    labels_dir = folder / f"labels-w{workers}"
    labels_dir.mkdir(parents=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, cpu = time.perf_counter(), time.process_time()
    label_images(predictor, dataset, list(range(len(dataset))), u, labels_dir, CRFParams(), workers, batch_size, None)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool has shut down: its workers are reaped
    worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    assert len(list(labels_dir.glob("*.png"))) == len(dataset)
    return seconds, cpu, worker_cpu


def _crf_ms(dataset, predictor, u, count: int) -> dict:
    """CRF alone, in this process, on the network's label-conditioned probabilities at full image size."""
    import numpy as np

    from cpcx.crf import CRFParams, crf_labels
    from cpcx.pseudo.infer import upsample

    times, sizes, classes_n = [], [], []
    for i in range(min(count, len(dataset))):
        image = dataset.load_image(i)
        classes = np.flatnonzero(dataset.labels[i] > 0).astype(np.uint8)
        probs = predictor([image], dataset.labels[i:i + 1], None if u is None else u[i:i + 1])
        full = upsample(probs[0], classes, image.shape[:2]).numpy()
        start = time.perf_counter()
        crf_labels(image, full, classes, CRFParams())
        times.append(1000 * (time.perf_counter() - start))
        sizes.append(image.shape[0] * image.shape[1])
        classes_n.append(len(classes))
    return {"images": len(times), "mean_ms": float(np.mean(times)), "median_ms": float(np.median(times)),
            "mean_megapixels": float(np.mean(sizes)) / 1e6, "mean_classes": float(np.mean(classes_n))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path,
                        default=Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data")) / "voc2012-mini" / "VOC2012")
    parser.add_argument("--limit", type=int, default=64, help="train images to label (the slice has 311)")
    parser.add_argument("--workers", default="1,2", help="comma-separated CRF worker counts")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=384, help="network input size (pseudo.img_size)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained weights/*.pt (default: tiny net)")
    parser.add_argument("--crf-images", type=int, default=16, help="images for the CRF ms/image measurement")
    parser.add_argument("--repeat", type=int, default=2, help="repeats per setting (the fastest counts)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-pseudo-") as tmp:
        dataset, predictor, u, network = _setup(args)
        crf = _crf_ms(dataset, predictor, u, args.crf_images)
        print(f"CRF: {crf['mean_ms']:.0f} ms/image (median {crf['median_ms']:.0f}) at {crf['mean_megapixels']:.3f} MP, "
              f"{crf['mean_classes']:.1f} classes/image")
        # Settings alternate and each keeps its fastest repeat: a neighbour process that steals a core for a
        # while (a shared machine) then slows one repeat, not one setting.
        counts = [int(w) for w in args.workers.split(",")]
        times: dict[int, list[float]] = {w: [] for w in counts}
        main_cpu, worker_cpu = [], []
        for repeat in range(args.repeat):
            for workers in counts:
                folder = Path(tmp) / f"r{repeat}"
                seconds, cpu, children = _label(dataset, predictor, u, workers, args.batch_size, folder)
                times[workers].append(seconds)
                main_cpu.append(cpu / len(dataset))
                worker_cpu.append(children / len(dataset))
                print(f"workers={workers}: {len(dataset)} images in {seconds:.1f} s "
                      f"= {len(dataset) / seconds:.2f} images/s")
        runs = [{"workers": w, "seconds": min(times[w]), "all_seconds": times[w],
                 "images_per_s": len(dataset) / min(times[w])} for w in counts]
    # What 2 free cores would give: 1 worker is bound by max(network, CRF) per image, 2 workers by
    # max(network, (network + CRF) / 2): the main process's share is what keeps 2 workers below 2×.
    main_ms, crf_ms = 1000 * min(main_cpu), 1000 * min(worker_cpu)
    ideal = max(main_ms, crf_ms) / max(main_ms, (main_ms + crf_ms) / 2)
    cpu = {"main_ms_per_image": main_ms, "workers_ms_per_image": crf_ms, "ideal_2_core_speedup": ideal}
    print(f"CPU per image: main process {main_ms:.0f} ms, CRF workers {crf_ms:.0f} ms → "
          f"{ideal:.2f}× on 2 otherwise idle cores")
    base = runs[0]["images_per_s"]
    for run in runs:
        run["speedup"] = run["images_per_s"] / base
    result = {
        "benchmark": "pseudo", "images": len(dataset), "img_size": predictor.size, "flip": True,
        "network": network, "batch_size": args.batch_size, "crf": crf, "runs": runs, "cpu": cpu,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": list(os.getloadavg())},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    from cpcx import atomic

    atomic.write_json(args.out / "pseudo.json", result)
    lines = [
        f"# pseudo stage speed ({len(dataset)} VOC-slice train images, {network}, input {predictor.size}², flip)",
        "", "| CRF workers | seconds (best of repeats) | images/s | speed-up |", "|---:|---:|---:|---:|",
        *[f"| {r['workers']} | {r['seconds']:.1f} ({', '.join(f'{t:.1f}' for t in r['all_seconds'])}) | "
          f"{r['images_per_s']:.2f} | {r['speedup']:.2f}× |" for r in runs],
        "", f"CRF alone: {crf['mean_ms']:.0f} ms/image mean, {crf['median_ms']:.0f} median "
        f"({crf['images']} images, {crf['mean_megapixels']:.3f} MP, {crf['mean_classes']:.1f} classes each; "
        "10 iterations, ViT-PCM kernels, one thread).",
        f"CPU time per image: main process (loading, network, upsampling, hand-off) {main_ms:.0f} ms, CRF workers "
        f"{crf_ms:.0f} ms, so 2 workers on 2 otherwise idle cores can reach {ideal:.2f}×.",
        f"Machine: {os.cpu_count()} CPUs; 1-min load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other processes on the machine slow the 2-worker run most).", "",
    ]
    atomic.write_text(args.out / "pseudo.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
