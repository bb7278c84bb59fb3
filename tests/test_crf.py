"""The dense CRF: same answer as pydensecrf called directly, and it cleans a noisy labelling."""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from cpcx.crf import CRFParams, crf_labels, dense_crf, unary_from_probs
from cpcx.metrics import ConfusionMatrix
from cpcx.recipe import CRFConfig


def _scene(height: int = 60, width: int = 80, seed: int = 0):
    """Three colour regions (background, a disc, a bar) with mild pixel noise, and their true labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    truth = np.zeros((height, width), dtype=np.uint8)
    truth[(yy - 30) ** 2 + (xx - 25) ** 2 < 15 ** 2] = 1
    truth[10:50, 55:70] = 2
    colours = np.array([[40, 90, 40], [220, 60, 50], [60, 70, 210]], dtype=np.float64)
    image = colours[truth] + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _noisy_probs(truth: np.ndarray, num_classes: int, seed: int = 1) -> np.ndarray:
    """Soft probabilities that favour the true class, with per-pixel noise strong enough to flip ~30%."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (num_classes, *truth.shape))
    logits += 0.9 * np.eye(num_classes)[truth].transpose(2, 0, 1)
    probs = np.exp(logits)
    return (probs / probs.sum(0)).astype(np.float32)


def _miou(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> float:
    cm = ConfusionMatrix(num_classes)
    cm.update(truth, prediction)
    return cm.result().miou


def test_params_default_to_vit_pcm_and_follow_the_recipe():
    assert CRFParams.from_config(CRFConfig()) == CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0, 1.0)
    custom = CRFConfig(iterations=5, bi_xy=50, bi_rgb=5, bi_w=7, pos_w=2, pos_xy=3, unary_temperature=2)
    assert CRFParams.from_config(custom) == CRFParams(5, 3.0, 2.0, 50.0, 5.0, 7.0, 2.0)


def test_crf_agrees_with_a_direct_pydensecrf_call():
    image, truth = _scene()
    probs = _noisy_probs(truth, 3)
    params = CRFParams(iterations=7, pos_xy=2.0, pos_w=3.0, bi_xy=40.0, bi_rgb=8.0, bi_w=5.0)

    direct = dcrf.DenseCRF2D(image.shape[1], image.shape[0], 3)
    direct.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    direct.addPairwiseGaussian(sxy=2.0, compat=3.0)
    direct.addPairwiseBilateral(sxy=40.0, srgb=8.0, rgbim=np.ascontiguousarray(image), compat=5.0)
    expected = np.array(direct.inference(7)).reshape(probs.shape)

    np.testing.assert_allclose(dense_crf(image, probs, params), expected, rtol=1e-6, atol=1e-7)
    # crf_labels maps channel j back to class classes[j] (the CRF runs on the present classes only)
    labels = crf_labels(image, probs, [0, 7, 15], params)
    np.testing.assert_array_equal(labels, np.array([0, 7, 15], dtype=np.uint8)[expected.argmax(0)])


def test_crf_cleans_a_noisy_labelling():
    image, truth = _scene()
    probs = _noisy_probs(truth, 3)
    noisy = probs.argmax(0)
    refined = crf_labels(image, probs, [0, 1, 2])  # ViT-PCM defaults
    before, after = _miou(truth, noisy, 3), _miou(truth, refined, 3)
    assert before < 0.6  # the test case is really noisy
    assert after > before + 0.25, (before, after)
    assert after > 0.9


def test_zero_pairwise_weights_leave_the_argmax():
    image, truth = _scene()
    probs = _noisy_probs(truth, 3)
    labels = crf_labels(image, probs, [0, 1, 2], CRFParams(pos_w=0.0, bi_w=0.0))
    np.testing.assert_array_equal(labels, probs.argmax(0))


def test_unary_temperature_flattens_the_probabilities():
    probs = np.array([[0.9, 0.5, 0.0], [0.1, 0.5, 1.0]], dtype=np.float32)[:, None, :]  # (2, 1, 3)
    np.testing.assert_array_equal(unary_from_probs(probs), unary_from_softmax(probs))
    tempered = np.sqrt(probs) / np.sqrt(probs).sum(0)
    np.testing.assert_allclose(unary_from_probs(probs, temperature=2.0),
                               -np.log(np.clip(tempered, 1e-5, 1)).reshape(2, -1), rtol=1e-6)
    # T > 1 brings the two classes' energies closer: the pairwise terms get more say
    gap = lambda u: np.abs(u[0] - u[1])  # noqa: E731
    assert np.all(gap(unary_from_probs(probs, 2.0)) <= gap(unary_from_probs(probs)) + 1e-6)


def test_single_class_and_shape_errors():
    image, _ = _scene(8, 10)
    probs = np.ones((1, 8, 10), dtype=np.float32)
    assert (crf_labels(image, probs, [0]) == 0).all() and crf_labels(image, probs, [0]).shape == (8, 10)
    with pytest.raises(ValueError, match="does not match"):
        dense_crf(image[:4], np.ones((2, 8, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="class indices"):
        crf_labels(image, np.ones((2, 8, 10), dtype=np.float32), [0, 1, 2])
