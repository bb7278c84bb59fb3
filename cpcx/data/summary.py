"""What is in a data set: image counts per class (used by ``make demo`` and ``cpcx doctor``)."""
from __future__ import annotations

from typing import Any

from cpcx.data.base import SegmentationDataset


def summary(dataset: SegmentationDataset) -> dict[str, Any]:
    """Counts from the image labels: images, images per foreground class, images with no foreground."""
    labels = dataset.labels
    per_class = labels[:, 1:].sum(axis=0).astype(int)
    return {
        "name": dataset.name,
        "split": dataset.split,
        "images": len(dataset),
        "classes": dataset.num_classes,  # background included
        "has_masks": dataset.has_masks,
        "per_class": {name: int(n) for name, n in zip(dataset.classes[1:], per_class)},
        "no_foreground": int((labels[:, 1:].sum(axis=1) == 0).sum()),
        "mean_classes_per_image": round(float(labels[:, 1:].sum(axis=1).mean()), 3),
    }


def describe(cfg) -> "rich.table.Table":  # noqa: F821 (rich is imported lazily)
    """A rich table of per-class image counts for the train and val splits of a dataset config."""
    from rich.table import Table

    from cpcx.data import build_dataset

    stats = {split: summary(build_dataset(cfg, split)) for split in ("train", "val")}
    train, val = stats["train"], stats["val"]
    table = Table(title=f"{train['name']} ({cfg.root})")
    table.add_column("class")
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    for name in train["per_class"]:
        table.add_row(name, str(train["per_class"][name]), str(val["per_class"].get(name, "-")))
    table.add_section()
    table.add_row("images", str(train["images"]), str(val["images"]))
    table.add_row("masks", "yes" if train["has_masks"] else "no", "yes" if val["has_masks"] else "no")
    return table
