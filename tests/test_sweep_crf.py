"""benchmarks/sweep_crf.py: valid settings, the forked CRF pass returns every image's own labels in order, and
the scores and the table say what each row was."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_crf  # noqa: E402
from cpcx.crf import CRFParams, crf_labels  # noqa: E402


def test_every_setting_is_valid_and_distinct():
    names = [name for name, _, _ in sweep_crf.SETTINGS]
    assert names[0] == "recipe" and len(set(names)) == len(names)
    params = [replace(CRFParams(), **changes) for _, changes, _ in sweep_crf.SETTINGS]  # a typo raises here
    assert all(changes for _, changes, _ in sweep_crf.SETTINGS[1:])
    assert len({p for p in params[1:]}) == len(params) - 1


def _items(count: int = 5):
    """Images whose left half is dark and right half bright, with class-1 probabilities that ramp across the
    image off the colour edge: each image's own CRF answer differs from its neighbours'."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        height, width = 24, 32 + 4 * i
        image = np.zeros((height, width, 3), dtype=np.uint8)
        image[:, width // 2:] = 220
        ramp = np.clip(np.linspace(-0.3, 1.3, width) + rng.normal(0, 0.1, (height, width)), 0.01, 0.99)
        probs = np.stack([1 - ramp, ramp]).astype(np.float16)
        items.append((image, probs, np.array([0, 3 + i], dtype=np.uint8)))
    return items


def test_forked_crf_pass_equals_one_call_per_image_in_order():
    items = _items()
    params = CRFParams(bi_xy=10.0, bi_rgb=13.0, bi_w=10.0, pos_xy=3.0, pos_w=3.0)
    got = sweep_crf.crf_all(items, params, workers=2)
    for (image, probs, classes), labels in zip(items, got):
        assert labels.shape == image.shape[:2]
        np.testing.assert_array_equal(labels, crf_labels(image, probs.astype(np.float32), classes, params))
    assert [set(np.unique(g)) - {0} for g in got] == [{3 + i} for i in range(len(items))]
    assert sweep_crf._IMAGES == []  # the shared list does not keep hundreds of MB alive after the pass


def test_table_lists_each_row_with_its_kernels(tmp_path):
    doc = {"command": "benchmarks/sweep_crf.py -r r.yaml", "run": "runs/x", "images": 2, "rows": [
        {"setting": "no CRF", "why": "argmax", "params": None, "miou": 0.4, "fg_iou": 0.6, "seconds": 0.0},
        {"setting": "irn", "why": "IRN", "params": {**CRFParams(bi_rgb=13.0).__dict__}, "miou": 0.45,
         "fg_iou": 0.61, "seconds": 60.0}]}
    sweep_crf.write(doc, tmp_path / "crf")
    table = (tmp_path / "crf.md").read_text()
    assert "| no CRF | – | – | – | – | – | – | 40.0 | 60.0 | 0 | argmax |" in table
    assert "| irn | 1 | 3 | 67 | 13 | 4 | 1 | 45.0 | 61.0 | 60 | IRN |" in table
    assert (tmp_path / "crf.json").exists()


def test_unknown_setting_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        sweep_crf.main(["-r", "recipes/voc-mini.yaml", "--only", "nope"])
    assert "recipe" in capsys.readouterr().err


def test_a_run_that_is_not_there_is_one_line_and_exit_2(tmp_path, voc_root, capsys):
    code = sweep_crf.main(["-r", str(ROOT / "recipes/voc-mini.yaml"), "name=nope", f"runs_dir={tmp_path}",
                           "--out", str(tmp_path / "crf")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("✘") and err.count("\n") == 1
    assert not (tmp_path / "crf.json").exists()
