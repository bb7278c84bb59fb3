"""Class lists of the benchmark data sets. Index 0 is always ``background`` (the WSSS convention)."""
from __future__ import annotations

BACKGROUND = "background"

#: The 20 PASCAL VOC foreground classes, in the official order (mask value i+1 = VOC_CLASSES[i]).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def with_background(foreground: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The full class tuple of a data set: background first, then the foreground classes in order."""
    return (BACKGROUND, *foreground)
