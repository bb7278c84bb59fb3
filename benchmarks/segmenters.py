"""What the final segmenter keeps of its pseudo-labels (issue 18): each segmenter trained on the pseudo-labels and,
as an oracle reference, on the ground-truth masks of the same training images; VOC or COCO slice, per seed.

    .venv/bin/python benchmarks/segmenters.py                        # every segmenter, seeds 0 1 2
    .venv/bin/python benchmarks/segmenters.py --only grid --seeds 0
    .venv/bin/python benchmarks/segmenters.py --data coco --only grid    # after coco_grids.py --only fused

The pseudo-labels are those of the fused grid's runs: on VOC ``benchmarks/backbones.py``'s
(``runs-bench/bb-vit-lite0-s<seed>``), on COCO ``benchmarks/coco_grids.py``'s (``runs-bench/coco-fused-s<seed>``);
run those first. Each segmenter row gets its own run folder ``runs-bench/seg[-coco]-<segmenter>-<labels>-s<seed>``
whose clusters/train/pseudo are links to that run, and ``cpcx segment`` is measured as a separate process (wall
and CPU seconds, peak RSS).

Val mIoU is over the val images and also split into the first half of the val ids ("choose": where the
segmenter settings were chosen, on VOC) and the other half ("report": never looked at while choosing). The ratio
pseudo / ground truth is the fair measure of what the pseudo-labels cost that segmenter. Results:
``benchmarks/results/segmenters[-coco].{json,md}``; finished entries are skipped on a re-run (``--redo``
measures again; ``--refresh`` re-reads finished folders; ``--flip-ablation`` scores the grid rows without the
mirrored val view).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_exec import save_results, child_env, cpcx_argv, mean_std, read_json, run_measured, tail  # noqa: E402
from results_rows import ROOT, SALIENCY_OFF, VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
WORK = "runs-bench"
#: The fused grid on coco-mini (which ships the ViT alone): benchmarks/coco_grids.py's "fused" rows.
COCO_FUSED = ["model.backbone=vit_small_patch14_dinov2", "model.weights=../weights/dinov2_vits14.safetensors",
              "model.img_size=336", "pseudo.img_size=336", "model.feature_strides=null",
              "model.fuse.backbone=tf_efficientnet_lite0", "model.fuse.weights=../weights/efficientnet_lite0.safetensors",
              "model.fuse.feature_strides=[16,32]", *SALIENCY_OFF]  # coco-mini's saliency: 5 Dec 2026, after these


@dataclass(frozen=True)
class Data:
    recipe: str
    source: str  # the run whose clusters/train/pseudo each row links to
    cache: str  # the shared token cache folder under WORK
    overrides: tuple[str, ...]  # what makes the recipe the source run's
    files: str  # results file stem
    prefix: str  # run folder prefix


DATA = {
    "voc": Data(VOC_RECIPE, "bb-vit-lite0-s{seed}", "features-bb", VOC_MINI_BEFORE_TRIM, "segmenters", "seg"),  # backbones.py's runs
    "coco": Data("recipes/coco-mini.yaml", "coco-fused-s{seed}", "features-coco-grids", tuple(COCO_FUSED),
                 "segmenters-coco", "seg-coco"),
}
D = DATA["voc"]  # set by --data

#: Every segment knob spelled out, so a row means the same whatever recipes/voc-mini.yaml ships.
SEGMENTERS: dict[str, tuple[str, list[str]]] = {
    "grid": ("DeepLabV3 (ASPP) head on the frozen fused grid, val flip", [
        "segment.arch=deeplabv3", "segment.encoder=grid", "segment.encoder_weights=null", "segment.encoder_file=null",
        "segment.head_channels=128", "segment.aspp_rates=[2,4,6]", "segment.optimizer=adamw", "segment.lr=0.001",
        "segment.weight_decay=0.01", "segment.epochs=16", "segment.batch_size=16", "segment.scales=[1.0]",
        "segment.flip=true", "segment.eval_every=16", "segment.workers=0", "segment.precision=auto"]),
    "lite0": ("DeepLabV3+ EfficientNet-Lite0 on images (shipped before)", [
        "segment.arch=deeplabv3plus", "segment.encoder=tu-tf_efficientnet_lite0", "segment.encoder_weights=null",
        "segment.encoder_file=../weights/efficientnet_lite0.safetensors", "segment.optimizer=sgd", "segment.lr=0.01",
        "segment.weight_decay=0.0001", "segment.epochs=4", "segment.batch_size=8", "segment.crop_size=256",
        "segment.scales=[1.0]", "segment.flip=false", "segment.eval_every=4", "segment.workers=1",
        "segment.precision=auto"]),
}
LABELS = ("pseudo", "ground_truth")


def link_upstream(name: str, seed: int) -> None:
    """The run folder of one row: its upstream stages are links to the source run's."""
    folder = ROOT / WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    for stage in ("clusters", "train", "pseudo"):
        link = folder / stage
        if not link.exists():
            link.symlink_to(Path("..") / D.source.format(seed=seed) / stage)


