"""benchmarks/extra_images_probe.py's data: the VOC slice's training split plus the COCO slice's train images that
hold a VOC class, in the VOC layout cpcx reads, with COCO's masks mapped to VOC's class indices."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import extra_images_probe as probe  # noqa: E402


def test_the_layout_adds_coco_images_with_voc_masks_and_is_read_as_voc(tmp_path, voc_root, coco_root):
    from cpcx.data import build_dataset
    from cpcx.data.classes import VOC_CLASSES
    from cpcx.data.coco import COCODataset
    from cpcx.recipe import COCODatasetConfig, VOCDatasetConfig

    dest = tmp_path / "VOC2012"
    added = probe.build_layout(dest, voc_root, coco_root)
    train = build_dataset(VOCDatasetConfig(root=voc_root), "train")
    both = build_dataset(VOCDatasetConfig(root=dest, train_split=probe.SPLIT), "train")
    coco = COCODataset(COCODatasetConfig(root=coco_root), "train")
    assert 0 < added < len(coco) and len(both) == len(train) + added and both.has_masks
    assert list(both.ids[: len(train)]) == list(train.ids)  # the VOC ids first, in order: the choose/report split
    assert np.array_equal(both.labels[: len(train)], train.labels)
    assert both.labels[len(train):].sum(1).min() >= 1  # every COCO image brings a VOC class
    # one COCO image: its person pixels are VOC's person, its non-VOC objects background, its crowd kept ignored
    person = coco.classes.index("person")
    k = next(k for k in range(len(coco)) if (coco.load_mask(k) == person).any())
    mapped = both.load_mask(both.index_of(f"coco_{coco.ids[k]}"))
    original = coco.load_mask(k)
    assert np.array_equal(mapped == VOC_CLASSES.index("person") + 1, original == person)
    assert np.array_equal(mapped == 255, original == 255)
    voc_names = set(VOC_CLASSES) | set(probe.COCO_TO_VOC)
    others = [c for c, name in enumerate(coco.classes) if c and name not in voc_names]
    assert not mapped[np.isin(original, others)].any()
    assert probe.build_layout(dest, voc_root, coco_root) == added  # built once: a second call reads the list
