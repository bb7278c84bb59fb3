"""``docs/results.md`` from ``docs/results.json``: aggregation (mean ± std over seeds) and the markdown tables.

Pure functions of the JSON document (plus the previous markdown, whose hand-written analysis between
``<!-- analysis -->`` and ``<!-- /analysis -->`` is kept across re-renders), so the tests render fixtures.
mIoU values are stored as fractions and shown ×100 with one decimal.
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Any, Iterable, Sequence

from results_rows import LOCAL_LLMS, t5_tag

ANALYSIS_OPEN, ANALYSIS_CLOSE = "<!-- analysis -->", "<!-- /analysis -->"
_ANALYSIS = re.compile(re.escape(ANALYSIS_OPEN) + r"(.*?)" + re.escape(ANALYSIS_CLOSE), re.DOTALL)
ANALYSIS_PLACEHOLDER = "\n_To be written once the full benchmark has run: what the numbers mean, honestly._\n"
DONE = "done"


# ------------------------------------------------------------------------------------- aggregation
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n - 1) of the values that exist; std is None below two values."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def fmt_pm(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """``27.9 ± 0.4`` (n ≥ 2), ``27.9`` (n = 1) or ``—`` (none)."""
    mean, std, n = mean_std(values)
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def compact_partition(clusters: Sequence[dict] | None, limit: int = 6) -> str:
    """``vehicle {aeroplane, bicycle}; animal {bird, cat} + singletons: person``: groups of two or more in full,
    singletons by name when there are few of them."""
    if not clusters:
        return "—"
    groups = [c for c in clusters if len(c["members"]) > 1]
    singles = [c["members"][0] for c in clusters if len(c["members"]) == 1]
    if not groups:
        return f"{len(singles)} singletons (every class alone)"
    parts = [f"{c['name']} {{{', '.join(c['members'])}}}" for c in groups[:limit]]
    if len(groups) > limit:
        parts.append(f"… {len(groups) - limit} more groups")
    text = "; ".join(parts)
    if singles:
        text += f" + singletons: {', '.join(singles)}" if len(singles) <= 4 else f" + {len(singles)} singletons"
    return _cell(text)


def _cell(text: str) -> str:
    """Text from an LLM (cluster names) must not break a markdown table row."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _groups(clusters: Sequence[dict]) -> tuple[tuple[str, ...], ...]:
    return tuple(sorted(tuple(sorted(c["members"])) for c in clusters))


def rand_agreement(runs: Sequence[dict], key: str = "clusters") -> float | None:
    """Mean over pairs of runs of the Rand index of their partitions (``key``): the share of class pairs that
    both put together or both keep apart. 1 = the same partition; finer than a count of distinct partitions."""
    parts = [{m: i for i, c in enumerate(r[key]) for m in c["members"]} for r in runs if r.get(key)]
    scores = []
    for a in range(len(parts)):
        for b in range(a + 1, len(parts)):
            classes = sorted(parts[a])
            pairs = [(x, y) for i, x in enumerate(classes) for y in classes[i + 1:]]
            same = sum((parts[a][x] == parts[a][y]) == (parts[b][x] == parts[b][y]) for x, y in pairs)
            scores.append(same / len(pairs))
    return sum(scores) / len(scores) if scores else None


def distinct_partitions(runs: Sequence[dict]) -> int:
    """How many different partitions (cluster names ignored) the runs produced."""
    return len({_groups(r["clusters"]) for r in runs if r.get("clusters")})


_ROW_ORDER = {"sources": ("gemma", "qwen", "static", "one-per-class")}


def _row_key(section: str, row: str) -> tuple:
    """Table order: the sources as listed, R numerically, the rest by name ((a)…(d)); the JSON keeps no order."""
    order = _ROW_ORDER.get(section, ())
    if row in order:
        return (0, order.index(row), "")
    number = re.fullmatch(r"R=(\d+)", row)
    return (0, int(number.group(1)), "") if number else (1, 0, row)


def rows_of(doc: dict, section: str) -> list[tuple[str, list[dict]]]:
    """The entries of a section grouped by row (seeds in order), rows in table order."""
    rows: dict[str, list[dict]] = {}
    for entry in doc.get("experiments", {}).values():
        if entry.get("section") == section:
            rows.setdefault(entry["row"], []).append(entry)
    for entries in rows.values():
        entries.sort(key=lambda e: e.get("seed", 0))
    return sorted(rows.items(), key=lambda item: _row_key(section, item[0]))


