"""``cpcx predict``: segment a user's own images with the trained segmenter (the segment checkpoint alone).

Inputs are image files, folders (their images; subfolders with ``recursive``) and glob patterns. Per image
it writes, under the output folder, ``labels/<name>.png`` (class indices in the VOC palette, at the image's
size), ``overlays/<name>.jpg`` (the labels over the image, with a legend of the classes present) and, with
``probs``, ``probs/<name>.npz`` (float16 softmax, compressed). Test-time scales, flip and the dense CRF follow
the recipe's ``segment`` (and ``crf``) sections, as for the val predictions of ``cpcx segment``, and so does
``segment.saliency`` (a salient-object network's foreground mixed into the probabilities, ``cpcx.saliency``).

A bad input (missing, empty, not an image, truncated, too large) costs one line and the others go on; images
that need a conversion (EXIF rotation, greyscale, CMYK, 16-bit, transparency, larger than the working size)
are predicted and get one note line (``cpcx.image_inputs``). Every file is written atomically.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from rich.console import Console

from cpcx import atomic
from cpcx.errors import CpcxError
from cpcx.image_inputs import MAX_SIDE, InputError, collect_inputs, load_image

#: Plain (non-terminal) progress lines at least this often.
PLAIN_EVERY_S = 30.0


# ------------------------------------------------------------------------------------------- outputs
def legend_overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """The labels blended over the image, above a strip naming the classes present in their colours."""
    from PIL import ImageDraw, ImageFont

    from cpcx.data.palette import VOC_PALETTE
    from cpcx.viz import blend

    height, width = labels.shape
    # Background (0) and ignore (255) are not painted (``blend``), so the legend names the painted classes.
    present = [int(c) for c in np.unique(labels) if 0 < c < min(255, len(class_names))]
    font_size = max(11, min(28, width // 40))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        font = ImageFont.load_default()
    pad, box = font_size // 2, font_size
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(c, class_names[c], draw_probe.textlength(class_names[c], font=font)) for c in present]
    rows, x = [[]], pad
    for entry in entries:  # wrap the legend over as many rows as the image width needs
        need = box + pad // 2 + entry[2] + 2 * pad
        if rows[-1] and x + need > width:
            rows.append([])
            x = pad
        rows[-1].append((x, entry))
        x += need
    strip = len(rows) * (box + pad) + pad
    canvas = Image.new("RGB", (width, height + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(blend(image, labels)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = height + pad + r * (box + pad)
        for x, (c, name, _) in row:
            draw.rectangle((x, top, x + box, top + box), fill=tuple(int(v) for v in VOC_PALETTE[c]), outline=(0, 0, 0))
            draw.text((x + box + pad // 2, top + box / 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def _save_jpeg(path: Path, image: Image.Image) -> None:
    atomic.write_with(path, lambda handle: image.save(handle, format="JPEG", quality=90))


def _save_probs(path: Path, probs: np.ndarray, class_names: Sequence[str], size: tuple[int, int]) -> None:
    """float16 (C, h, w) at the working size (a 10000² image's full-size softmax would be GBs), with the size of
    the labels they decide: upsample bilinearly to ``size`` to recover them at full size."""
    import zipfile

    arrays = {"probs": probs.astype(np.float16), "classes": np.array(list(class_names)), "size": np.array(size)}

    def write(handle) -> None:
        # An .npz (np.load reads it) deflated at level 1: softmax noise barely compresses more at
        # savez_compressed's level 6, which took 6× longer (26 s vs 4 s for a 21×2048² array).
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)

    atomic.write_with(path, write)


# ----------------------------------------------------------------------------------------------- run
@dataclass
class Summary:
    done: int
    failed: int
    seconds: float
    out: Path

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")


def find_checkpoint(recipe, weights: Path | None = None) -> Path:
    if weights is not None:
        return Path(weights)
    folder = recipe.run_dir("segment") / "weights"
    for name in ("best.pt", "last.pt"):
        if (folder / name).is_file():
            return folder / name
    raise CpcxError(f"{folder}: no segment checkpoint (best.pt or last.pt); train it with "
                    f"`cpcx segment -r <recipe>` or pass --weights FILE", code=2)


def open_segmenter(recipe, weights: Path | None = None):
    """(segmenter on the CPU, meta) from the recipe's segment checkpoint or ``weights``; a checkpoint that
    cannot be read is a usage error (code 2) for predict and export, which have nothing else to go on."""
    from cpcx.segment.networks import load_segnet

    try:
        return load_segnet(find_checkpoint(recipe, weights), map_location="cpu")
    except CpcxError as exc:
        exc.code = 2
        raise


def run_predict(recipe, inputs: Sequence[str], out: Path | None = None, recursive: bool = False,
                probs: bool = False, weights: Path | None = None, console: Console | None = None,
                err_console: Console | None = None, max_side: int = MAX_SIDE) -> Summary:
    """Predict every input; one line per failed input, a summary line at the end → counts and timing.

    Under torchrun every rank predicts every world-th input into the same output folder and prints the lines of
    its own failed inputs; the counts are summed over the ranks, so every rank's summary (and the exit code of
    ``cpcx predict``) covers the whole run. Rank 0 alone prints the header, the progress and the summary."""
    from cpcx import shard

    with shard.joined(recipe.segment.device, "segment.device") as ranks:
        return _predict(recipe, ranks, inputs, out, recursive, probs, weights, console or Console(), err_console,
                        max_side)


def _predict(recipe, ranks, inputs: Sequence[str], out: Path | None, recursive: bool, probs: bool,
             weights: Path | None, console: Console, err_console: Console | None, max_side: int) -> Summary:
    import io

    import torch

    from cpcx import shard
    from cpcx.crf import CRFParams
    from cpcx.segment.infer import predict_probs, refine_labels

    err_console = err_console or console
    items, problems = collect_inputs(inputs, recursive)
    if not items:
        for text, problem in problems if ranks.is_main else []:
            err_console.print(f"[bold red]✘[/] {_escape(text)}: {_escape(problem)}", soft_wrap=True, highlight=False)
        raise CpcxError("no image to predict among the inputs; pass image files, folders or quoted globs", code=2)
    cfg = recipe.segment
    device = ranks.device
    checkpoint = find_checkpoint(recipe, weights)
    model, meta = open_segmenter(recipe, weights)
    model.to(device)
    names = list(meta["classes"])
    crf_params = CRFParams.from_config(recipe.crf) if cfg.crf else None
    out = Path(out) if out is not None else recipe.run_dir("predict")
    saliency = cfg.saliency if cfg.saliency.enabled else None
    if saliency is not None:  # a file that is not the network fails here, before any output
        from cpcx.saliency import check_network, mix_prediction, predict as predict_saliency

        threads = max(1, torch.get_num_threads())
        check_network(saliency.weights, saliency.size, "segment.saliency", threads)
    how = f"{len(cfg.scales)} scale{'s' if len(cfg.scales) > 1 else ''}{' + flip' if cfg.flip else ''}" \
          f"{f' + saliency {saliency.weight:g}' if saliency is not None else ''}{' + CRF' if crf_params else ''}"
    # Every rank collected the same inputs (sorted, names made unique over all of them): each takes its share;
    # the inputs that could not be read are reported and counted once, by rank 0.
    mine = shard.shard_blocks(items, ranks.rank, ranks.world_size)
    problems = problems if ranks.is_main else []
    shown = console if ranks.is_main else Console(quiet=True, file=io.StringIO())  # header, progress, summary
    shown.print(f"predict: {len(items)} image{'s' if len(items) != 1 else ''} · {checkpoint} · {how} · "
                f"{device}{f' · {ranks.world_size} processes' if ranks.enabled else ''} → {out}",
                soft_wrap=True, highlight=False, markup=False)

    progress = _progress(shown, len(mine))

    def fail(text: str, why: str) -> None:
        # While the bar is live its console prints above it; rich's stderr console would write straight to the
        # terminal (it bypasses Live's stderr proxy) and tear the bar's line.
        where = console if progress.bar is not None else err_console
        where.print(f"[bold red]✘[/] {_escape(text)}: {_escape(why)}", soft_wrap=True, highlight=False)

    for text, problem in problems:
        fail(text, problem)
    done, failed = 0, len(problems)
    started = time.perf_counter()
    with progress as advance:
        for item in mine:
            try:
                loaded = load_image(item.path, max_side)
            except InputError as exc:
                fail(str(item.path), str(exc))
                failed += 1
                advance()
                continue
            if loaded.notes:
                console.print(f"[yellow]![/] {_escape(str(item.path))}: {_escape('; '.join(loaded.notes))}",
                              soft_wrap=True, highlight=False)
            try:
                prob = predict_probs(model, loaded.image, cfg.scales, cfg.flip, device, cfg.precision)
            except RuntimeError as exc:  # out of memory, typically: this image fails, smaller ones may not
                fail(str(item.path), f"the network failed on this {loaded.image.shape[1]}×{loaded.image.shape[0]} "
                                     f"image ({_first_line(exc)}); free memory, or use fewer segment.scales")
                failed += 1
                advance()
                continue
            if saliency is not None:  # ISNet on one CPU core: 3.4 s an image at 1024², 0.9 s at 512² (results.md 8p)
                prob = mix_prediction(prob, predict_saliency(saliency.weights, loaded.image, saliency.size,
                                                             "segment.saliency", threads), saliency.weight)
            labels = refine_labels(loaded.image, prob, crf_params)
            full = labels if labels.shape == loaded.size else np.asarray(
                Image.fromarray(labels).resize(loaded.size[::-1], Image.Resampling.NEAREST))
            from cpcx.data.palette import save_label_png

            save_label_png(out / "labels" / f"{item.name}.png", full)
            _save_jpeg(out / "overlays" / f"{item.name}.jpg", legend_overlay(loaded.image, labels, names))
            if probs:
                _save_probs(out / "probs" / f"{item.name}.npz", prob.cpu().numpy(), names, loaded.size)
            done += 1
            advance()
            del prob
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if ranks.enabled:  # also waits for the slowest rank, so the time below is the whole run's
        done, failed = (int(n) for n in shard.sum_over_ranks(np.array([done, failed], dtype=np.int64), ranks))
    summary = Summary(done, failed, time.perf_counter() - started, out)
    mark = "[green]✔[/]" if not failed else "[bold red]✘[/]"
    shown.print(f"{mark} predict: {done} done, {failed} failed in {summary.seconds:.1f} s "
                  f"({summary.images_per_s:.2f} images/s) · {_escape(str(out))}", soft_wrap=True, highlight=False)
    return summary


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 160 else text[:159] + "…"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _progress:
    """``advance()`` per image: a rich bar on a terminal, else a plain line every 10 % or 30 s, whichever first."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.done = console, total, 0
        self.bar = None

    def __enter__(self) -> Callable[[], None]:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("predict", total=self.total)
            return lambda: self.bar.update(self.task, advance=1)
        from cpcx.progress import PlainProgress

        lines = PlainProgress("predict", self.total, lambda text: self.console.print(text, highlight=False),
                              seconds=PLAIN_EVERY_S)
        return lambda: lines(1)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
