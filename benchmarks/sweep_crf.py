"""Which dense-CRF settings make the best pseudo-labels of a trained run? One network pass, many CRFs.

    .venv/bin/python benchmarks/sweep_crf.py -r recipes/voc-mini.yaml name=cpc-static-s0 runs_dir=runs-bench \
        seed=0 train.feature_cache_dir=runs-bench/features-voc          # row (f) seed 0 of docs/results.md

The label-conditioned probabilities are computed once, exactly as ``cpcx pseudo`` computes them (the
diagnosis script's loader: cached tokens, flip-averaged), upsampled to each image's size over its present
classes, and kept in memory (float16, ~1 MB per image). Each setting in ``SETTINGS`` then runs the CRF of
``cpcx.crf`` on every training image in ``--workers`` processes and is scored against the official masks
(mIoU and object-vs-background IoU). The first row is the recipe's own ``crf`` section, so its mIoU must equal
the run's "mIoU" of ``cpcx pseudo``. Settings differ from the recipe only in the fields they name.

Results go to ``benchmarks/results/crf.{json,md}`` (``--out``) after every setting; a re-run with the same
command skips the settings already there. About 1 min per setting for 311 images with 2 workers on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

#: (name, fields changed from the recipe's crf section, why this one). The kernels of the literature:
#: ViT-PCM/voc-mini (bilateral xy 67, rgb 3, w 4; Gaussian 1, 3), DeepLab v2 on VOC (121, 5, 4; 3, 3) and the
#: AffinityNet/IRN post-processing (80, 13, 10; 3, 3). The unary temperature decides how far the pairwise
#: terms may move a boundary of maps upsampled from a 24×24 grid: T > 1 lets them move it further.
_DEEPLAB = {"bi_xy": 121.0, "bi_rgb": 5.0, "bi_w": 4.0, "pos_xy": 3.0, "pos_w": 3.0}
_IRN = {"bi_xy": 80.0, "bi_rgb": 13.0, "bi_w": 10.0, "pos_xy": 3.0, "pos_w": 3.0}
SETTINGS: tuple[tuple[str, dict, str], ...] = (
    ("recipe", {}, "voc-mini as it ships: ViT-PCM kernels, unary T 0.5"),
    ("T1", {"unary_temperature": 1.0}, "ViT-PCM kernels, plain unary"),
    ("T2", {"unary_temperature": 2.0}, "ViT-PCM kernels, flattened unary"),
    ("deeplab", {**_DEEPLAB, "unary_temperature": 1.0}, "DeepLab v2's VOC kernels"),
    ("deeplab-T2", {**_DEEPLAB, "unary_temperature": 2.0}, "DeepLab v2's VOC kernels, flattened unary"),
    ("irn", {**_IRN, "unary_temperature": 1.0}, "AffinityNet/IRN kernels"),
    ("irn-T0.5", {**_IRN, "unary_temperature": 0.5}, "AffinityNet/IRN kernels, sharpened unary"),
    ("irn-T2", {**_IRN, "unary_temperature": 2.0}, "AffinityNet/IRN kernels, flattened unary"),
    ("rgb13", {"bi_rgb": 13.0, "unary_temperature": 1.0}, "ViT-PCM kernels with IRN's colour std"),
    ("rgb13-w10", {"bi_rgb": 13.0, "bi_w": 10.0, "unary_temperature": 1.0}, "ViT-PCM kernels, IRN's colour std and weight"),
)

_IMAGES: list = []  # (image, probs, classes) per image, set before the pool forks so the workers share it
_PARAMS = None


def _init(params) -> None:
    global _PARAMS
    from cpcx.crf import init_worker

    init_worker()
    _PARAMS = params


def _crf_one(index: int):
    import numpy as np

    from cpcx.crf import crf_labels

    image, probs, classes = _IMAGES[index]
    return index, crf_labels(image, np.asarray(probs, dtype=np.float32), classes, _PARAMS)


def crf_all(items: list, params, workers: int) -> list:
    """The CRF label map of every (image, probs, classes) item, in order, on ``workers`` forked processes
    (fork: the items, hundreds of MB, are shared with the workers instead of pickled to them)."""
    _IMAGES[:] = items
    predictions = [None] * len(items)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init, initargs=(params,)) as pool:
            for index, labels in pool.imap_unordered(_crf_one, range(len(items)), chunksize=4):
                predictions[index] = labels
    finally:
        _IMAGES.clear()
    return predictions


def load_probabilities(recipe):
    """(dataset, masks, [(image, present-class probs (k, H, W) float16, classes)]) as ``cpcx pseudo`` sees them."""
    import numpy as np

    from cpcx.pseudo.infer import upsample
    from diagnose_pseudo import decode_as_pseudo, load_paste_probs, load_run

    dataset, probs, feats = load_run(recipe)
    # pseudo.context_paste: the multi-class images come from the pasted network, as the stage decodes them
    maps = decode_as_pseudo(probs, feats, dataset.labels, recipe, load_paste_probs(recipe))
    items, masks = [], []
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        classes = np.flatnonzero(dataset.labels[i] > 0).astype(np.uint8)
        items.append((image, upsample(maps[i], classes, image.shape[:2]).numpy().astype(np.float16), classes))
        masks.append(dataset.load_mask(i))
    return dataset, masks, items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-r", "--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value, as for cpcx")
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crf")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from cpcx.crf import CRFParams
    from diagnose_pseudo import confusion_of, open_run, scores_of

    torch.set_num_threads(1)
    names = [name for name, _, _ in SETTINGS]
    wanted = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"--only: unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    command = " ".join(["benchmarks/sweep_crf.py", "-r", args.recipe, *args.overrides])
    out_json = args.out.with_suffix(".json")
    doc = json.loads(out_json.read_text()) if out_json.exists() else {}
    if doc.get("command") != command:
        doc = {"command": command, "rows": []}
    done = {row["setting"] for row in doc["rows"]}
    start = time.perf_counter()
    opened = open_run(args, load_probabilities)
    if opened is None:
        return 2
    recipe, (dataset, masks, items) = opened

    def score(predictions) -> dict:  # mIoU, per-class IoU and the error split, as diagnose_pseudo.py reports them
        return scores_of(confusion_of(zip(masks, predictions), dataset.num_classes), dataset.classes)

    doc.update(run=str(recipe.run_dir()), images=len(dataset), load_seconds=time.perf_counter() - start)
    if "no CRF" not in done:
        argmax = [classes[np.asarray(probs, dtype=np.float32).argmax(0)] for _, probs, classes in items]
        doc["rows"].insert(0, {"setting": "no CRF", "why": "argmax of the upsampled maps", "params": None,
                               **score(argmax), "seconds": 0.0})
    base = CRFParams.from_config(recipe.crf)
    for name, changes, why in SETTINGS:
        if name not in wanted or name in done:
            continue
        params = replace(base, **changes)
        began = time.perf_counter()
        predictions = crf_all(items, params, args.workers)
        row = {"setting": name, "why": why, "params": asdict(params), **score(predictions),
               "seconds": time.perf_counter() - began}
        doc["rows"].append(row)
        print(f"{name:12s} mIoU {100 * row['miou']:.1f}  object/background IoU {100 * row['fg_iou']:.1f}  "
              f"{row['seconds']:.0f} s", flush=True)
        write(doc, args.out)
    write(doc, args.out)
    return 0


def write(doc: dict, out: Path) -> None:
    from cpcx import atomic

    atomic.write_json(out.with_suffix(".json"), doc)
    lines = [f"# Dense-CRF settings on the pseudo-labels of `{doc['run']}` ({doc['images']} images)", "",
             f"`{doc['command']}`", "",
             "Kernels: Gaussian (pos_xy, pos_w) and bilateral (bi_xy, bi_rgb, bi_w); T: unary temperature.", "",
             "| setting | pos_xy | pos_w | bi_xy | bi_rgb | bi_w | T | mIoU | object/background IoU | seconds | why |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in doc["rows"]:
        p = row["params"]
        kernels = ("| – " * 6) if p is None else "".join(
            f"| {p[k]:g} " for k in ("pos_xy", "pos_w", "bi_xy", "bi_rgb", "bi_w", "unary_temperature"))
        lines.append(f"| {row['setting']} {kernels}| {100 * row['miou']:.1f} | {100 * row['fg_iou']:.1f} | "
                     f"{row['seconds']:.0f} | {row['why']} |")
    atomic.write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
