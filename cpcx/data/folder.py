"""A plain folder data set for your own images: ``images/`` + ``labels.csv`` (+ optional ``masks/``).

labels.csv has the header ``image,labels[,split]``:

    image,labels,split
    cat1.jpg,cat;sofa,train
    street/04.png,person;car,val
    empty.jpg,,train

``image`` is a path relative to the image folder; the image id is that path without its suffix.
``labels`` are ``;``-separated class names (empty = background only); a row without a split is ``train``.
Classes are ``dataset.classes`` in that order, or else the sorted union of the names in the CSV.
Masks (optional): PNG class-index images ``<masks>/<id>.png`` (0 = background, 255 = ignore). The folder
is ``dataset.masks``, or ``masks/`` when that exists. A split has masks when all its images have one; a
split where only some have one is an error (a half-annotated split would give misleading scores).
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

import numpy as np

from cpcx.data.base import SegmentationDataset, check_files_exist
from cpcx.data.classes import BACKGROUND, with_background
from cpcx.data.palette import load_label_png
from cpcx.errors import CpcxError
from cpcx.recipe import FolderDatasetConfig

SPLITS = ("train", "val")
REQUIRED_COLUMNS = ("image", "labels")
OPTIONAL_COLUMNS = ("split",)


def _read_rows(path: Path) -> list[tuple[int, str, list[str], str]]:
    """(line number, image, class names, split) for every data row of the CSV."""
    if not path.is_file():
        raise CpcxError(f"{path}: labels CSV not found; fix dataset.labels (relative to dataset.root)")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: spreadsheets add a BOM
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
        if missing or unknown:
            raise CpcxError(
                f"{path}: header is '{','.join(header)}'; it must be 'image,labels' or 'image,labels,split'"
            )
        reader.fieldnames = header
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise CpcxError(f"{path}: line {line} has more cells than the header; quote cells holding commas")
            image = (row["image"] or "").strip()
            if not image:
                raise CpcxError(f"{path}: line {line} has an empty image cell; name the image file")
            if PurePosixPath(image).is_absolute() or ".." in PurePosixPath(image).parts:
                raise CpcxError(f"{path}: line {line}: image '{image}' must be a path inside the image folder")
            names = [n.strip() for n in (row["labels"] or "").split(";") if n.strip()]
            split = (row.get("split") or "").strip() or "train"
            if split not in SPLITS:
                raise CpcxError(f"{path}: line {line}: split '{split}' is not train or val")
            rows.append((line, image, names, split))
    return rows


class FolderDataset(SegmentationDataset):
    def __init__(self, cfg: FolderDatasetConfig, split: str):
        root = Path(cfg.root)
        image_dir = root / cfg.images
        csv_path = root / cfg.labels
        if not image_dir.is_dir():
            raise CpcxError(f"{image_dir}: image folder not found; fix dataset.images (relative to dataset.root)")
        all_rows = _read_rows(csv_path)
        classes = self._classes(cfg, all_rows, csv_path)
        column = {name: c for c, name in enumerate(classes)}

        rows = [r for r in all_rows if r[3] == split]
        if cfg.limit is not None:
            rows = rows[: cfg.limit]
        ids, paths = [], []
        labels = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for i, (line, image, names, _) in enumerate(rows):
            ids.append(str(PurePosixPath(image).with_suffix("")))
            paths.append(image_dir / image)
            for name in names:
                if name == BACKGROUND:
                    continue  # implicit everywhere; tolerated when written out
                if name not in column:
                    raise CpcxError(
                        f"{csv_path}: line {line} ({image}): unknown class '{name}'; "
                        "add it to dataset.classes or fix the spelling"
                    )
                labels[i, column[name]] = 1.0
        check_files_exist(paths, "image", f"{csv_path} names images missing from {image_dir}")

        self.mask_dir = self._mask_dir(cfg, root)
        has_masks = False
        if self.mask_dir is not None and ids:
            present = [(self.mask_dir / f"{i}.png").is_file() for i in ids]
            if any(present) and not all(present):
                first = ids[present.index(False)]
                raise CpcxError(
                    f"{self.mask_dir / (first + '.png')}: mask missing, while other '{split}' images have one; "
                    "give every image of the split a mask, or none"
                )
            has_masks = all(present)
        super().__init__(
            name=root.name or "folder", split=split, classes=classes, ids=ids, image_paths=paths,
            has_masks=has_masks, source=str(csv_path),
        )
        self._csv_labels = labels

    @staticmethod
    def _classes(cfg: FolderDatasetConfig, rows, csv_path: Path) -> tuple[str, ...]:
        if cfg.classes is None:
            found = sorted({n for r in rows for n in r[2]} - {BACKGROUND})
            if not found:
                raise CpcxError(f"{csv_path}: no class names in the labels column; label the images or set dataset.classes")
            return with_background(found)
        names = [n.strip() for n in cfg.classes]
        if BACKGROUND in names:
            raise CpcxError("dataset.classes: leave out 'background'; it is always class 0")
        if len(set(names)) != len(names) or not all(names):
            raise CpcxError("dataset.classes: class names must be non-empty and unique")
        return with_background(names)

    @staticmethod
    def _mask_dir(cfg: FolderDatasetConfig, root: Path) -> Path | None:
        if cfg.masks is not None:
            path = root / cfg.masks
            if not path.is_dir():
                raise CpcxError(f"{path}: mask folder not found; fix dataset.masks or remove it")
            return path
        default = root / "masks"
        return default if default.is_dir() else None

    def _compute_labels(self) -> np.ndarray:
        return self._csv_labels

    def mask_source(self, i: int) -> str:
        return str(self.mask_dir / f"{self.ids[i]}.png")

    def _load_mask(self, i: int) -> np.ndarray:
        path = self.mask_dir / f"{self.ids[i]}.png"
        mask = load_label_png(path)
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero(counts[self.num_classes:255]) + self.num_classes
        if bad.size:
            raise CpcxError(
                f"{path}: mask holds value {bad[0]} but the classes are 0..{self.num_classes - 1} (255 = ignore); "
                "fix the mask or dataset.classes"
            )
        return mask
