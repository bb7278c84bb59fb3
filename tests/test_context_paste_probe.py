"""benchmarks/context_paste_probe.py: the pasting moves the donor's masked tokens without wrapping and adds its
class; donors are the single-class images of a label folder (its scores: tests/test_self_training_runs.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import context_paste_probe as probe  # noqa: E402

from cpcx.data import build_dataset  # noqa: E402
from cpcx.data.palette import save_label_png  # noqa: E402
from cpcx.recipe import load_recipe  # noqa: E402
from test_pseudo import _recipe  # noqa: E402


def test_paste_shifts_the_masked_donor_cells_and_drops_what_leaves_the_grid():
    host = torch.zeros(5, 5, 3)
    donor = torch.arange(5 * 5 * 3, dtype=torch.float32).reshape(5, 5, 3) + 1
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 0] = mask[2, 3] = mask[4, 4] = True
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x, out_label = probe.paste(host, label, donor, mask, 3, 1, -1)  # one row down, one column left
    pasted = (x != 0).any(-1)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[3, 2] = True  # (2, 3) moved; (0, 0) left the grid on the left, (4, 4) at the bottom: dropped
    assert torch.equal(pasted, expected)
    assert torch.equal(x[3, 2], donor[2, 3])
    assert out_label.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert label.tolist() == [1.0, 0.0, 1.0, 0.0] and not host.any()  # the inputs are untouched


def test_donors_are_the_single_class_images_of_a_label_folder(tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root))  # 8 VOC train images
    dataset = build_dataset(recipe.dataset, "train")
    folder = tmp_path / "labels"
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        save_label_png(folder / f"{image_id}.png", np.where(mask == 255, 0, mask))  # the truth
    labels = np.asarray(dataset.labels)
    single = {i for i in range(len(dataset)) if labels[i, 1:].sum() == 1}
    assert single and len(single) < len(dataset)  # the fixture holds both kinds
    donors = probe.donor_masks(dataset, folder, 24)
    assert set(donors) <= single and donors
    for i, (c, mask) in donors.items():
        assert labels[i, c] == 1 and mask.shape == (24, 24) and int(mask.sum()) >= probe.MIN_CELLS
