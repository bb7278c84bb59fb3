"""More training images with image labels only: voc-mini trained on its 311 VOC ids plus the COCO slice's train
images that hold a VOC class, scored on the 311 VOC ids alone (issue 20: "the method grows with data").

    .venv/bin/python benchmarks/extra_images_probe.py --seeds 0 1 2

The only other images on this machine are the COCO slice's (nothing may be downloaded). Its train2017 images
that hold one of the 20 VOC classes (134 of 166) join the training split of a VOC-layout folder (``--data``,
built once: the VOC files linked, each COCO mask drawn by ``cpcx.data.coco`` and mapped to VOC's indices, the
other 60 COCO classes painted background as VOC paints its unlabelled objects, crowd regions kept as 255). Only
their image labels reach the network, as for the VOC images; the masks are for scoring.

Each seed runs voc-mini with ``variants.py``'s ``bf16-crf5`` overrides (voc-mini as it ships) on that split,
stages as separate measured processes. Its CRF pseudo-labels of the 311 VOC ids are scored against the VOC
masks: all, the first 200 ids (choose) and the other 111 (report), with the object/background IoU; the base is
the same recipe on the 311 alone (``variants.py``'s runs, re-used or trained). Results:
``benchmarks/results/extra-images.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbones import CHOOSE, split_confusions  # noqa: E402
from diagnose_pseudo import miou_and_fg  # noqa: E402
from results_exec import mean_std, run_stages, save_results  # noqa: E402
from results_rows import ROOT, VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402
from variants import VARIANTS, run_variant  # noqa: E402

from cpcx.data.classes import VOC_CLASSES, with_background  # noqa: E402

VOC_NAMES = with_background(VOC_CLASSES)
WORK = "runs-bench"
BASE = "bf16-crf5"  # voc-mini as it ships, in variants.py's terms
SPLIT = "train_coco"
#: COCO's names of the VOC classes that COCO spells otherwise.
COCO_TO_VOC = {"airplane": "aeroplane", "motorcycle": "motorbike", "dining table": "diningtable",
               "potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor"}


def build_layout(dest: Path, voc_root: Path, coco_root: Path) -> int:
    """The VOC-layout folder: VOC's train and val files linked, COCO train images holding a VOC class added to the
    split ``SPLIT`` with their masks mapped to VOC indices. The split lists are written last, so a folder cut
    short is rebuilt. → the number of COCO images added."""
    from PIL import Image

    from cpcx import atomic
    from cpcx.data.classes import VOC_CLASSES
    from cpcx.data.coco import COCODataset
    from cpcx.recipe import COCODatasetConfig

    lists = dest / "ImageSets" / "Segmentation"
    if (lists / f"{SPLIT}.txt").is_file():
        return sum(1 for i in (lists / f"{SPLIT}.txt").read_text().split() if i.startswith("coco_"))
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    splits = {s: (voc_root / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    for image_id in splits["train"] + splits["val"]:
        for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            link = dest / folder / f"{image_id}.{ext}"
            if not link.is_symlink():
                link.symlink_to((voc_root / folder / f"{image_id}.{ext}").resolve())
    coco = COCODataset(COCODatasetConfig(root=coco_root), "train")
    to_voc = np.zeros(256, np.uint8)
    to_voc[255] = 255
    for c, name in enumerate(coco.classes[1:], start=1):
        voc_name = COCO_TO_VOC.get(name, name)
        if voc_name in VOC_CLASSES:
            to_voc[c] = VOC_CLASSES.index(voc_name) + 1
    palette = Image.open(voc_root / "SegmentationClass" / f"{splits['train'][0]}.png").getpalette()
    added = []
    for i in range(len(coco)):
        mask = to_voc[coco.load_mask(i)]
        if not ((mask > 0) & (mask < 255)).any():
            continue  # no VOC class: its image label would be empty
        image_id = f"coco_{coco.ids[i]}"
        link = dest / "JPEGImages" / f"{image_id}.jpg"
        if not link.is_symlink():
            link.symlink_to(Path(coco.image_path(i)).resolve())
        png = Image.fromarray(mask, "P")
        png.putpalette(palette)
        png.save(dest / "SegmentationClass" / f"{image_id}.png")
        added.append(image_id)
    for name, ids in (("train", splits["train"]), ("val", splits["val"]), (SPLIT, splits["train"] + added)):
        atomic.write_text(lists / f"{name}.txt", "\n".join(ids) + "\n")
    return len(added)


def voc_scores(labels_dir: Path) -> dict:
    """The label maps of voc-mini's train ids: {"all" | "choose" | "report": {miou, fg_iou}}, percent."""
    return {part: miou_and_fg(m.matrix, VOC_NAMES) for part, m in split_confusions(labels_dir).items()}


