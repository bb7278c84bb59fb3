"""Knobs of voc-mini *as it ships* (fused grid, class probe, context paste, CRF), scored as issue 20 asks.

    .venv/bin/python benchmarks/sweep_shipped.py --only topk3,topk12 --seeds 0           # screen on seed 0
    .venv/bin/python benchmarks/sweep_shipped.py --only shipped,topk12 --seeds 0 1 2      # confirm a choice
    .venv/bin/python benchmarks/sweep_shipped.py --score-only                             # re-read the runs

``benchmarks/sweep_train.py`` swept these knobs on the ViT-only grid with four groups, before voc-mini took the fused
grid (docs/backbones.md): its optima need not hold on the grid voc-mini ships now. Each (variant, seed) here is

    cpcx clusters|train|pseudo -r recipes/voc-mini.yaml name=sw-<variant>-s<seed> seed=<seed> runs_dir=runs-bench \\
        train.feature_cache_dir=<--cache> pseudo.workers=1 <SALIENCY_OFF> <the variant's overrides>

(a stage already current for that recipe is not run again), then its CRF pseudo-labels are scored on the 311 train
images: mIoU and object/background IoU on all of them, on the first 200 ids (*choose*: where a setting may be
picked) and on the other 111 (*report*: never used to pick), on the single- and the multi-class images
(``self_training_runs.score_folder``). ``pseudo.workers=1`` because two sweeps share the 2 cores; the CRF's result
does not depend on it. The procedure the table is meant for: screen every variant on seed 0, pick on the choose
column only, run the picked ones on seeds 1 and 2, then read the report column.

Results: ``--out`` (json and md; a re-run keeps the rows it does not redo, so parallel sweeps with disjoint
``--only`` lists can share one ``--out`` if they run one after the other, or each their own and ``--merge``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from backbones import CHOOSE  # noqa: E402
from results_exec import command_line, mean_std, write_report  # noqa: E402
from results_rows import SALIENCY_OFF  # noqa: E402

RECIPE = "recipes/voc-mini.yaml"
RUNS_DIR = "runs-bench"
STAGES = ("clusters", "train", "pseudo")
PARTS = ("all", "choose", "report", "single", "multi")

#: name → (overrides, why it is worth a row). Each knob one step either side of what voc-mini shipped when the sweep
#: was made, before it took pseudo.saliency (late on 5 Dec 2026; ``SALIENCY_OFF`` pins that off under every
#: row, so the rows keep meaning, and fingerprinting, what they measured). voc-mini as it ships now: saliency-int8.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "shipped": ([], "voc-mini as it shipped until late on 5 Dec 2026 (no pseudo.saliency)"),
    "topk3": (["model.topk=3"], "each class pooled over 3 patches, not 6"),
    "topk12": (["model.topk=12"], "each class pooled over 12 patches, not 6"),
    "bgk0.3": (["model.background_topk=0.3"], "background pooled over 30 % of the patches, not 50 %"),
    "bgk0.7": (["model.background_topk=0.7"], "background pooled over 70 % of the patches, not 50 %"),
    "pce0.05": (["loss.pce_weight=0.05"], "half the contrastive weight"),
    "pce0.2": (["loss.pce_weight=0.2"], "twice the contrastive weight"),
    "ep4": (["train.epochs=4"], "4 epochs, not 6"),
    "ep8": (["train.epochs=8"], "8 epochs, not 6"),
    "bg-learned": (["model.background=learned"], "a learned background row instead of one constant logit"),
    "dropout0.4": (["model.dropout=0.4"], "twice the dropout"),
    "views-transpose": (["train.views=[orig,hflip,transpose]"],
                        "the transposed grid as a third training view (ViT-PCM's transpose augmentation)"),
    "self-training": (["pseudo.self_training.enabled=true"],
                      "+ the cross-validated self-training round (results.md 8h) beside the context paste"),
    "crf-t1": (["crf.unary_temperature=1"], "CRF unary at temperature 1, not 0.5"),
    "img448": (["model.img_size=448", "pseudo.img_size=448", "model.topk=11"],
               "a 32×32 grid instead of 24×24 (Lite0 reads 512 px; k scaled with the patch count)"),
    "saliency": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                  f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc"],
                 "+ ISNet's foreground mixed into the maps (pseudo.saliency, weights 0.5 / 0.2; `make weights-saliency`)"),
    "saliency-add": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                      f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc", "pseudo.saliency.weight_multi=0.5",
                      "pseudo.saliency.multi_mode=add"],
                     "+ pseudo.saliency, the multi-class images' mix adding object only (weights 0.5 / +0.5)"),
    "saliency-passes": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                         f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc", "pseudo.saliency.passes_multi=2",
                         "pseudo.saliency.weight_multi=0.3"],
                        "+ pseudo.saliency, two passes on the multi-class images (the second at 512², weights 0.5 / "
                        "0.3)"),
    "saliency-int8": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                       f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc", "pseudo.saliency.passes_multi=2",
                       "pseudo.saliency.weight_multi=0.3", "pseudo.saliency.precision=int8"],
                      "+ pseudo.saliency with two passes on the multi-class images, the network quantized to int8: "
                      "voc-mini as it shipped from late on 5 Dec 2026"),
    "saliency-paste-loss": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                             f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc", "pseudo.saliency.passes_multi=2",
                             "pseudo.saliency.weight_multi=0.1", "pseudo.saliency.precision=int8",
                             "pseudo.saliency.paste_loss=0.5"],
                            "+ the pasted network learns the saliency maps (pseudo.saliency.paste_loss 0.5), the "
                            "multi-class images' mix at 0.1"),
    "paste-networks": (["pseudo.saliency.enabled=true", "pseudo.saliency.weights=../weights/isnet.onnx",
                        f"pseudo.saliency.cache_dir={RUNS_DIR}/saliency-voc", "pseudo.saliency.passes_multi=2",
                        "pseudo.saliency.weight_multi=0.1", "pseudo.saliency.precision=int8",
                        "pseudo.saliency.paste_loss=0.5", "pseudo.context_paste.networks=2"],
                       "+ two pasted networks, their maps averaged on the multi-class images"),
}


def run_name(variant: str, seed: int) -> str:
    return f"sw-{variant}-s{seed}"


def overrides_of(variant: str, seed: int, cache: str) -> list[str]:
    return [f"name={run_name(variant, seed)}", f"seed={seed}", f"runs_dir={RUNS_DIR}",
            f"train.feature_cache_dir={cache}", "pseudo.workers=1", *SALIENCY_OFF, *VARIANTS[variant][0]]


def reuse_shipped(recipe, shipped, stage: str) -> bool:
    """Copy ``stage`` of the shipped run of the same seed into the variant's run when the variant does not change
    it (same fingerprint; a decoding knob leaves clusters and training as they are) → whether it was copied."""
    import shutil

    from cpcx.runs import fingerprint, stage_is_current

    if not stage_is_current(shipped, stage) or fingerprint(shipped, stage) != fingerprint(recipe, stage):
        return False
    shutil.rmtree(recipe.run_dir(stage), ignore_errors=True)
    shutil.copytree(shipped.run_dir(stage), recipe.run_dir(stage))
    return stage_is_current(recipe, stage)


def run_variant(variant: str, seed: int, cache: str, logs: Path) -> dict:
    """The three stages of one (variant, seed), each skipped when current (or copied from the shipped run when the
    variant leaves it as it is) → {stage: wall seconds run here}."""
    from cpcx.recipe_io import load_recipe
    from cpcx.runs import stage_is_current
    from sweep_train import run_cpcx

    overrides = overrides_of(variant, seed, cache)
    recipe = load_recipe(ROOT / RECIPE, overrides)
    shipped = load_recipe(ROOT / RECIPE, overrides_of("shipped", seed, cache))
    seconds = {}
    for stage in STAGES:
        if stage_is_current(recipe, stage):
            continue
        if variant != "shipped" and stage != "pseudo" and reuse_shipped(recipe, shipped, stage):
            continue
        log = logs / f"{run_name(variant, seed)}-{stage}.log"
        seconds[stage] = round(run_cpcx([stage, "-r", RECIPE, *overrides], log))
    return seconds


def score_run(variant: str, seed: int, cache: str) -> dict:
    """{part: {miou, fg_iou}} of the run's CRF pseudo-labels, plus the stages' seconds from their stage.json."""
    from cpcx.data import build_dataset
    from cpcx.recipe_io import load_recipe
    from cpcx.runs import read_stage_state, stage_is_current
    from self_training_runs import score_folder

    recipe = load_recipe(ROOT / RECIPE, overrides_of(variant, seed, cache))
    if not stage_is_current(recipe, "pseudo"):
        raise SystemExit(f"{recipe.run_dir('pseudo')}: no finished pseudo stage for this recipe; run without "
                         "--score-only first")
    dataset = build_dataset(recipe.dataset, "train")
    parts = score_folder(dataset, recipe.run_dir("pseudo") / "labels")
    no_crf = json.loads((recipe.run_dir("pseudo") / "metrics.json").read_text()).get("miou_no_crf")
    stage_seconds = {s: (read_stage_state(recipe, s) or {}).get("seconds") for s in ("train", "pseudo")}
    return {"parts": parts, "miou_no_crf": None if no_crf is None else 100 * no_crf, "seconds": stage_seconds}


def render(doc: dict) -> str:
    lines = ["# Knobs of voc-mini as it ships (issue 20)", "",
             f"`.venv/bin/python {doc['invocations'][0]}`" if len(doc.get("invocations", [])) == 1 else
             "Made by the invocations listed below the table, merged (`--merge`).", "",
             f"CRF pseudo-label mIoU of the 311 train images (object/background IoU in brackets); choose = the first "
             f"{CHOOSE} ids, where a setting may be picked; report = the other {311 - CHOOSE}, never used to pick. "
             "Seconds: `stage.json` of each run, mean over its seeds (train includes a token extraction only for a "
             "variant whose grid or views need a cache of their own); runs shared the 2 cores (see below).", "",
             "| variant | overrides | seeds | all | choose | report | single / multi | no CRF | train s | pseudo s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    # the table's order is VARIANTS' (the json's keys may come back sorted), unknown rows last
    for variant in [*[v for v in VARIANTS if v in doc["rows"]], *sorted(set(doc["rows"]) - set(VARIANTS))]:
        by_seed = doc["rows"][variant]
        seeds = sorted(by_seed, key=int)
        rows = [by_seed[s] for s in seeds]

        def cell(part: str) -> str:
            values = [r["parts"][part]["miou"] for r in rows]
            fg = sum(r["parts"][part]["fg_iou"] for r in rows) / len(rows)
            each = " / ".join(f"{v:.1f}" for v in values)
            return f"{mean_std(values)} ({fg:.1f})" + (f" [{each}]" if len(values) > 1 and part == "all" else "")

        def seconds(stage: str) -> str:
            values = [r["seconds"][stage] for r in rows if r["seconds"].get(stage)]
            return f"{sum(values) / len(values):.0f}" if values else "—"

        single = mean_std([r["parts"]["single"]["miou"] for r in rows])
        multi = mean_std([r["parts"]["multi"]["miou"] for r in rows])
        no_crf = mean_std([r["miou_no_crf"] for r in rows if r["miou_no_crf"] is not None])
        overrides = " ".join(VARIANTS[variant][0]) if variant in VARIANTS else "?"
        why = VARIANTS[variant][1] if variant in VARIANTS else ""
        lines.append(f"| {variant}: {why} | `{overrides or '—'}` | {', '.join(seeds)} | {cell('all')} | "
                     f"{cell('choose')} | {cell('report')} | {single} / {multi} | {no_crf} | {seconds('train')} | "
                     f"{seconds('pseudo')} |")
    if doc.get("notes"):
        lines += [""] + [f"- {note}" for note in doc["notes"]]
    if doc.get("invocations"):
        lines += ["", "Invocations that wrote this file, in order:", ""]
        lines += [f"- `{c}`" for c in doc["invocations"]]
    return "\n".join(lines) + "\n"


def _extend_new(items: list, more) -> None:
    """Append the entries of ``more`` that ``items`` lacks, in order (invocations and notes of merged sweeps)."""
    items += [m for m in more if m not in items]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache", default=f"{RUNS_DIR}/features-voc",
                        help="train.feature_cache_dir shared by every run (the fused grid's token cache)")
    parser.add_argument("--score-only", action="store_true", help="score the runs that exist; train nothing")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="sweep JSONs of parallel runs to fold in")
    parser.add_argument("--note", action="append", default=[], help="a line to keep under the table (how runs were made)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep-shipped")
    args = parser.parse_args(argv)
    wanted = [v for v in args.only.split(",") if v] or list(VARIANTS)
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; pick from {', '.join(VARIANTS)}")

    json_path = args.out.with_suffix(".json")
    doc = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}, "invocations": []}
    for other in args.merge:
        theirs = json.loads(other.read_text())
        for variant, by_seed in theirs["rows"].items():
            doc["rows"].setdefault(variant, {}).update(by_seed)
        _extend_new(doc.setdefault("invocations", []), theirs.get("invocations", []))
        _extend_new(doc.setdefault("notes", []), theirs.get("notes", []))
    _extend_new(doc.setdefault("notes", []), args.note)
    logs = ROOT / RUNS_DIR / "sweep-shipped-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not args.merge:
        for variant in wanted:
            for seed in args.seeds:
                if args.score_only and not (ROOT / RUNS_DIR / run_name(variant, seed) / "pseudo" / "labels").is_dir():
                    continue
                start = time.perf_counter()
                ran = {} if args.score_only else run_variant(variant, seed, args.cache, logs)
                entry = score_run(variant, seed, args.cache)
                doc["rows"].setdefault(variant, {})[str(seed)] = entry
                print(f"{run_name(variant, seed)}: all {entry['parts']['all']['miou']:.1f}, choose "
                      f"{entry['parts']['choose']['miou']:.1f} (ran {ran or 'nothing'}, "
                      f"{time.perf_counter() - start:.0f} s)", flush=True)
        _extend_new(doc["invocations"], [command_line("benchmarks/sweep_shipped.py", argv)])
    write_report(doc, args.out, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
