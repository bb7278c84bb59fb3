"""PASCAL VOC 2012 in the VOCdevkit layout (optionally with the SBD ``train_aug`` split).

``dataset.root`` may be the VOC2012 folder itself (the one holding JPEGImages/), its parent, or the
parent of VOCdevkit/. Image-level labels come from the masks where every image of the split has one
(the ``cls_labels`` of WSSS works), otherwise from the object names in Annotations/<id>.xml.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cpcx.data.base import SegmentationDataset, check_files_exist, labels_from_masks
from cpcx.data.classes import VOC_CLASSES, with_background
from cpcx.data.palette import load_label_png
from cpcx.errors import CpcxError
from cpcx.recipe import VOCDatasetConfig

AUG_SPLIT = "train_aug"


def find_voc_root(root: Path) -> Path:
    """The folder holding JPEGImages/: ``root``, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = Path(root)
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise CpcxError(
        f"dataset.root: {root} holds no JPEGImages/ (nor VOC2012/JPEGImages/ or VOCdevkit/VOC2012/JPEGImages/); "
        "point dataset.root at the VOC2012 folder"
    )


def read_split_file(path: Path) -> list[str]:
    """Ids, one per line. DeepLab-style lines (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``) give ``x``."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(Path(line.split()[0]).stem)
    return ids


class VOCDataset(SegmentationDataset):
    def __init__(self, cfg: VOCDatasetConfig, split: str):
        self.voc_root = find_voc_root(cfg.root)
        split_name = cfg.train_split if split == "train" else cfg.val_split
        split_file = self._split_file(Path(cfg.root), split_name)
        ids = read_split_file(split_file)
        if cfg.limit is not None:
            ids = ids[: cfg.limit]
        paths = [self.voc_root / "JPEGImages" / f"{i}.jpg" for i in ids]
        check_files_exist(paths, "image", f"the split list {split_file} names images missing from JPEGImages/")

        # train_aug masks live in SegmentationClassAug/ (SBD + VOC); the official splits use SegmentationClass/.
        self.mask_dir = self.voc_root / "SegmentationClass"
        if split_name == AUG_SPLIT:
            for candidate in (self.voc_root / "SegmentationClassAug", Path(cfg.root) / "SegmentationClassAug"):
                if candidate.is_dir():
                    self.mask_dir = candidate
                    break
        # Masks count only if every image has one (train_aug without SegmentationClassAug has ~1/4 of them).
        has_masks = bool(ids) and self.mask_dir.is_dir() and all(self._mask_path(i).is_file() for i in ids)
        super().__init__(
            name="voc", split=split, classes=with_background(VOC_CLASSES), ids=ids, image_paths=paths,
            has_masks=has_masks, source=str(split_file),
        )
        self.split_name = split_name

    def _split_file(self, root: Path, split_name: str) -> Path:
        candidates = [self.voc_root / "ImageSets" / "Segmentation" / f"{split_name}.txt"]
        if split_name == AUG_SPLIT:
            candidates += [self.voc_root / f"{AUG_SPLIT}.txt", root / f"{AUG_SPLIT}.txt"]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise CpcxError(
            f"{candidates[0]}: split list for '{split_name}' not found; set dataset.train_split/val_split to a "
            f"file name in {candidates[0].parent} (without .txt)"
        )

    def _mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def mask_source(self, i: int) -> str:
        return str(self._mask_path(self.ids[i]))

    def _load_mask(self, i: int) -> np.ndarray:
        return load_label_png(self._mask_path(self.ids[i]))

    def _compute_labels(self) -> np.ndarray:
        if self.has_masks:
            return labels_from_masks(
                self._load_mask, lambda i: str(self._mask_path(self.ids[i])), len(self), self.num_classes
            )
        return self.labels_from_xml()

    def labels_from_xml(self) -> np.ndarray:
        """Labels from the object names of Annotations/<id>.xml (difficult and truncated objects included)."""
        column = {name: c for c, name in enumerate(self.classes)}
        labels = np.zeros((len(self), self.num_classes), dtype=np.float32)
        for i, image_id in enumerate(self.ids):
            path = self.voc_root / "Annotations" / f"{image_id}.xml"
            if not path.is_file():
                raise CpcxError(
                    f"{path}: no annotation XML and no mask ({self._mask_path(image_id)}) for image '{image_id}'; "
                    "image-level labels need one of them"
                )
            try:
                objects = ET.parse(path).getroot().findall("object")
                names = [(obj.findtext("name") or "").strip() for obj in objects]
            except ET.ParseError as exc:
                raise CpcxError(f"{path}: not valid XML ({exc}); replace the file") from None
            for name in names:
                if name not in column or column[name] == 0:
                    raise CpcxError(f"{path}: unknown VOC class '{name}'; expected one of {', '.join(VOC_CLASSES)}")
                labels[i, column[name]] = 1.0
        return labels
