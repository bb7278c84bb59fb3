"""benchmarks/imagenet_objectness.py: the VOC → ImageNet class table and the dense head, on small inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import imagenet_objectness as io  # noqa: E402

#: A word each ImageNet class of the VOC class must name (timm's descriptions), or the whole range it must lie in.
_WORDS = {"aeroplane": ("airliner", "warplane"), "bicycle": ("bicycle", "bike"), "bus": ("bus",),
          "chair": ("chair", "throne"), "cow": ("ox", "buffalo", "bison"), "diningtable": ("dining table",),
          "motorbike": ("moped", "scooter"), "sheep": ("ram", "bighorn"), "sofa": ("couch",),
          "tvmonitor": ("television", "monitor", "screen", "computer"), "bottle": ("bottle",),
          "horse": ("sorrel", "horse"), "pottedplant": ("pot", "vase")}


def test_every_voc_object_class_has_imagenet_classes_that_name_it():
    from cpcx.data.classes import VOC_CLASSES
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert set(io.VOC_TO_IMAGENET) == set(VOC_CLASSES)
    seen: set[int] = set()
    for voc, indices in io.VOC_TO_IMAGENET.items():
        assert indices and all(0 <= i < 1000 for i in indices)
        assert not seen & set(indices), f"{voc} shares ImageNet classes with another VOC class"
        seen |= set(indices)
        for i in indices:
            name = info.index_to_description(i).lower()
            if voc in _WORDS:
                assert any(w in name for w in _WORDS[voc]), (voc, i, name)
    assert "tabby" in info.index_to_description(281).lower() and "egyptian" in info.index_to_description(285).lower()
    assert "chihuahua" in info.index_to_description(151).lower() and "mexican hairless" in info.index_to_description(268).lower()


def test_dense_probs_follow_the_head_at_every_location_and_sum_per_class():
    timm = pytest.importorskip("timm")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    dense = io.dense_class_probs(net, image, ["cat", "dog"], size=64)
    assert dense.shape == (2, 2, 2)
    everything = io.dense_class_probs(net, image, list(io.VOC_TO_IMAGENET), size=64)
    assert (everything.sum(0) <= 1 + 1e-5).all() and (dense >= 0).all()  # disjoint parts of one softmax
    mirrored = io.dense_class_probs(net, np.ascontiguousarray(image[:, ::-1]), ["cat", "dog"], size=64)
    assert np.allclose(mirrored, dense[..., ::-1], atol=1e-5)  # image and mirror averaged, each in its own frame
    # the head's global logits are the mean of the dense ones (linear head after a mean pool)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        f = net.forward_features(x)
        dense_logits = torch.einsum("bchw,kc->bkhw", f, net.classifier.weight).mean((2, 3)) + net.classifier.bias
        assert torch.allclose(dense_logits, net(x), atol=1e-4)


def test_present_mass_reads_only_the_image_classes():
    dense = np.stack([np.full((2, 2), v, np.float32) for v in (0.1, 0.2, 0.3)])
    labels = np.array([1, 0, 1, 1])  # background, then three object classes: the second and third present
    assert np.allclose(io.present_mass(dense, labels), 0.5)


def test_objectness_iou_counts_pixels_and_skips_ignored_ones():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 1
    mask[7] = 255
    grid = np.zeros((2, 2), np.float32)
    grid[0] = 1.0
    assert io.objectness_iou([mask], [grid], 0.5) == pytest.approx(100)  # the top half, row 7 ignored
    left = np.zeros((2, 2), np.float32)
    left[:, 0] = 1.0
    assert io.objectness_iou([mask], [left], 0.5) == pytest.approx(100 * 16 / 44)  # 7 × 4 vs 4 × 8, overlap 16
    assert io.label_iou([mask], [np.where(mask == 255, 0, mask)]) == 100
