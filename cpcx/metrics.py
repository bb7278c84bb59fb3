"""Semantic segmentation metrics from a confusion matrix (rows: ground truth, columns: prediction).

mIoU averages only over classes that occur in the ground truth or the prediction: a class absent from
both has an undefined IoU (0/0) and must not count, as in the VOC/COCO evaluation code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a C×C confusion matrix over images; pixels labelled ``ignore_index`` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        if truth.shape != prediction.shape:
            raise ValueError(f"shape mismatch: ground truth {truth.shape} vs prediction {prediction.shape}")
        truth = truth.astype(np.int64).ravel()
        prediction = prediction.astype(np.int64).ravel()
        keep = (truth != self.ignore_index) & (truth >= 0) & (truth < self.num_classes)
        truth, prediction = truth[keep], prediction[keep]
        if prediction.size and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"prediction holds labels outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(
            truth * self.num_classes + prediction, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def result(self) -> "SegmentationScores":
        return scores_from_confusion(self.matrix)


@dataclass(frozen=True)
class SegmentationScores:
    iou: np.ndarray  # per class, NaN where the class is absent from ground truth and prediction
    miou: float
    pixel_accuracy: float
    mean_accuracy: float

    def as_dict(self, class_names: list[str] | tuple[str, ...]) -> dict:
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "per_class_iou": {
                name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, self.iou)
            },
        }


def scores_from_confusion(matrix: np.ndarray) -> SegmentationScores:
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    gt_total = matrix.sum(axis=1)
    pred_total = matrix.sum(axis=0)
    union = gt_total + pred_total - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        class_acc = np.where(gt_total > 0, true_positive / gt_total, np.nan)
    total = matrix.sum()
    return SegmentationScores(
        iou=iou,
        miou=float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        pixel_accuracy=float(true_positive.sum() / total) if total else float("nan"),
        mean_accuracy=float(np.nanmean(class_acc)) if np.any(~np.isnan(class_acc)) else float("nan"),
    )