def _done(entries: Sequence[dict]) -> list[dict]:
    return [e for e in entries if e.get("status") == DONE]


def _status(entries: Sequence[dict]) -> str:
    """What to show when a row has no finished seed: the first entry's status (never an invented number)."""
    for entry in entries:
        if entry.get("status") != DONE:
            return _cell(str(entry.get("status") or "not run"))
    return ""


def _seeds(entries: Sequence[dict], key: str) -> str:
    seeds = [str(e["seed"]) for e in entries if e.get(key) is not None]
    return ", ".join(seeds) or "—"


# ---------------------------------------------------------------------------------------- sections
def _miou_row(label: str, entries: Sequence[dict], extra: Sequence[str] = ()) -> str:
    done = _done(entries)
    if not done:
        return f"| {label} | {' | '.join(extra) + ' | ' if extra else ''}{_status(entries)} | | | |"
    cells = [fmt_pm(e.get("pseudo_miou") for e in done), fmt_pm(e.get("pseudo_miou_no_crf") for e in done),
             fmt_pm(e.get("val_miou") for e in done), f"{_seeds(done, 'pseudo_miou')} / {_seeds(done, 'val_miou')}"]
    return "| " + " | ".join([label, *extra, *cells]) + " |"


_MIOU_HEAD = "pseudo mIoU (CRF) | pseudo mIoU (no CRF) | DeepLab val mIoU | seeds (pseudo / DeepLab) |"


def table4(doc: dict) -> list[str]:
    rows = rows_of(doc, "table4")
    lines = ["## Table 4 analog: the CPC components (VOC slice)", ""]
    if not rows:
        return lines + ["_not run yet_", ""]
    lines += [f"Base recipe `recipes/voc-mini.yaml` (frozen DINOv2 ViT-S/14 at 336, EfficientNet-Lite0 "
              f"DeepLabV3+); pseudo-labels on the {_count(doc, 'train_images', 'table4')} train images, DeepLab on "
              f"the {_count(doc, 'val_images', 'table4')} val images. Same seeds in every row; mean ± sample std "
              "over seeds.", "",
              "| row | " + _MIOU_HEAD, "|---|---:|---:|---:|---|"]
    lines += [_miou_row(f"({row}) {entries[0]['label']}", entries) for row, entries in rows]
    segment_s = [e.get("stages", {}).get("segment", {}).get("seconds") for _, es in rows for e in es]
    lines += ["", f"DeepLab takes {_fmt_seconds(segment_s)} s per run here, so it is trained only for the seeds "
              "listed after the slash (`--segment-seeds`). Clusters used:", ""]
    for row, entries in rows:
        done = _done(entries)
        if any("model.cluster_token=false" in o for o in entries[0].get("overrides", [])):
            lines.append(f"- ({row}) none: no cluster token")
        elif done:
            clusters = done[0].get("clusters")
            lines.append(f"- ({row}) {len(clusters or [])} clusters: {compact_partition(clusters)}")
    return lines + [""]


def sources(doc: dict) -> list[str]:
    rows = rows_of(doc, "sources")
    lines = ["## Cluster sources (full CPC = rows d and j)", ""]
    if not rows:
        return lines + ["_not run yet_", ""]
    lines += ["| source | clusters | " + _MIOU_HEAD, "|---|---|---:|---:|---:|---|"]
    for row, entries in rows:
        done = _done(entries)
        clusters = done[0].get("clusters") if done else None
        count = f"{len(clusters)}: {compact_partition(clusters)}" if clusters else "—"
        lines.append(_miou_row(f"{entries[0]['label']}", entries, [count]))
    return lines + [""]


