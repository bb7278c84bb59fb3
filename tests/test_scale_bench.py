"""benchmarks/scale.py's data-set builder on a 6-image set: cpcx reads it as a folder data set, every mask has its
image's size, every image's labels are the classes its mask holds, and a second build reuses the first."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import scale  # noqa: E402


def test_a_scaled_set_has_consistent_images_masks_and_labels(tmp_path, voc_root):
    from cpcx.data import build_dataset
    from cpcx.data.classes import VOC_CLASSES
    from cpcx.recipe import FolderDatasetConfig

    folder = scale.build_scaled_set(voc_root.parent, 6, 0, tmp_path, val=2, log=lambda text: None)
    assert folder.name == scale.scaled_set_name(6, 0) and not list(tmp_path.glob(".*tmp*"))
    cfg = FolderDatasetConfig(root=folder, masks="masks", classes=list(VOC_CLASSES))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (6, 2) and train.has_masks and val.has_masks
    sources = set()
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, mask = dataset.load_image(i), dataset.load_mask(i)  # load_mask checks the sizes agree too
            assert image.shape[:2] == mask.shape and scale.LONG_SIDE[0] <= max(mask.shape) <= scale.LONG_SIDE[1]
            present = np.zeros(dataset.num_classes, bool)
            present[np.unique(mask[mask < 255])] = True
            present[0] = False
            assert present.any() and (dataset.labels[i][1:] > 0).tolist() == present[1:].tolist()
            sources.add(dataset.ids[i].split("_", 1)[1])
    assert len(sources) == 8  # distinct slice images (6 of 311 train, 2 of 172 val)

    # the mask went through the image's geometry: a mirrored or cropped mask would sit off its object's pixels
    i = 0
    source_id = train.ids[i].split("_", 1)[1]
    original = np.array(Image.open(voc_root / "SegmentationClass" / f"{source_id}.png"))
    assert set(np.unique(train.load_mask(i))) <= set(np.unique(original))

    mtime = (folder / "manifest.json").stat().st_mtime_ns
    assert scale.build_scaled_set(voc_root.parent, 6, 0, tmp_path, val=2) == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_vary_moves_the_mask_with_the_image():
    """An image whose grey level spells its mask: after a random flip, crop and rescale the two still agree
    (bilinear resizing blurs only the block edges)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 400), np.uint8)
    mask[20:140, 30:150], mask[150:290, 200:390], mask[40:100, 300:380] = 3, 15, 7  # asymmetric: a flip shows
    image = np.repeat((mask * 10)[:, :, None], 3, axis=2)
    for _ in range(20):
        varied, varied_mask = scale.vary(image, mask, rng)
        assert varied.shape[:2] == varied_mask.shape and scale.LONG_SIDE[0] <= max(varied_mask.shape) <= scale.LONG_SIDE[1]
        assert (varied_mask > 0).any()
        agree = np.mean(np.rint(varied[:, :, 0] / 10) == varied_mask)
        assert agree > 0.97, agree
