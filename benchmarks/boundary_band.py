"""Where the pseudo-labels' object/background errors sit, and whether each image's own appearance fixes them.

    .venv/bin/python benchmarks/boundary_band.py --runs runs-cp/vm-s0 runs-cp/vm-s1 runs-cp/vm-s2

Issue 20 wants the object/background IoU of voc-mini's pseudo-labels from 62 to 70. This reads a finished run's
CRF pseudo-labels (``pseudo/labels``, as ``cpcx pseudo`` wrote them) against the masks and answers three things:

1. *Where the wrong pixels are*: each pixel called object that is background, by its distance to the true object,
   and each object pixel called background, by its distance to the predicted object, in grid patches (an image's
   longer side / 24), by scene (one object class or several).
2. *What a perfect call near the boundary is worth* (the band oracle): within ``band`` patches of the predicted
   object/background boundary, object vs background comes from the mask; a pixel that becomes object takes the
   class of the nearest predicted object pixel, as the refiners below must. Anything farther stays as it is.
3. *Whether the image itself can make that call*, with the refiners that re-decide that band only:
   ``grabcut`` (OpenCV's GrabCut: one colour model of the object and one of the background per image, seeded by
   the label-conditioned maps: their confident object and background are fixed, the rest starts from the CRF
   labels) and ``ridge`` (a ridge classifier per image on EfficientNet-Lite0's stride 4, 8 and 16 maps at the
   image's own resolution, fitted on the pixels outside the band, deciding the pixels inside it).

The refiners' settings (``GRABCUT``, ``RIDGE``) were picked on seed 0's choose ids (the first 200; the ridge's on the
first 40 of them) among a few (GrabCut: confident object 0.9 / 0.97, confident background 0.9 / 0.97, prior from the
maps or the CRF; ridge: band 0.5 / 1 patch, alone or averaged with the CRF labels) and are reported on the choose and
report ids of every run.
Results: ``benchmarks/results/boundary-band.{json,md}``. About 4 min a run on one core (the network pass of the
maps, then 0.6 s an image).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Distance buckets (grid patches) of the error split; the last is "farther".
EDGES = (0.5, 1.0, 2.0, 4.0)
#: Bands (grid patches) of the band oracle.
BANDS = (0.5, 1.0)
#: GrabCut: maps' object share above ``sure_object`` is fixed object, below 1 - ``sure_background`` fixed
#: background; the CRF labels give the probable rest; ``iterations`` of OpenCV's EM.
GRABCUT = {"sure_object": 0.9, "sure_background": 0.97, "iterations": 3}
#: Ridge per image: the band it re-decides (patches) and its ridge penalty.
RIDGE = {"band": 0.5, "lam": 10.0}
PARTS = ("all", "choose", "report", "single", "multi")


def boundary_distance(objects):
    """(H, W) distance in pixels of every pixel to the other side of the object/background boundary of the bool
    map ``objects`` (infinite where the map is all object or all background)."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    if objects.all() or not objects.any():
        return np.full(objects.shape, np.inf)
    return distance_transform_edt(objects) + distance_transform_edt(~objects)


