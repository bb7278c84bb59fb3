"""``cpcx clusters``: group the class names into clusters (paper Sec. 3.2, Algorithm 1) → clusters.json.

Algorithm 1, as written in the paper:

1. ask the LLM ``R = clustering.queries`` times with p_gen ‖ class list (T = 0; the query index r is part of
   each request's identity, so each is its own cached answer), turn each answer into a canonical partition;
2. ``z0`` = the most frequent partition (ties → the one that appeared first);
3. ``z_{t+1} = M(p_refine ‖ z_t)`` until ``z_{t+1} = z_t = z_{t-1}``, or ``clustering.max_refine_iters``
   (then a warning names the partition kept: the last one). ``clustering.refine: false`` keeps z0.

The ``static`` provider takes the clusters from the recipe instead (checked against the class list).
Output ``runs/<name>/clusters/clusters.json`` (byte-identical for the same recipe and cache) and
``answers.json`` (every answer's raw text). ``load_clusters`` reads the file for training.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cpcx import atomic
from cpcx.errors import CpcxError
from cpcx.llm.answers import EXAMPLE_CLASSES, example_answer, shape_description
from cpcx.llm.prompts import PromptTemplate, load_template
from cpcx.partition import Partition, consensus, converged, membership_matrix, vote
from cpcx.recipe import Recipe

FORMAT_VERSION = 1
FILE_NAME = "clusters.json"


# ----------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ClusterSet:
    classes: tuple[str, ...]  # foreground classes, data set order (no background)
    clusters: list[tuple[str, tuple[str, ...]]]  # (name, members)
    matrix: np.ndarray  # (n_classes, n_clusters) float32 0/1: u = clip(labels[1:] @ matrix, 0, 1)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.clusters]


def load_clusters(path: str | Path) -> ClusterSet:
    """Read a clusters.json; anything malformed is one ``CpcxError`` that says to re-run the stage."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        classes = tuple(str(c) for c in data["classes"])
        clusters = [(str(c["name"]), tuple(str(m) for m in c["members"])) for c in data["clusters"]]
        _check_cover(classes, clusters)
    except FileNotFoundError:
        raise CpcxError(f"{path}: no clusters file; run `cpcx clusters -r <recipe>` first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CpcxError(f"{path}: not a valid clusters file ({exc}); re-run `cpcx clusters -r <recipe>`") from None
    return ClusterSet(classes, clusters, membership_matrix(classes, clusters))


def _check_cover(classes: Sequence[str], clusters: Sequence[tuple[str, Sequence[str]]]) -> None:
    seen = [m for _, members in clusters for m in members]
    if sorted(seen) != sorted(classes):
        raise ValueError("the clusters do not hold every class exactly once")


# ----------------------------------------------------------------------------------------- inputs
def class_names(recipe: Recipe) -> tuple[str, ...]:
    """The foreground classes of the recipe's data set, in data set order."""
    from cpcx.data import build_dataset

    return tuple(build_dataset(recipe.dataset, "train").classes[1:])


def static_partition(llm_cfg: Any, classes: Sequence[str]) -> Partition:
    """The recipe's hand-made clusters, checked: each class exactly once, no unknown name, no empty cluster."""
    known = set(classes)
    owner: dict[str, str] = {}
    for name, members in llm_cfg.clusters.items():
        if not members:
            raise CpcxError(f"llm.clusters.{name}: empty cluster; add classes to it or remove it", code=2)
        for member in members:
            if member not in known:
                raise CpcxError(f"llm.clusters.{name}: '{member}' is not a class of the data set; use one of "
                                f"{', '.join(classes)}", code=2)
            if member in owner:
                where = "twice" if owner[member] == name else f"in both '{owner[member]}' and '{name}'"
                raise CpcxError(f"llm.clusters: class '{member}' is listed {where}; keep it in one cluster", code=2)
            owner[member] = name
    missing = [c for c in classes if c not in owner]
    if missing:
        raise CpcxError(f"llm.clusters: classes in no cluster: {', '.join(missing)}; add each to one cluster",
                        code=2)
    return Partition.from_assignment(list(llm_cfg.clusters.items()), classes)


def _values(classes: Sequence[str], shape: str, schema: dict, current: Partition | None) -> dict[str, str]:
    values = {
        "classes": "\n".join(f"- {c}" for c in classes), "n_classes": str(len(classes)),
        "format": shape_description(shape), "example": example_answer(shape),  # type: ignore[arg-type]
        "example_classes": ", ".join(EXAMPLE_CLASSES),
        "schema": json.dumps(schema, indent=2),
    }
    if current is not None:
        values.update(clusters=current.render(), n_clusters=str(len(current)))
    return values


# ----------------------------------------------------------------------------------------- stage
def run_clusters(recipe: Recipe, dry_run: bool = False, console: Console | None = None) -> Path:
    """Run Algorithm 1 (or take the static clusters) and write ``clusters.json``; return its path."""
    console = console or Console()
    out = recipe.run_dir("clusters") / FILE_NAME
    classes = class_names(recipe)
    if recipe.llm.provider == "static":
        partition = static_partition(recipe.llm, classes)
        if dry_run:
            console.print(f"[bold]dry run[/]: static clusters from the recipe, no LLM; would write {out}")
            _print_table(console, partition, classes)
            return out
        record = {"provider": "static", "model": None, "vote": None, "refine": None, "prompts": None}
        return _finish(recipe, out, classes, partition, record, [], console)

    from cpcx.runs import prepare_stage_dir

    templates = (load_template(recipe.prompts.generate, "generate", "prompts.generate"),
                 load_template(recipe.prompts.refine, "refine", "prompts.refine"))
    if dry_run:
        _dry_run(recipe, classes, templates, console)
        return out
    prepare_stage_dir(recipe, "clusters")
    partition, record, answers = self_refine(recipe, classes, templates, console)
    return _finish(recipe, out, classes, partition, record, answers, console)


def _asker(recipe: Recipe, classes: Sequence[str], console: Console, mode: str | None = None):
    from cpcx.llm.ask import Asker
    from cpcx.llm.cache import AnswerCache

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    cache = AnswerCache(recipe.llm.cache_dir, mode or recipe.llm.cache_mode, warn=warn)
    c = recipe.clustering
    return Asker(recipe.llm, cache, classes, c.answer_shape, c.max_retries)


def self_refine(recipe: Recipe, classes: Sequence[str], templates: tuple[PromptTemplate, PromptTemplate],
                console: Console) -> tuple[Partition, dict, list]:
    """Algorithm 1. Returns the kept partition, the record for clusters.json and every answer."""
    from cpcx.llm.ask import InvalidAnswers

    c = recipe.clustering
    gen, ref = templates
    asker = _asker(recipe, classes, console)
    answers = []
    try:
        with console.status("asking the LLM…") if console.is_terminal else contextlib.nullcontext() as status:
            messages = gen.render(_values(classes, c.answer_shape, asker.schema, None))
            for r in range(1, c.queries + 1):
                if status is not None:
                    status.update(f"asking the LLM: generate query {r}/{c.queries}…")
                answers.append(asker.ask(messages, "generate", r))
            partitions = [Partition.from_assignment(a.assignment, classes) for a in answers]
            winner, histogram = vote(partitions)
            z0 = consensus(partitions, classes) if c.vote == "pairs" else histogram[winner].partition
            trace = [z0]
            stable = None
            if c.refine:
                for t in range(c.max_refine_iters):
                    if status is not None:
                        status.update(f"asking the LLM: refine iteration {t + 1}/{c.max_refine_iters}…")
                    messages = ref.render(_values(classes, c.answer_shape, asker.schema, trace[-1]))
                    answers.append(asker.ask(messages, "refine", t))
                    trace.append(Partition.from_assignment(answers[-1].assignment, classes))
                    if converged(trace):
                        break
                stable = converged(trace)
    except InvalidAnswers as exc:
        raise _invalid(recipe, exc) from None
    finally:
        asker.cache.close()
    kept = trace[-1]
    if c.refine and not stable:
        console.print(f"[yellow]warning:[/] self-refine did not converge in {c.max_refine_iters} iterations (the "
                      f"last three partitions were never all equal); kept the last partition z_{len(trace) - 1} "
                      f"({escape(kept.summary())}); raise clustering.max_refine_iters or set clustering.refine=false",
                      soft_wrap=True)
    from_cache = sum(a.cached for a in answers)
    console.print(f"LLM: {len(answers)} answers ({from_cache} from the cache, {asker.calls} calls); "
                  f"vote: {len(histogram)} distinct partitions, " + _z0_line(c, histogram, winner, trace[0])
                  + (f"; refine: {len(trace) - 1} iterations, {'converged' if stable else 'not converged'}"
                     if c.refine else "; refine: off"))
    record = {
        "provider": recipe.llm.provider, "model": recipe.llm.model,
        "temperature": recipe.llm.temperature, "seed": recipe.llm.seed,
        "answer_shape": c.answer_shape, "answer_schema": asker.schema, "schema_enforced": recipe.llm.json_schema,
        "prompts": {t.kind: {"file": t.path.name, "sha256": t.sha256} for t in templates},
        "vote": {
            "queries": c.queries, "method": c.vote, "winner": winner,
            "histogram": [{"count": e.count, "queries": list(e.queries), "clusters": e.partition.to_json()}
                          for e in histogram],
            "z0": trace[0].to_json(),
        },
        "refine": None if not c.refine else {
            "converged": bool(stable), "iterations": len(trace) - 1, "max_iterations": c.max_refine_iters,
            "trace": [p.to_json() for p in trace],
        },
    }
    return kept, record, answers


def _z0_line(c, histogram: list, winner: int, z0: Partition) -> str:
    """How z0 was chosen, for the summary line: the most frequent partition's votes, or the pairwise consensus
    and how many answers it equals (none, often, with sampled answers)."""
    if c.vote == "partition":
        return f"z0 got {histogram[winner].count}/{c.queries}"
    same = sum(e.count for e in histogram if e.partition.groups == z0.groups)
    return f"z0 = their consensus pair by pair ({len(z0)} clusters, equal to {same}/{c.queries} answers)"


def _invalid(recipe: Recipe, exc: Any) -> CpcxError:  # exc: cpcx.llm.ask.InvalidAnswers
    folder = recipe.run_dir("clusters")
    from cpcx.redact import redact  # a model may have answered with the API key: never written as such

    path = atomic.write_json(folder / "invalid-answers.json", redact({"label": exc.label, "problems": exc.problems,
                                                                      "attempts": exc.attempts}))
    tries = len(exc.attempts)
    return CpcxError(f"llm: the answer to {exc.label} was still invalid after {tries} "
                     f"{'try' if tries == 1 else 'tries'} ({'; '.join(exc.problems)}); the raw answers are in "
                     f"{path}; try another model, edit the prompts, or raise clustering.max_retries")


def _finish(recipe: Recipe, out: Path, classes: Sequence[str], partition: Partition, record: dict,
            answers: list, console: Console) -> Path:
    from cpcx.runs import mark_stage_done, prepare_stage_dir

    folder = prepare_stage_dir(recipe, "clusters") if record["provider"] == "static" else out.parent
    document = {
        "format": FORMAT_VERSION, "classes": list(classes), "clusters": partition.to_json(),
        "matrix": partition.matrix(classes).astype(int).tolist(), **record,
    }
    from cpcx.redact import redact  # answers come redacted from the asker; these files are a boundary too

    atomic.write_json(out, redact(document))
    atomic.write_json(folder / "answers.json", redact([
        {"stage": a.stage, "query": a.query, "key": a.key, **a.value} for a in answers
    ]))
    mark_stage_done(recipe, "clusters")
    _print_table(console, partition, classes)
    console.print(f"[green]✔[/] {len(partition)} clusters → {out}")
    return out


def _print_table(console: Console, partition: Partition, classes: Sequence[str]) -> None:
    table = Table(title=f"{len(partition)} clusters of {len(classes)} classes", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("cluster")
    table.add_column("members")
    for i, (name, members) in enumerate(partition.clusters):
        table.add_row(str(i), escape(name), ", ".join(members))  # names come from the LLM: no markup
    console.print(table)


# ----------------------------------------------------------------------------------------- dry run
def _dry_run(recipe: Recipe, classes: Sequence[str], templates: tuple[PromptTemplate, PromptTemplate],
             console: Console) -> None:
    """Print what would be sent and under which cache keys; no LLM call, nothing written."""
    c = recipe.clustering
    asker = _asker(recipe, classes, console, mode="readonly" if recipe.llm.cache_mode != "off" else "off")
    gen, ref = templates
    try:
        console.rule(f"p_gen: {gen.path} (sent {c.queries}×)")
        messages = gen.render(_values(classes, c.answer_shape, asker.schema, None))
        _print_messages(console, messages)
        for r in range(1, c.queries + 1):
            key = asker.key(messages, "generate", r)
            state = "cached" if asker.cache.get(key) is not None else "not cached"
            console.print(f"  generate query {r}: key {key} ({state})")
        if c.refine:
            console.rule(f"p_refine: {ref.path} (up to {c.max_refine_iters}×, with z_t)")
            values = _values(classes, c.answer_shape, asker.schema, None)
            values.update(clusters="<z_t: the current clusters, one per line>", n_clusters="<|z_t|>")
            _print_messages(console, ref.render(values))
            console.print("  refine keys depend on z_t, known once the generate answers are in")
        else:
            console.print("clustering.refine is false: no refine step")
    finally:
        asker.cache.close()
    console.print(f"[bold]dry run[/]: nothing was sent or written ({recipe.llm.provider} {recipe.llm.model})")


def _print_messages(console: Console, messages: list[dict[str, str]]) -> None:
    for message in messages:
        console.print(f"[bold cyan]\\[{message['role']}][/]")
        console.print(message["content"], markup=False, highlight=False, soft_wrap=True)
