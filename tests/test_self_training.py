"""``pseudo.self_training``: held-out heads learn across images, the mix keeps to the image's classes, and `cpcx
pseudo` runs both passes on real VOC images, resumes without retraining, and refuses a run without cached tokens."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.errors import CpcxError
from cpcx.pseudo import run_pseudo
from cpcx.recipe import load_recipe
from cpcx.pseudo.self_training import FIRST_PASS, PREDICTIONS, HeadMix, cross_validated_probs, folds_of
from test_pseudo import _checkpoint, _labels, _recipe


def test_heads_predict_held_out_images_from_a_memory_mapped_cache(tmp_path):
    # The cache's layout: (N, views, h, w, e) float16 on disk with an extra view the heads must skip; each cell's
    # class is the argmax of a fixed linear map of its token, its label at 4x the grid, mirrored in the hflip view.
    g = torch.Generator().manual_seed(0)
    n, h, e, c = 48, 6, 16, 3
    orig = torch.randn(n, h, h, e, generator=g)
    truth = (orig @ torch.randn(e, c, generator=g)).argmax(-1)
    stored = np.lib.format.open_memmap(tmp_path / "tokens.npy", mode="w+", dtype=np.float16, shape=(n, 3, h, h, e))
    stored[:, 0] = torch.randn(n, h, h, e, generator=g).numpy()  # a view the run does not use
    stored[:, 1], stored[:, 2] = orig.numpy(), orig.flip(2).numpy()
    cells = truth.repeat_interleave(4, 1).repeat_interleave(4, 2)
    targets = torch.stack([cells, cells.flip(-1)], 1).numpy().astype(np.uint8)
    cfg = SimpleNamespace(folds=4, epochs=40, head_channels=32, aspp_rates=[1, 2, 3], lr=3e-3, weight_decay=0.0,
                          batch_size=8)
    probs = cross_validated_probs(np.load(tmp_path / "tokens.npy", mmap_mode="r"), [1, 2], targets, cfg, c, seed=0)
    assert probs.shape == (n, c, h, h)
    assert torch.allclose(probs.sum(1), torch.ones(n, h, h), atol=1e-5)
    assert (probs.argmax(1) == truth).float().mean().item() > 0.8  # held-out images: chance is 1/3


def test_every_image_is_held_out_exactly_once():
    splits = folds_of(17, 4, seed=1)
    assert sorted(torch.cat([h for _, h in splits]).tolist()) == list(range(17))
    assert all(not set(t.tolist()) & set(h.tolist()) for t, h in splits)


def test_the_mix_keeps_to_the_image_classes_and_falls_back_to_the_maps():
    maps = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.8, 0.0]])[:, :, None, None].repeat(1, 1, 2, 2)  # (2, 3, 2, 2)
    heads = torch.zeros(5, 3, 2, 2)
    heads[3] = torch.tensor([0.1, 0.3, 0.6])[:, None, None]  # 0.6 on a class image 3 does not hold
    heads[4, 2] = 1.0  # all its mass on an absent class: the maps alone there
    labels = np.array([[1, 1, 0], [1, 1, 0]])
    out = HeadMix(heads, 0.5)(maps, [3, 4], labels)
    torch.testing.assert_close(out[0, :, 0, 0], 0.5 * maps[0, :, 0, 0] + 0.5 * torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(out[1], maps[1])
    torch.testing.assert_close(out.sum(1), torch.ones(2, 2, 2))


def _self_training_recipe(tmp_path, voc_root, **pseudo):
    settings = {"enabled": True, "folds": 2, "epochs": 3, "batch_size": 2, "head_channels": 8, "aspp_rates": [1, 1, 1],
                **pseudo}
    return load_recipe(_recipe(tmp_path, voc_root, model={"img_size": 96}, crf={"enabled": False},
                               pseudo={"self_training": settings}))


def _cache_tokens(recipe):
    from cpcx.data import build_dataset
    from cpcx.data.views import ImageLabelDataset
    from cpcx.feature_cache import FeatureCache
    from cpcx.model import load_checkpoint

    net, _ = load_checkpoint(_checkpoint(recipe))
    FeatureCache.build(recipe.run_dir("train") / "features", "test_vit", net.backbone,
                       ImageLabelDataset(build_dataset(recipe.dataset, "train")), 96, ["orig", "hflip"],
                       torch.device("cpu"), "fp32", batch_size=4, workers=0, log=lambda _: None)


def _console() -> Console:
    return Console(record=True, width=200, file=open(os.devnull, "w"))


def test_pseudo_runs_both_passes_and_resumes_without_retraining_the_heads(tmp_path, voc_root):
    recipe = _self_training_recipe(tmp_path, voc_root, mix=1.0)
    _cache_tokens(recipe)
    first_run = _console()
    labels_dir = run_pseudo(recipe, console=first_run)
    stage = recipe.run_dir("pseudo")
    first, final = _labels(stage / FIRST_PASS), _labels(labels_dir)
    assert sorted(first) == sorted(final) and len(final) == 8
    probs = torch.load(stage / PREDICTIONS, weights_only=True)
    assert probs.shape == (8, 21, 6, 6) and probs.dtype == torch.float16
    # mix 1: the second pass decodes the heads alone, so its labels follow them, not the first pass
    assert any((first[k] != final[k]).any() for k in final)
    assert json.loads((stage / "metrics.json").read_text())["self_training"] is True
    assert "grid heads" in first_run.export_text()

    stamp = (stage / PREDICTIONS).stat().st_mtime_ns
    lost = sorted(final)[:3]
    for name in lost:
        (labels_dir / f"{name}.png").unlink()
    again = _console()
    run_pseudo(recipe, console=again)
    assert (stage / PREDICTIONS).stat().st_mtime_ns == stamp  # read back, not retrained
    assert "heads' predictions from" in again.export_text()
    resumed = _labels(labels_dir)
    assert all((resumed[k] == final[k]).all() for k in final)


def test_a_run_without_cached_tokens_is_refused_before_any_label(tmp_path, voc_root):
    recipe = _self_training_recipe(tmp_path, voc_root)
    _checkpoint(recipe)  # no feature cache
    with pytest.raises(CpcxError, match=r"pseudo\.self_training.*train\.feature_cache"):
        run_pseudo(recipe, console=_console())
    assert not list((recipe.run_dir("pseudo") / "labels").glob("*.png"))
    assert not (recipe.run_dir("pseudo") / FIRST_PASS).exists()


def test_first_pass_crf_false_trains_the_heads_on_the_maps_argmax(tmp_path, voc_root):
    """``first_pass_crf: false``: the first pass is the plain no-CRF labelling (the heads learn from it), while the
    second pass still goes through the CRF."""
    path = _recipe(tmp_path, voc_root, model={"img_size": 96}, crf={"iterations": 2},
                   pseudo={"self_training": {"enabled": True, "folds": 2, "epochs": 2, "batch_size": 2,
                                             "head_channels": 8, "aspp_rates": [1, 1, 1], "first_pass_crf": False}})
    recipe = load_recipe(path)
    _cache_tokens(recipe)
    plain = run_pseudo(load_recipe(path, ["crf.enabled=false", "pseudo.self_training.enabled=false"]),
                       console=_console())
    argmax = {k: v.copy() for k, v in _labels(plain).items()}
    with_crf = run_pseudo(load_recipe(path, ["pseudo.self_training.enabled=false"]), console=_console())
    crf_labels = {k: v.copy() for k, v in _labels(with_crf).items()}
    assert any((argmax[k] != crf_labels[k]).any() for k in argmax)  # the CRF changes these images: a real check
    run_pseudo(recipe, console=_console())
    first = _labels(recipe.run_dir("pseudo") / FIRST_PASS)
    assert sorted(first) == sorted(argmax)
    assert all((first[k] == argmax[k]).all() for k in argmax)
    assert json.loads((recipe.run_dir("pseudo") / "metrics.json").read_text())["crf"] is not None