def nearest_object_class(labels):
    """(H, W) the class of the nearest object pixel of the label map (0 everywhere if it has none)."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    objects = labels > 0
    if not objects.any():
        return np.zeros_like(labels)
    _, (rows, cols) = distance_transform_edt(~objects, return_indices=True)
    return labels[rows, cols]


class Geometry(NamedTuple):
    """What the band functions read of a label map: each pixel's distance to its boundary (``boundary_distance``)
    and the class of its nearest object pixel (``nearest_object_class``). Two distance transforms of the image,
    about 50 ms at 500 × 375: ``_image`` computes them once for all its decodings."""

    distance: Any
    nearest: Any


def geometry_of(labels) -> Geometry:
    return Geometry(boundary_distance(labels > 0), nearest_object_class(labels))


def error_split(mask, labels, patch: float, edges=EDGES):
    """Pixel counts of the object/background errors by distance (patches of ``patch`` px): false object (predicted
    object, true background) by its distance to the true object; missed object by its distance to the predicted
    object; plus the pixels that are object in both. Ignored pixels (255) are left out."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    valid = mask != 255
    truth, predicted = (mask > 0) & valid, (labels > 0) & valid
    bins = (0.0, *edges, np.inf)
    far_truth = distance_transform_edt(~truth) / patch if truth.any() else np.full(mask.shape, np.inf)
    far_predicted = distance_transform_edt(~predicted) / patch if predicted.any() else np.full(mask.shape, np.inf)
    false_object = np.histogram(far_truth[predicted & ~truth], bins)[0]
    missed = np.histogram(far_predicted[truth & ~predicted], bins)[0]
    return {"false_object": false_object, "missed": missed, "both": int((truth & predicted).sum())}


def band_oracle(mask, labels, band_px: float, geometry: Geometry | None = None):
    """The label map with object vs background taken from ``mask`` within ``band_px`` of its own boundary; pixels
    that become object take the nearest predicted object's class; ignored pixels and the rest are unchanged.
    ``geometry``: the labels' ``geometry_of``, when the caller has it."""
    geometry = geometry or geometry_of(labels)
    objects = labels > 0
    band = (geometry.distance <= band_px) & (mask != 255)
    out = labels.copy()
    out[band & (mask == 0)] = 0
    grow = band & (mask > 0) & ~objects
    out[grow] = geometry.nearest[grow]
    return out


def grabcut_band(image, labels, object_prob, sure_object: float, sure_background: float, iterations: int,
                 geometry: Geometry | None = None):
    """GrabCut over the image seeded by the maps' object probability ``object_prob`` (H, W): fixed object above
    ``sure_object``, fixed background below ``1 - sure_background``, the CRF ``labels`` the probable rest. Pixels
    that become object take the nearest labelled object's class."""
    import cv2
    import numpy as np

    objects = labels > 0
    seeds = np.where(objects, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[object_prob > sure_object] = cv2.GC_FGD
    seeds[object_prob < 1 - sure_background] = cv2.GC_BGD
    fore = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if fore.all() or not fore.any():  # one side only: GrabCut has no second model to fit
        return labels
    background, foreground = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seeds, None, background, foreground, iterations,
                cv2.GC_INIT_WITH_MASK)
    refined = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    nearest = (geometry or geometry_of(labels)).nearest
    return np.where(refined, np.where(objects, labels, nearest), 0).astype(labels.dtype)


