"""benchmarks/diagnose_pseudo.py: its decoders and its error split, on small hand-made tensors."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import diagnose_pseudo as diag  # noqa: E402


def test_threshold_maps_normalise_present_classes_and_fix_the_background():
    probs = torch.rand(2, 4, 3, 3) + 0.1
    labels = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    maps = diag.threshold_maps(probs, labels, background=0.3)
    assert torch.all(maps[:, 0] == 0.3)
    assert torch.all(maps[0, 1] == 0) and torch.all(maps[1, 2:] == 0)  # absent classes never win
    assert maps[0, 2].max() == pytest.approx(1.0) and maps[1, 1].max() == pytest.approx(1.0)


def test_affinity_walk_spreads_a_class_within_its_token_group_only():
    h = w = 2  # patches 0, 1 share token a; patches 2, 3 share token b, orthogonal to a
    feats = torch.zeros(1, h, w, 4)
    feats[0, 0, :, 0] = 1.0
    feats[0, 1, :, 1] = 1.0
    maps = torch.zeros(1, 2, h, w)
    maps[0, 1, 0, 0] = 1.0  # class 1 fires on patch 0 only
    out = diag.affinity_maps(maps, feats, tau=0.02, steps=1)
    assert out[0, 1, 0, 1] == pytest.approx(0.5, abs=1e-3)  # patch 1 (same token) gets half of it
    assert out[0, 1, 1].abs().max() < 1e-6  # the other group gets nothing


def test_selftrain_probe_follows_the_confident_patches():
    torch.manual_seed(0)
    n, h, w, c = 8, 4, 4, 3
    group = torch.rand(n, h, w) > 0.5  # class 1 on one token direction, class 2 on another
    group[0, 0, 0] = True
    feats = torch.where(group[..., None], torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    feats = feats + 0.05 * torch.randn(n, h, w, 3)
    maps = torch.zeros(n, c, h, w)
    maps[:, 1] = torch.where(group, 0.9, 0.1)
    maps[:, 2] = 1.0 - maps[:, 1]
    maps[0, :, 0, 0] = torch.tensor([0.0, 0.4, 0.6])  # an unconfident patch, labelled against its token
    labels = torch.tensor([[1.0, 1.0, 1.0]]).expand(n, -1)
    out, kept = diag.selftrain_maps(maps, feats, labels, confidence=0.8, epochs=200)
    assert kept < 1.0
    predicted = out.argmax(1)
    assert torch.equal(predicted == 1, group)  # the probe fixes the unconfident patch too


def _two_by_two_scorer():
    """One 2×2 image: background, an `a` pixel and two `b` pixels; all three classes present."""
    mask = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    dataset = SimpleNamespace(labels=np.array([[1, 1, 1]]), classes=("background", "a", "b"), num_classes=3,
                              load_mask=lambda i: mask)
    return diag.Scorer(dataset), torch.zeros(1, 3, 2, 2)


def test_error_split_counts_background_misses_and_wrong_classes():
    scorer, maps = _two_by_two_scorer()
    maps[0, 0, 0, 1] = 1.0  # object pixel a → background (a miss)
    maps[0, 1, 1, 0] = 1.0  # b pixel → a (wrong class)
    maps[0, 2, 1, 1] = 1.0  # b pixel → b
    maps[0, 0, 0, 0] = 1.0  # background → background
    split = scorer.scores(maps)
    assert split["fg_recall"] == pytest.approx(2 / 3)
    assert split["fg_precision"] == pytest.approx(1.0)
    assert split["wrong_class_in_fg"] == pytest.approx(0.5)
    assert scorer.scores(maps)["miou"] == pytest.approx(1 / 3)  # IoU background 1/2, a 0, b 1/2


def test_truth_on_grid_is_exact_when_objects_follow_the_patches_and_ignores_255():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 4:] = 3  # the right column of a 2×2 grid
    mask[0, 0] = 255
    maps = diag.truth_on_grid([mask], num_classes=4, grid=(2, 2))
    assert maps.shape == (1, 4, 2, 2)
    assert torch.all(maps[0, 3, :, 1] == 1.0) and torch.all(maps[0, 0, :, 1] == 0.0)
    assert maps[0, 0, 0, 0] == pytest.approx(15 / 16)  # the ignored pixel counts for no class
    scorer = diag.Scorer(SimpleNamespace(labels=np.array([[1, 0, 0, 1]]), num_classes=4,
                                         classes=("background", "a", "b", "c"), load_mask=lambda i: mask))
    assert scorer.scores(maps)["miou"] == pytest.approx(1.0)  # an edge along the grid survives bilinear decoding
    mask[:4, 4:] = 0  # now an object in one corner patch: bilinear decoding rounds its inner corner off
    corner = scorer.scores(diag.truth_on_grid([mask], num_classes=4, grid=(2, 2)))["miou"]
    assert 0.9 < corner < 1.0


def test_oracles_fix_one_half_of_the_decision_each():
    scorer, maps = _two_by_two_scorer()
    maps[0, 0, 0, 1] = 1.0  # a pixel → background (object/background error); its best object is a
    maps[0, 1, 0, 1] = 0.5
    maps[0, 1, 1, 0] = 1.0  # b pixel → a (class error)
    maps[0, 2, 1, 1] = 1.0  # b pixel → b
    maps[0, 2, 0, 0] = 1.0  # background pixel → b (object/background error)
    oracle = scorer.oracles(maps)
    # truth's background: [[0, a], [a, b]] → IoU background 1, a 1/2, b 1/2
    assert oracle["truth_background"] == pytest.approx(2 / 3)
    # truth's classes where both call it object: [[b, 0], [b, b]] → background 0, a 0, b 2/3
    assert oracle["truth_class"] == pytest.approx(2 / 9)
    assert scorer.scores(maps)["miou"] == pytest.approx(1 / 9)  # both halves wrong somewhere: below both oracles


def test_objectness_decides_object_vs_background_and_keeps_the_networks_class():
    maps = torch.zeros(1, 3, 1, 3)
    maps[0, :, 0, 0] = torch.tensor([0.9, 0.1, 0.0])  # the network: background
    maps[0, :, 0, 1] = torch.tensor([0.1, 0.2, 0.7])  # the network: b
    maps[0, :, 0, 2] = torch.tensor([0.1, 0.6, 0.3])  # the network: a
    objectness = torch.tensor([[[0.8, 0.3, 0.6]]])
    out = diag.with_objectness(maps, objectness)
    assert out[0].argmax(0).tolist() == [[1, 0, 1]]  # object where o > 0.5, with the network's best object
    assert diag.object_share(maps)[0, 0].tolist() == pytest.approx([0.1, 0.9, 0.9])


def test_pca_objectness_follows_the_token_split_signed_by_the_maps():
    torch.manual_seed(0)
    feats = torch.randn(1, 4, 4, 8) * 0.01
    feats[0, :2, :, 0] += 1.0  # the top half's tokens differ from the bottom half's along one direction
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 1, :2] = 1.0  # the network calls the top half object...
    maps[0, 0] = 0.5
    o = diag.pca_objectness(maps, feats)
    assert bool((o[0, :2] > 0.5).all() and (o[0, 2:] < 0.5).all())  # ...and the component is signed to agree


def test_prototypes_fix_the_class_of_a_confused_patch_and_keep_the_background():
    # Two images of classes a (1) and b (2): tokens of a point along e0, of b along e1, background along e2.
    feats = torch.zeros(2, 1, 4, 3)
    feats[:, 0, 0, 2] = 1.0  # patch 0: background
    feats[:, 0, 1:3, 0] = 1.0  # patches 1, 2: a
    feats[:, 0, 3, 1] = 1.0  # patch 3: b
    maps = torch.zeros(2, 3, 1, 4)
    maps[:, 0, 0, 0] = 1.0
    maps[:, 1, 0, 1:3] = 1.0  # a won confidently on its patches
    maps[:, 2, 0, 3] = 0.9  # b won confidently on its patch in image 0...
    maps[1, 1, 0, 3] = 0.95  # ...but in image 1 a takes b's patch by a hair
    labels = torch.ones(2, 3)
    out = diag.prototype_maps(maps, feats, labels, confidence=0.8)
    assert maps[1].argmax(0).tolist() == [[0, 1, 1, 1]]
    assert out[1].argmax(0).tolist() == [[0, 1, 1, 2]]  # the b patch gets its class back from the prototypes
    assert out[0].argmax(0).tolist() == [[0, 1, 1, 2]]
    assert torch.equal(out[:, 0], maps[:, 0])  # the background is the network's
    assert torch.allclose(out[:, 1:].amax(1), maps[:, 1:].amax(1))  # the strongest object score is kept


def test_confusions_rank_object_to_object_flows_by_share_of_the_truth():
    scorer, maps = _two_by_two_scorer()
    maps[0, 0, 0, 0] = 1.0  # background → background
    maps[0, 2, 0, 1] = 1.0  # the a pixel → b: all of a
    maps[0, 1, 1, 0] = 1.0  # one b pixel → a: half of b
    maps[0, 0, 1, 1] = 1.0  # the other b pixel → background (not an object-to-object flow)
    top = diag.top_confusions(scorer.confusion(maps), scorer.dataset.classes, top=2)
    assert [(c["truth"], c["predicted"]) for c in top] == [("a", "b"), ("b", "a")]
    assert [c["share"] for c in top] == pytest.approx([1.0, 0.5])


def test_supervised_probe_predicts_held_out_images_from_the_other_folds_truth():
    torch.manual_seed(0)
    n, h, w, e = 12, 3, 3, 8
    # class 1 patches carry token direction 0, class 2 direction 1, background direction 2 (plus noise)
    truth_class = torch.randint(0, 3, (n, h, w))
    feats = torch.nn.functional.one_hot(truth_class, e).float() + 0.05 * torch.randn(n, h, w, e)
    truth = torch.nn.functional.one_hot(truth_class, 3).permute(0, 3, 1, 2).float()
    truth[0, :, 0, 0] = 0.0  # a patch with no valid pixel: left out of training, still predicted
    probs = diag.supervised_probe_probs(feats, truth, folds=3, epochs=20)
    assert probs.shape == truth.shape
    assert torch.allclose(probs.sum(1), torch.ones(n, h, w), atol=1e-5)
    assert (probs.argmax(1) == truth_class).float().mean() > 0.95


def test_supervised_probe_never_sees_the_image_it_predicts():
    # each image has a token direction of its own (plus one shared by all) and one class on all its patches:
    # image 0 class 2, the others class 1. A head that saw image 0 predicts 2 there; leave-one-out heads learned
    # only the other images' class, on the shared direction.
    n, h, w = 6, 2, 2
    feats = (torch.eye(n + 1)[:n] + 2 * torch.eye(n + 1)[n])[:, None, None, :].expand(n, h, w, n + 1).clone()
    truth = torch.zeros(n, 3, h, w)
    truth[0, 2] = 1.0
    truth[1:, 1] = 1.0
    probs = diag.supervised_probe_probs(feats, truth, folds=n, epochs=300)
    assert torch.all(probs[0].argmax(0) == 1)


def test_decode_as_pseudo_applies_the_class_probe_only_when_the_recipe_enables_it():
    from cpcx.pseudo.infer import condition_on_labels
    from cpcx.recipe import ClassProbeConfig

    torch.manual_seed(0)
    n, h, w = 6, 3, 3
    probs = torch.rand(n, 4, h, w).softmax(1)
    feats = torch.randn(n, h, w, 5)
    labels = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]])

    def recipe(enabled: bool):
        probe = ClassProbeConfig(enabled=enabled, min_images=1, object_threshold=0.0, epochs=5)
        return SimpleNamespace(seed=0, pseudo=SimpleNamespace(class_max_norm=True, class_probe=probe))

    plain = condition_on_labels(probs, torch.tensor(labels).float(), True)
    assert torch.equal(diag.decode_as_pseudo(probs, feats, labels, recipe(False)), plain)
    probed = diag.decode_as_pseudo(probs, feats, labels, recipe(True))
    assert torch.equal(probed, diag.with_class_probe(plain, feats, labels, recipe(True)))
    assert not torch.allclose(probed[3:], plain[3:])  # the images with two objects are re-decided
    assert torch.allclose(probed[:3], plain[:3])  # one object: nothing to decide


def test_area_oracle_calls_object_the_truths_share_of_patches_in_the_maps_order():
    maps = torch.zeros(2, 3, 2, 2)
    maps[:, 0] = torch.tensor([[0.9, 0.6], [0.3, 0.5]])  # background
    maps[:, 1] = torch.tensor([[0.1, 0.4], [0.7, 0.5]])  # the one object: ratios 9, 1.5, 0.43, 1
    half = np.array([[1, 1], [0, 0]], dtype=np.uint8)  # half the pixels are object (the top row)
    masks = [np.kron(half, np.ones((4, 4), dtype=np.uint8))] * 2
    out = diag.area_oracle_maps(maps, masks, which=np.array([True, False]))
    called = out[0, 1] > out[0, 0]
    assert called.tolist() == [[False, False], [True, True]]  # the two lowest ratios: the area, not the place
    assert torch.allclose(out[0].sum(0), torch.ones(2, 2))  # a distribution again, for the CRF
    assert torch.equal(out[1], maps[1])  # not among ``which``: untouched
    assert (maps[0, 1] > maps[0, 0]).sum() == 1  # the maps alone called one patch object
    everything, nothing = np.ones((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8)
    nothing[0, 0] = 255  # ignored pixels do not count
    assert bool((diag.area_oracle_maps(maps[:1], [everything])[0, 1] > 0.5).all())
    assert bool((diag.area_oracle_maps(maps[:1], [nothing])[0, 0] > 0.5).all())


def test_decode_as_pseudo_takes_the_multi_class_images_from_the_pasted_network():
    torch.manual_seed(0)
    n, h, w = 6, 3, 3
    probs, paste = torch.rand(n, 4, h, w).softmax(1), torch.rand(n, 4, h, w).softmax(1)
    feats = torch.randn(n, h, w, 5)
    labels = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]])
    recipe = SimpleNamespace(seed=0, pseudo=SimpleNamespace(class_max_norm=True, class_probe=SimpleNamespace(
        enabled=False)))
    merged = diag.decode_as_pseudo(probs, feats, labels, recipe, paste)
    assert torch.equal(merged[:3], diag.decode_as_pseudo(probs, feats, labels, recipe)[:3])  # one object class
    assert torch.equal(merged[3:], diag.decode_as_pseudo(paste, feats, labels, recipe)[3:])  # several
    assert not torch.allclose(merged[3:], diag.decode_as_pseudo(probs, feats, labels, recipe)[3:])


def test_decode_as_pseudo_averages_several_pasted_networks_each_with_its_own_seeds_probe():
    from cpcx.recipe import ClassProbeConfig

    torch.manual_seed(0)
    n, h, w = 6, 3, 3
    probs = torch.rand(n, 4, h, w).softmax(1)
    first, second = torch.rand(n, 4, h, w).softmax(1), torch.rand(n, 4, h, w).softmax(1)
    feats = torch.randn(n, h, w, 5)
    labels = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 1]])
    probe = ClassProbeConfig(enabled=True, min_images=1, object_threshold=0.0, epochs=5)
    recipe = SimpleNamespace(seed=3, pseudo=SimpleNamespace(class_max_norm=True, class_probe=probe))
    merged = diag.decode_as_pseudo(probs, feats, labels, recipe, [first, second])
    # as the stage: network k's probe fitted with the run's seed + k * 1000, the decoded maps averaged
    expected = (diag.decode_as_pseudo(first, feats, labels, recipe, seed=3)
                + diag.decode_as_pseudo(second, feats, labels, recipe, seed=1003)) / 2
    assert torch.allclose(merged[3:], expected[3:])
    assert torch.equal(merged[:3], diag.decode_as_pseudo(probs, feats, labels, recipe)[:3])  # one object class
    assert not torch.allclose(merged[3:], diag.decode_as_pseudo(first, feats, labels, recipe)[3:])
    # the seed reaches the probe: another seed fits another probe
    assert not torch.allclose(diag.decode_as_pseudo(second, feats, labels, recipe, seed=1003)[3:],
                              diag.decode_as_pseudo(second, feats, labels, recipe, seed=3)[3:])
    assert torch.equal(diag.decode_as_pseudo(probs, feats, labels, recipe, first),
                       diag.decode_as_pseudo(probs, feats, labels, recipe, [first]))  # one tensor = a list of one
    # the raw-probs variants: the networks' mean, one network's own, nothing without the switch
    assert torch.allclose(diag.raw_paste_probs([first, second]), (first + second) / 2)
    assert torch.equal(diag.raw_paste_probs(first), first) and diag.raw_paste_probs(None) is None


def test_load_paste_probs_names_the_missing_pasted_network_and_the_fix(tmp_path, monkeypatch):
    from cpcx.errors import CpcxError

    def recipe(enabled: bool, networks: int = 1):
        return SimpleNamespace(pseudo=SimpleNamespace(context_paste=SimpleNamespace(enabled=enabled,
                                                                                    networks=networks)),
                               run_dir=lambda stage: tmp_path / stage)

    assert diag.load_paste_probs(recipe(False)) is None
    with pytest.raises(CpcxError, match=r"paste/weights/best\.pt.*cpcx pseudo.*context_paste\.enabled=false"):
        diag.load_paste_probs(recipe(True))
    read = []
    monkeypatch.setattr(diag, "load_run", lambda recipe, checkpoint: read.append(checkpoint) or (None, len(read)))
    (tmp_path / "pseudo" / "paste" / "weights").mkdir(parents=True)
    (tmp_path / "pseudo" / "paste" / "weights" / "best.pt").write_bytes(b"")
    assert diag.load_paste_probs(recipe(True)) == [1]
    with pytest.raises(CpcxError, match=r"paste-2/weights/best\.pt"):  # networks: 2, the second not trained
        diag.load_paste_probs(recipe(True, 2))
    (tmp_path / "pseudo" / "paste-2" / "weights").mkdir(parents=True)
    (tmp_path / "pseudo" / "paste-2" / "weights" / "best.pt").write_bytes(b"")
    read.clear()
    assert diag.load_paste_probs(recipe(True, 2)) == [1, 2]
    assert read == [tmp_path / "pseudo" / d / "weights" / "best.pt" for d in ("paste", "paste-2")]


def test_with_crf_scores_each_part_of_the_slice_through_the_crf(monkeypatch):
    from cpcx.recipe import CRFConfig

    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 1
    image = np.full((16, 16, 3), 40, dtype=np.uint8)
    image[mask == 1] = 220
    truth = torch.zeros(1, 3, 4, 4)
    truth[0, 1, 1:3, 1:3] = 1.0
    truth[0, 0] = 1 - truth[0, 1]
    # images 0 and 1 hold one object class, image 2 two (b is labelled, not in its mask)
    dataset = _Sized(labels=np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1]]), classes=("background", "a", "b"),
                     num_classes=3, load_mask=lambda i: mask, load_image=lambda i: image)
    good = truth.repeat(3, 1, 1, 1)
    mixed = good.clone()
    mixed[2, [0, 1]] = mixed[2, [1, 0]]  # image 2: object and background swapped
    monkeypatch.setattr(diag, "CHOOSE", 2)
    out = diag.with_crf(dataset, SimpleNamespace(crf=CRFConfig()), {"good": good, "mixed": mixed})
    assert all(out["good"][part]["fg_iou"] == pytest.approx(100.0) for part in diag.CRF_PARTS)
    assert out["mixed"]["choose"]["fg_iou"] == out["mixed"]["single"]["fg_iou"] == pytest.approx(100.0)
    assert out["mixed"]["report"]["fg_iou"] == out["mixed"]["multi"]["fg_iou"] == pytest.approx(0.0)
    assert 0 < out["mixed"]["all"]["fg_iou"] < 100


class _Sized(SimpleNamespace):
    """A stand-in data set of three images."""

    def __len__(self):
        return 3
