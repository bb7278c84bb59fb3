"""How much of each image is object? The number the pseudo-labels lack, estimated without masks (issue 20, 8j).

    .venv/bin/python benchmarks/area_estimates.py --runs runs-cp/cp-s0 runs-cp/cp-s1 runs-cp/cp-s2

``diagnose_pseudo.py``'s area oracle shows that the maps rank the patches of a multi-class image well and get their
*amount* wrong: with each image's object share taken from its mask (the background scaled until that share of the
patches is called object) voc-mini's pseudo-labels rise from 55.7 to 60.9 with the CRF, and the object/background
IoU from 62.5 to 70.0. This script asks whether anything available without masks knows that share better than the
maps do. Each estimate replaces the truth in the same decoding of the multi-class images (``area_scaled_maps``):

* ``maps``: the share of the patches the maps themselves call object (what the pseudo-labels already use);
* ``tokens``: a ridge regression (lambda 10, standardised features) from each image's mean token (both views) to
  the object share of its CRF pseudo-label, fitted on the single-class images, whose labels get the area right
  (mean absolute error 0.07 there), and applied to the others;
* ``saliency``: the share of the image that img-focus's saliency decoder (``saliency_objectness.py``) puts above
  0.5, on the cached ViT tokens;
* ``head``: the grid segmenter's DeepLabV3 head trained on the single-class images' CRF pseudo-labels (as
  ``pseudo.self_training`` trains its heads: 16 epochs), its share of the patches called object over the image's
  classes;
* ``truth``: the oracle.

Each run is one made with ``pseudo.context_paste`` (its multi-class images decoded by its pasted network, as the
stage does). Reported on the multi-class images, choose (the first 200 ids) and report apart: the estimate's mean
absolute error, and the pseudo-labels' mIoU and object/background IoU without and with the recipe's CRF. The lambda
was picked among 10 / 100 / 1000 on seed 0's choose ids; nothing else was chosen. Results: ``--out`` (json, md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
ESTIMATES = ("maps", "tokens", "saliency", "head", "truth")
RIDGE_LAMBDA = 10.0
BUCKETS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.01)  # of the truth's object share


def ridge_shares(pooled, targets, train, lam: float = RIDGE_LAMBDA):
    """(N,) ridge-regression predictions of every row of ``pooled`` (N, e), fitted on the rows ``train`` (N,) bool
    against ``targets``; the features standardised on those rows, an unpenalised intercept; clipped to [0, 1]."""
    import numpy as np

    mean, std = pooled[train].mean(0), pooled[train].std(0) + 1e-6
    x = (pooled - mean) / std
    a = x[train]
    weights = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (targets[train] - targets[train].mean()))
    return np.clip(x @ weights + targets[train].mean(), 0.0, 1.0)


def head_shares(tokens, views, label_of, n: int, train, labels, cfg, seed: int, folder: Path):
    """(N,) share of the patches a grid head trained on the images ``train`` (their labels ``label_of(i)``) calls
    object among each image's labelled classes, both views undone and averaged."""
    import numpy as np
    import torch

    from cpcx.pseudo.self_training import VIEWS, fit_head, predict_views
    from cpcx.segment.grid_train import LABEL_UPSAMPLE, label_grids

    targets = label_grids(label_of, n, LABEL_UPSAMPLE * tokens.shape[2], list(VIEWS), folder)
    head = fit_head(tokens, views, targets, torch.from_numpy(np.flatnonzero(train)), cfg, labels.shape[1], seed)
    out = np.zeros(n)
    for i in range(n):
        probs = predict_views(head, tokens, i, views) * torch.tensor(labels[i], dtype=torch.float32)[:, None, None]
        out[i] = float((probs[0] < probs[1:].amax(0)).float().mean())
    return out


