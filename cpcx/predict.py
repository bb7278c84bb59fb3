"""``cpcx predict``: segment a user's own images with the trained segmenter (the segment checkpoint alone).

Inputs are image files, folders (their images; subfolders with ``recursive``) and glob patterns. Per image
it writes, under the output folder, ``labels/<name>.png`` (class indices in the VOC palette, at the image's
size), ``overlays/<name>.jpg`` (the labels over the image, with a legend of the classes present) and, with
``probs``, ``probs/<name>.npz`` (float16 softmax, compressed). Test-time scales, flip and the dense CRF follow
the recipe's ``segment`` (and ``crf``) sections, as for the val predictions of ``cpcx segment``.

A bad input (missing, empty, not an image, truncated, too large) costs one line and the others go on; images
that need a conversion (EXIF rotation, greyscale, CMYK, 16-bit, transparency, larger than the working size)
are predicted and get one note line. Every file is written atomically.
"""
from __future__ import annotations

import glob
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.console import Console

from cpcx import atomic
from cpcx.errors import CpcxError

#: What a folder's files must end with to be read as images (named files are tried whatever their suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
#: Longest side the network sees: larger images are downscaled for it and their labels upsampled back, so
#: memory and time stay bounded (a 10000² image at 5 scales would need tens of GB of activations).
MAX_SIDE = 2048
#: Larger images are refused: decoding alone would need more than ~750 MB (3 bytes a pixel).
MAX_PIXELS = 250_000_000
#: Plain (non-terminal) progress lines at least this often.
PLAIN_EVERY_S = 30.0
_GLOB_CHARS = set("*?[")


class InputError(Exception):
    """One input cannot be predicted: the message says why and what to do, in one line."""


@dataclass
class Item:
    path: Path
    name: str  # output name without suffix, relative to the output folders (posix, may hold subfolders)


@dataclass
class Loaded:
    image: np.ndarray  # H×W×3 uint8 RGB at the working size
    size: tuple[int, int]  # (H, W) the labels are written at: the image as viewers show it
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- inputs
def collect_inputs(inputs: Sequence[str], recursive: bool = False) -> tuple[list[Item], list[tuple[str, str]]]:
    """Files, folders and globs → (items in order, without repeats; [(input, problem)] for inputs that gave none)."""
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append(Item(path, name))

    def add_folder(folder: Path) -> bool:
        pattern = folder.rglob("*") if recursive else folder.glob("*")
        files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            add(path, path.relative_to(folder).with_suffix("").as_posix())
        return bool(files)

    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            if not add_folder(path):
                deeper = "" if recursive else " (add --recursive to read its subfolders)"
                problems.append((text, f"folder holds no image files ({', '.join(IMAGE_SUFFIXES[:3])}, …){deeper}"))
        elif path.is_file():
            add(path, path.stem)
        elif _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(str(path), recursive=recursive))
            files = [Path(m) for m in matches if Path(m).is_file()]
            found = any([add_folder(Path(m)) for m in matches if Path(m).is_dir()])
            for file in files:
                add(file, file.stem)
            if not files and not found:
                problems.append((text, "no file matches this pattern; check it (quote it so that the shell "
                                       "leaves it to cpcx, use ** with --recursive)"))
        else:
            problems.append((text, "no such file or folder; check the path"))
    return _unique_names(items), problems


def _unique_names(items: list[Item]) -> list[Item]:
    """Two inputs with the same name (a/x.jpg and b/x.jpg, x.jpg and x.png) must not overwrite each other."""
    taken: set[str] = set()
    for item in items:
        name, n = item.name, 1
        while name.lower() in taken:
            n += 1
            name = f"{item.name}-{n}"
        item.name = name
        taken.add(name.lower())
    return items


# ------------------------------------------------------------------------------------------ decoding
class _bomb_limit_lifted:
    """PIL warns above 89 MP and refuses above 179 MP (decompression-bomb guard); cpcx checks the size itself
    against ``MAX_PIXELS`` before decoding anything, and decodes large JPEGs at a reduced scale."""

    def __enter__(self):
        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        self.caught = warnings.catch_warnings()
        self.caught.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.saved
        self.caught.__exit__(*exc)


