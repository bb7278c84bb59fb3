"""The data set interface every stage reads: ids, image paths, image-level labels and (optional) masks.

A ``SegmentationDataset`` is one split of one data set. Subclasses (VOC, COCO, folder) find the files
and say how labels and masks are made; this base class holds what is common: id lookup, RGB loading,
the lazily computed and cached label matrix, and the "no masks here" error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from cpcx.errors import CpcxError

IGNORE = 255  # the "ignore" value of masks (cpcx.metrics.IGNORE_INDEX; not imported: data must not need metrics)

Split = str  # "train" | "val"


def read_rgb(path: str | Path) -> np.ndarray:
    """Load an image file as H×W×3 uint8 RGB (no EXIF rotation: annotations refer to the stored pixels)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise CpcxError(f"{path}: image not found; restore the file or fix dataset.root") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise CpcxError(f"{path}: cannot read the image ({exc}); replace the file") from None


def check_files_exist(paths: Sequence[Path], what: str, fix: str) -> None:
    """One stat per file, up front: a missing image is reported at build time, not mid-epoch."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CpcxError(f"{missing[0]}: {what} not found{more}; {fix}")


class SegmentationDataset:
    """One split of a data set. Column/class 0 is background; masks use 255 for "ignore".

    Subclasses call ``super().__init__`` with the ids and image paths of the split, and implement
    ``_compute_labels`` (the N×C multi-hot matrix, background column included) and, when they
    have masks, ``_load_mask``.
    """

    def __init__(
        self,
        *,
        name: str,
        split: Split,
        classes: Sequence[str],
        ids: Sequence[str],
        image_paths: Sequence[Path],
        has_masks: bool,
        source: str,
    ):
        if len(ids) != len(image_paths):
            raise ValueError("ids and image_paths differ in length")
        if not ids:
            raise CpcxError(f"{source}: split '{split}' has no images; check the split list or drop dataset.limit")
        self.name = name
        self.split = split
        self.classes: tuple[str, ...] = tuple(classes)
        self.ids: list[str] = list(ids)
        self.has_masks = bool(has_masks)
        self.source = source  # the file or folder that defines the split, for messages
        self._paths = [Path(p) for p in image_paths]
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise CpcxError(f"{source}: image id '{dup}' appears twice in split '{split}'; list each image once")
        self._labels: np.ndarray | None = None

    # ------------------------------------------------------------------------------------ basics
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, images={len(self)}, "
                f"classes={self.num_classes}, has_masks={self.has_masks})")

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise CpcxError(f"{self.source}: image id '{image_id}' is not in split '{self.split}'") from None

    def image_path(self, i: int) -> Path:
        return self._paths[i]

    def load_image(self, i: int) -> np.ndarray:
        return read_rgb(self._paths[i])

    # ------------------------------------------------------------------------------------ labels
    @property
    def labels(self) -> np.ndarray:
        """(N, C) float32 multi-hot image labels, column 0 (background) always 1. Computed once, read-only."""
        if self._labels is None:
            labels = np.asarray(self._compute_labels(), dtype=np.float32)
            if labels.shape != (len(self), self.num_classes):
                raise AssertionError(f"labels shape {labels.shape} != {(len(self), self.num_classes)}")
            labels[:, 0] = 1.0
            labels.setflags(write=False)
            self._labels = labels
        return self._labels

    def _compute_labels(self) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- masks
    def load_mask(self, i: int) -> np.ndarray:
        """H×W uint8 class indices, 255 = ignore. Raises ``CpcxError`` when the data set has no masks."""
        if not self.has_masks:
            raise CpcxError(
                f"{self.source}: data set '{self.name}' split '{self.split}' has no ground-truth masks; "
                "mask-based scores need a data set with masks"
            )
        mask = self._load_mask(i)
        self._check_mask(i, mask)
        return mask

    def _check_mask(self, i: int, mask: np.ndarray) -> None:
        """A mask must cover its image pixel for pixel and hold class indices or 255.

        A mask of another size is refused, not resized: it is almost always paired with the wrong image or
        cropped/scaled by another tool, and a nearest-neighbour resize would score misaligned pixels into an
        mIoU that looks valid. Out-of-range values would be dropped silently by the confusion matrix.
        """
        try:
            with Image.open(self._paths[i]) as image:  # the header only: no decoding
                width, height = image.size
        except OSError:
            return  # an unreadable image is reported where it is read, with its own message
        if mask.shape != (height, width):
            raise CpcxError(
                f"{self.mask_source(i)}: mask is {mask.shape[1]}×{mask.shape[0]} but its image {self._paths[i]} is "
                f"{width}×{height}; masks must match their image pixel for pixel: replace the mask (or remove the "
                "image from the split)"
            )
        labelled = mask[mask != IGNORE]
        if labelled.size:
            top = int(labelled.max())
            if top >= self.num_classes:
                raise CpcxError(
                    f"{self.mask_source(i)}: mask holds value {top} but the classes are 0..{self.num_classes - 1} "
                    "(255 = ignore); fix the mask or the class list"
                )

    def mask_source(self, i: int) -> str:
        """The file (or annotation) that mask ``i`` comes from, for messages."""
        return f"{self.source} (mask of image '{self.ids[i]}')"

    def _load_mask(self, i: int) -> np.ndarray:
        raise NotImplementedError


def labels_from_masks(
    load_mask: Callable[[int], np.ndarray], describe: Callable[[int], str], n: int, num_classes: int
) -> np.ndarray:
    """Multi-hot labels from class-index masks: the classes 1..C-1 present (0 and 255 do not count).

    ``load_mask(i)`` gives mask i and ``describe(i)`` names it in messages. Values that are neither a
    class index nor 255 are a data error, reported here rather than as a wrong label later.
    """
    labels = np.zeros((n, num_classes), dtype=np.float32)
    for i in range(n):
        counts = np.bincount(load_mask(i).ravel(), minlength=256)
        bad = np.flatnonzero(counts[num_classes:255])
        if bad.size:
            raise CpcxError(
                f"{describe(i)}: mask holds value {bad[0] + num_classes} but the classes are 0..{num_classes - 1} "
                "(255 = ignore); fix the mask or the class list"
            )
        labels[i] = counts[:num_classes] > 0
    return labels