def estimate_run(run: Path, crf: bool) -> dict:
    """Every estimate of one run's images and what each gives its multi-class images (module docstring)."""
    import numpy as np

    from cpcx.data.palette import load_label_png
    from cpcx.model import load_checkpoint
    from cpcx.pseudo import find_checkpoint
    from cpcx.recipe import load_recipe
    from backbones import CHOOSE
    from diagnose_pseudo import (Scorer, area_scaled_maps, decode_as_pseudo, load_paste_probs, load_run,
                                 miou_and_fg, own_shares, run_token_cache, scene_of, object_area_shares, with_crf)
    from saliency_objectness import decoder_maps, onnx_path, saliency_decoder

    start = time.perf_counter()
    recipe = load_recipe(run / "pseudo" / "recipe.resolved.yaml", [])
    dataset, probs, feats = load_run(recipe)
    maps = decode_as_pseudo(probs, feats, dataset.labels, recipe, load_paste_probs(recipe))
    scorer = Scorer(dataset)
    labels_dir, n = run / "pseudo" / "labels", len(dataset)
    multi = scene_of(dataset.labels) == "multi"
    single = ~multi
    label_areas = object_area_shares([load_label_png(labels_dir / f"{i}.png") for i in dataset.ids])  # pseudo-labels
    net, _ = load_checkpoint(find_checkpoint(recipe))
    cache = run_token_cache(recipe, net, dataset, recipe.pseudo.img_size)
    tokens = cache.tokens
    pooled = np.stack([np.asarray(tokens[i])[cache.views].astype(np.float32).mean((0, 1, 2)) for i in range(n)])
    saliency = decoder_maps(np.asarray(tokens[:])[:, cache.views], saliency_decoder(onnx_path()))
    shares = {
        "maps": own_shares(maps),
        "tokens": ridge_shares(pooled, label_areas, single),
        "saliency": (saliency > 0.5).mean((1, 2)),
        "head": head_shares(tokens, cache.views, lambda i: load_label_png(labels_dir / f"{dataset.ids[i]}.png"), n,
                            single, np.asarray(dataset.labels), recipe.pseudo.self_training, recipe.seed, run / "pseudo"),
        "truth": object_area_shares(scorer.masks),
    }
    choose = np.arange(n) < CHOOSE
    parts = {"choose": multi & choose, "report": multi & ~choose}
    decoded = {name: area_scaled_maps(maps, s, multi) if name != "maps" else maps for name, s in shares.items()}
    entry: dict = {}
    for name, s in shares.items():
        row = {"mae": {p: float(np.abs(s[w] - shares["truth"][w]).mean()) for p, w in parts.items()},
               "no_crf": {p: miou_and_fg(scorer.confusion(decoded[name], w), dataset.classes) for p, w in parts.items()}}
        entry[name] = row
    if crf:
        scored = with_crf(dataset, recipe, decoded, np.flatnonzero(multi))
        for name in shares:
            entry[name]["crf"] = {p: scored[name][p] for p in ("choose", "report", "multi")}
    return {"estimates": entry, "multi": np.flatnonzero(multi).tolist(),
            "shares": {name: [round(float(v), 4) for v in s] for name, s in shares.items()},
            "seconds": round(time.perf_counter() - start)}


def buckets(doc: dict, edges=BUCKETS) -> list[dict]:
    """The maps' own area against the truth's on the multi-class images of every run, by the truth's share."""
    import numpy as np

    own, truth = (np.concatenate([np.asarray(r["shares"][k])[r["multi"]] for r in doc["runs"].values()])
                  for k in ("maps", "truth"))
    out = []
    for low, high in zip(edges[:-1], edges[1:]):
        within = (truth >= low) & (truth < high)
        if within.any():
            out.append({"truth_from": low, "truth_to": high, "images": int(within.sum()),
                        "truth": float(truth[within].mean()), "maps": float(own[within].mean())})
    return out


def render(doc: dict) -> str:
    import numpy as np

    titles = {"maps": "the maps' own area (as shipped)", "tokens": "ridge on the mean token (single-class fit)",
              "saliency": "img-focus saliency > 0.5", "head": "grid head trained on the single-class images",
              "truth": "the truth (oracle)"}
    lines = ["# The object's area of each multi-class image, estimated without masks (issue 20)", "",
             f"`.venv/bin/python {doc['command']}`", "",
             "Multi-class images only, their background scaled to each estimate (`area_scaled_maps`); mean absolute "
             "error of the estimated share, then mIoU (object/background IoU) without and with the CRF; choose = "
             "the first 200 ids, report = the others. Mean over the runs (each run's figures in the json).", "",
             "| area from | error choose / report | no CRF choose | no CRF report | CRF choose | CRF report |",
             "|---|---:|---:|---:|---:|---:|"]
    runs = list(doc["runs"].values())
    for name in ESTIMATES:
        rows = [r["estimates"][name] for r in runs]

        def cell(kind, part):
            if any(kind not in r for r in rows):
                return "—"
            return (f"{np.mean([r[kind][part]['miou'] for r in rows]):.1f} "
                    f"({np.mean([r[kind][part]['fg_iou'] for r in rows]):.1f})")

        mae = " / ".join(f"{np.mean([r['mae'][p] for r in rows]):.3f}" for p in ("choose", "report"))
        lines.append(f"| {titles[name]} | {mae} | {cell('no_crf', 'choose')} | {cell('no_crf', 'report')} | "
                     f"{cell('crf', 'choose')} | {cell('crf', 'report')} |")
    lines += ["", "The maps' own area against the truth's, multi-class images of all runs, by the truth's share:", "",
              "| truth's share | images | truth, mean | maps, mean |", "|---|---:|---:|---:|"]
    lines += [f"| {b['truth_from']:.2f}–{min(b['truth_to'], 1):.2f} | {b['images']} | {b['truth']:.2f} | {b['maps']:.2f} |"
              for b in buckets(doc)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="runs made with pseudo.context_paste")
    parser.add_argument("--no-crf", action="store_true", help="skip the CRF scoring (minutes per run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "area-estimates")
    args = parser.parse_args(argv)

    import torch

    from results_exec import command_line, write_report

    torch.set_num_threads(1)
    doc = {"command": command_line(__file__, argv),
           "runs": {str(run): estimate_run(run, not args.no_crf) for run in args.runs}}
    print(write_report(doc, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
