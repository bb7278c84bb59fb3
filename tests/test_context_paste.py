"""``pseudo.context_paste``: the pasting moves a donor's masked tokens without wrapping and adds its class; the
pasted items draw the same pastes on every call; donors are the single-class images of a label folder; and `cpcx
pseudo` labels the single-class VOC images with the run's network, the others with the pasted one, resuming without
training it again."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.pseudo.context_paste import PASTE_DIR, PastedItems, donor_masks, multi_class, paste
from cpcx.data import build_dataset
from cpcx.data.palette import save_label_png
from cpcx.errors import CpcxError
from cpcx.pseudo import run_pseudo
from cpcx.recipe import RecipeError, load_recipe
from test_pseudo import _checkpoint, _labels, _recipe
from cpcx.pseudo.self_training import FIRST_PASS, PREDICTIONS
from test_self_training import _cache_tokens


def _console() -> Console:
    return Console(record=True, width=200, file=open(os.devnull, "w"))


# ------------------------------------------------------------------------------------------------- pieces
def test_paste_shifts_the_masked_donor_cells_and_drops_what_leaves_the_grid():
    host = torch.zeros(5, 5, 3)
    donor = torch.arange(5 * 5 * 3, dtype=torch.float32).reshape(5, 5, 3) + 1
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 0] = mask[2, 3] = mask[4, 4] = True
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x, out_label = paste(host, label, donor, mask, 3, 1, -1)  # one row down, one column left
    pasted = (x != 0).any(-1)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[3, 2] = True  # (2, 3) moved; (0, 0) left the grid on the left, (4, 4) at the bottom: dropped
    assert torch.equal(pasted, expected)
    assert torch.equal(x[3, 2], donor[2, 3])
    assert out_label.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert label.tolist() == [1.0, 0.0, 1.0, 0.0] and not host.any()  # the inputs are untouched


def test_multi_class_counts_object_classes_not_background():
    labels = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert multi_class(labels).tolist() == [False, True, True, False]


class _Cache:
    """The trainer's cache interface: ``views`` and ``get(i, view)``; image i's tokens are i + 1 everywhere, its
    mirrored view the negative."""

    views = ["orig", "hflip"]

    def get(self, i: int, view: int) -> torch.Tensor:
        return torch.full((4, 4, 2), float(i + 1) * (-1 if view else 1))


def test_pasted_items_add_a_missing_class_with_the_donors_tokens_and_draw_the_same_every_time():
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1.0]])
    matrix = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)  # classes 2 and 3 share the second cluster
    u = torch.from_numpy(np.clip(labels[:, 1:].numpy() @ matrix, 0, 1))
    square = torch.zeros(4, 4, dtype=torch.bool)
    square[1:3, 1:3] = True
    donors = {0: (1, square), 1: (2, square), 2: (3, square)}
    items = PastedItems(labels, u, 5, cache=_Cache(), donors=donors, matrix=matrix, probability=1.0, shift=0.25)
    for epoch in range(3):
        for i in range(4):
            item = items[epoch, i]
            assert torch.equal(item["x"], items[epoch, i]["x"])  # the sample's own stream: the same paste again
            if i == 3:  # it holds every donor's class: nothing to paste
                assert torch.equal(item["label"], labels[3]) and item["x"].abs().eq(4).all()
                continue
            gained = torch.nonzero(item["label"] - labels[i]).flatten().tolist()
            assert len(gained) == 1 and labels[i, gained[0]] == 0  # one class the host lacked
            donor = next(j for j, (c, _) in donors.items() if c == gained[0])
            changed = item["x"].abs() != i + 1
            assert 1 <= int(changed[..., 0].sum()) <= 4  # at most the donor's 4 cells, shifted by at most one
            assert item["x"][changed].abs().eq(donor + 1).all()  # and they hold the donor's tokens
            torch.testing.assert_close(item["u"], torch.from_numpy(np.clip(
                item["label"][1:].numpy() @ matrix, 0, 1)))
    # probability below one: some samples are left as they are
    few = PastedItems(labels, u, 5, cache=_Cache(), donors=donors, matrix=matrix, probability=0.3, shift=0.25)
    untouched = sum(torch.equal(few[e, i]["label"], labels[i]) for e in range(10) for i in range(3))
    assert 10 <= untouched <= 29


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
    donors = donor_masks(dataset.labels, dataset.ids, folder, (24, 24), 4)
    assert set(donors) <= single and donors
    for i, (c, mask) in donors.items():
        assert labels[i, c] == 1 and mask.shape == (24, 24) and int(mask.sum()) >= 4
    few = donor_masks(dataset.labels, dataset.ids, folder, (24, 24), 24 * 24)  # no object covers the whole grid
    assert not few


def test_the_switch_is_refused_where_the_backbone_trains_or_no_tokens_are_cached(tmp_path, voc_root):
    for train in ({"unfreeze_blocks": 2}, {"unfreeze_blocks": 0, "feature_cache": False}):
        path = _recipe(tmp_path, voc_root, train=train, pseudo={"context_paste": {"enabled": True}})
        with pytest.raises(RecipeError, match=r"train\.feature_cache: true and train\.unfreeze_blocks: 0"):
            load_recipe(path)


# -------------------------------------------------------------------------------------------------- the stage
def _paste_recipe(tmp_path, voc_root, **paste):
    from cpcx.clusters import run_clusters

    path = _recipe(tmp_path, voc_root, model={"img_size": 96}, crf={"enabled": False},
                   train={"epochs": 2, "warmup_epochs": 1, "batch_size": 4, "unfreeze_blocks": 0},
                   # one image a batch: an image's maps then never depend on which images share its batch (float
                   # rounding), so the labels of the two passes can be compared with plain runs bit for bit
                   pseudo={"batch_size": 1, "context_paste": {"enabled": True, "min_patches": 1, **paste}})
    recipe = load_recipe(path)
    run_clusters(recipe, console=_console())  # the static clusters: the second training reads clusters.json
    _cache_tokens(recipe)  # writes the run's checkpoint too
    # the run's network: not the one a fresh training of seed 0 starts from (its head moved; the backbone, whose
    # tokens are cached, kept)
    checkpoint = recipe.run_dir("train") / "weights" / "best.pt"
    state = torch.load(checkpoint, weights_only=True)
    g = torch.Generator().manual_seed(1)
    state["model"] = {k: v if k.startswith("backbone.") or not v.is_floating_point() else
                      v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state["model"].items()}
    torch.save(state, checkpoint)
    return path, recipe


def test_pseudo_routes_the_images_between_the_two_networks_and_resumes_without_training_again(tmp_path, voc_root):
    path, recipe = _paste_recipe(tmp_path, voc_root)
    dataset = build_dataset(recipe.dataset, "train")
    multi = multi_class(dataset.labels)
    assert multi.any() and not multi.all()  # 3 of the 8 images hold several classes
    run = _console()
    labels_dir = run_pseudo(recipe, console=run)
    final = _labels(labels_dir)
    assert len(final) == 8
    stage = recipe.run_dir("pseudo")
    weights = stage / PASTE_DIR / "weights"
    assert (weights / "last.pt").is_file() and (weights / "best.pt").is_file()
    assert len((stage / PASTE_DIR / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["context_paste"] is True and metrics["context_paste_donors"] >= 1
    assert "second network" in run.export_text()

    def plain_run(name, checkpoint):
        """Labels of a run without the switch from ``checkpoint``, reading the same token cache."""
        other = load_recipe(path, [f"name={name}", "pseudo.context_paste.enabled=false",
                                   f"train.feature_cache_dir={recipe.run_dir('train') / 'features'}"])
        (other.run_dir("train") / "weights").mkdir(parents=True)
        (other.run_dir("train") / "weights" / "best.pt").write_bytes(checkpoint.read_bytes())
        return _labels(run_pseudo(other, console=_console()))

    plain = plain_run("plain", recipe.run_dir("train") / "weights" / "best.pt")  # the single-class images' labeller
    pasted = plain_run("pasted", weights / "best.pt")  # the multi-class images' labeller
    for i, image_id in enumerate(dataset.ids):
        expected = pasted if multi[i] else plain
        assert (final[image_id] == expected[image_id]).all(), image_id
    for kind in (True, False):  # the two networks differ on both kinds of image: a wrong routing is seen
        assert any((pasted[k] != plain[k]).any() for i, k in enumerate(dataset.ids) if multi[i] == kind)

    stamp = (weights / "last.pt").stat().st_mtime_ns
    lost = [image_id for i, image_id in enumerate(dataset.ids) if multi[i]][:2]
    for image_id in lost:
        (labels_dir / f"{image_id}.png").unlink()
    again = _console()
    run_pseudo(recipe, console=again)
    assert (weights / "last.pt").stat().st_mtime_ns == stamp  # read back, not trained again
    assert "already trained" in again.export_text()
    resumed = _labels(labels_dir)
    assert all((resumed[k] == final[k]).all() for k in final)


def test_a_run_without_cached_tokens_is_refused_before_any_label(tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root, model={"img_size": 96}, train={"unfreeze_blocks": 0},
                                 pseudo={"context_paste": {"enabled": True}}))
    _checkpoint(recipe)  # no feature cache
    with pytest.raises(CpcxError, match=r"pseudo\.context_paste.*train\.feature_cache"):
        run_pseudo(recipe, console=_console())
    assert not list((recipe.run_dir("pseudo") / "labels").glob("*.png"))


def test_a_short_second_training_starts_from_the_runs_network(tmp_path, voc_root):
    path, _ = _paste_recipe(tmp_path, voc_root, epochs=1)
    recipe = load_recipe(path, ["train.lr_after_warmup=1e-12"])  # so small that the weights stay where they start
    run = _console()
    run_pseudo(recipe, console=run)
    folder = recipe.run_dir("pseudo") / PASTE_DIR
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")  # one epoch, from the warm-up's end: no warm-up
    assert float(rows[1].split(",")[1]) == recipe.train.lr_after_warmup
    assert f"starting from the network of {recipe.run_dir('train') / 'weights' / 'best.pt'}" in run.export_text()
    saved = torch.load(folder / "weights" / "last.pt", weights_only=True)
    assert saved["recipe"]["train"]["epochs"] == 1 and saved["recipe"]["train"]["warmup_epochs"] == 0
    start = torch.load(recipe.run_dir("train") / "weights" / "best.pt", weights_only=True)["model"]
    for key, value in start.items():
        torch.testing.assert_close(saved["model"][key], value, rtol=0, atol=1e-6)


def test_with_self_training_the_routing_makes_the_first_pass_and_the_pasted_network_trains_once(tmp_path, voc_root):
    path, recipe = _paste_recipe(tmp_path, voc_root)
    both = load_recipe(path, ["name=both", "pseudo.self_training.enabled=true", "pseudo.self_training.folds=2",
                              "pseudo.self_training.epochs=2", "pseudo.self_training.head_channels=8",
                              "pseudo.self_training.aspp_rates=[1,1,1]",
                              f"train.feature_cache_dir={recipe.run_dir('train') / 'features'}"])
    (both.run_dir("train") / "weights").mkdir(parents=True)
    checkpoint = recipe.run_dir("train") / "weights" / "best.pt"
    (both.run_dir("train") / "weights" / "best.pt").write_bytes(checkpoint.read_bytes())
    (both.run_dir("clusters")).mkdir(parents=True)
    for f in recipe.run_dir("clusters").iterdir():
        (both.run_dir("clusters") / f.name).write_bytes(f.read_bytes())
    run = _console()
    labels_dir = run_pseudo(both, console=run)
    stage = both.run_dir("pseudo")
    first, final = _labels(stage / FIRST_PASS), _labels(labels_dir)
    assert len(first) == len(final) == 8
    # The first pass is exactly what the context paste alone writes: the same routing, the same pasted network.
    routed = _labels(run_pseudo(recipe, console=_console()))
    assert all((first[k] == routed[k]).all() for k in routed)
    assert any((first[k] != final[k]).any() for k in final)  # the heads are mixed into the final pass
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["self_training"] is True and metrics["context_paste"] is True
    weights = stage / PASTE_DIR / "weights"
    assert len((stage / PASTE_DIR / "metrics.csv").read_text().splitlines()) == 3  # trained once: header + 2 epochs
    assert run.export_text().count("a second network learns") == 1

    stamps = (weights / "last.pt").stat().st_mtime_ns, (stage / PREDICTIONS).stat().st_mtime_ns
    ids = build_dataset(both.dataset, "train").ids
    multi = multi_class(build_dataset(both.dataset, "train").labels)
    lost = [next(k for i, k in enumerate(ids) if multi[i]), next(k for i, k in enumerate(ids) if not multi[i])]
    for image_id in lost:
        (labels_dir / f"{image_id}.png").unlink()
    run_pseudo(both, console=_console())
    assert ((weights / "last.pt").stat().st_mtime_ns, (stage / PREDICTIONS).stat().st_mtime_ns) == stamps
    resumed = _labels(labels_dir)
    assert all((resumed[k] == final[k]).all() for k in final)


# ------------------------------------------------------------------------------ pseudo.saliency.paste_loss
def test_the_saliency_loss_reads_only_the_masked_cells_and_pulls_the_object_share_to_the_target():
    from cpcx.model.losses import saliency_loss

    target = torch.tensor([[[0.9, 0.1], [0.8, 0.0]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the bottom row does not count
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)  # background and two classes: object share 2/3 everywhere
    loss = saliency_loss(logits.softmax(1), target, mask)
    loss.backward()
    object_share = 1 - logits.softmax(1)[:, 0]
    expected = -(target * object_share.log() + (1 - target) * (1 - object_share).log())[0, 0].mean()
    torch.testing.assert_close(loss, expected)
    assert (logits.grad[:, :, 1] == 0).all()  # no gradient where the mask is 0
    assert logits.grad[0, 0, 0, 0] > 0 and logits.grad[0, 0, 0, 1] < 0  # background down at 0.9, up at 0.1
    assert saliency_loss(logits.softmax(1), target, torch.zeros_like(mask)) == 0


def test_saliency_targets_average_the_map_per_cell_and_keep_only_the_salient_cells_of_multi_class_images():
    from cpcx.pseudo.context_paste import saliency_targets

    labels = np.array([[1, 1, 0], [1, 1, 1]])  # one object class, two
    left = np.zeros((40, 80), np.float32)
    left[:, :30] = 1.0  # the left 30 of 80 columns; the grid's cells are 20 px wide: 1, 0.5, 0, 0
    targets = saliency_targets(lambda i: left, labels, (2, 4))
    for i in (0, 1):
        torch.testing.assert_close(targets[i][0], torch.tensor([[1.0, 0.5, 0, 0]] * 2))
    assert targets[0][1].eq(1).all()  # every cell of the single-class image
    assert targets[1][1].tolist() == [[1.0, 0, 0, 0]] * 2  # on the multi-class one only where the saliency is > 0.5


def test_pasted_items_carry_the_saliency_in_their_view_and_the_pasted_cells_as_object():
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1.0]])
    u = torch.zeros(3, 0)
    square = torch.zeros(4, 4, dtype=torch.bool)
    square[1:3, 1:3] = True
    donors = {0: (1, square), 1: (2, square), 2: (3, square)}
    ramp = torch.tensor([[0.0, 0.2, 0.6, 0.9]]).expand(4, 4)  # brighter to the right: the mirrored view shows it
    saliency = {i: (ramp * 0.5 * (i + 1) / 1.5, torch.full((4, 4), float(i))) for i in range(3)}
    plain = PastedItems(labels, u, 5, cache=_Cache(), donors=donors, matrix=None, probability=1e-9, shift=0.25,
                        saliency=saliency)
    pasting = PastedItems(labels, u, 5, cache=_Cache(), donors=donors, matrix=None, probability=1.0, shift=0.25,
                          saliency=saliency)
    views = set()
    for epoch in range(4):
        for i in range(3):
            item = plain[epoch, i]
            views.add(item["view"])
            target, mask = saliency[i]
            expected = target.flip(-1) if item["view"] == 1 else target
            assert torch.equal(item["saliency"], expected) and torch.equal(item["saliency_mask"], mask)
            item = pasting[epoch, i]  # the same host view; the donor's cells are object and count
            pasted = item["x"].abs() != i + 1
            pasted = pasted[..., 0]
            assert pasted.any()
            assert item["saliency"][pasted].eq(1).all() and item["saliency_mask"][pasted].eq(1).all()
            assert torch.equal(item["saliency"][~pasted], expected[~pasted])
            assert torch.equal(item["saliency_mask"][~pasted], mask[~pasted])
    assert views == {0, 1}
    assert torch.equal(saliency[0][0], ramp * 0.5 / 1.5)  # the targets themselves are left as they were



def test_the_donor_mask_follows_the_donor_view_whichever_it_is():
    """A donor's tokens come from one of the cache's views; its patch mask (drawn on the original grid) is put in the
    same view, a transpose included, so the pasted cells are the object's."""

    class Transposed(_Cache):
        views = ["transpose"]

        def get(self, i: int, view: int) -> torch.Tensor:  # image i's tokens, transposed: i + 1 in its object's cells
            x = torch.zeros(4, 4, 2)
            if i == 0:
                x[0, 1:4] = 1.0  # the donor's object: the top row's last three cells, transposed into column 0
            return x.transpose(0, 1)

    row = torch.zeros(4, 4, dtype=torch.bool)
    row[0, 1:4] = True
    labels = torch.tensor([[1, 1, 0.0], [1, 0, 1.0]])
    items = PastedItems(labels, torch.zeros(2, 0), 5, cache=Transposed(), donors={0: (1, row)}, matrix=None,
                        probability=1.0, shift=1e-9)  # no shift: the pasted cells are the mask's own
    item = items[0, 1]
    assert item["label"].tolist() == [1.0, 1.0, 1.0]
    assert item["x"][..., 0].eq(1).sum() == 3  # every pasted cell holds the donor's object token


