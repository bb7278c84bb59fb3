"""`cpcx pseudo` end to end on 8 real VOC images with a tiny checkpoint: outputs, scores, resume, kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console

from cpcx import atomic
from cpcx.data import build_dataset, load_label_png
from cpcx.evaluate import run_evaluate
from cpcx.model import build_model, checkpoint_meta, cluster_vectors
from cpcx.pseudo import run_pseudo
from cpcx.pseudo.infer import PatchPredictor, condition_on_labels
from cpcx.recipe import load_recipe

ANIMALS = ["bird", "cat", "cow", "dog", "horse", "sheep"]


def _recipe(folder: Path, voc_root: Path, **sections) -> Path:
    """A recipe for 8 VOC train images and a tiny ViT (timm's test_vit: 64 wide, 16-px patches)."""
    from cpcx.data.classes import VOC_CLASSES

    data = {
        "name": "tiny", "runs_dir": str(folder / "runs"),
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": 8},
        "llm": {"provider": "static",
                "clusters": {"animals": ANIMALS, "other": [c for c in VOC_CLASSES if c not in ANIMALS]}},
        "model": {"backbone": "test_vit", "pretrained": False, "img_size": 64, "cluster_dim": 8, "lstm_hidden": 8},
        "pseudo": {"img_size": 96, "batch_size": 4, "workers": 2, "figures": 0},
        "crf": {"iterations": 5},  # half the default: the CRF itself is checked in test_crf.py
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(data))
    return folder / "r.yaml"


def _checkpoint(recipe, seed: int = 0) -> Path:
    """What `cpcx train` would save, for an untrained tiny CPCNet (the pseudo stage only needs the format)."""
    from cpcx.data.classes import VOC_CLASSES

    dataset = build_dataset(recipe.dataset, "train")
    matrix = np.array([[c in ANIMALS, c not in ANIMALS] for c in VOC_CLASSES], dtype=int)
    torch.manual_seed(seed)
    net = build_model(recipe.model, dataset.num_classes, 2, load_weights=False)
    path = recipe.run_dir("train") / "weights" / "best.pt"
    atomic.save_torch(path, {"model": net.state_dict(), "meta": checkpoint_meta(net, dataset.classes, matrix)})
    return path


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: load_label_png(p) for p in sorted(folder.glob("*.png"))}


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, voc_root):
    """One full run (CRF, 2 workers, 2 figures) whose outputs the other tests compare against."""
    folder = tmp_path_factory.mktemp("pseudo")
    recipe = load_recipe(_recipe(folder, voc_root, pseudo={"figures": 2}))
    _checkpoint(recipe)
    labels_dir = run_pseudo(recipe, console=_quiet())
    return recipe, labels_dir, _labels(labels_dir), json.loads((labels_dir.parent / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------- pieces
def test_condition_on_labels():
    probs = torch.tensor([[0.6, 0.5], [0.2, 0.3], [0.2, 0.2]])[None, :, None, :]  # (1, 3 classes, 1, 2 patches)
    labels = torch.tensor([[1.0, 1.0, 0.0]])  # class 2 is absent from the image
    out = condition_on_labels(probs, labels, class_max_norm=False)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.75, 0.625], [0.25, 0.375], [0.0, 0.0]]))
    # max-norm: class 0 → [1, 5/6], class 1 → [2/3, 1]: class 1 now wins the patch where it peaks
    out = condition_on_labels(probs, labels, class_max_norm=True)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.6, 5 / 11], [0.4, 6 / 11], [0.0, 0.0]]))
    # every present class underflowed at a patch: uniform over the present classes, never NaN
    zero = torch.tensor([[0.0], [0.0], [1.0]])[None, :, None, :]
    torch.testing.assert_close(condition_on_labels(zero, labels, True)[0, :, 0, 0], torch.tensor([0.5, 0.5, 0.0]))


def test_flip_averaging_makes_the_prediction_mirror_symmetric(reference, voc_root):
    recipe = reference[0]
    dataset = build_dataset(recipe.dataset, "train")
    torch.manual_seed(1)
    net = build_model(recipe.model, dataset.num_classes, 2, load_weights=False)
    predictor = PatchPredictor(net, torch.device("cpu"), "fp32", 90, flip=True, class_max_norm=True)
    assert predictor.size == 96  # snapped to the 16-px patch grid so that a flip mirrors the patches exactly
    images = [dataset.load_image(i) for i in (0, 1)]  # two sizes in one batch
    u = cluster_vectors(dataset.labels[:2], np.eye(20, 2))
    probs = predictor(images, dataset.labels[:2], u)
    mirrored = predictor([im[:, ::-1] for im in images], dataset.labels[:2], u)
    assert probs.shape == (2, 21, 6, 6)
    torch.testing.assert_close(probs, mirrored.flip(-1), atol=1e-5, rtol=1e-4)
    predictor.flip = False
    assert not torch.allclose(predictor(images, dataset.labels[:2], u), mirrored.flip(-1), atol=1e-3)


