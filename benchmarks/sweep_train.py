"""Training knobs one at a time: each variant trains voc-mini with a few overrides and scores its pseudo-labels.

    .venv/bin/python benchmarks/sweep_train.py                          # every variant (≈ 1 h on 2 cores)
    .venv/bin/python benchmarks/sweep_train.py --only finetune-1,finetune-2 --out /tmp/sweep-b

Every variant is ``recipes/voc-mini.yaml`` with the four static groups it had when the sweep ran (``SHARED``)
plus its overrides, at seed 0, in ``runs-bench/sweep-<variant>``
(token caches shared in ``runs-bench/features-voc`` with the Table 4 benchmark): ``cpcx clusters``, then
``cpcx train`` (a finished run of the same recipe is kept: ``--resume`` says it is done), then the no-CRF
mIoU of its pseudo-labels on the 311 training images, computed as ``diagnose_pseudo.py`` does (= the "mIoU
without CRF" that ``cpcx pseudo`` reports), with the error split beside it. One seed per variant: the seed
spread of voc-mini is ±5 (docs/results.md), so only large differences mean something.

Results go to ``benchmarks/results/sweep.{json,md}`` (``--out``); a re-run keeps the rows whose overrides
are unchanged. Two processes can share the work (disjoint ``--only`` lists, each its own ``--out``), then
``--merge A.json B.json`` folds their rows into the default output without training or scoring anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # results_exec, diagnose_pseudo: siblings of this script
from results_rows import SALIENCY_OFF  # noqa: E402
RECIPE = "recipes/voc-mini.yaml"
#: The sweep ran on voc-mini when it shipped four static groups; pinning them keeps every row's recipe (and its
#: run folder's fingerprints) what was measured, now that voc-mini ships the two groups of row clusters-2.
FOUR_GROUPS = ("llm.clusters={vehicle: [aeroplane, bicycle, boat, bus, car, motorbike, train], "
               "animal: [bird, cat, cow, dog, horse, sheep], person: [person], "
               "indoor: [bottle, chair, diningtable, pottedplant, sofa, tvmonitor]}")
#: The sweep ran before voc-mini enabled its class probe, put EfficientNet-Lite0 beside the ViT (model.fuse) and
#: labelled the multi-class images with a second network (pseudo.context_paste) and mixed in a saliency network
#: (pseudo.saliency): all pinned off, like the four groups, so the rows compare (the context paste also needs the
#: frozen backbone the finetune rows unfreeze).
SHARED = ["runs_dir=runs-bench", "seed=0", "train.feature_cache_dir=runs-bench/features-voc", FOUR_GROUPS,
          "pseudo.class_probe.enabled=false", "model.fuse=null", "pseudo.context_paste.enabled=false",
          *SALIENCY_OFF]
FINETUNE = ["train.trunk_cache=true", "train.backbone_lr=0.0001"]

#: name → (overrides, why it is worth a row)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "voc-mini": ([], "the base: voc-mini with its former four static groups"),
    "no-hv-bilstm": (["model.hv_bilstm=false"], "the ViT tokens straight into the classifier"),
    "topk-5pct": (["model.topk=0.05"], "k = 29 patches instead of 6"),
    "topk-3": (["model.topk=3"], "fewer patches per class"),
    "background-topk-0.3": (["model.background_topk=0.3"], "background pooled over 30 % of the patches, not 50 %"),
    "pce-0.3": (["loss.pce_weight=0.3"], "a stronger contrastive term"),
    "pce-threshold-0.7": (["loss.pce_threshold=0.7"], "more patches counted as confident in the PCE"),
    "classifier-l2": (["loss.classifier_l2=0.01"], "ViT-PCM's L2 on the patch classifier"),
    "label-smoothing": (["loss.label_smoothing=0.1"], "softer image-label targets"),
    "dropout-0.4": (["model.dropout=0.4"], "twice the dropout"),
    "warmup-lr-3e-3": (["train.lr=0.003"], "a faster warm-up"),
    "epochs-10-lr-3e-4": (["train.epochs=10", "train.lr_after_warmup=0.0003"], "longer, slower second phase"),
    "clusters-8": (["llm.clusters={road: [bicycle, bus, car, motorbike], transport: [aeroplane, boat, train], "
                    "pet: [cat, dog], farm: [cow, horse, sheep], bird: [bird], person: [person], "
                    "furniture: [chair, diningtable, sofa], household: [bottle, pottedplant, tvmonitor]}"],
                   "8 finer hand-made groups instead of the base's 4"),
    "clusters-2": (["llm.clusters={living: [bird, cat, cow, dog, horse, person, sheep], "
                    "object: [aeroplane, bicycle, boat, bottle, bus, car, chair, diningtable, motorbike, pottedplant, "
                    "sofa, train, tvmonitor]}"], "2 coarse groups, living things and objects (voc-mini's since)"),
    "img-448": (["model.img_size=448", "pseudo.img_size=448", "model.topk=11"],
                "a 32×32 patch grid instead of 24×24 (k scaled with the patch count)"),
    "finetune-1": (["train.unfreeze_blocks=1", *FINETUNE], "the last ViT block trains after the warm-up"),
    "finetune-2": (["train.unfreeze_blocks=2", *FINETUNE], "the last two blocks train"),
    "finetune-1-epochs-10": (["train.unfreeze_blocks=1", *FINETUNE, "train.epochs=10"], "the last block, longer"),
}


def run_cpcx(args: list[str], log: Path) -> float:
    """One ``cpcx`` command as results.py runs its stages (same environment, output to ``log``) → wall seconds."""
    from results_exec import child_env, cpcx_argv, run_measured

    measured = run_measured([*cpcx_argv(), *args], log, child_env())
    if measured.returncode:
        raise SystemExit(f"cpcx {' '.join(args)} failed (exit {measured.returncode}); see {log}")
    return measured.seconds


def train(name: str, overrides: list[str], logs: Path) -> float:
    """cpcx clusters + cpcx train for one variant → seconds in cpcx train (a few for a finished run kept)."""
    args = ["-r", RECIPE, f"name=sweep-{name}", *SHARED, *overrides]
    run_cpcx(["clusters", *args], logs / f"sweep-{name}-clusters.log")
    log = logs / f"sweep-{name}-train.log"
    if (ROOT / "runs-bench" / f"sweep-{name}" / "train" / "weights" / "last.pt").is_file():
        try:  # --resume refuses a changed recipe (then we train afresh) and stops at once when it is done
            return run_cpcx(["train", "--resume", *args], log)
        except SystemExit:
            pass
    return run_cpcx(["train", *args], log)


def score(name: str, overrides: list[str]) -> dict:
    """No-CRF mIoU and error split of the variant's pseudo-labels (diagnose_pseudo.py's first row)."""
    from cpcx.recipe import load_recipe
    from diagnose_pseudo import Scorer, load_run, score_as_pseudo

    recipe = load_recipe(ROOT / RECIPE, [f"name=sweep-{name}", *SHARED, *overrides])
    dataset, probs, feats = load_run(recipe)
    return score_as_pseudo(Scorer(dataset), probs, feats, recipe)[1]


def render(doc: dict) -> str:
    lines = ["# Training variants of voc-mini with four static groups (seed 0, no-CRF pseudo mIoU on the 311 "
             "training images)", "",
             "`.venv/bin/python benchmarks/sweep_train.py` — each row is `recipes/voc-mini.yaml` plus the overrides, "
             f"with `{' '.join(SHARED)}`; one seed each (voc-mini's seed spread is ±5).", "",
             "| variant | overrides | mIoU | object/background IoU | object recall / precision | wrong present class "
             "| train s |", "|---|---|---:|---:|---:|---:|---:|"]
    footer = ["", "train s: wall seconds of `cpcx train` (a few for a finished run that was kept; with the one-time "
              "extraction of a token cache, ≈ 4 min on 2 cores, for the first variant that needs it unless "
              "runs-bench/features-voc held it already). Invocations that wrote this file, in order (parallel ones "
              "share the 2 cores, so their seconds are about doubled):", ""]
    footer += [f"- `{command}`" for command in doc.get("invocations", [])]
    for name, row in doc["rows"].items():
        lines.append(f"| {name}: {row['why']} | `{' '.join(row['overrides']) or '—'}` | {100 * row['miou']:.1f} | "
                     f"{100 * row['fg_iou']:.1f} | {100 * row['fg_recall']:.1f} / {100 * row['fg_precision']:.1f} | "
                     f"{100 * row['wrong_class_in_fg']:.1f} % | {row['train_seconds']:.0f} |")
    return "\n".join(lines + footer) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="sweep JSONs of parallel runs to fold in")
    args = parser.parse_args(argv)
    wanted = [v for v in args.only.split(",") if v] or list(VARIANTS)
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; pick from {', '.join(VARIANTS)}")

    import torch

    from cpcx import atomic

    torch.set_num_threads(1)
    path = args.out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    command = " ".join([".venv/bin/python", "benchmarks/sweep_train.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge:
        for other in args.merge:
            theirs = json.loads(other.read_text())
            doc["rows"].update({k: v for k, v in theirs["rows"].items() if k in VARIANTS})
            doc.setdefault("invocations", []).extend(theirs.get("invocations", []))
            doc["date"] = max(doc.get("date", ""), theirs.get("date", ""))
        doc["rows"] = {k: doc["rows"][k] for k in VARIANTS if k in doc["rows"]}
        doc.setdefault("invocations", []).append(command)
        doc["invocations"] = list(dict.fromkeys(doc["invocations"]))  # merging the same files again adds nothing
        atomic.write_json(path, doc)
        atomic.write_text(args.out.with_suffix(".md"), render(doc))
        print(render(doc))
        return 0
    logs = ROOT / "runs-bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    doc.setdefault("invocations", []).append(command)
    for name in wanted:
        overrides, why = VARIANTS[name]
        if doc["rows"].get(name, {}).get("overrides") == overrides:
            continue
        print(f"{name}: {' '.join(overrides) or '(the base)'}", flush=True)
        seconds = train(name, overrides, logs)
        doc["rows"][name] = {"overrides": overrides, "why": why, "train_seconds": seconds, **score(name, overrides)}
        doc["rows"] = {k: doc["rows"][k] for k in VARIANTS if k in doc["rows"]}  # the table keeps VARIANTS' order
        doc["date"] = time.strftime("%Y-%m-%d")
        atomic.write_json(path, doc)
        atomic.write_text(args.out.with_suffix(".md"), render(doc))
        print(f"  no-CRF mIoU {100 * doc['rows'][name]['miou']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