def segment_run(key: str, labels: str, seed: int, logs: Path) -> dict:
    name = f"{D.prefix}-{key}-{labels}-s{seed}"
    source = ROOT / WORK / D.source.format(seed=seed)
    if not (source / "pseudo" / "metrics.json").is_file():
        return {"error": f"{source}: no pseudo-labels; run benchmarks/backbones.py --only vit-lite0 (VOC) or "
                         "benchmarks/coco_grids.py --only fused (COCO) first"}
    link_upstream(name, seed)
    args = [f"name={name}", f"seed={seed}", f"runs_dir={WORK}", f"train.feature_cache_dir={WORK}/{D.cache}",
            *D.overrides, f"segment.labels={labels}", *SEGMENTERS[key][1]]
    measured = run_measured([*cpcx_argv(), "segment", "-r", D.recipe, *args], logs / f"{name}.log", child_env())
    entry = {"argv": " ".join(["cpcx", "segment", "-r", D.recipe, *args]), "seconds": measured.seconds,
             "cpu_seconds": measured.cpu_seconds, "max_rss_mib": measured.max_rss_mib}
    if measured.returncode != 0:
        return {**entry, "error": tail(logs / f"{name}.log")}
    return {**entry, **read_row(ROOT / WORK / name / "segment")}


def read_row(folder: Path) -> dict:
    """What a finished segment folder says: val mIoU (all, halves), seconds per training epoch and to predict."""
    import csv

    metrics = read_json(folder / "metrics.json")
    with open(folder / "metrics.csv") as handle:
        # Epochs without a val measurement: the training cost alone (the last epoch also scores val).
        epochs = [float(r["seconds"]) for r in csv.DictReader(handle) if not r["val_miou"]]
    return {"miou": 100 * metrics["miou"], "oracle": metrics.get("oracle"),
            "train_seconds": metrics.get("train_seconds"), "predict_seconds": metrics.get("predict_seconds"),
            "epoch_seconds": float(np.median(epochs)) if epochs else None, **halves(folder / "predictions")}


def halves(predictions: Path) -> dict:
    """Val mIoU on the first half of the val ids (choose) and on the other half (report)."""
    from cpcx.data import build_dataset, load_label_png
    from cpcx.metrics import ConfusionMatrix
    from cpcx.recipe_io import load_recipe

    dataset = build_dataset(load_recipe(ROOT / D.recipe).dataset, "val")
    half = len(dataset) // 2
    parts = {"choose": ConfusionMatrix(dataset.num_classes), "report": ConfusionMatrix(dataset.num_classes)}
    for i, image_id in enumerate(dataset.ids):
        parts["choose" if i < half else "report"].update(dataset.load_mask(i),
                                                         load_label_png(predictions / f"{image_id}.png"))
    return {k: 100 * float(m.result().miou) for k, m in parts.items()}


def flip_ablation(seed: int, labels: str = "pseudo") -> dict:
    """A finished grid row scored again from its val tokens without the mirrored view (what segment.flip adds),
    on the whole val split and its two halves: no training, the same checkpoint."""
    import torch

    from cpcx.data import build_dataset
    from cpcx.metrics import ConfusionMatrix
    from cpcx.recipe_io import load_recipe
    from cpcx.segment.grid_train import probs_from_tokens, token_cache
    from cpcx.segment.networks import load_segnet

    name = f"{D.prefix}-grid-{labels}-s{seed}"
    recipe = load_recipe(ROOT / D.recipe, [f"name={name}", f"runs_dir={WORK}", f"train.feature_cache_dir={WORK}/{D.cache}",
                                           *D.overrides, *SEGMENTERS["grid"][1]])
    model, _ = load_segnet(recipe.run_dir("segment") / "weights" / "best.pt")
    val = build_dataset(recipe.dataset, "val")
    cache = token_cache(recipe, model.backbone, val, ["orig", "hflip"], torch.device("cpu"), print)
    half = len(val) // 2
    out = {}
    for views in (["orig"], ["orig", "hflip"]):
        parts = {"all": ConfusionMatrix(val.num_classes), "choose": ConfusionMatrix(val.num_classes),
                 "report": ConfusionMatrix(val.num_classes)}
        for i in range(len(val)):
            mask = val.load_mask(i)
            tokens = cache.get_all(i)[[cache.views.index(v) for v in views]]
            label = probs_from_tokens(model, tokens, views, mask.shape).argmax(0).numpy()
            for part in ("all", "choose" if i < half else "report"):
                parts[part].update(mask, label)
        out["flip" if len(views) == 2 else "no_flip"] = {k: 100 * float(m.result().miou) for k, m in parts.items()}
    return out