def load_image(path: Path, max_side: int = MAX_SIDE) -> Loaded:
    """An input as RGB at the working size (longest side ≤ ``max_side``), EXIF orientation applied.

    Raises :class:`InputError` with a one-line reason for what cannot be predicted.
    """
    try:
        if path.stat().st_size == 0:
            raise InputError("empty file (0 bytes); replace it with the image")
        with _bomb_limit_lifted():
            image = Image.open(path)
    except UnidentifiedImageError:
        raise InputError("not an image Pillow can read; remove it or save it as JPEG or PNG") from None
    except OSError as exc:
        raise InputError(f"cannot open ({exc.strerror or exc}); check the file's permissions") from None
    notes: list[str] = []
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InputError(f"{width}×{height} is {width * height / 1e6:.0f} MP, more than the {MAX_PIXELS / 1e6:.0f} MP "
                             "cpcx predict reads; downscale it first")
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block: keep the stored pixels as they are
            orientation = 1
        if image.format == "JPEG" and max(width, height) > max_side:
            # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT (fast, a fraction of the memory).
            scale = max_side / max(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            with _bomb_limit_lifted():
                image.load()
                oriented = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"truncated or corrupt image ({exc}); re-download or re-save it") from None
        if orientation in range(2, 9):
            notes.append(f"EXIF orientation {orientation} applied (predicted upright, as viewers show it)")
        rgb, note = _to_rgb(oriented)
        if note:
            notes.append(note)
    # The labels are written at the full size as viewers show it (a JPEG draft shrinks ``image.size``).
    size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    full_hw = (size[1], size[0])
    if max(full_hw) > max_side or rgb.shape[:2] != full_hw:
        scale = min(1.0, max_side / max(full_hw))
        work = (max(1, round(full_hw[1] * scale)), max(1, round(full_hw[0] * scale)))
        if (rgb.shape[1], rgb.shape[0]) != work:
            rgb = np.asarray(Image.fromarray(rgb).resize(work, Image.Resampling.BILINEAR))
        notes.append(f"{full_hw[1]}×{full_hw[0]} is larger than the {max_side}-px working size: predicted at "
                     f"{work[0]}×{work[1]}, labels upsampled back")
    return Loaded(np.array(rgb, dtype=np.uint8, order="C"), full_hw, notes)  # a writable copy for torch


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, str]:
    """Any Pillow mode → H×W×3 uint8 RGB, and a note when the conversion changed something a user should know."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image), ""
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit greyscale: scale, never clip, to 8 bits
        values = np.asarray(image).astype(np.float64)
        top = 1.0 if mode == "F" and values.max(initial=0) <= 1.0 else (255.0 if values.max(initial=0) <= 255 else 65535.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        depth = {65535.0: "16-bit", 1.0: "float"}.get(top, "wide")
        return np.repeat(grey[..., None], 3, axis=2), f"{depth} greyscale ({mode}) scaled to 8 bits, predicted as RGB"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), \
            f"transparency ({mode}) flattened onto white"
    rgb = np.asarray(image.convert("RGB"))
    if mode in ("L", "1"):
        return rgb, f"greyscale ({mode}) image predicted as RGB"
    if mode == "CMYK":
        return rgb, "CMYK image converted to RGB"
    return rgb, "" if mode == "P" else f"{mode} image converted to RGB"


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


def run_predict(recipe, inputs: Sequence[str], out: Path | None = None, recursive: bool = False,
                probs: bool = False, weights: Path | None = None, console: Console | None = None,
                err_console: Console | None = None, max_side: int = MAX_SIDE) -> Summary:
    """Predict every input; one line per failed input, a summary line at the end → counts and timing."""
    import torch

    from cpcx.crf import CRFParams
    from cpcx.device import resolve_device
    from cpcx.segment_infer import predict_probs, refine_labels
    from cpcx.segnet import load_segnet

    console = console or Console()
    err_console = err_console or console
    items, problems = collect_inputs(inputs, recursive)
    if not items:
        for text, problem in problems:
            err_console.print(f"[bold red]✘[/] {text}: {problem}", soft_wrap=True, markup=True, highlight=False)
        raise CpcxError("no image to predict among the inputs; pass image files, folders or quoted globs", code=2)
    cfg = recipe.segment
    device = resolve_device(cfg.device, "segment.device")
    checkpoint = find_checkpoint(recipe, weights)
    try:
        model, meta = load_segnet(checkpoint, map_location="cpu")
    except CpcxError as exc:
        exc.code = 2
        raise
    model.to(device)
    names = list(meta["classes"])
    crf_params = CRFParams.from_config(recipe.crf) if cfg.crf else None
    out = Path(out) if out is not None else recipe.run_dir("predict")
    how = f"{len(cfg.scales)} scale{'s' if len(cfg.scales) > 1 else ''}{' + flip' if cfg.flip else ''}" \
          f"{' + CRF' if crf_params else ''}"
    console.print(f"predict: {len(items)} image{'s' if len(items) != 1 else ''} · {checkpoint} · {how} · "
                  f"{device} → {out}", soft_wrap=True, highlight=False, markup=False)

    def fail(text: str, why: str) -> None:
        err_console.print(f"[bold red]✘[/] {_escape(text)}: {_escape(why)}", soft_wrap=True, highlight=False)

    for text, problem in problems:
        fail(text, problem)
    done, failed = 0, len(problems)
    started = time.perf_counter()
    with _progress(console, len(items)) as advance:
        for item in items:
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
            prob = predict_probs(model, loaded.image, cfg.scales, cfg.flip, device, cfg.precision)
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
    summary = Summary(done, failed, time.perf_counter() - started, out)
    mark = "[green]✔[/]" if not failed else "[bold red]✘[/]"
    console.print(f"{mark} predict: {done} done, {failed} failed in {summary.seconds:.1f} s "
                  f"({summary.images_per_s:.2f} images/s) · {_escape(str(out))}", soft_wrap=True, highlight=False)
    return summary


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
        self.last = time.monotonic()
        every = max(1, self.total // 10)

        def advance() -> None:
            self.done += 1
            if self.done % every == 0 or self.done == self.total or time.monotonic() - self.last >= PLAIN_EVERY_S:
                self.last = time.monotonic()
                self.console.print(f"predict: {self.done}/{self.total}", highlight=False)

        return advance

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