def table5(doc: dict) -> list[str]:
    runs = [r for r in doc.get("clusters_runs", {}).values() if r.get("section") == "table5"]
    lines = ["## Table 5 analog: R queries, cluster stability and mIoU (VOC slice)", ""]
    if not runs:
        return lines + ["_not run yet_", ""]
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for run in runs:  # runs recorded before a second model (or the pairwise vote) joined name neither: Gemma's
        groups.setdefault((run.get("llm", "gemma"), run.get("vote", "partition"), int(run["queries"])), []).append(run)
    training = {e["row"]: e for e in doc.get("experiments", {}).values() if e.get("section") == "table5"}
    temps = sorted({r.get("temperature") for r in runs})
    lines += [f"`cpcx clusters` with each local model, temperature {', '.join(map(str, temps))}, repeat k sets "
              "`llm.seed=k` (generate query r of a run samples with seed k + r), always cold (`llm.cache_mode=refresh`). \"Distinct answers in a run\" "
              "counts the different partitions among the R generate answers of one run (the vote's histogram).",
              "\"Agreement\" is the mean Rand index between the repeats' partitions (share of class pairs that both "
              "put together or both keep apart), of z0 (the vote's partition) and of the final one (after refine).",
              "", "| model | R | repeats | distinct partitions over repeats | agreement z0 / final | distinct answers "
              "in a run | clusters | refine iterations (converged) | s per clusters run | pseudo mIoU (CRF, seed 0) |",
              "|---|---:|---:|---:|---|---|---|---|---:|---:|"]
    order = list(LOCAL_LLMS)

    def table_order(key: tuple[str, str, int]) -> tuple:  # models as LOCAL_LLMS lists them, the paper's vote first
        return order.index(key[0]) if key[0] in order else len(order), key[1] != "partition", key

    for key in sorted(groups, key=table_order):
        model, vote, queries = key
        name = (LOCAL_LLMS[model].name if model in LOCAL_LLMS else model) + (
            "" if vote == "partition" else f", `clustering.vote={vote}`")
        done = [r for r in groups[key] if r.get("status") == DONE]
        if not done:
            lines.append(f"| {name} | {queries} | 0 | {_status(groups[key])} | | | | | | |")
            continue
        train = training.get(f"{t5_tag(model, vote)}R={queries}")
        miou = (fmt_pm([train.get("pseudo_miou")]) if train and train.get("status") == DONE
                else _cell((train or {}).get("status", "—")))
        refine = ", ".join(f"{r.get('refine_iterations')}{'' if r.get('converged') else ' (not conv.)'}" for r in done)
        lines.append(" | ".join([
            f"| {name}", str(queries), str(len(done)), str(distinct_partitions(done)),
            " / ".join("—" if v is None else f"{v:.3f}" for v in (rand_agreement(done, "z0"), rand_agreement(done))),
            ", ".join(str(r.get("vote_distinct")) for r in done), ", ".join(str(len(r["clusters"])) for r in done),
            refine, _fmt_seconds([r.get("seconds") for r in done]), f"{miou} |"]))
    return lines + [""]


def coco(doc: dict) -> list[str]:
    rows = rows_of(doc, "coco")
    lines = ["## COCO slice", ""]
    if not rows:
        return lines + ["_not run yet_", ""]
    entries = rows[0][1]
    done = _done(entries)
    counts = (done[0].get("counts") or {}) if done else {}
    scored = done[0].get("classes_scored") if done else None
    lines += [f"`recipes/coco-mini.yaml`: 81 classes (80 + background), static clusters = the 12 COCO "
              f"supercategories; pseudo-labels on the {counts.get('train_images', '?')} train images, DeepLab "
              f"on the {counts.get('val_images', '?')} val images. mIoU averages the classes present in the ground "
              f"truth or the prediction ({scored if scored is not None else '?'} of 81 on train).", "",
              "| run | " + _MIOU_HEAD, "|---|---:|---:|---:|---|", _miou_row(entries[0]["label"], entries), ""]
    return lines


def _fmt_seconds(values: Sequence[float | None]) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "—"
    return f"{mean:.0f}" if std is None else f"{mean:.0f} ± {std:.0f}"


def _count(doc: dict, key: str, section: str) -> Any:
    for entry in doc.get("experiments", {}).values():
        if entry.get("section") == section and (entry.get("counts") or {}).get(key):
            return entry["counts"][key]
    return "?"