def test_averaged_maps_re_decide_each_networks_maps_by_its_own_probe_then_average():
    from cpcx.pseudo.context_paste import AveragedMaps
    from cpcx.pseudo.labelling import Labeller

    class Predictor:  # label-conditioned maps, and the tokens a probe reads
        def __init__(self, value):
            self.value = value

        def __call__(self, images, labels, u, tokens=None, trunk=None, with_tokens=False):
            maps = torch.full((len(labels), 3, 2, 2), self.value)
            return (maps, torch.zeros(len(labels), 2, 2, 4)) if with_tokens else maps

    class Probe:
        def __init__(self, shift):
            self.shift = shift

        def redecide(self, maps, tokens, labels):
            return maps + self.shift

    labels = np.array([[1, 1, 1], [1, 1, 1]])
    members = [Labeller(Predictor(1.0), Probe(10.0)), Labeller(Predictor(3.0), Probe(100.0)),
               Labeller(Predictor(5.0), None)]
    out = AveragedMaps(members)(None, labels, None, torch.zeros(2, 1, 2, 2, 4))
    assert torch.allclose(out, torch.full((2, 3, 2, 2), ((1 + 10) + (3 + 100) + 5) / 3))
    with pytest.raises(ValueError, match="one member's predictor"):
        AveragedMaps(members)(None, labels, None, with_tokens=True)


