"""pseudo.class_probe: the object class re-decided by a linear head trained on single-class images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.pseudo.class_probe import ClassProbe, fit_class_probe, object_patches, single_class_images
from cpcx.recipe import ClassProbeConfig, load_recipe


def test_single_class_images_count_objects_not_the_background():
    labels = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    assert single_class_images(labels) == [0, 2]


def test_object_patches_keep_the_patches_the_network_calls_object():
    maps = torch.zeros(2, 4, 1, 3)
    maps[:, 0] = torch.tensor([0.9, 0.4, 0.1])  # background share per patch
    maps[0, 2] = 1 - maps[0, 0]
    maps[1, 3] = 1 - maps[1, 0]
    tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    x, y, image, single = object_patches(maps, tokens, np.array([[1, 0, 1, 0], [1, 0, 0, 1]]), threshold=0.5)
    assert y.tolist() == [1, 1, 2, 2]  # object index among the objects (class - 1), patches 1 and 2 of each image
    assert torch.equal(x, tokens[:, 0, 1:].reshape(4, 2))
    assert image.tolist() == [0, 0, 1, 1] and single.all()


def test_object_patches_of_multi_object_images_need_a_confident_object():
    maps = torch.zeros(1, 4, 1, 3)
    maps[0, 0] = torch.tensor([0.1, 0.1, 0.9])  # patch 2 is background
    maps[0, 1] = torch.tensor([0.85, 0.45, 0.05])
    maps[0, 2] = torch.tensor([0.05, 0.45, 0.05])
    labels = np.array([[1, 1, 1, 0]])
    tokens = torch.randn(1, 1, 3, 2)
    assert len(object_patches(maps, tokens, labels, threshold=0.5)[1]) == 0  # without a confidence: none
    x, y, image, single = object_patches(maps, tokens, labels, threshold=0.5, confidence=0.8)
    assert y.tolist() == [0] and not single.any()  # patch 0 (class 1 takes 94 %); patch 1 is a tie


def _probe(mix: float, known=(True, True, True)) -> ClassProbe:
    # object k is token direction k: the probe is sure of the class its token shows
    return ClassProbe(torch.eye(3) * 5, torch.zeros(3), torch.tensor(known), mix)


def test_redecide_moves_a_confused_patch_and_keeps_background_and_sums():
    maps = torch.tensor([0.2, 0.7, 0.1, 0.0])[None, :, None, None]  # network: class 1 wins; class 2 present
    tokens = torch.tensor([0.0, 1.0, 0.0])[None, None, None]  # the token shows object 2 (class 2)
    labels = np.array([[1, 1, 1, 0]])
    out = _probe(mix=1.0).redecide(maps, tokens, labels)
    assert out[0, :, 0, 0].argmax() == 2
    assert out[0, 0] == pytest.approx(0.2) and out.sum() == pytest.approx(1.0)
    assert out[0, 3] == 0  # an absent class stays out
    assert torch.allclose(_probe(mix=0.0).redecide(maps, tokens, labels), maps)  # mix 0: the network's maps
    half = _probe(mix=0.5).redecide(maps, tokens, labels)[0, :, 0, 0]
    sure = float(torch.softmax(torch.tensor([0.0, 50.0]), 0)[0])  # unit token × 10 × weight 5
    assert float(half[1]) == pytest.approx(0.5 * 0.7 + 0.5 * 0.8 * sure, abs=1e-4)


def test_redecide_leaves_the_share_of_a_class_it_does_not_know():
    maps = torch.tensor([0.1, 0.3, 0.2, 0.4])[None, :, None, None]
    tokens = torch.tensor([0.0, 1.0, 0.0])[None, None, None]
    out = _probe(mix=1.0, known=(True, True, False)).redecide(maps, tokens, np.array([[1, 1, 1, 1]]))
    assert out[0, 3, 0, 0] == pytest.approx(0.4)  # class 3: too few single-class images, the network's share
    assert out[0, 2, 0, 0] > out[0, 1, 0, 0]  # classes 1 and 2 share their 0.5 as the token says
    assert out[0, 1:, 0, 0].sum() == pytest.approx(0.9)


def test_fit_learns_the_classes_and_marks_the_rare_ones_unknown():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (600,))
    x = torch.nn.functional.one_hot(y, 6).float() + 0.1 * torch.randn(600, 6)
    cfg = ClassProbeConfig(enabled=True, min_images=4, epochs=30)
    probe = fit_class_probe([(x[:300], y[:300]), (x[300:], y[300:])], np.array([10, 4, 3]), cfg, seed=0)
    assert probe.known.tolist() == [True, True, False]
    logits = torch.nn.functional.normalize(x, dim=-1) @ probe.weight.T * 10 + probe.bias
    assert (logits.argmax(1) == y).float().mean() > 0.95
    again = fit_class_probe([(x[:300], y[:300]), (x[300:], y[300:])], np.array([10, 4, 3]), cfg, seed=0)
    assert torch.equal(again.weight, probe.weight)  # seeded


def test_tokens_returned_with_the_maps_are_the_vits(tmp_path, voc_root):
    from test_pseudo import _checkpoint, _recipe

    from cpcx.data import build_dataset
    from cpcx.model import cluster_vectors, load_checkpoint
    from cpcx.pseudo.infer import PatchPredictor

    recipe = load_recipe(_recipe(tmp_path, voc_root, model={"img_size": 96}))
    net, meta = load_checkpoint(_checkpoint(recipe))
    dataset = build_dataset(recipe.dataset, "train")
    predictor = PatchPredictor(net, torch.device("cpu"), "fp32", 96, flip=True, class_max_norm=True)
    images = [dataset.load_image(i) for i in range(2)]
    u = cluster_vectors(dataset.labels, meta["cluster_matrix"])[:2]
    maps, tokens = predictor(images, dataset.labels[:2], u, with_tokens=True)
    assert torch.equal(maps, predictor(images, dataset.labels[:2], u))
    with torch.inference_mode():
        assert torch.allclose(tokens, net.backbone(predictor.prepare(images)), atol=1e-5)


def test_pseudo_stage_trains_saves_and_reuses_the_probe(tmp_path, voc_root):
    from test_pseudo import _checkpoint, _labels, _recipe

    from cpcx.pseudo import run_pseudo

    quiet = Console(file=open(os.devnull, "w"), width=120)
    probe_cfg = {"enabled": True, "min_images": 1, "object_threshold": 0.0, "epochs": 2}
    recipe = load_recipe(_recipe(tmp_path, voc_root, pseudo={"class_probe": probe_cfg}, crf={"enabled": False}))
    _checkpoint(recipe)
    labels_dir = run_pseudo(recipe, console=quiet)
    saved = labels_dir.parent / "class_probe.pt"
    probe = ClassProbe.load(saved)
    assert probe.weight.shape == (20, 64) and probe.known.any()
    assert json.loads((labels_dir.parent / "metrics.json").read_text())["class_probe"] is True
    first = _labels(labels_dir)
    # an interrupted run resumes with the saved probe: same labels, the probe file untouched
    stamp = saved.stat().st_mtime_ns
    for image_id in sorted(first)[4:]:
        (labels_dir / f"{image_id}.png").unlink()
    run_pseudo(recipe, console=quiet)
    assert saved.stat().st_mtime_ns == stamp
    after = _labels(labels_dir)
    for image_id in first:
        np.testing.assert_array_equal(after[image_id], first[image_id])
    # the saved probe is the one applied: one that knows every class and always says person (15) takes every
    # object pixel of the images where person competes (2007_000032: aeroplane and person; 2007_000170)
    ClassProbe(torch.zeros(20, 64), torch.arange(20.0) * 0 + 100 * (torch.arange(20) == 14), torch.ones(20, dtype=bool),
               mix=1.0).save(saved)
    for image_id in first:
        (labels_dir / f"{image_id}.png").unlink()
    run_pseudo(recipe, console=quiet)
    forced = _labels(labels_dir)
    for image_id in ("2007_000032", "2007_000170"):
        assert set(np.unique(forced[image_id])) <= {0, 15}
        # the object mass is kept, so a pixel that was object stays object (all of it now on one class)
        assert np.all(forced[image_id][first[image_id] > 0] > 0)
    assert set(np.unique(first["2007_000032"])) == {0, 1, 15}
    np.testing.assert_array_equal(forced["2007_000039"], first["2007_000039"])  # one object: nothing to decide


def test_object_patches_bring_finer_maps_to_the_tokens_grid():
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0] = 0.2
    maps[0, 1] = 0.8  # every patch object, class 1
    x, y, _, _ = object_patches(maps, torch.ones(1, 2, 2, 5), np.array([[1, 1, 0]]), threshold=0.5)
    assert x.shape == (4, 5) and y.tolist() == [0, 0, 0, 0]


def test_multi_object_rows_teach_only_the_classes_short_of_single_class_images():
    from cpcx.pseudo.class_probe import fit_from_batches

    # class 1 (object 0): 2 single-class images; class 2 (object 1): none, but confident in 2 two-object images
    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    maps = torch.zeros(4, 3, 2, 2)
    maps[:2, 1] = 1.0
    maps[2:, 1, 0] = 1.0  # top row: class 1, confidently
    maps[2:, 2, 1] = 1.0  # bottom row: class 2, confidently
    tokens = torch.zeros(4, 2, 2, 2)
    tokens[:, 0, :, 0] = 1.0
    tokens[:, 1, :, 1] = 1.0
    cfg = ClassProbeConfig(enabled=True, min_images=2, epochs=30)
    probe, patches = fit_from_batches(iter([(maps[:2], tokens[:2], labels[:2]), (maps[2:], tokens[2:], labels[2:])]),
                                      labels, cfg, seed=0)
    # class 1 has its 2 single-class images, so the multi-object images add only class 2's rows (2 per image)
    assert patches == 2 * 4 + 2 * 2
    assert probe.known.tolist() == [True, True]
    single_only = ClassProbeConfig(enabled=True, min_images=2, epochs=30, multi_confidence=None)
    probe, patches = fit_from_batches(iter([(maps[:2], tokens[:2], labels[:2]), (maps[2:], tokens[2:], labels[2:])]),
                                      labels, single_only, seed=0)
    assert patches == 8 and probe.known.tolist() == [True, False]


def test_fit_from_batches_keeps_each_batch_to_its_share_of_max_patches():
    from cpcx.pseudo.class_probe import fit_from_batches

    maps = torch.zeros(2, 3, 10, 10)
    maps[:, 1] = 1.0  # every patch object, class 1
    labels = np.array([[1, 1, 0], [1, 1, 0]])
    batches = [(maps, torch.randn(2, 10, 10, 4), labels) for _ in range(3)]  # 3 batches × 200 object patches
    cfg = ClassProbeConfig(enabled=True, min_images=1, epochs=1, max_patches=90)
    probe, patches = fit_from_batches(iter(batches), np.concatenate([labels] * 3), cfg, seed=0)
    assert patches == 90  # 30 per batch of 2 of the 6 images
    _, everything = fit_from_batches(iter(batches), np.concatenate([labels] * 3),
                                     ClassProbeConfig(enabled=True, epochs=1), seed=0)
    assert everything == 600


def test_a_data_set_without_single_class_images_gets_a_probe_that_changes_nothing():
    from cpcx.pseudo.class_probe import fit_from_batches

    cfg = ClassProbeConfig(enabled=True)
    probe, patches = fit_from_batches(iter([]), np.zeros((0, 4)), cfg, seed=0)
    assert patches == 0 and not probe.known.any()
    maps = torch.rand(2, 4, 3, 3).softmax(1)
    assert torch.equal(probe.redecide(maps, torch.randn(2, 3, 3, 8), np.ones((2, 4))), maps)


def test_gather_rows_draws_what_cat_then_randperm_draws_and_empties_the_list():
    from cpcx.pseudo.class_probe import gather_rows

    torch.manual_seed(1)
    blocks = [(torch.randn(n, 5), torch.randint(0, 4, (n,))) for n in (7, 0, 13, 5)]
    x_all, y_all = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    for cap in (3, 24, 25, 100):
        rows = list(blocks)
        x, y = gather_rows(rows, cap, torch.Generator().manual_seed(7))
        if cap < 25:
            keep = torch.randperm(25, generator=torch.Generator().manual_seed(7))[:cap]
            assert torch.equal(x, x_all[keep]) and torch.equal(y, y_all[keep])
        else:
            assert torch.equal(x, x_all) and torch.equal(y, y_all)
        assert rows == [] and x.dtype == torch.float32
    half = [(torch.randn(4, 3).half(), torch.arange(4))]
    x, _ = gather_rows(half, 2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (2, 3)
    x, y = gather_rows([(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))], 10, torch.Generator())
    assert x.shape == (0, 6) and len(y) == 0  # no rows: the probe still gets the tokens' width


def test_the_in_place_normalisation_equals_f_normalize():
    from cpcx.pseudo.class_probe import _TOKEN_SCALE, normalise_rows_

    x = torch.randn(50, 8)
    x[3] = 0.0  # a zero row stays zero, as F.normalize leaves it
    expected = torch.nn.functional.normalize(x, dim=-1) * _TOKEN_SCALE
    out = normalise_rows_(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, expected)