def stage_speed(doc: dict) -> list[tuple[str, str, list[dict]]]:
    """Measured stage runs per (data set, stage), each run folder once (shared folders are skipped stages)."""
    seen: set[tuple[str, str]] = set()
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in doc.get("experiments", {}).values():
        for stage, info in (entry.get("stages") or {}).items():
            # a skipped stage reports the time its stage.json recorded when it ran; a resumed one only the rest
            partial = info.get("action") == "resume" or info.get("failed") or info.get("seconds") is None
            if partial or (entry["run"], stage) in seen:
                continue
            seen.add((entry["run"], stage))
            # a static clusters stage reads the recipe; an LLM one asks the model: two different costs
            provider = entry.get("provider", "?")
            name = stage if stage != "clusters" else \
                "clusters (static)" if provider == "static" else f"clusters ({provider} LLM, shared answer cache)"
            groups.setdefault((entry.get("dataset", "voc"), name), []).append(
                {**info, "counts": entry.get("counts") or {}})
    return [(ds, stage, runs) for (ds, stage), runs in groups.items()]


def _throughput(stage: str, runs: Sequence[dict]) -> str:
    rates = []
    for run in runs:
        c = run["counts"]
        work = {"train": (c.get("train_images") or 0) * (c.get("train_epochs") or 0),
                "pseudo": c.get("train_images") or 0,
                "segment": (c.get("train_images") or 0) * (c.get("segment_epochs") or 0)}.get(stage)
        if work and run.get("seconds"):
            rates.append(work / run["seconds"])
    unit = {"train": "image-epochs/s", "pseudo": "images/s", "segment": "image-epochs/s"}.get(stage)
    mean, _, _ = mean_std(rates)
    return "—" if mean is None or unit is None else f"{mean:.2f} {unit}"


def speed(doc: dict) -> list[str]:
    lines = ["## Speed", "", "Every stage ran as its own `cpcx <stage>` process: wall time, CPU time (user + system, "
             "CRF workers included) and peak resident memory (largest process of the stage, from `wait4`).", "",
             "| data | stage | runs | wall s (mean, min–max) | CPU s (mean) | throughput | peak RSS MiB |",
             "|---|---|---:|---|---:|---|---:|"]
    order = {"train": 1, "pseudo": 2, "segment": 3}
    for ds, stage, runs in sorted(stage_speed(doc), key=lambda g: (g[0], order.get(g[1], 0), g[1])):
        secs = [r["seconds"] for r in runs]
        cpu = mean_std(r.get("cpu_seconds") for r in runs)[0]
        rss = max((r["max_rss_mib"] for r in runs if r.get("max_rss_mib") is not None), default=None)
        wall = f"{statistics.fmean(secs):.0f} ({min(secs):.0f}–{max(secs):.0f})"
        lines.append(f"| {ds} | {stage} | {len(runs)} | {wall} | {'—' if cpu is None else f'{cpu:.0f}'} | "
                     f"{_throughput(stage, runs)} | {'—' if rss is None else f'{rss:.0f}'} |")
    lines += ["", "Each run folder counts once (rows that share one count it once; a stage found done reports the "
              "time recorded when it ran; a resumed stage is left out). The slowest train run of a data set includes "
              "the one-time DINOv2 token extraction (all rows share one token cache, `train.feature_cache_dir`); "
              "segment includes the val predictions. The LLM server's own memory is not in the clusters figures.", ""]
    lines += _bench_files(doc.get("bench_files") or {})
    lines += _cold_warm(doc)
    gpu = (doc.get("machine") or {}).get("gpu")
    lines += [f"GPU: {gpu}" if gpu else "GPU: not lent to this task (torch sees none); no GPU numbers.", ""]
    return lines


def _bench_files(files: dict) -> list[str]:
    lines = []
    train = files.get("train")
    if train:
        lines += [f"Feature cache on vs off (`benchmarks/results/train.json`, {train.get('images')} images, "
                  f"{train.get('backbone')}): cached {train.get('cached_s_per_epoch')} s/epoch vs uncached "
                  f"{train.get('uncached_s_per_epoch')} s/epoch ({train.get('speedup')}× wall, "
                  f"{train.get('speedup_cpu_time')}× CPU time); one-time extraction "
                  f"{train.get('cache_extraction_s')} s.", ""]
    pseudo = files.get("pseudo")
    if pseudo:
        runs = "; ".join(f"{r['workers']} worker{'s' if r['workers'] != 1 else ''}: {r['images_per_s']:.2f} images/s"
                         f" ({r.get('speedup', 1):.2f}×)" for r in pseudo.get("runs", []))
        lines += [f"CRF workers (`benchmarks/results/pseudo.json`, {pseudo.get('images')} images, "
                  f"{pseudo.get('network')}): {runs}; CRF alone {pseudo.get('crf', {}).get('mean_ms', 0):.0f} "
                  "ms/image.", ""]
    return lines or ["_benchmarks/results/{train,pseudo}.json not found: run `make bench`._", ""]