def test_multi_scale_averages_each_size_on_the_finest_grid(reference, voc_root):
    """pseudo.scales: the maps of every input size, flip-averaged, resized to the finest grid and averaged."""
    import torch.nn.functional as F

    recipe = reference[0]
    dataset = build_dataset(recipe.dataset, "train")
    torch.manual_seed(1)
    net = build_model(recipe.model, dataset.num_classes, 2, load_weights=False)
    images = [dataset.load_image(i) for i in (0, 1)]
    u = cluster_vectors(dataset.labels[:2], np.eye(20, 2))
    single = {size: PatchPredictor(net, torch.device("cpu"), "fp32", size, flip=True, class_max_norm=True)
              for size in (64, 96, 128)}
    multi = PatchPredictor(net, torch.device("cpu"), "fp32", 96, flip=True, class_max_norm=True,
                           scales=[0.7, 1.0, 1.3])  # 67 → 64, 125 → 128 (snapped to the 16-px patches)
    assert multi.size == 96 and multi.extra_sizes == [64, 128]
    maps = multi.patch_probs(images, u)
    assert maps.shape == (2, 21, 8, 8)  # the 128-px grid
    expected = torch.stack([F.interpolate(single[size].patch_probs(images, u), size=(8, 8), mode="bilinear",
                                          align_corners=False) for size in (96, 64, 128)]).mean(0)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))  # still a distribution per patch
    with pytest.raises(ValueError, match="pseudo.scales needs the images"):
        multi.patch_probs(None, u, np.zeros((2, 2, 6, 6, 192), dtype=np.float16))


# ------------------------------------------------------------------------------------------ the stage
def test_end_to_end_outputs_and_scores(reference):
    recipe, labels_dir, labels, metrics = reference
    dataset = build_dataset(recipe.dataset, "train")
    assert sorted(labels) == sorted(dataset.ids)
    for i, image_id in enumerate(dataset.ids):
        assert Image.open(labels_dir / f"{image_id}.png").mode == "P"
        assert labels[image_id].shape == dataset.load_image(i).shape[:2]
        # only classes the image is known to contain (absent classes are zeroed before the CRF)
        assert set(np.unique(labels[image_id])) <= set(np.flatnonzero(dataset.labels[i]))
    stage = labels_dir.parent
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["miou_no_crf"] <= 1
    assert metrics["images"] == 8 and metrics["images_no_crf"] == 8 and metrics["crf"]["iterations"] == 5
    assert len((stage / "confusion.csv").read_text().splitlines()) == 22
    assert len(list((stage / "figures" / "heatmaps").glob("*.png"))) == 2
    assert len(list((stage / "figures" / "overlays").glob("*.png"))) == 2
    assert (stage / "figures" / "iou_per_class.png").is_file()
    assert not list(labels_dir.glob(".*"))  # no temp files left
    # `cpcx evaluate --stage pseudo` reads the PNGs back and agrees with the in-pass score
    assert run_evaluate(recipe, "pseudo", console=_quiet())["miou"] == pytest.approx(metrics["miou"], abs=1e-12)


def test_rerun_skips_and_resumes_a_partial_run(reference):
    recipe, labels_dir, labels, metrics = reference
    partial = labels_dir.parent.parent / "partial"
    shutil.copytree(labels_dir.parent, partial / "pseudo")
    shutil.copytree(recipe.run_dir("train"), partial / "train")
    copy = recipe.model_copy(update={"runs_dir": partial.parent, "name": "partial",
                                     "pseudo": recipe.pseudo.model_copy(update={"figures": 0})})
    kept = sorted(labels)[:5]
    for image_id in sorted(labels)[5:]:
        (partial / "pseudo" / "labels" / f"{image_id}.png").unlink()
    (partial / "pseudo" / "labels" / f".{kept[0]}.png.abc123.tmp").write_bytes(b"torn")  # a write killed mid-way
    before = {i: (partial / "pseudo" / "labels" / f"{i}.png").stat().st_mtime_ns for i in kept}

    run_pseudo(copy, console=_quiet())
    after = _labels(partial / "pseudo" / "labels")
    assert sorted(after) == sorted(labels) and not list((partial / "pseudo" / "labels").glob(".*"))
    for image_id in kept:  # finished images were not redone
        assert (partial / "pseudo" / "labels" / f"{image_id}.png").stat().st_mtime_ns == before[image_id]
    for image_id in labels:
        np.testing.assert_array_equal(after[image_id], labels[image_id])
    again = json.loads((partial / "pseudo" / "metrics.json").read_text())
    assert again["miou"] == pytest.approx(metrics["miou"]) and again["miou_no_crf"] == pytest.approx(metrics["miou_no_crf"])


