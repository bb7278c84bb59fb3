"""The torch training view of a data set: images and image-level labels, and nothing else.

Weak supervision means training must never see a mask. ``ImageLabelDataset`` copies the image paths and
the label matrix out of the ``SegmentationDataset`` and keeps no reference to it, so masks are out of
reach by construction (not by convention).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from cpcx.data.base import SegmentationDataset, read_rgb


class ImageLabelDataset(Dataset):
    """Items: ``{"image": transform(H×W×3 uint8) or the array, "label": float32 (C,), "index": int, "id": str}``."""

    def __init__(self, dataset: SegmentationDataset, transform: Optional[Callable[[np.ndarray], Any]] = None):
        self.paths = [str(dataset.image_path(i)) for i in range(len(dataset))]
        self.ids = list(dataset.ids)
        self.classes = tuple(dataset.classes)
        self.labels = torch.from_numpy(np.array(dataset.labels, dtype=np.float32))  # a copy, owned here
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_rgb(self.paths[index])
        return {
            "image": self.transform(image) if self.transform is not None else image,
            "label": self.labels[index].clone(),
            "index": index,
            "id": self.ids[index],
        }