def _cold_warm(doc: dict) -> list[str]:
    runs = {k.rsplit("-", 1)[-1]: r for k, r in doc.get("clusters_runs", {}).items() if r.get("section") == "speed"}
    cold, warm = runs.get("cold"), runs.get("warm")
    if not cold:
        return []
    if cold.get("status") != DONE or not warm or warm.get("status") != DONE:
        return [f"Cold vs warm `cpcx clusters` (Gemma): {cold.get('status')}", ""]
    lines = [f"| `cpcx clusters`, Gemma, R = {cold.get('queries')} + refine | wall s | LLM calls | peak RSS MiB |",
             "|---|---:|---:|---:|"]
    for name, run in (("cold", cold), ("warm", warm)):
        what = "empty answer cache" if name == "cold" else "second run"
        lines.append(f"| {name} ({what}) | {run['seconds']:.1f} | {run.get('calls', '—')} | "
                     f"{run.get('max_rss_mib', 0):.0f} |")
    return lines + [""]


def commands(doc: dict) -> list[str]:
    # Every invocation that wrote into this file, in order: a benchmark resumed or merged over several runs
    # of results.py shows all of them (later ones skip what earlier ones finished).
    invocations = doc.get("invocations") or [doc.get("benchmark_command", "?")]
    heading = "The benchmark:" if len(invocations) == 1 else \
        "The benchmark, as it was run (in order; a later invocation skips the stages an earlier one finished):"
    lines = ["## Commands", "", heading, "", "```bash", *invocations, "```", "",
             "Each row is a `cpcx run` (shown for its first seed; the other seeds change `seed=` and the `-s<seed>` of "
             "`name=`). The benchmark runs the same overrides stage by stage (`cpcx clusters`, `train`, `pseudo`, "
             "and `segment` for the DeepLab seeds only), each as its own process:", "", "```bash"]
    for section in ("table4", "sources", "table5", "coco"):
        for row, entries in rows_of(doc, section):
            lines += [f"# {section}/{row}: {entries[0]['label']}", entries[0]["command"]]
    runs = doc.get("clusters_runs", {})
    for key in sorted(runs, key=lambda k: (runs[k].get("section") != "table5", runs[k].get("queries", 0), k)):
        run = runs[key]
        if run.get("repeat", 0) == 0:  # the other repeats differ only in llm.seed and name
            note = " (repeat k: llm.seed=k, name=…-rep<k>)" if run.get("section") == "table5" else ""
            lines += [f"# {key}{note}", run["command"]]
    return lines + ["```", ""]


def header(doc: dict) -> list[str]:
    m = doc.get("machine") or {}
    return ["# Results on the real slices (issue 7)", "",
            "Generated by `benchmarks/results.py` (do not edit by hand outside the analysis section); raw numbers "
            "per row and seed in `results.json` beside this file. mIoU × 100.", "",
            f"- date: {doc.get('updated', '?')} (started {doc.get('started', '?')})",
            f"- machine: {m.get('cores', '?')} cores, {m.get('cpu', '?')}, {m.get('ram_gib', '?')} GiB RAM, "
            f"GPU: {m.get('gpu') or 'none'}; torch {m.get('torch', '?')}, Python {m.get('python', '?')}",
            f"- git: {doc.get('git_sha', '?')}",
            f"- local LLM: {doc.get('llm', {}).get('note', '?')}", ""]


def keep_analysis(previous: str | None) -> str:
    """The hand-written text between the analysis markers of the previous markdown (or the placeholder)."""
    match = _ANALYSIS.search(previous or "")
    return match.group(1) if match else ANALYSIS_PLACEHOLDER


def render(doc: dict, previous: str | None = None) -> str:
    lines = header(doc) + table4(doc) + sources(doc) + table5(doc) + coco(doc) + speed(doc)
    lines += ["## What the numbers mean", "", ANALYSIS_OPEN + keep_analysis(previous) + ANALYSIS_CLOSE, ""]
    lines += commands(doc)
    return "\n".join(lines)
