"""Data sets: PASCAL VOC, MS COCO and plain folders, behind one interface (see docs/CONTRACTS.md).

``build_dataset(cfg, split)`` gives a ``SegmentationDataset`` (ids, images, image labels, optional masks);
``ImageLabelDataset`` is the torch view used for training, which cannot reach the masks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from cpcx.data.base import SegmentationDataset, read_rgb
from cpcx.data.classes import BACKGROUND, VOC_CLASSES
from cpcx.data.palette import VOC_PALETTE, load_label_png, save_label_png
from cpcx.data.summary import describe, summary

if TYPE_CHECKING:
    from cpcx.data.views import ImageLabelDataset

__all__ = [
    "BACKGROUND", "VOC_CLASSES", "VOC_PALETTE", "ImageLabelDataset", "SegmentationDataset", "build_dataset",
    "describe", "load_label_png", "read_rgb", "save_label_png", "summary",
]


def build_dataset(cfg, split: Literal["train", "val"]) -> SegmentationDataset:
    """One split of the data set a ``dataset`` recipe section describes (VOC, COCO or folder)."""
    from cpcx.recipe import COCODatasetConfig, FolderDatasetConfig, VOCDatasetConfig

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(cfg, VOCDatasetConfig):
        from cpcx.data.voc import VOCDataset

        return VOCDataset(cfg, split)
    if isinstance(cfg, COCODatasetConfig):
        from cpcx.data.coco import COCODataset

        return COCODataset(cfg, split)
    if isinstance(cfg, FolderDatasetConfig):
        from cpcx.data.folder import FolderDataset

        return FolderDataset(cfg, split)
    raise TypeError(f"not a dataset config: {type(cfg).__name__}")


def __getattr__(name: str):
    # torch is imported only by the code that trains, so `cpcx validate` and `doctor` stay fast.
    if name == "ImageLabelDataset":
        from cpcx.data.views import ImageLabelDataset

        return ImageLabelDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