def run_seed(seed: int, data: Path, logs: Path) -> dict:
    name = f"coco-extra-s{seed}"
    args = [f"name={name}", f"seed={seed}", f"runs_dir={WORK}", f"train.feature_cache_dir={WORK}/features-coco-extra",
            f"dataset.root={data}", f"dataset.train_split={SPLIT}", *VOC_MINI_BEFORE_TRIM, *VARIANTS[BASE][1]]
    entry = run_stages(VOC_RECIPE, args, ("clusters", "train", "pseudo"), name, logs)
    if "error" not in entry:
        entry["scores"] = voc_scores(ROOT / WORK / name / "pseudo" / "labels")
    base = run_variant(BASE, seed, False, logs)
    if "error" not in base:
        entry["base_scores"] = voc_scores(ROOT / WORK / f"var-{BASE}-s{seed}" / "pseudo" / "labels")
        entry["base_stages"] = base["stages"]
    return entry


def render(results: dict) -> str:
    seeds = {int(k): v for k, v in results["seeds"].items() if "scores" in v and "base_scores" in v}
    lines = ["# More training images: voc-mini on its 311 VOC ids + the COCO slice's train images with a VOC class",
             "", f"`.venv/bin/python benchmarks/extra_images_probe.py --seeds {' '.join(map(str, sorted(seeds)))}"
             + (f" --data {results['data']}" if results.get("data") else "") + "`"
             f" — {results.get('coco_images', '?')} COCO images join the training split (image labels only); CRF "
             "pseudo-labels scored on the 311 VOC train ids alone: all (object/background IoU in brackets), the "
             f"first {CHOOSE} ids / the other {311 - CHOOSE}. Base: the same recipe on the 311 alone "
             f"(variants.py's `{BASE}`, voc-mini as it ships).", "",
             "| seed | training images | all (obj/bg IoU) | choose / report | train + pseudo s |",
             "|---|---|---:|---|---:|"]
    for seed, entry in sorted(seeds.items()):
        for label, scores, stages in (("311 VOC", entry["base_scores"], entry["base_stages"]),
                                      ("311 VOC + COCO", entry["scores"], entry["stages"])):
            seconds = sum((stages.get(s) or {}).get("seconds") or 0 for s in ("train", "pseudo"))
            lines.append(f"| {seed} | {label} | {scores['all']['miou']:.1f} ({scores['all']['fg_iou']:.1f}) | "
                         f"{scores['choose']['miou']:.1f} / {scores['report']['miou']:.1f} | {seconds:.0f} |")
    for label, key in (("311 VOC", "base_scores"), ("311 VOC + COCO", "scores")):
        pick = lambda part, f: [e[key][part][f] for e in seeds.values()]  # noqa: E731
        lines.append(f"| mean | {label} | {mean_std(pick('all', 'miou'))} ({np.mean(pick('all', 'fg_iou')):.1f}) | "
                     f"{np.mean(pick('choose', 'miou')):.1f} / {np.mean(pick('report', 'miou')):.1f} | |")
    lines += ["", "Seconds: wall time on 2 cores, other work beside (the train figure of a first run includes the "
              "token extraction of every image)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    data_root = Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data"))  # as the recipes read it
    parser.add_argument("--coco", type=Path, default=data_root / "coco2017-mini")
    parser.add_argument("--data", type=Path, default=ROOT / WORK / "extra-images" / "VOC2012",
                        help="the VOC-layout folder built here (VOC + COCO)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from cpcx.data.voc import find_voc_root
    from cpcx.recipe_io import load_recipe

    voc_root = find_voc_root(load_recipe(ROOT / VOC_RECIPE).dataset.root)  # the slice voc-mini reads and is scored on
    logs = ROOT / WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"coco_images": build_layout(args.data.resolve(), voc_root, args.coco), "seeds": {},
               "data": None if args.data == parser.get_default("data") else str(args.data)}
    for seed in args.seeds:
        results["seeds"][str(seed)] = run_seed(seed, args.data.resolve(), logs)
        print(f"seed {seed}: {results['seeds'][str(seed)].get('scores')} base "
              f"{results['seeds'][str(seed)].get('base_scores')}", flush=True)
    save_results(results, args.out, "extra-images", render)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
