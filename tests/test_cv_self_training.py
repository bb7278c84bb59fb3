"""benchmarks/cv_self_training.py: the run's labels are read in data set order, and the mix is a distribution over
the image's classes that moves from the run's maps to the heads'."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cv_self_training as cv  # noqa: E402


def test_the_mix_is_the_runs_maps_at_zero_and_the_heads_restricted_to_the_image_classes_at_one():
    g = torch.Generator().manual_seed(0)
    classes = np.array([0, 3, 7])
    weak = torch.rand(3, 5, 4, generator=g)
    weak = weak / weak.sum(0, keepdim=True)
    head = torch.rand(9, 5, 4, generator=g).softmax(0)  # mass on absent classes too
    assert torch.allclose(cv.mixed(weak, head, classes, 0.0), weak)
    restricted = head[classes] / head[classes].sum(0, keepdim=True)
    assert torch.allclose(cv.mixed(weak, head, classes, 1.0), restricted)
    half = cv.mixed(weak, head, classes, 0.5)
    assert torch.allclose(half.sum(0), torch.ones(5, 4), atol=1e-6)
    assert torch.allclose(half, (weak + restricted) / 2)


def test_the_runs_pseudo_labels_are_read_in_data_set_order(tmp_path):
    folder = tmp_path / cv.RUN.format(seed=4) / "pseudo" / "labels"
    folder.mkdir(parents=True)
    ids = ["b_2", "a_1", "c_3"]
    for k, name in enumerate(ids):
        Image.fromarray(np.full((3, 5), k + 1, np.uint8)).save(folder / f"{name}.png")
    labels = cv.run_pseudo_labels(tmp_path, 4, _Ids(ids))
    assert [int(x[0, 0]) for x in labels] == [1, 2, 3]
    with pytest.raises(FileNotFoundError):
        cv.run_pseudo_labels(tmp_path, 5, _Ids(ids))


class _Ids:
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)
