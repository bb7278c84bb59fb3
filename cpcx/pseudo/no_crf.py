"""The pseudo stage's score before the CRF: a confusion matrix kept on disk so that resumed and sharded runs
still report it over every image, each image counted once.

One process keeps ``no_crf.json`` (the matrix and the ids it covers) up to date as it goes. Under torchrun each
rank keeps its own ``no_crf.part-<rank>.json`` of the images it scored in this run (none of which the merged
file already counts); rank 0 folds the parts into ``no_crf.json`` when every rank has finished, and also at
the start of the next run if a killed run left parts behind. A part is folded only when none of its ids is in
the merged file yet, so folding twice (a kill between saving the merged file and deleting the parts) counts
nothing twice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from cpcx import atomic
from cpcx.metrics import ConfusionMatrix

#: Seconds between saves of the matrix (its loss on a kill only shortens that report).
SAVE_EVERY_S = 30.0
MERGED_NAME = "no_crf.json"
PART_GLOB = "no_crf.part-*.json"


def part_path(stage_dir: Path, rank: int) -> Path:
    return stage_dir / f"no_crf.part-{rank}.json"


class NoCRFScores:
    """Confusion matrix of the no-CRF argmax, per id at most once, persisted across resumed runs.

    ``counted``: ids another file already counts (a rank's part skips the ids of the merged file); ``fresh``:
    start empty whatever the file holds (a part is never continued, it was folded at the start).
    """

    def __init__(self, path: Path, num_classes: int, counted: Iterable[str] = (), fresh: bool = False):
        self.path = path
        self.confusion = ConfusionMatrix(num_classes)
        self.ids: set[str] = set()
        self.counted = frozenset(counted)
        self._saved_at = time.monotonic()
        if fresh:
            return
        try:
            state = json.loads(path.read_text())
            matrix = np.asarray(state["matrix"], dtype=np.int64)
            if matrix.shape == self.confusion.matrix.shape:
                self.confusion.matrix, self.ids = matrix, set(state["ids"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no file yet, or a file from another data set: start afresh

    def add(self, image_id: str, mask: np.ndarray, prediction: np.ndarray) -> None:
        if image_id not in self.ids and image_id not in self.counted:
            self.confusion.update(mask, prediction)
            self.ids.add(image_id)
        if time.monotonic() - self._saved_at > SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        atomic.write_json(self.path, {"ids": sorted(self.ids), "matrix": self.confusion.matrix.tolist()}, indent=None)
        self._saved_at = time.monotonic()


def fold_parts(stage_dir: Path, num_classes: int) -> NoCRFScores:
    """``no_crf.json`` with every rank's part added (rank 0 only, while no rank is labelling); parts removed."""
    merged = NoCRFScores(stage_dir / MERGED_NAME, num_classes)
    parts = sorted(stage_dir.glob(PART_GLOB))
    for path in parts:
        part = NoCRFScores(path, num_classes)
        if part.ids and not part.ids & merged.ids and part.confusion.matrix.shape == merged.confusion.matrix.shape:
            merged.confusion.matrix = merged.confusion.matrix + part.confusion.matrix
            merged.ids |= part.ids
    if parts:
        merged.save()  # first the merged file, then the parts: a kill in between folds nothing twice
        for path in parts:
            path.unlink(missing_ok=True)
    return merged
