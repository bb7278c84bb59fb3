"""``pseudo.self_training`` through ``cpcx pseudo``: each run's two passes scored (issue 20, docs/results.md 8h).

    .venv/bin/python benchmarks/self_training_runs.py --runs runs-st/st-s0 runs-st/st-s1 runs-st/st-s2

A run made with ``pseudo.self_training.enabled=true`` keeps its first pass (``pseudo/labels_first/``: the recipe
without the switch, the same network and decoding) beside its final labels (``pseudo/labels/``), so one run gives
both rows. Each is scored on the data set of the run's resolved recipe: mIoU and object/background IoU on all
images, the first 200 ids (choose) and the others (report), and the stage's time from its log when given
(``--logs``, the plain-text output of ``cpcx pseudo``). Results: ``--out`` (json and md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbones import CHOOSE  # noqa: E402
from results_exec import mean_std  # noqa: E402
from results_rows import ROOT  # noqa: E402

PASSES = {"labels_first": "first pass (the recipe without the switch)", "labels": "+ pseudo.self_training"}
#: The first pass's name when it ran without the CRF (``pseudo.self_training.first_pass_crf: false``).
FIRST_NO_CRF = "first pass without CRF (the heads' targets)"


def _label(key: str, entry: dict) -> str:
    return FIRST_NO_CRF if key == "labels_first" and entry.get("first_pass_crf") is False else PASSES[key]


def score_folder(dataset, folder: Path, multi_folder: Path | None = None) -> dict:
    """{part: mIoU and object/background IoU} of the label PNGs in ``folder``: parts all, choose (the first
    ``CHOOSE`` ids) / report (the others), single / multi (the images with one / several object classes) and
    choose_single / choose_multi. With ``multi_folder`` the multi-class images' labels come from there (one run's
    labels for the single-class images, another's for the rest)."""
    from cpcx.data.palette import load_label_png
    from cpcx.metrics import ConfusionMatrix
    from diagnose_pseudo import miou_and_fg, scene_of

    scenes = scene_of(dataset.labels)
    parts: dict = {}
    for i, image_id in enumerate(dataset.ids):
        scene = str(scenes[i])
        source = multi_folder if scene == "multi" and multi_folder is not None else folder
        mask, predicted = dataset.load_mask(i), load_label_png(source / f"{image_id}.png")
        split = "choose" if i < CHOOSE else "report"
        for part in ("all", split, scene) + ((f"choose_{scene}",) if split == "choose" else ()):
            parts.setdefault(part, ConfusionMatrix(dataset.num_classes)).update(mask, predicted)
    return {p: miou_and_fg(m.matrix, dataset.classes) for p, m in parts.items()}


def stage_seconds(log: Path) -> dict:
    """The heads' training time and each pass's labelling time, as ``cpcx pseudo`` printed them."""
    text = log.read_text(errors="replace")
    heads = re.search(r"heads trained in (\d+) s", text)
    first = re.search(r"first pass: \d+ labels in ([\d.]+) s", text)
    final = re.findall(r"✔ \d+ labels in ([\d.]+) s", text)
    return {"first_pass": float(first.group(1)) if first else None, "heads": int(heads.group(1)) if heads else None,
            "second_pass": float(final[-1]) if final else None}


def _s(value, decimals: int = 0) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"


def render(doc: dict) -> str:
    lines = ["# `pseudo.self_training` through `cpcx pseudo` (issue 20)", "", f"`.venv/bin/python {doc['command']}`", "",
             "| run | labels | all (object/bg IoU) | choose / report |", "|---|---|---:|---|"]
    for run, entry in doc["runs"].items():
        for key in PASSES:
            f = entry[key]
            lines.append(f"| {run} | {_label(key, entry)} | {f['all']['miou']:.1f} ({f['all']['fg_iou']:.1f}) | "
                         f"{_s(f.get('choose', {}).get('miou'), 1)} / {_s(f.get('report', {}).get('miou'), 1)} |")
    for key in PASSES:
        def pick(part):
            values = [e[key][part]["miou"] for e in doc["runs"].values() if part in e[key]]
            return mean_std(values) if values else "—"
        fg = sum(e[key]["all"]["fg_iou"] for e in doc["runs"].values()) / len(doc["runs"])
        label = _label(key, next(iter(doc["runs"].values())))
        lines.append(f"| mean | {label} | {pick('all')} ({fg:.1f}) | {pick('choose')} / {pick('report')} |")
    timed = {run: e["seconds"] for run, e in doc["runs"].items() if e.get("seconds")}
    if timed:
        lines += ["", "Seconds (from the stage's log): " + "; ".join(
            f"{run}: first pass {_s(s['first_pass'])}, heads {_s(s['heads'])}, second pass {_s(s['second_pass'])}"
            for run, s in timed.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (runs_dir/name)")
    parser.add_argument("--logs", type=Path, nargs="*", default=[], help="the runs' `cpcx pseudo` logs, same order")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "self-training-runs")
    args = parser.parse_args(argv)

    def entry_of(run: Path, recipe, dataset) -> dict:
        entry = {key: score_folder(dataset, run / "pseudo" / key) for key in PASSES}
        entry["first_pass_crf"] = recipe.pseudo.self_training.first_pass_crf and recipe.crf.enabled
        return entry

    report_runs("benchmarks/self_training_runs.py", argv, args.runs, args.logs, args.out, entry_of, stage_seconds,
                render)
    return 0


def report_runs(script: str, argv, runs: list[Path], logs: list[Path], out: Path, entry_of, seconds_of,
                render) -> dict:
    """The report of finished runs: ``entry_of(run, recipe, dataset)`` for each run, on the data set of its resolved
    pseudo recipe, with ``seconds_of(log)`` of its log when there is one; written to ``out`` (json, and md by
    ``render``) under the command that made it → the document."""
    from cpcx import atomic
    from cpcx.data import build_dataset
    from cpcx.recipe import load_recipe

    doc = {"command": " ".join([script, *(argv if argv is not None else sys.argv[1:])]), "runs": {}}
    for k, run in enumerate(runs):
        recipe = load_recipe(run / "pseudo" / "recipe.resolved.yaml", [])
        entry = entry_of(run, recipe, build_dataset(recipe.dataset, recipe.pseudo.split))
        if k < len(logs):
            entry["seconds"] = seconds_of(logs[k])
        doc["runs"][run.name] = entry
        print(run.name, json.dumps(entry), flush=True)
    atomic.write_json(out.with_suffix(".json"), doc)
    atomic.write_text(out.with_suffix(".md"), render(doc))
    return doc


if __name__ == "__main__":
    sys.exit(main())
