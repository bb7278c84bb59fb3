"""``cpcx run``: clusters → train → pseudo → segment → evaluate, skipping the stages that are up to date.

A stage is up to date when its ``stage.json`` says ``done`` for the current fingerprint (the recipe sections
it and its upstream stages read, see ``cpcx.runs``). A stage that was interrupted (``running`` with the same
fingerprint) is resumed: training and segmentation continue from ``weights/last.pt``, pseudo-labelling skips
the images already written. A stage whose recipe changed is redone from scratch (its stale outputs dropped).
The run ends with a summary table and ``runs/<name>/summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from cpcx import atomic
from cpcx.recipe import Recipe
from cpcx.runs import (STAGES, drop_stale_outputs, fingerprint, mark_stage_done, output_written, read_stage_state,
                       stage_is_current)


def _stage_functions() -> dict[str, Callable[[Recipe, bool, Console], object]]:
    # Imported here so that `cpcx run --help` stays fast.
    from cpcx.clusters import run_clusters
    from cpcx.pseudo import run_pseudo
    from cpcx.segment import run_segment
    from cpcx.train import run_train

    return {
        "clusters": lambda r, resume, c: run_clusters(r, console=c),
        "train": lambda r, resume, c: run_train(r, resume=resume, console=c),
        "pseudo": lambda r, resume, c: run_pseudo(r, console=c),
        "segment": lambda r, resume, c: run_segment(r, resume=resume, console=c),
    }


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None  # JSON of another shape is no record of ours


def missing_outputs(recipe: Recipe, stage: str) -> tuple[str, str] | None:
    """What a stage recorded ``done`` no longer has on disk, and how to mend it: ``(what, "resume" | "run")``.

    The record alone is not trusted: a deleted pseudo-label or checkpoint would otherwise be "up to date"
    forever (and the next stage would fail, or score a partial set). ``resume`` redoes only what is missing
    (the same inputs give the same outputs); ``run`` redoes the stage, because what is gone is its result.
    """
    from cpcx.errors import CpcxError

    folder = recipe.run_dir(stage)
    if stage == "clusters":
        from cpcx.clusters import load_clusters

        try:
            load_clusters(folder / "clusters.json")
        except CpcxError:  # gone, empty or torn: the stage (cached or static, so cheap) writes it again
            return "clusters.json is missing or unreadable", "resume"
        return None
    if stage == "train":
        if not any((folder / "weights" / name).is_file() for name in ("best.pt", "last.pt")):
            return "weights/best.pt and weights/last.pt are missing", "run"
        return None
    if stage == "segment" and not (folder / "weights" / "best.pt").is_file():
        return "weights/best.pt is missing", "run"
    from cpcx.data import build_dataset

    sub, split = ("labels", recipe.pseudo.split) if stage == "pseudo" else ("predictions", "val")
    try:
        dataset = build_dataset(recipe.dataset, split)
    except CpcxError:
        return None  # the data set itself is the problem: the stage that needs it will say so
    gone = [i for i in dataset.ids if not output_written(folder / sub / f"{i}.png")]
    if gone:
        return f"{len(gone)} of {len(dataset)} files in {sub}/ are missing (first: {gone[0]}.png)", "resume"
    if dataset.has_masks and not (folder / "metrics.json").is_file():
        return "metrics.json is missing", "resume"
    return None


def plan(recipe: Recipe, notes: dict[str, str] | None = None) -> dict[str, str]:
    """What ``cpcx run`` would do for each stage: ``skip``, ``resume`` or ``run`` (``notes`` gets the reason
    when a stage recorded done is redone because its outputs are gone)."""
    actions: dict[str, str] = {}
    upstream_redone = False
    for stage in STAGES:
        state = read_stage_state(recipe, stage)
        if not upstream_redone and stage_is_current(recipe, stage):
            missing = missing_outputs(recipe, stage)
            if missing is None:
                actions[stage] = "skip"
                continue
            what, actions[stage] = missing
            if notes is not None:
                notes[stage] = what
            upstream_redone = actions[stage] == "run"  # a repair by resuming gives what was there: keep the rest
            continue
        same = bool(state and state.get("fingerprint") == fingerprint(recipe, stage))
        actions[stage] = "resume" if (same and not upstream_redone) else "run"
        upstream_redone = True
    return actions


def _can_resume(recipe: Recipe, stage: str, console: Console) -> bool:
    """Whether an interrupted train/segment stage can continue from ``weights/last.pt``.

    ``cpcx run`` never got a ``--resume`` from the user, so advice about that flag would not fit: an unreadable
    ``last.pt`` (a kill mid-save before atomic writes, a full disk, a hand copy) or one the recipe no longer
    matches makes the stage start over, with a note, instead of a refusal the user cannot act on.
    """
    from cpcx.checkpoint import changed_keys
    from cpcx.errors import CpcxError
    from cpcx.torchload import load_torch_file

    last = recipe.run_dir(stage) / "weights" / "last.pt"
    if not last.exists():  # killed before the first epoch ended
        return False
    try:
        ckpt = load_torch_file(last, "checkpoint", "-")
        changed = changed_keys(ckpt.get("recipe", {}), recipe.model_dump(mode="json")) if stage == "train" else []
        why = f"the recipe changed since it was saved ({', '.join(changed)})" if changed else None
    except CpcxError as exc:
        why = str(exc).split(": ", 1)[-1].rsplit("; ", 1)[0]
    except AttributeError:
        why = "not a cpcx checkpoint"
    if why is None:
        return True
    console.print(f"[yellow]![/] {last}: {why}; {stage} starts over (its finished epochs are redone) and "
                  "replaces it")
    return False


def run_pipeline(recipe: Recipe, console: Console | None = None) -> dict:
    console = console or Console()
    functions = _stage_functions()
    notes: dict[str, str] = {}
    actions = plan(recipe, notes)
    summary_path = recipe.run_dir() / "summary.json"
    previous = _read_json(summary_path) or {}
    times: dict[str, float] = dict(previous.get("seconds", {})) if previous.get("name") == recipe.name else {}
    for stage, action in actions.items():
        if action == "skip":
            console.print(f"[dim]• {stage}: up to date, skipped[/]")
            continue
        if stage in notes:
            console.print(f"[yellow]![/] {stage}: recorded done, but {notes[stage]}; "
                          f"{'redoing what is missing' if action == 'resume' else 'redoing the stage'}")
        if action == "run":
            dropped = drop_stale_outputs(recipe, stage)
            if stage in ("train", "segment"):
                # a fresh start must not resume from weights of another recipe
                for name in ("last.pt", "best.pt"):
                    (recipe.run_dir(stage) / "weights" / name).unlink(missing_ok=True)
            note = f" (dropped stale {', '.join(dropped)})" if dropped else ""
            console.rule(f"[bold]{stage}[/]{note}")
        else:
            console.rule(f"[bold]{stage}[/] (resuming)")
        resume = action == "resume" and (stage not in ("train", "segment") or _can_resume(recipe, stage, console))
        start = time.perf_counter()
        functions[stage](recipe, resume, console)
        times[stage] = round(time.perf_counter() - start, 1)
        mark_stage_done(recipe, stage, seconds=times[stage])
    summary = _summary(recipe, times)
    atomic.write_json(summary_path, summary)
    _print_summary(summary, console)
    return summary


def _summary(recipe: Recipe, times: dict[str, float]) -> dict:
    clusters = _read_json(recipe.run_dir("clusters") / "clusters.json") or {}
    pseudo = _read_json(recipe.run_dir("pseudo") / "metrics.json") or {}
    segment = _read_json(recipe.run_dir("segment") / "metrics.json") or {}
    return {
        "name": recipe.name,
        "clusters": [
            {"name": c.get("name"), "members": c.get("members")} for c in clusters.get("clusters", [])
        ],
        "pseudo_miou": pseudo.get("miou"),
        "pseudo_miou_no_crf": pseudo.get("miou_no_crf"),
        "val_miou": segment.get("miou"),
        "seconds": times,
        "folders": {stage: str(recipe.run_dir(stage)) for stage in STAGES},
        "figures": str(recipe.run_dir("pseudo") / "figures"),
    }


def _fmt(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"cpcx run · {summary['name']}", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for cluster in summary["clusters"]:
        table.add_row(f"cluster {cluster['name']}", ", ".join(cluster["members"] or []))
    table.add_row("pseudo-label mIoU (train, CRF)", _fmt(summary["pseudo_miou"]))
    table.add_row("pseudo-label mIoU (train, no CRF)", _fmt(summary["pseudo_miou_no_crf"]))
    table.add_row("DeepLab mIoU (val)", _fmt(summary["val_miou"]))
    for stage, seconds in summary["seconds"].items():
        table.add_row(f"time {stage}", f"{seconds:.0f} s")
    console.print(table)
    console.print(f"figures: {summary['figures']}")
    console.print(f"summary: {Path(summary['folders']['clusters']).parent / 'summary.json'}")