def ridge_band(features, grid, labels, band_px: float, lam: float, geometry: Geometry | None = None):
    """Object vs background re-decided within ``band_px`` of the labels' boundary by a ridge classifier fitted on
    this image's pixels outside the band. ``features`` (h·w, d) standardised, sampled at stride 4 (``grid`` =
    (h, w)); the label map is read at the same points and the score upsampled back to it."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    geometry = geometry or geometry_of(labels)
    objects, distance = labels > 0, geometry.distance
    h, w = grid
    rows = np.minimum(np.arange(h) * 4 + 2, labels.shape[0] - 1)
    cols = np.minimum(np.arange(w) * 4 + 2, labels.shape[1] - 1)
    target = objects[np.ix_(rows, cols)].reshape(-1)
    outside = distance[np.ix_(rows, cols)].reshape(-1) > band_px
    if not outside.any() or target[outside].all() or not target[outside].any():
        return labels
    x = np.c_[features, np.ones(len(features))]
    fit = x[outside]
    weights = np.linalg.solve(fit.T @ fit + lam * np.eye(x.shape[1]), fit.T @ target[outside].astype(np.float64))
    score = torch.from_numpy((x @ weights).reshape(1, 1, h, w)).float()
    score = F.interpolate(score, labels.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    refined = np.where(distance <= band_px, score > 0.5, objects)
    return np.where(refined, np.where(objects, labels, geometry.nearest), 0).astype(labels.dtype)


class FineFeatures:
    """EfficientNet-Lite0's stride 4, 8 and 16 maps of an image at its own size, stacked at stride 4 and
    standardised per channel: (h·w, 176), (h, w)."""

    def __init__(self, weights: Path):
        import torch

        from imagenet_objectness import imagenet_classifier

        self.net = imagenet_classifier("lite0", weights)
        cfg = self.net.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def __call__(self, image):
        import torch
        import torch.nn.functional as F

        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - self.mean) / self.std
        maps = []
        with torch.inference_mode():
            x = self.net.bn1(self.net.conv_stem(x))
            for k, block in enumerate(self.net.blocks):
                x = block(x)
                if k in (1, 2, 4):  # strides 4, 8, 16
                    maps.append(x)
        size = maps[0].shape[-2:]
        stacked = torch.cat([maps[0]] + [F.interpolate(m, size, mode="bilinear", align_corners=False)
                                         for m in maps[1:]], 1)[0]
        flat = stacked.reshape(stacked.shape[0], -1).T.numpy()
        return (flat - flat.mean(0)) / (flat.std(0) + 1e-5), tuple(size)


_STATE: dict = {}  # per worker process: the data set, maps and feature network (set by _init)


def _init(run: Path, maps, weights: Path) -> None:
    import torch

    from cpcx.data import build_dataset
    from cpcx.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(run / "pseudo" / "recipe.resolved.yaml", [])
    _STATE.update(run=run, maps=maps, features=FineFeatures(weights),
                  dataset=build_dataset(recipe.dataset, recipe.pseudo.split))


def _image(i: int):
    """One image: its mask, the run's labels and every decoding of them, and its error split."""
    import numpy as np

    from cpcx.data.palette import load_label_png
    from cpcx.pseudo.infer import upsample

    dataset, maps = _STATE["dataset"], _STATE["maps"]
    mask, image = dataset.load_mask(i), np.asarray(dataset.load_image(i))
    labels = load_label_png(_STATE["run"] / "pseudo" / "labels" / f"{dataset.ids[i]}.png")
    classes = np.flatnonzero(dataset.labels[i] > 0)
    patch = max(mask.shape) / 24
    object_prob = 1 - upsample(maps[i].float(), classes, mask.shape).numpy()[0]
    features, grid = _STATE["features"](image)
    geometry = geometry_of(labels)
    decoded = {"as shipped": labels,
               **{f"band oracle {b:g}": band_oracle(mask, labels, b * patch, geometry) for b in BANDS},
               "grabcut": grabcut_band(image, labels, object_prob, **GRABCUT, geometry=geometry),
               "ridge": ridge_band(features, grid, labels, RIDGE["band"] * patch, RIDGE["lam"], geometry)}
    return i, mask, decoded, error_split(mask, labels, patch)


