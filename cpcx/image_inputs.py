"""Reading a user's images for ``cpcx predict``: which files the inputs name, and each file as upright RGB.

Inputs are files, folders (their image files; subfolders with ``recursive``) and glob patterns. Each file
becomes H×W×3 uint8 RGB at a bounded working size, with the EXIF orientation applied and a note for every
conversion a user should know about (greyscale, CMYK, 16-bit, transparency, downscaling); what cannot be read
raises :class:`InputError` with a one-line reason and fix.
"""
from __future__ import annotations

import glob
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: What a folder's files must end with to be read as images (named files are tried whatever their suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
#: Longest side the network sees: larger images are downscaled for it and their labels upsampled back, so
#: memory and time stay bounded (a 10000² image at 5 scales would need tens of GB of activations).
MAX_SIDE = 2048
#: Larger images are refused: decoding alone would need more than ~750 MB (3 bytes a pixel).
MAX_PIXELS = 250_000_000
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
        peak = values.max(initial=0)
        # A 16-bit mode is scaled from its full range even when dark (a dark image must stay dark); the 32-bit
        # modes say nothing of their range, so it is guessed from the values.
        if mode.startswith("I;16") or peak > 255:
            top = 65535.0
        else:
            top = 1.0 if mode == "F" and peak <= 1.0 else 255.0
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
