"""benchmarks/area_estimates.py: the ridge estimate, the area decoding it feeds and the report, on small arrays."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import area_estimates as ae  # noqa: E402
import diagnose_pseudo as diag  # noqa: E402


def test_ridge_learns_the_share_from_the_training_rows_only_and_clips():
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(40, 3))
    share = 0.3 + 0.1 * pooled[:, 0]
    train = np.arange(40) < 30
    wrong = share.copy()
    wrong[~train] = 5.0  # the held-out rows' targets must not be read
    predicted = ae.ridge_shares(pooled, wrong, train, lam=1e-6)
    assert np.allclose(predicted[~train], np.clip(share[~train], 0, 1), atol=1e-4)
    assert ae.ridge_shares(pooled * 100, np.full(40, 3.0), train).max() == 1.0  # a share stays a share


def test_an_estimated_share_decodes_like_the_truth_of_the_same_share():
    maps = torch.rand(3, 4, 5, 5)
    maps = maps / maps.sum(1, keepdim=True)
    masks = [np.kron(np.eye(2, dtype=np.uint8), np.ones((5, 5), dtype=np.uint8))] * 3  # half object
    which = np.array([True, False, True])
    assert torch.equal(diag.area_scaled_maps(maps, np.full(3, 0.5), which), diag.area_oracle_maps(maps, masks, which))
    called = diag.own_shares(diag.area_scaled_maps(maps, np.array([0.2, 0.0, 0.6])))
    assert called.tolist() == pytest.approx([0.2, 0.0, 0.6], abs=0.021)  # 25 patches: to one patch


def test_the_report_averages_the_runs_and_buckets_the_multi_class_images():
    def run(offset):
        est = {"mae": {"choose": 0.1 + offset, "report": 0.2},
               "no_crf": {p: {"miou": 40.0 + offset, "fg_iou": 50.0} for p in ("choose", "report")}}
        return {"estimates": {name: est for name in ae.ESTIMATES}, "multi": [1, 2],
                "shares": {"maps": [0.9, 0.3, 0.4], "truth": [0.0, 0.05, 0.8]} | {
                    k: [0.0] * 3 for k in ae.ESTIMATES if k not in ("maps", "truth")}}

    doc = {"command": "benchmarks/area_estimates.py --runs a b", "runs": {"a": run(0.0), "b": run(2.0)}}
    text = ae.render(doc)
    assert "| the truth (oracle) | 1.100 / 0.200 | 41.0 (50.0) | 41.0 (50.0) | — | — |" in text
    assert ae.buckets(doc) == [
        {"truth_from": 0.0, "truth_to": 0.1, "images": 2, "truth": 0.05, "maps": 0.3},  # image 0 is not multi-class
        {"truth_from": 0.7, "truth_to": 1.01, "images": 2, "truth": 0.8, "maps": 0.4}]
