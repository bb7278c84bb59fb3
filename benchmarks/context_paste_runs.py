"""``pseudo.context_paste`` through ``cpcx pseudo``: each run scored beside the labels of the same recipe without it
(issue 20, docs/results.md 8i).

    .venv/bin/python benchmarks/context_paste_runs.py --runs runs-cp/cp-s0 runs-cp/cp-s1 runs-cp/cp-s2 \\
        --base runs-bench/var-bf16-crf5-s{0,1,2}/pseudo/labels --logs runs-cp/cp-s{0,1,2}.log

A run made with ``pseudo.context_paste.enabled=true`` labels the single-class images with its own network and the
multi-class ones with the pasted network; ``--base`` names, in the same order, the label folder of the same recipe
and network without the switch. Both are scored on the data set of the run's resolved recipe: mIoU and
object/background IoU on all images, the first 200 ids (choose) and the others (report), the single- and the
multi-class images apart (``self_training_runs.score_folder``). The run's segmenter, when it has one
(``segment/``), adds its val mIoU and the two halves of the val ids (``variants.segment_scores``). ``--logs``: the
runs' ``cpcx pseudo`` output, for the seconds of the second network's training and of the whole labelling.
Results: ``--out`` (json and md).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_exec import mean_std  # noqa: E402
from results_rows import ROOT  # noqa: E402
from self_training_runs import report_runs, score_folder  # noqa: E402

PARTS = ("all", "choose", "report", "single", "multi")


def stage_seconds(log: Path) -> dict:
    """The second network's training (its epochs' seconds summed) and the whole labelling, as the log printed."""
    text = log.read_text(errors="replace")
    after = text.split("a second network learns", 1)[-1] if "a second network learns" in text else ""
    epochs = [float(s) for s in re.findall(r"^epoch \d+/\d+ \(.*?\) .* ([\d.]+)s$", after, flags=re.M)]
    total = re.findall(r"✔ \d+ labels in ([\d.]+) s", text)
    return {"paste_training": round(sum(epochs)) if epochs else None,
            "labelling": round(float(total[-1])) if total else None}


def _cell(parts: dict, part: str) -> str:
    if part not in parts:
        return "—"
    return f"{parts[part]['miou']:.1f} ({parts[part]['fg_iou']:.1f})"


def render(doc: dict) -> str:
    runs = doc["runs"]
    lines = ["# `pseudo.context_paste` through `cpcx pseudo` (issue 20)", "", f"`.venv/bin/python {doc['command']}`",
             "", "Pseudo-label mIoU (object/background IoU in brackets) of each run and of the same recipe without "
             "the switch (`--base`).", "",
             "| run | labels | " + " | ".join(PARTS) + " |", "|---|---|" + "---:|" * len(PARTS)]
    for run, entry in runs.items():
        for key, title in (("base", "without the switch"), ("paste", "+ pseudo.context_paste")):
            lines.append(f"| {run} | {title} | " + " | ".join(_cell(entry[key], p) for p in PARTS) + " |")
    for key, title in (("base", "without the switch"), ("paste", "+ pseudo.context_paste")):
        cells = []
        for part in PARTS:
            values = [e[key][part]["miou"] for e in runs.values() if part in e[key]]
            fg = [e[key][part]["fg_iou"] for e in runs.values() if part in e[key]]
            cells.append(f"{mean_std(values)} ({sum(fg) / len(fg):.1f})" if values else "—")
        lines.append(f"| mean | {title} | " + " | ".join(cells) + " |")
    segmented = {run: e["segment"] for run, e in runs.items() if e.get("segment")}
    if segmented:
        lines += ["", "Segmenter on the val split, trained on the switched labels: " + "; ".join(
            f"{run} {s['segment_val']:.1f} (halves {s['segment_choose']:.1f} / {s['segment_report']:.1f})"
            for run, s in segmented.items()) + f"; mean {mean_std([s['segment_val'] for s in segmented.values()])}."]
    timed = {run: e["seconds"] for run, e in runs.items() if e.get("seconds")}
    if timed:
        lines += ["", "Seconds (from the stage's log): " + "; ".join(
            f"{run}: second network's training {s['paste_training']}, the whole labelling {s['labelling']}"
            for run, s in timed.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (runs_dir/name)")
    parser.add_argument("--base", type=Path, nargs="+", required=True,
                        help="label folders of the same recipe without the switch, same order")
    parser.add_argument("--logs", type=Path, nargs="*", default=[], help="the runs' `cpcx pseudo` logs, same order")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "context-paste-runs")
    args = parser.parse_args(argv)
    if len(args.base) != len(args.runs):
        parser.error(f"--base names {len(args.base)} folders for {len(args.runs)} runs; give one per run")

    from variants import segment_scores

    bases = dict(zip(args.runs, args.base))

    def entry_of(run: Path, recipe, dataset) -> dict:
        entry = {"base": score_folder(dataset, bases[run]), "paste": score_folder(dataset, run / "pseudo" / "labels")}
        if (run / "segment" / "metrics.json").is_file():
            entry["segment"] = segment_scores(run / "segment")
        return entry

    report_runs("benchmarks/context_paste_runs.py", argv, args.runs, args.logs, args.out, entry_of, stage_seconds,
                render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
