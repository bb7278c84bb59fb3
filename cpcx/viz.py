"""Figures for the run folder (matplotlib, Agg backend, PNG, written atomically).

* ``class_heatmaps``: the patch probabilities Z of each class present in an image, upsampled and laid
  over the image (the paper's Fig. 6);
* ``label_overlays``: ground truth vs pseudo-label before and after the CRF, in VOC colours over the image
  (Figs. 4–5);
* ``iou_bar_chart``: per-class IoU, one bar per scored variant (e.g. with and without CRF);
* ``training_curves``: a stage's ``metrics.csv`` drawn per epoch (loss; val mIoU or P/R/F1 where measured).

Which images are drawn is ``sample_indices``: evenly spaced over the split, so the same images every run.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cpcx import atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window (or need a display)
    import matplotlib.pyplot as plt

    return plt


def sample_indices(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)``: a deterministic, representative sample."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic.write_bytes(path, buffer.getvalue())


def colorize(labels: np.ndarray) -> np.ndarray:
    """H×W class indices → H×W×3 uint8 in the VOC palette (255 = ignore shows as the palette's cream)."""
    from cpcx.data.palette import VOC_PALETTE

    return VOC_PALETTE[np.asarray(labels, dtype=np.uint8)]


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Label colours over the image; background (0) and ignore (255) pixels keep the image."""
    out = image.astype(np.float32)
    colours = colorize(labels).astype(np.float32)
    painted = (labels != 0) & (labels != 255)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return out.clip(0, 255).astype(np.uint8)


def class_heatmaps(
    path: str | Path, image: np.ndarray, probs: np.ndarray, classes: Sequence[int], class_names: Sequence[str],
    title: str = "",
) -> Path:
    """One panel per present class: its probability map (H×W, 0..1) over the image, shared colour scale."""
    plt = _pyplot()
    n = 1 + len(classes)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6 * image.shape[0] / image.shape[1] + 0.5), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    mappable = None
    for ax, channel, c in zip(axes[1:], probs, classes):
        ax.imshow(image)
        mappable = ax.imshow(channel, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(f"Z · {class_names[c]}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def label_overlays(
    path: str | Path, image: np.ndarray, panels: Mapping[str, np.ndarray], class_names: Sequence[str],
    title: str = "",
) -> Path:
    """The image, then each label map of ``panels`` (title → H×W indices) blended over it, with a legend."""
    plt = _pyplot()
    import matplotlib.patches as mpatches

    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 2.8 * image.shape[0] / image.shape[1] + 0.7), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    present: set[int] = set()
    for ax, (name, labels) in zip(axes[1:], panels.items()):
        ax.imshow(blend(image, labels))
        ax.set_title(name, fontsize=9)
        present.update(int(v) for v in np.unique(labels) if v != 255)
    for ax in axes:
        ax.axis("off")
    colours = colorize(np.array(sorted(present), dtype=np.uint8)) / 255.0
    handles = [mpatches.Patch(color=colour, label=class_names[c]) for c, colour in zip(sorted(present), colours)
               if c < len(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def iou_bar_chart(path: str | Path, class_names: Sequence[str], columns: Mapping[str, object], title: str = "") -> Path:
    """Horizontal bars of per-class IoU (%); ``columns`` maps a variant name to ``SegmentationScores``."""
    plt = _pyplot()
    names = list(class_names)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    height = 0.8 / max(1, len(columns))
    positions = np.arange(len(names))
    for k, (label, scores) in enumerate(columns.items()):
        iou = np.nan_to_num(np.asarray(scores.iou, dtype=float)) * 100
        miou = getattr(scores, "miou", float("nan")) * 100
        ax.barh(positions + k * height, iou, height=height, label=f"{label or 'IoU'} (mIoU {miou:.1f})")
    ax.set_yticks(positions + height * (len(columns) - 1) / 2)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


#: metrics.csv columns drawn by ``training_curves``, by panel; others (epoch, lr, seconds, …) are not curves.
LOSS_COLUMNS = ("loss", "mce", "pce")
SCORE_COLUMNS = ("val_miou", "precision", "recall", "f1")


def training_curves(csv_path: str | Path, path: str | Path, title: str = "") -> Path | None:
    """Loss per epoch and, where measured, the scores (val mIoU, P/R/F1) of a stage's ``metrics.csv``, as the
    ultralytics ``results.png`` beside its CSV. Empty cells (e.g. val mIoU between evaluations) are skipped.
    None (nothing drawn) when the CSV has no row yet."""
    import csv

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None

    def series(column: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for row in rows:
            try:
                x, y = int(row["epoch"]), float(row[column])
            except (KeyError, TypeError, ValueError):  # not measured this epoch (or not a column of this stage)
                continue
            xs.append(x)
            ys.append(y)
        return xs, ys

    panels = [(name, [c for c in columns if series(c)[1]]) for name, columns in
              (("loss", LOSS_COLUMNS), ("score", SCORE_COLUMNS))]
    panels = [(name, columns) for name, columns in panels if columns]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, columns) in zip(axes[0], panels):
        for column in columns:
            xs, ys = series(column)
            ax.plot(xs, [100 * y for y in ys] if column == "val_miou" else ys, marker="o", ms=3,
                    label="val mIoU (%)" if column == "val_miou" else column)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