@pytest.mark.slow
def test_killed_run_resumes_and_loses_nothing(reference, tmp_path, voc_root):
    _, _, labels, _ = reference
    recipe = load_recipe(_recipe(tmp_path, voc_root))
    _checkpoint(recipe)
    labels_dir = recipe.run_dir("pseudo") / "labels"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cpcx", "pseudo", "-r", str(tmp_path / "r.yaml")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not list(labels_dir.glob("*.png")):
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its CRF workers, mid-way
    process.wait()
    written = len(list(labels_dir.glob("*.png")))
    assert 0 < written < 8, f"the kill should land mid-run ({written} written): {process.stderr.read().decode()[-500:]}"

    run_pseudo(recipe, console=_quiet())
    after = _labels(labels_dir)
    assert sorted(after) == sorted(labels)
    for image_id in labels:
        np.testing.assert_array_equal(after[image_id], labels[image_id])


def test_new_checkpoint_relabels_everything(reference, tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root, crf={"enabled": False}))
    _checkpoint(recipe, seed=0)
    labels_dir = run_pseudo(recipe, console=_quiet())
    metrics = json.loads((labels_dir.parent / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(metrics["miou_no_crf"]) and metrics["crf"] is None
    first = _labels(labels_dir)
    _checkpoint(recipe, seed=5)  # re-trained with the same recipe: the old labels are stale
    run_pseudo(recipe, console=_quiet())
    second = _labels(labels_dir)
    assert sorted(first) == sorted(second)
    assert any(not np.array_equal(first[i], second[i]) for i in first)


def test_feature_cache_replaces_the_vit(reference, tmp_path, voc_root):
    """A frozen backbone's cached tokens (orig + hflip at the same size) stand in for the ViT."""
    from cpcx.data.views import ImageLabelDataset
    from cpcx.feature_cache import FeatureCache
    from cpcx.model import load_checkpoint
    from cpcx.pseudo.infer import open_token_cache

    recipe = load_recipe(_recipe(tmp_path, voc_root, model={"img_size": 96}, crf={"enabled": False}))
    net, meta = load_checkpoint(_checkpoint(recipe))
    dataset = build_dataset(recipe.dataset, "train")
    predictor = PatchPredictor(net, torch.device("cpu"), "fp32", 96, flip=True, class_max_norm=True)
    assert open_token_cache(recipe, net, dataset, 96, True) is None  # nothing cached yet
    FeatureCache.build(recipe.run_dir("train") / "features", "test_vit", net.backbone, ImageLabelDataset(dataset), 96,
                       ["orig", "hflip"], torch.device("cpu"), "fp32", batch_size=4, workers=0, log=lambda _: None)
    cache = open_token_cache(recipe, net, dataset, 96, True)
    assert cache is not None and open_token_cache(recipe, net, dataset, 128, True) is None  # other size: no
    assert open_token_cache(recipe, net, dataset, 96, True, autocast="bf16") is None  # fp32 tokens for a bf16 stage: no
    u = cluster_vectors(dataset.labels, meta["cluster_matrix"])
    images = [dataset.load_image(i) for i in range(3)]
    live = predictor(images, dataset.labels[:3], u[:3])
    cached = predictor(images, dataset.labels[:3], u[:3], np.asarray(cache.tokens[[0, 1, 2]])[:, cache.views])
    torch.testing.assert_close(cached, live, atol=2e-3, rtol=0)  # float16 tokens

    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    run_pseudo(recipe, console=console)
    assert "feature cache" in console.export_text()
    metrics = json.loads((recipe.run_dir("pseudo") / "metrics.json").read_text())
    assert metrics["miou"] == pytest.approx(reference[3]["miou_no_crf"], abs=0.01)
    net.backbone.set_trainable_blocks(1)
    with torch.no_grad():
        net.backbone.vit.blocks[-1].mlp.fc2.bias.add_(0.1)  # a fine-tuned backbone: the cache no longer applies
    assert open_token_cache(recipe, net, dataset, 96, True) is None