def score_run(run: Path, workers: int, weights: Path, limit: int | None = None) -> dict:
    """Every decoding of one run by part, and its error split by scene (percent of the object/background union)."""
    from multiprocessing import get_context

    from cpcx.metrics import ConfusionMatrix
    from cpcx.recipe import load_recipe
    from backbones import CHOOSE
    from diagnose_pseudo import decode_as_pseudo, load_paste_probs, load_run, miou_and_fg, scene_of

    start = time.perf_counter()
    recipe = load_recipe(run / "pseudo" / "recipe.resolved.yaml", [])
    dataset, probs, feats = load_run(recipe)
    maps = decode_as_pseudo(probs, feats, dataset.labels, recipe, load_paste_probs(recipe))
    scenes = scene_of(dataset.labels)
    confusions: dict = {}
    split = {s: {"false_object": 0, "missed": 0, "both": 0} for s in ("single", "multi")}
    with get_context("fork").Pool(workers, _init, (run, maps, weights)) as pool:
        for i, mask, decoded, errors in pool.imap_unordered(_image, range(min(limit or len(dataset), len(dataset)))):
            for name, labels in decoded.items():
                for part in ("all", "choose" if i < CHOOSE else "report", str(scenes[i])):
                    confusions.setdefault(name, {}).setdefault(part, ConfusionMatrix(dataset.num_classes))
                    confusions[name][part].update(mask, labels)
            for key, value in errors.items():
                split[str(scenes[i])][key] = split[str(scenes[i])][key] + value
    errors = {}
    for scene, counts in split.items():
        union = counts["both"] + counts["false_object"].sum() + counts["missed"].sum()
        errors[scene] = {"fg_iou": round(100 * counts["both"] / union, 1),
                         "false_object": [round(100 * v / union, 1) for v in counts["false_object"]],
                         "missed": [round(100 * v / union, 1) for v in counts["missed"]]}
    scores = {name: {p: miou_and_fg(m.matrix, dataset.classes) for p, m in parts.items()}
              for name, parts in confusions.items()}
    return {"scores": scores, "errors": errors, "seconds": round(time.perf_counter() - start)}


def render(doc: dict) -> str:
    import numpy as np

    runs = list(doc["runs"].values())
    names = list(runs[0]["scores"])
    lines = ["# Where the object/background errors are, and the image's own appearance as a fix (issue 20)", "",
             f"`.venv/bin/python {doc['command']}`", "",
             "CRF pseudo-labels as the runs wrote them, against the masks. Error split: percent of the "
             "object/background union of each scene, by distance in grid patches (an image's longer side / 24): "
             "false object by its distance to the true object, missed object by its distance to the predicted one. "
             "Mean over the runs.", "",
             "| scene | object/bg IoU | false object ≤ 0.5 / 1 / 2 / 4 / farther | missed ≤ 0.5 / 1 / 2 / 4 / farther |",
             "|---|---:|---:|---:|"]
    for scene in ("single", "multi"):
        rows = [r["errors"][scene] for r in runs]
        cell = lambda key: " / ".join(f"{v:.1f}" for v in np.mean([r[key] for r in rows], 0))  # noqa: E731
        lines.append(f"| {scene}-class | {np.mean([r['fg_iou'] for r in rows]):.1f} | {cell('false_object')} | "
                     f"{cell('missed')} |")
    lines += ["", "mIoU (object/background IoU), mean over the runs ± std of the mIoU; choose = the first 200 ids, "
              "report = the others. The band oracles take object vs background from the mask within 0.5 or 1 "
              "patch of the predicted boundary (an upper bound for any band refiner); `grabcut` and `ridge` are "
              f"the refiners of the module docstring (GrabCut {GRABCUT}; ridge {RIDGE}).", "",
              "| decoding | " + " | ".join(PARTS) + " |", "|---|" + "---:|" * len(PARTS)]
    for name in names:
        cells = []
        for part in PARTS:
            vals = [r["scores"][name][part] for r in runs if part in r["scores"][name]]
            if not vals:
                cells.append("—")
                continue
            miou = [v["miou"] for v in vals]
            cells.append(f"{np.mean(miou):.1f} ± {np.std(miou):.1f} ({np.mean([v['fg_iou'] for v in vals]):.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per run, all ids: " + "; ".join(
        f"{run}: " + ", ".join(f"{n} {r['scores'][n]['all']['miou']:.1f}" for n in names) + f" ({r['seconds']} s)"
        for run, r in doc["runs"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished runs (cpcx pseudo done)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "efficientnet_lite0.safetensors")
    parser.add_argument("--limit", type=int, help="the first N images only (a quick check)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "boundary-band")
    args = parser.parse_args(argv)

    import torch

    from results_exec import command_line, write_report

    torch.set_num_threads(1)
    doc = {"command": command_line(__file__, argv),
           "runs": {str(run): score_run(run, args.workers, args.weights, args.limit) for run in args.runs}}
    print(write_report(doc, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
