"""Training data of the segmentation stage: images with their labels, randomly scaled, flipped, cropped.

The labels are the pseudo-labels (``segment.labels: pseudo``, always in a real run) or, as an oracle reference
for benchmarks only, the data set's ground-truth masks of the same images (``segment.labels: ground_truth``):
DeepLab(pseudo-labels) / DeepLab(ground truth) is what the pseudo-labels cost.

Augmentation draws from a generator seeded by (seed, epoch, index), not from worker RNGs: an epoch is the
same whatever the number of workers, and ``--resume`` replays exactly what an uninterrupted run would see.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from cpcx.data.palette import load_label_png
from cpcx.errors import CpcxError
from cpcx.metrics import IGNORE_INDEX


def pseudo_label_path(label_dir: Path, image_id: str) -> Path:
    return Path(label_dir) / f"{image_id}.png"


def check_pseudo_labels(dataset, label_dir: Path, recipe_hint: str = "<recipe>") -> None:
    """Every image of ``dataset`` needs ``label_dir/<id>.png`` of its size with values < C or 255.

    Checked once, up front, in the main process: a problem found by a DataLoader worker mid-epoch would
    surface as a traceback, not as one line naming the file.
    """
    label_dir = Path(label_dir)
    missing = [i for i in dataset.ids if not pseudo_label_path(label_dir, i).is_file()]
    if missing:
        raise CpcxError(
            f"{label_dir}: {len(missing)} of {len(dataset)} pseudo-labels of the {dataset.split} split are missing "
            f"(first: {missing[0]}.png); run `cpcx pseudo -r {recipe_hint}` first (with pseudo.split={dataset.split})"
        )

    def check(index: int) -> None:
        path = pseudo_label_path(label_dir, dataset.ids[index])
        label = load_label_png(path)
        with Image.open(dataset.image_path(index)) as image:  # header only: no decoding
            width, height = image.size
        if label.shape != (height, width):
            raise CpcxError(
                f"{path}: pseudo-label is {label.shape[1]}×{label.shape[0]} but the image is {width}×{height}; "
                "delete the labels folder and re-run `cpcx pseudo`"
            )
        bad = label[(label >= dataset.num_classes) & (label != IGNORE_INDEX)]
        if bad.size:
            raise CpcxError(
                f"{path}: holds class {int(bad.max())} but the data set has {dataset.num_classes} classes; the "
                "pseudo-labels come from another data set, delete them and re-run `cpcx pseudo`"
            )

    # PNG decoding releases the GIL: a few threads make this ~free next to an epoch, even for 10k images.
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(check, range(len(dataset))):
            pass


class TrainLabels:
    """``labels(index)`` → H×W uint8 class indices (255: ignore) of one training image: its pseudo-label PNG, or
    its ground-truth mask with ``ground_truth`` (the oracle reference). Picklable for DataLoader workers."""

    def __init__(self, dataset, label_dir: Path | None, ground_truth: bool = False):
        if ground_truth and not dataset.has_masks:
            raise CpcxError(f"segment.labels: ground_truth, but the {dataset.split} split of {dataset.source} has no "
                            "masks; use segment.labels=pseudo")
        self.dataset, self.ground_truth = dataset, bool(ground_truth)
        self.label_dir = None if label_dir is None else Path(label_dir)

    @property
    def kind(self) -> str:
        return "ground_truth" if self.ground_truth else "pseudo"

    def __call__(self, index: int) -> np.ndarray:
        if self.ground_truth:
            return self.dataset.load_mask(index)
        return load_label_png(pseudo_label_path(self.label_dir, self.dataset.ids[index]))


class PseudoLabelCrops(torch.utils.data.Dataset):
    """Items ``{"image": 3×S×S uint8, "label": S×S int64, "index"}``: random scale, h-flip, crop of size S.

    ``labels``: a :class:`TrainLabels` or the folder of the pseudo-labels.

    Images smaller than the crop after scaling are padded with the ``fill`` colour (the normalisation mean,
    so padding is zero after normalisation) and their labels with 255, which the loss ignores.
    """

    def __init__(
        self,
        dataset,
        labels: "TrainLabels | Path",
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 1.5),
        fill: Sequence[float] = (0.485, 0.456, 0.406),
        hflip: float = 0.5,
        seed: int = 0,
    ):
        self.dataset = dataset
        self.labels = labels if isinstance(labels, TrainLabels) else TrainLabels(dataset, Path(labels))
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.fill = np.asarray([round(255 * v) for v in fill], dtype=np.uint8)
        self.hflip = float(hflip)
        self.seed = int(seed)
        self.epoch = 0  # set by the training loop before each epoch's iterator is made

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.dataset.load_image(index)
        label = self.labels(index)
        image, label = random_scale_crop(image, label, rng, self.crop_size, self.scale_range, self.fill, self.hflip)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "index": index,
        }


def random_scale_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    scale_range: tuple[float, float],
    fill: np.ndarray,
    hflip: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale (bilinear image, nearest label), maybe flip, pad to the crop (fill / 255), crop at random."""
    height, width = label.shape
    scale = float(rng.uniform(*scale_range))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    if rng.random() < hflip:
        image, label = image[:, ::-1], label[:, ::-1]
    pad_h, pad_w = max(crop_size - new_h, 0), max(crop_size - new_w, 0)
    if pad_h or pad_w:
        padded = np.empty((new_h + pad_h, new_w + pad_w, 3), dtype=np.uint8)
        padded[:] = fill
        padded[:new_h, :new_w] = image
        padded_label = np.full((new_h + pad_h, new_w + pad_w), IGNORE_INDEX, dtype=np.uint8)
        padded_label[:new_h, :new_w] = label
        image, label = padded, padded_label
    top = int(rng.integers(0, image.shape[0] - crop_size + 1))
    left = int(rng.integers(0, image.shape[1] - crop_size + 1))
    return (np.ascontiguousarray(image[top:top + crop_size, left:left + crop_size]),
            np.ascontiguousarray(label[top:top + crop_size, left:left + crop_size]))