def render(results: dict) -> str:
    lines = [
        f"# Segmenters: pseudo-labels against the ground-truth oracle ({D.recipe})", "",
        f"{results['date'][:10]} · {results['machine']} · `.venv/bin/python benchmarks/segmenters.py --data "
        f"{'coco' if D is DATA['coco'] else 'voc'}`. Each segmenter trained on the train split's CRF pseudo-labels "
        f"of the fused grid (the runs `{WORK}/{D.source}`, one per seed), and on their ground-truth masks "
        "(ORACLE, a reference). Val mIoU on the val split, mean ± std over seeds; choose / report: the first half "
        "of the val ids (the segmenter settings were chosen on VOC's) and the other half. seconds: the whole "
        "`cpcx segment` process (with the grid head mostly reading the val images through the backbones, once per "
        "cache: later seeds reuse it); s / epoch: one training epoch (median).", "",
        "| segmenter | labels | val mIoU | choose / report | pseudo ÷ oracle | seeds | seconds | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, (title, _) in SEGMENTERS.items():
        rows = results["runs"].get(key, {})
        done = {labels: [r for r in rows.get(labels, {}).values() if "miou" in r] for labels in LABELS}
        for labels in LABELS:
            runs = done[labels]
            ratio = ""
            if labels == "pseudo" and done["ground_truth"]:
                ratio = f"{np.mean([r['miou'] for r in runs]) / np.mean([r['miou'] for r in done['ground_truth']]):.2f}" \
                    if runs else ""
            lines.append(
                f"| {title} | {'ORACLE: ground truth' if labels == 'ground_truth' else 'pseudo-labels'} | "
                f"{mean_std([r['miou'] for r in runs])} | {mean_std([r['choose'] for r in runs])} / "
                f"{mean_std([r['report'] for r in runs])} | {ratio} | "
                f"{', '.join(sorted(rows.get(labels, {}), key=int)) or '—'} | "
                f"{mean_std([r['seconds'] for r in runs])} | "
                f"{mean_std([r['epoch_seconds'] for r in runs if r.get('epoch_seconds')])} |")
    flips = [r["flip_ablation"] for r in results["runs"].get("grid", {}).get("pseudo", {}).values()
             if "flip_ablation" in r]
    if flips:
        lines += ["", f"segment.flip on the grid row (voc-mini ships without it; pseudo-labels; the same checkpoints scored from their val tokens "
                      f"with and without the mirrored view; `--flip-ablation`), {len(flips)} seed(s):", "",
                  "| val views | val mIoU | choose / report |", "|---|---|---|"]
        for key, title in (("flip", "orig + hflip (averaged)"), ("no_flip", "orig only")):
            lines.append(f"| {title} | {mean_std([f[key]['all'] for f in flips])} | "
                         f"{mean_std([f[key]['choose'] for f in flips])} / {mean_std([f[key]['report'] for f in flips])} |")
    errors = [f"- {k} {labels} seed {s}: {r['error']}" for k, by in results["runs"].items()
              for labels, seeds in by.items() for s, r in seeds.items() if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SEGMENTERS), default=None)
    parser.add_argument("--labels", nargs="*", choices=LABELS, default=list(LABELS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--data", choices=sorted(DATA), default="voc",
                        help="voc: the VOC slice (voc-mini); coco: the COCO slice (coco-mini with the fused grid)")
    parser.add_argument("--refresh", action="store_true", help="re-read finished rows' folders (no training)")
    parser.add_argument("--flip-ablation", action="store_true",
                        help="score the finished grid rows again without the mirrored val view (no training)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    global D
    D = DATA[args.data]
    path = OUT / f"{D.files}.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    logs = ROOT / WORK / "logs"

    def save() -> None:
        save_results(results, OUT, D.files, render)

    if args.refresh:  # derived fields of finished rows, read again from their folders (no training)
        for key, by in results["runs"].items():
            for labels, seeds in by.items():
                for seed, entry in seeds.items():
                    if "miou" in entry:
                        entry.update(read_row(ROOT / WORK / f"{D.prefix}-{key}-{labels}-s{seed}" / "segment"))
        save()
        return 0
    if args.flip_ablation:
        for seed in args.seeds:
            entry = results["runs"].get("grid", {}).get("pseudo", {}).get(str(seed))
            if entry and "miou" in entry:
                entry["flip_ablation"] = flip_ablation(seed)
                print(f"seed {seed}: {entry['flip_ablation']}", flush=True)
        save()
        return 0
    for key in args.only or list(SEGMENTERS):
        for labels in args.labels:
            for seed in args.seeds:
                slot = results["runs"].setdefault(key, {}).setdefault(labels, {})
                if str(seed) in slot and "miou" in slot[str(seed)] and not args.redo:
                    continue
                print(f"segment {key} · {labels} · seed {seed}", flush=True)
                slot[str(seed)] = segment_run(key, labels, seed, logs)
                print(f"  → {json.dumps(slot[str(seed)])[:300]}", flush=True)
                save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
