"""Label PNGs: palette images whose pixel values are class indices (255 = ignore), in the VOC colours.

Ground-truth masks, pseudo-labels and predictions all use this format, so any viewer shows them in the
familiar VOC colours while ``np.array(Image.open(p))`` still gives the class indices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cpcx import atomic
from cpcx.errors import CpcxError


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (``n`` × 3 uint8): bits of the index spread over R, G, B, high bit first."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE: np.ndarray = voc_palette()
VOC_PALETTE.setflags(write=False)


def save_label_png(path: str | Path, label: np.ndarray) -> Path:
    """Write an H×W class-index map (values 0..255) as a VOC-palette PNG, atomically."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be H×W, got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(label))  # 2-D uint8 → mode "L"
    image.putpalette(VOC_PALETTE.tobytes())  # turns the "L" image into a "P" image with these colours
    return atomic.write_with(path, lambda handle: image.save(handle, format="PNG"))


def load_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG as class indices (H×W uint8). Never converts to RGB: palette indices are the labels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise CpcxError(
                    f"{path}: label PNG has mode {image.mode}; save it as a palette (P) or greyscale (L) PNG "
                    "whose pixel values are class indices"
                )
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise CpcxError(f"{path}: label PNG not found; check the mask folder") from None
    except OSError as exc:
        raise CpcxError(f"{path}: cannot read the label PNG ({exc}); replace the file") from None
