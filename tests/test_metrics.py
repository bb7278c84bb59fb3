"""mIoU from a confusion matrix, checked against hand-computed cases."""
import numpy as np
import pytest

from cpcx.metrics import ConfusionMatrix, scores_from_confusion


def test_hand_computed_two_images():
    cm = ConfusionMatrix(3)
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]], dtype=np.uint8)
    cm.update(truth, pred)
    # class 0: tp 1, gt 2, pred 2 -> 1/3 ; class 1: tp 2, gt 2, pred 3 -> 2/3 ; class 2: tp 1, gt 2, pred 1 -> 1/2
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    scores = cm.result()
    assert scores.iou == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 6)


def test_class_absent_from_truth_and_prediction_does_not_count():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]))
    scores = cm.result()
    assert np.isnan(scores.iou[2]) and np.isnan(scores.iou[3])
    assert scores.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores.as_dict(["bg", "a", "b", "c"])["per_class_iou"]["b"] is None


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    scores = scores_from_confusion(np.array([[5, 1], [0, 0]]))
    assert scores.iou.tolist() == pytest.approx([5 / 6, 0.0])
    assert scores.miou == pytest.approx(5 / 12)


def test_ignore_and_errors():
    cm = ConfusionMatrix(2)
    cm.update(np.full((2, 2), 255), np.zeros((2, 2)))
    assert cm.matrix.sum() == 0
    with pytest.raises(ValueError, match="shape mismatch"):
        cm.update(np.zeros((2, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(3), np.array([0, 1, 5]))


def test_merge_equals_single_pass():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 5, (2, 50)), rng.integers(0, 5, (2, 50))
    whole, a, b = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(truth, pred)
    a.update(truth[0], pred[0])
    b.update(truth[1], pred[1])
    a.merge(b)
    assert (a.matrix == whole.matrix).all()