def test_several_pasted_networks_train_with_their_own_seeds_and_label_the_multi_class_images_with_their_mean(
        tmp_path, voc_root):
    """``pseudo.context_paste.networks: 2``: ``paste/`` and ``paste-2/`` each hold a network trained with its own
    seed and its own class probe; the multi-class images' labels are the argmax of the mean of the two networks'
    label-conditioned maps, each re-decided by its probe (computed here from each checkpoint on the same token
    cache); a second run reads both back."""
    from cpcx.feature_cache import autocast_tag
    from cpcx.model import load_checkpoint
    from cpcx.model.network import cluster_vectors
    from cpcx.pseudo.class_probe import ClassProbe
    from cpcx.pseudo.context_paste import SEED_STEP, paste_folder
    from cpcx.pseudo.infer import PatchPredictor, channel_argmax, open_token_cache, upsample
    from cpcx.pseudo.labelling import class_maps, load_or_fit_class_probe

    path, _ = _paste_recipe(tmp_path, voc_root, networks=2)
    recipe = load_recipe(path, ["pseudo.class_probe.enabled=true", "pseudo.class_probe.min_images=1"])
    dataset = build_dataset(recipe.dataset, "train")
    multi = multi_class(dataset.labels)
    run = _console()
    final = _labels(run_pseudo(recipe, console=run))
    folders = [paste_folder(recipe, 0), paste_folder(recipe, 1)]
    assert [f.name for f in folders] == [PASTE_DIR, PASTE_DIR + "-2"]
    saved = [torch.load(f / "weights" / "last.pt", weights_only=True) for f in folders]
    assert [s["recipe"]["seed"] for s in saved] == [recipe.seed, recipe.seed + SEED_STEP]
    assert any(not torch.equal(saved[0]["model"][k], v) for k, v in saved[1]["model"].items())
    run_net = torch.load(recipe.run_dir("train") / "weights" / "best.pt", weights_only=True)["model"]
    for key, value in saved[1]["model"].items():  # the run's frozen backbone, whose tokens are cached, not a new one
        if key.startswith("backbone."):
            assert torch.equal(value, run_net[key]), key
    assert len(list((recipe.run_dir("train") / "features").glob("*/meta.json"))) == 1  # no second token cache
    assert "2 networks learn" in run.export_text()
    metrics = json.loads((recipe.run_dir("pseudo") / "metrics.json").read_text())
    assert metrics["context_paste_checkpoints"] == [str(f / "weights" / "best.pt") for f in folders]

    maps = []
    for folder in folders:
        net, meta = load_checkpoint(folder / "weights" / "best.pt", map_location="cpu")
        cfg = recipe.pseudo
        predictor = PatchPredictor(net, torch.device("cpu"), cfg.precision, cfg.img_size, cfg.flip,
                                   cfg.class_max_norm, cfg.scales)
        cache = open_token_cache(recipe, net, dataset, predictor.size, cfg.flip,
                                 autocast=autocast_tag(torch.device("cpu"), cfg.precision))
        u = cluster_vectors(dataset.labels, meta["cluster_matrix"])
        probe = ClassProbe.load(folder / "class_probe.pt")
        maps.append({i: class_maps(predictor, probe, None, dataset.labels[[i]], u[[i]],
                                   np.asarray(cache.tokens[[i]])[:, cache.views])[0] for i in np.flatnonzero(multi)})
        if folder == folders[1]:  # its own probe, fitted with its own seed: refitted here, it is the same
            probes = {seed: load_or_fit_class_probe(predictor, dataset, u, cache, cfg, seed,
                                                    tmp_path / f"probe-{seed}.pt", _console())
                      for seed in (recipe.seed + SEED_STEP, recipe.seed)}
            assert torch.equal(probe.weight, probes[recipe.seed + SEED_STEP].weight)
            assert not torch.equal(probe.weight, probes[recipe.seed].weight)
    differs = 0
    for i, image_id in enumerate(dataset.ids):
        if not multi[i]:
            continue
        classes = np.flatnonzero(dataset.labels[i] > 0).astype(np.uint8)
        full = upsample((maps[0][i] + maps[1][i]) / 2, classes, final[image_id].shape)
        assert (final[image_id] == classes[channel_argmax(full)]).all(), image_id
        alone = classes[channel_argmax(upsample(maps[0][i], classes, final[image_id].shape))]
        differs += int((alone != final[image_id]).any())
    assert differs  # the mean is not the first network's labels: the check above can tell them apart

    stamps = [(f / "weights" / "last.pt").stat().st_mtime_ns for f in folders]
    for image_id in [k for i, k in enumerate(dataset.ids) if multi[i]][:2]:
        (recipe.run_dir("pseudo") / "labels" / f"{image_id}.png").unlink()
    run_pseudo(recipe, console=_console())
    assert [(f / "weights" / "last.pt").stat().st_mtime_ns for f in folders] == stamps  # read back
    resumed = _labels(recipe.run_dir("pseudo") / "labels")
    assert all((resumed[k] == final[k]).all() for k in final)
