"""MS COCO with instances JSON annotations, as a semantic segmentation data set.

Classes: the categories of the JSON in ascending category id (the official order), mapped to 1..K, with
background at 0. Image ids are the file stems (``000000000790``), sorted by file name; ``limit`` applies
after sorting. Image labels: the categories of the non-crowd instances.

Class masks are drawn on every access from the instance annotations (only the parsed annotation index is
cached), in a fixed order so the result never depends on the JSON's order:
  1. crowd regions (``iscrowd=1``) are painted 255 (ignore): they hold objects of a class but no instance
     outlines, and WSSS labels treat them as unknown;
  2. non-crowd instances are painted over them, larger area first (ties: smaller annotation id first), so a
     small object lying on a large one stays visible. A non-crowd instance therefore wins over a crowd
     region: its outline is certain, the crowd's is not.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from cpcx.data.base import SegmentationDataset, check_files_exist
from cpcx.data.classes import with_background
from cpcx.errors import CpcxError
from cpcx.recipe import COCODatasetConfig

IGNORE = 255


@dataclass(frozen=True)
class _Instance:
    label: int  # 1..K
    crowd: bool
    area: float
    ann_id: int
    segmentation: object  # polygons (list) or RLE (dict)


@dataclass(frozen=True)
class _Image:
    file_name: str
    height: int
    width: int
    instances: tuple[_Instance, ...]  # in drawing order


@dataclass(frozen=True)
class _Index:
    class_names: tuple[str, ...]  # foreground, ascending category id
    images: tuple[_Image, ...]  # sorted by file name


@functools.lru_cache(maxsize=4)
def _load_index(path: Path, mtime_ns: int, size: int) -> _Index:
    """Parse an instances JSON once per process (the full COCO train JSON takes ~20 s to read)."""
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        if len(categories) > 254:  # masks are uint8 with 255 = ignore
            raise CpcxError(f"{path}: {len(categories)} categories; at most 254 fit in a uint8 mask")
        label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
        per_image: dict[int, list[_Instance]] = {img["id"]: [] for img in data["images"]}
        for ann in data["annotations"]:
            if ann["category_id"] not in label_of:
                raise CpcxError(
                    f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, which is not in "
                    "'categories'; fix the JSON"
                )
            if ann["image_id"] in per_image:
                per_image[ann["image_id"]].append(_Instance(
                    label=label_of[ann["category_id"]], crowd=bool(ann.get("iscrowd", 0)),
                    area=float(ann.get("area", 0.0)), ann_id=int(ann["id"]), segmentation=ann["segmentation"],
                ))
        images = []
        for img in sorted(data["images"], key=lambda im: im["file_name"]):
            order = sorted(per_image[img["id"]], key=lambda a: (not a.crowd, -a.area, a.ann_id))
            images.append(_Image(img["file_name"], int(img["height"]), int(img["width"]), tuple(order)))
        names = tuple(str(c["name"]) for c in categories)
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CpcxError(f"{path}: not a COCO instances JSON ({type(exc).__name__}: {exc}); fix or replace the file") from None
    if len(set(names)) != len(names):
        raise CpcxError(f"{path}: two categories share a name; class names must be unique")
    return _Index(names, tuple(images))


def decode_segmentation(segmentation: object, height: int, width: int) -> np.ndarray:
    """One instance's H×W 0/1 mask from polygons, uncompressed RLE or compressed RLE (as pycocotools' annToMask)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # a polygon needs 3 points
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class COCODataset(SegmentationDataset):
    def __init__(self, cfg: COCODatasetConfig, split: str):
        root = Path(cfg.root)
        image_dir = root / (cfg.train_images if split == "train" else cfg.val_images)
        ann_path = root / (cfg.train_annotations if split == "train" else cfg.val_annotations)
        field = f"dataset.{split}_annotations"
        if not ann_path.is_file():
            raise CpcxError(f"{ann_path}: annotation JSON not found; fix {field} (relative to dataset.root)")
        if not image_dir.is_dir():
            raise CpcxError(f"{image_dir}: image folder not found; fix dataset.{split}_images (relative to dataset.root)")
        stat = ann_path.stat()
        index = _load_index(ann_path.resolve(), stat.st_mtime_ns, stat.st_size)
        images = index.images[: cfg.limit] if cfg.limit is not None else index.images
        paths = [image_dir / img.file_name for img in images]
        check_files_exist(paths, "image", f"{ann_path} lists images missing from {image_dir}")
        super().__init__(
            name="coco", split=split, classes=with_background(index.class_names),
            ids=[Path(img.file_name).stem for img in images], image_paths=paths, has_masks=True,
            source=str(ann_path),
        )
        self._images = images

    def _compute_labels(self) -> np.ndarray:
        labels = np.zeros((len(self), self.num_classes), dtype=np.float32)
        for i, img in enumerate(self._images):
            for inst in img.instances:
                if not inst.crowd:
                    labels[i, inst.label] = 1.0
        return labels

    def _load_mask(self, i: int) -> np.ndarray:
        img = self._images[i]
        mask = np.zeros((img.height, img.width), dtype=np.uint8)
        for inst in img.instances:  # crowd first, then non-crowd by decreasing area (see module docstring)
            pixels = decode_segmentation(inst.segmentation, img.height, img.width).astype(bool)
            mask[pixels] = IGNORE if inst.crowd else inst.label
        return mask
