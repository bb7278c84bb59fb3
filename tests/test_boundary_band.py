"""benchmarks/boundary_band.py: the error split, the band oracle and the two band refiners, on small arrays."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import boundary_band as bb  # noqa: E402


def _square(size: int, top: int, bottom: int, value: int = 1) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    out[top:bottom, top:bottom] = value
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_band_oracle_fixes_the_band_only_and_keeps_the_predicted_class():
    mask = _square(40, 10, 20, 7)
    mask[30:35, 30:35] = 5  # an object the prediction misses entirely, far from its boundary
    labels = _square(40, 12, 22, 3)  # the same object shifted by 2 px, called class 3
    fixed = bb.band_oracle(mask, labels, band_px=4)
    assert np.array_equal(fixed[:25, :25] > 0, mask[:25, :25] > 0)  # object vs background now right in the band
    assert set(np.unique(fixed[fixed > 0])) == {3}  # grown pixels take the nearest predicted class, not 7
    assert (fixed[30:35, 30:35] == 0).all()  # the far miss is not the band's
    narrow = bb.band_oracle(mask, labels, band_px=1) > 0  # a 1-px band cannot undo a 2-px shift
    assert not np.array_equal(narrow[:25, :25], mask[:25, :25] > 0)


def test_error_split_counts_every_wrong_pixel_once_by_its_distance():
    mask = _square(48, 8, 16)
    mask[40:44, 40:44] = 2  # missed, far from the predicted object
    mask[0, :] = 255  # ignored pixels are not counted
    labels = _square(48, 8, 18)  # two rows/columns of false object beside the true one
    labels[0, :5] = 1
    split = bb.error_split(mask, labels, patch=2.0)
    valid = mask != 255
    assert split["false_object"].sum() == ((labels > 0) & (mask == 0) & valid).sum()
    assert split["missed"].sum() == ((mask > 0) & (labels == 0) & valid).sum() == 16
    assert split["missed"][-1] == 16  # more than 4 patches (8 px) from the prediction: "farther"
    assert split["false_object"][:3].sum() == split["false_object"].sum() > 0  # the halo: within 2 patches (4 px)
    assert split["both"] == 64


def test_grabcut_takes_the_halo_off_a_colour_region():
    rng = np.random.default_rng(0)
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = (30, 60, 200)
    image[20:40, 20:40] = (220, 40, 30)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    truth = _square(64, 20, 40) > 0
    labels = _square(64, 15, 45, 4)  # a 5-px halo around the red square
    object_prob = np.full((64, 64), 0.5, np.float32)
    object_prob[25:35, 25:35] = 0.99  # sure object inside
    object_prob[:8], object_prob[-8:] = 0.0, 0.0  # sure background at the top and bottom
    refined = bb.grabcut_band(image, labels, object_prob, sure_object=0.9, sure_background=0.97, iterations=3)
    assert _iou(refined > 0, truth) > 0.9 > _iou(labels > 0, truth)
    assert set(np.unique(refined[refined > 0])) == {4}


def test_ridge_redecides_the_band_from_the_pixels_outside_it():
    rng = np.random.default_rng(1)
    truth = _square(64, 20, 44) > 0
    rows = np.minimum(np.arange(16) * 4 + 2, 63)
    on_grid = truth[np.ix_(rows, rows)].reshape(-1).astype(np.float64)
    features = np.c_[on_grid + rng.normal(0, 0.1, on_grid.size), rng.normal(size=(on_grid.size, 3))]
    labels = _square(64, 16, 48, 2)  # a 4-px halo
    refined = bb.ridge_band(features, (16, 16), labels, band_px=6, lam=1e-3)
    assert _iou(refined > 0, truth) > 0.9 > _iou(labels > 0, truth)
    far = bb.boundary_distance(labels > 0) > 6
    assert np.array_equal(refined[far], labels[far])  # nothing outside the band moves


def test_refiners_leave_an_image_with_one_side_only_alone():
    labels = np.zeros((32, 32), np.uint8)
    image = np.zeros((32, 32, 3), np.uint8)
    assert np.array_equal(bb.grabcut_band(image, labels, np.zeros((32, 32)), 0.9, 0.97, 1), labels)
    assert np.array_equal(bb.ridge_band(np.zeros((64, 2)), (8, 8), labels, 4, 1.0), labels)
    assert np.isinf(bb.boundary_distance(labels > 0)).all()
