"""The weight of ``segment.saliency`` screened on finished runs' segmenters (docs/results.md 8o).

    .venv/bin/python benchmarks/segment_saliency.py --runs runs-bench/sw-saliency-s0 runs-bench/sw-saliency-s1 \\
        --weights 0 0.1 0.2 0.35 0.5

Each run's segmenter writes its val predictions as ``cpcx segment`` does (``infer.write_val_predictions``: a grid
segmenter from the cached tokens, an image one at the recipe's scales and flip; the CRF with ``segment.crf``), with
ISNet's foreground mixed in at each weight (``cpcx.saliency.mix_prediction``; 0 is the run as it is), into a
scratch folder. The labels are scored on the first half of the val ids (``choose``: where the weight may be picked)
and on the other half (``report``) apart. ISNet's maps of the val images are computed once into ``--maps``
(``segment.saliency``'s folder layout) and shared by every run over the same images.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_exec import command_line, mean_std, write_report  # noqa: E402

PARTS = ("all", "choose", "report")


def screen_run(run: Path, isnet: Path, weights: list[float], maps: Path, workers: int, size: int = 1024) -> dict:
    import numpy as np
    import torch
    from rich.console import Console

    from cpcx.crf import CRFParams
    from cpcx.data import build_dataset, load_label_png
    from cpcx.metrics import ConfusionMatrix
    from cpcx.recipe import load_recipe
    from cpcx.recipe_saliency import SegmentSaliencyConfig
    from cpcx.saliency import SaliencyMaps, mix_prediction, saliency_folder
    from cpcx.segment.infer import write_val_predictions
    from cpcx.segment.networks import load_segnet

    recipe = load_recipe(run / "segment" / "recipe.resolved.yaml", [])
    val = build_dataset(recipe.dataset, "val")
    checkpoint = run / "segment" / "weights" / "best.pt"
    model, meta = load_segnet(checkpoint if checkpoint.is_file() else checkpoint.with_name("last.pt"),
                              map_location="cpu")
    cfg = SegmentSaliencyConfig(enabled=True, weights=isnet, size=size, cache_dir=maps)
    saliency = SaliencyMaps(cfg, val, saliency_folder(cfg, maps, val), "segment.saliency", "--workers")
    saliency.ensure(range(len(val)), workers, Console())
    crf = CRFParams.from_config(recipe.crf) if recipe.segment.crf else None
    half, rows = len(val) // 2, {}
    for weight in weights:
        started = time.perf_counter()

        def mix(index, probs, weight=weight):
            return mix_prediction(probs, saliency.map(index, tuple(probs.shape[1:])), weight)

        with tempfile.TemporaryDirectory() as scratch:
            write_val_predictions(recipe, model, meta, val, Path(scratch), range(len(val)), torch.device("cpu"), crf,
                                  log=lambda text: None, mix=mix if weight > 0 else None)
            matrices = {p: ConfusionMatrix(val.num_classes) for p in PARTS}
            for i, image_id in enumerate(val.ids):
                labels, mask = load_label_png(Path(scratch) / f"{image_id}.png"), val.load_mask(i)
                for part in ("all", "choose" if i < half else "report"):
                    matrices[part].update(mask, labels)
        rows[f"{weight:g}"] = {p: round(100 * float(m.result().miou), 2) for p, m in matrices.items()}
        rows[f"{weight:g}"]["seconds"] = round(time.perf_counter() - started, 1)
        print(run.name, f"{weight:g}", rows[f"{weight:g}"], flush=True)
    return {"images": len(val), "choose": half, "crf": crf is not None, "rows": rows,
            "checkpoint_miou": round(100 * float(np.nan_to_num(meta.get("val_miou") or 0)), 2)}


def render(doc: dict) -> str:
    runs = doc["runs"]
    first = next(iter(runs.values()))
    lines = ["# segment.saliency's weight on finished segmenters (issue 20)", "",
             f"`.venv/bin/python {doc['command']}`",
             "", f"Val mIoU of each run's segmenter with ISNet's foreground mixed into its probabilities at each "
             f"weight: all {first['images']} val images, the first {first['choose']} ids (choose) and the other "
             f"{first['images'] - first['choose']} (report); mean ± std over the runs, then each run.", "",
             "| weight | all | choose | report | " + " | ".join(runs) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(runs)]
    for weight in first["rows"]:
        cells = [mean_std([r["rows"][weight][p] for r in runs.values()]) for p in PARTS]
        cells += [f"{r['rows'][weight]['all']:.1f}" for r in runs.values()]
        lines.append(f"| {weight} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="runs with a finished segment stage")
    parser.add_argument("--isnet", type=Path, default=ROOT / "weights" / "isnet.onnx", help="make weights-saliency")
    parser.add_argument("--size", type=int, default=1024, help="the network's input size (ISNet: 1024)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--maps", type=Path, default=ROOT / "runs-bench" / "saliency-voc", help="ISNet maps' cache_dir")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment-saliency")
    args = parser.parse_args(argv)
    if not all(0 <= w <= 1 for w in args.weights):
        parser.error("--weights lie in 0..1")
    if not args.isnet.is_file():
        parser.error(f"--isnet {args.isnet}: no such file; build it with `make weights-saliency`")
    for run in args.runs:
        if not (run / "segment" / "recipe.resolved.yaml").is_file():
            parser.error(f"--runs {run}: no finished segment stage (segment/recipe.resolved.yaml)")
    doc = {"runs": {str(run): screen_run(run, args.isnet, args.weights, args.maps, args.workers, args.size)
                    for run in args.runs},
           "command": command_line("benchmarks/segment_saliency.py", argv)}
    print(write_report(doc, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
