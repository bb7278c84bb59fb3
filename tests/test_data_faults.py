"""Hostile data files (issue 19): a corrupt feature-cache file (torn, object dtype, wrong shape, bad meta.json),
a ground-truth mask whose size differs from its image, masks and labels with out-of-range values. Real files;
the caches are built by a tiny ViT on real VOC images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpcx import feature_cache
from cpcx.errors import CpcxError

MARKER = Path("/tmp/cpcx-hostile-npy-ran")


class _Evil:
    def __reduce__(self):
        return (MARKER.write_text, ("ran",))


@pytest.fixture
def built(tmp_path, voc_root):
    """A finished 6-image cache of a tiny ViT, and a function that (re)builds it with the same key."""
    from cpcx.data import ImageLabelDataset, build_dataset
    from cpcx.model import build_model
    from cpcx.recipe import ModelConfig, VOCDatasetConfig

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", pretrained=False, img_size=64, cluster_dim=16)
    backbone = build_model(cfg, 21, 4).backbone
    images = ImageLabelDataset(build_dataset(VOCDatasetConfig(root=voc_root, limit=6), "train"))
    lines: list[str] = []

    def build():
        lines.clear()
        return feature_cache.FeatureCache.build(tmp_path / "features", "tiny", backbone, images, 64, ["orig"],
                                                torch.device("cpu"), "fp32", 3, 0, log=lines.append)

    cache = build()
    reference = np.array(cache.tokens)
    del cache
    return build, lines, reference


def _rebuilt(build, lines, reference, problem: str) -> None:
    MARKER.unlink(missing_ok=True)
    cache = build()
    notes = [line for line in lines if "removed, rebuilding" in line]
    assert len(notes) == 1 and problem in notes[0], lines
    assert cache.tokens.dtype == np.float16 and np.array_equal(np.array(cache.tokens), reference)
    assert not MARKER.exists(), "an object array in the cache was unpickled"


def test_truncated_tokens_are_removed_and_rebuilt(built):
    build, lines, reference = built
    path = build().folder / "tokens.npy"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    _rebuilt(build, lines, reference, "tokens.npy is truncated")


def test_object_dtype_tokens_are_never_unpickled(built):
    build, lines, reference = built
    path = build().folder / "tokens.npy"
    np.save(path, np.array([_Evil(), 1], dtype=object), allow_pickle=True)
    _rebuilt(build, lines, reference, "tokens.npy holds object")


def test_wrong_shape_and_torn_header_and_bad_meta(built):
    build, lines, reference = built
    folder = build().folder
    np.save(folder / "tokens.npy", np.zeros((6, 1, 2, 2, 192), dtype=np.float16))
    _rebuilt(build, lines, reference, "not float16 (6, 1, 4, 4, 192)")
    (folder / "tokens.npy").write_bytes(b"\x93NUMPY garbage")
    _rebuilt(build, lines, reference, "tokens.npy is unreadable")
    (folder / "meta.json").write_text("{not json")
    _rebuilt(build, lines, reference, "meta.json is unreadable")
    (folder / "tokens.npy").write_bytes(b"")
    _rebuilt(build, lines, reference, "tokens.npy is unreadable")


def test_a_sound_cache_is_opened_without_a_note(built):
    build, lines, _ = built
    build()
    assert lines == []


# ------------------------------------------------------------------------------------------------ masks
def _voc_copy(tmp_path: Path, voc_root: Path, n: int = 4) -> tuple[Path, list[str]]:
    """A VOC folder of ``n`` images (symlinked JPEGs, copied masks and annotations) that a test may damage."""
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:n]
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        (root / "JPEGImages" / f"{i}.jpg").symlink_to(voc_root / "JPEGImages" / f"{i}.jpg")
        shutil.copy(voc_root / "SegmentationClass" / f"{i}.png", root / "SegmentationClass" / f"{i}.png")
        if (voc_root / "Annotations" / f"{i}.xml").is_file():
            shutil.copy(voc_root / "Annotations" / f"{i}.xml", root / "Annotations" / f"{i}.xml")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root, ids


def _dataset(root: Path):
    from cpcx.data import build_dataset
    from cpcx.recipe import VOCDatasetConfig

    return build_dataset(VOCDatasetConfig(root=root), "train")


def test_mask_of_another_size_is_one_line_naming_both_sizes(tmp_path, voc_root):
    root, ids = _voc_copy(tmp_path, voc_root)
    mask_path = root / "SegmentationClass" / f"{ids[1]}.png"
    with Image.open(mask_path) as mask:
        small = mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST)
        size = mask.size
    small.save(mask_path)
    dataset = _dataset(root)
    with pytest.raises(CpcxError) as info:
        dataset.load_mask(1)
    message = str(info.value)
    assert message == (f"{mask_path}: mask is {size[0] // 2}×{size[1] // 2} but its image "
                       f"{root / 'JPEGImages' / (ids[1] + '.jpg')} is {size[0]}×{size[1]}; masks must match their "
                       "image pixel for pixel: replace the mask (or remove the image from the split)")


def test_mask_with_values_outside_the_classes(tmp_path, voc_root):
    from cpcx.data.palette import save_label_png
    from cpcx.evaluate import evaluate_label_folder

    root, ids = _voc_copy(tmp_path, voc_root)
    mask_path = root / "SegmentationClass" / f"{ids[0]}.png"
    with Image.open(mask_path) as image:
        mask = np.array(image)
    mask[:3, :3] = 40  # VOC has 21 classes: 40 is no class and not 255
    save_label_png(mask_path, mask)
    dataset = _dataset(root)
    labels = tmp_path / "labels"
    for i, image_id in enumerate(ids):
        with Image.open(dataset.image_path(i)) as image:
            save_label_png(labels / f"{image_id}.png", np.zeros((image.height, image.width), np.uint8))
    with pytest.raises(CpcxError, match=rf"^{mask_path}: mask holds value 40 but the classes are 0..20"):
        evaluate_label_folder(dataset, labels)
