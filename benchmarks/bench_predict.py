"""Speed of `cpcx predict` on the VOC slice's val images: images/s per test-time setting, outputs included.

    .venv/bin/python benchmarks/bench_predict.py                              # 32 val images, smoke segmenter
    .venv/bin/python benchmarks/bench_predict.py --weights runs/voc-mini/segment/weights/best.pt --limit 172
    .venv/bin/python benchmarks/bench_predict.py --weights runs-bench/seg-grid-pseudo-s0/segment/weights/best.pt \
        --name predict-grid                                                     # the grid segmenter voc-mini ships
    .venv/bin/python benchmarks/bench_predict.py --weights runs-cp/vm-s0/segment/weights/best.pt \
        --isnet weights/isnet.onnx --only "1 scale (" "1 scale + segment.saliency" --name predict-grid-saliency

Without ``--weights`` the smoke recipe's segmenter (EfficientNet-Lite0 DeepLabV3+, the network voc-mini ships)
is trained for its one epoch on 16 train images, their ground-truth masks standing in for pseudo-labels: the
speed does not depend on how well it is trained. Each setting runs the whole command path (`run_predict`:
decode, network, CRF, label PNG, overlay with legend, probabilities when asked) into a fresh folder; the
model load is outside the timing. Results go to ``benchmarks/results/predict.{json,md}``.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

# Set before numpy/torch load: one thread, as the other speed benchmarks on this shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"

#: (name, recipe overrides, --probs)
SETTINGS = [
    ("1 scale (voc-mini, smoke)", ["segment.scales=[1.0]", "segment.flip=false", "segment.crf=false"], False),
    ("1 scale + --probs", ["segment.scales=[1.0]", "segment.flip=false", "segment.crf=false"], True),
    ("1 scale + flip", ["segment.scales=[1.0]", "segment.flip=true", "segment.crf=false"], False),
    ("3 scales (0.75, 1, 1.25) + flip", ["segment.scales=[0.75,1.0,1.25]", "segment.flip=true", "segment.crf=false"],
     False),
    ("1 scale + CRF (10 iterations)", ["segment.scales=[1.0]", "segment.flip=false", "segment.crf=true",
                                       "crf.iterations=10"], False),
]


def _train_smoke(voc: Path, runs_dir: Path) -> Path:
    from rich.console import Console

    from cpcx.data import build_dataset, save_label_png
    from cpcx.recipe import load_recipe
    from cpcx.segment import run_segment

    recipe = load_recipe(SMOKE, [f"runs_dir={runs_dir}", f"dataset.root={voc}"])
    train = build_dataset(recipe.dataset, "train")
    for i, image_id in enumerate(train.ids):
        save_label_png(recipe.run_dir("pseudo") / "labels" / f"{image_id}.png", train.load_mask(i))
    run_segment(recipe, console=Console(file=io.StringIO()))
    return recipe.run_dir("segment") / "weights" / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path,
                        default=Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data")) / "voc2012-mini" / "VOC2012")
    parser.add_argument("--limit", type=int, default=32, help="val images to predict (the slice has 172)")
    parser.add_argument("--weights", type=Path, default=None, help="a segment weights/*.pt (default: train smoke's)")
    parser.add_argument("--repeat", type=int, default=2, help="repeats per setting (the fastest counts)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="predict", help="results file stem (predict-grid for a grid segmenter)")
    parser.add_argument("--isnet", type=Path, default=None,
                        help="add a row with segment.saliency on, this network (make weights-saliency)")
    parser.add_argument("--only", nargs="+", default=None, help="run only the settings whose name starts so")
    args = parser.parse_args()
    if args.isnet is not None and not args.isnet.is_file():
        parser.error(f"--isnet {args.isnet}: no such file; build it with `make weights-saliency`")

    import numpy as np
    import torch
    from rich.console import Console

    from cpcx import atomic
    from cpcx.data import build_dataset
    from cpcx.predict import run_predict
    from cpcx.recipe import VOCDatasetConfig, load_recipe

    load_before = list(os.getloadavg())
    val = build_dataset(VOCDatasetConfig(root=args.voc, limit=args.limit), "val")
    inputs = [str(val.image_path(i)) for i in range(len(val))]
    megapixels = float(np.mean([np.prod(val.load_image(i).shape[:2]) for i in range(len(val))])) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        weights = args.weights or _train_smoke(args.voc, Path(tmp) / "runs")
        network = f"smoke segmenter ({weights.name}, trained here)" if args.weights is None else str(args.weights)
        from cpcx.segment.networks import load_segnet

        _, meta = load_segnet(weights)
        arch = f"{meta['arch']} · {meta['encoder']}"
        # A grid segmenter reads every image at its model.img_size: test-time scales do not apply to it.
        rows = SETTINGS + ([("1 scale + segment.saliency (ISNet at 1024²)",
                             ["segment.scales=[1.0]", "segment.flip=false", "segment.crf=false",
                              "segment.saliency.enabled=true", f"segment.saliency.weights={args.isnet.resolve()}"],
                             False)] if args.isnet is not None else [])
        settings = [row for row in rows if (meta["encoder"] != "grid" or "segment.scales=[1.0]" in row[1])
                    and (args.only is None or any(row[0].startswith(prefix) for prefix in args.only))]
        times: dict[str, list[float]] = {name: [] for name, _, _ in settings}
        for repeat in range(args.repeat):
            # Settings alternate and each keeps its fastest repeat: a neighbour that steals a core for a while
            # then slows one repeat, not one setting.
            for name, overrides, probs in settings:
                recipe = load_recipe(SMOKE, [f"runs_dir={tmp}", "segment.device=cpu", *overrides], check_inputs=False)
                summary = run_predict(recipe, inputs, out=Path(tmp) / f"out-{repeat}-{len(times[name])}",
                                      probs=probs, weights=weights, console=Console(file=io.StringIO()))
                assert (summary.done, summary.failed) == (len(inputs), 0)
                times[name].append(summary.seconds)
                print(f"{name}: {len(inputs)} images in {summary.seconds:.1f} s = {summary.images_per_s:.2f} images/s")
    runs = [{"setting": name, "overrides": overrides, "probs": probs, "seconds": min(times[name]),
             "all_seconds": times[name], "images_per_s": len(inputs) / min(times[name])}
            for name, overrides, probs in settings]
    result = {
        "benchmark": "predict", "images": len(inputs), "mean_megapixels": megapixels, "network": network,
        "arch": arch, "torch_threads": torch.get_num_threads(), "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": list(os.getloadavg())},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic.write_json(args.out / f"{args.name}.json", result)
    lines = [
        f"# cpcx predict speed ({len(inputs)} VOC-slice val images, {megapixels:.3f} MP mean, {network}, "
        f"{arch}, CPU, {torch.get_num_threads()} torch thread(s))",
        "", "| setting | seconds (best of repeats) | images/s |", "|---|---:|---:|",
        *[f"| {r['setting']} | {r['seconds']:.1f} ({', '.join(f'{t:.1f}' for t in r['all_seconds'])}) | "
          f"{r['images_per_s']:.2f} |" for r in runs],
        "", "Each row is the whole `cpcx predict` path per image (decode, network, CRF when on, label PNG, overlay "
        "JPEG with legend, float16 probabilities with --probs), model load excluded.",
        f"Machine: {os.cpu_count()} CPUs; 1-min load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other processes on the machine slow every row).", "",
    ]
    atomic.write_text(args.out / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
