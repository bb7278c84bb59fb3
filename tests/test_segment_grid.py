"""The grid segmenter (`segment.encoder: grid`) on real VOC images: an ASPP head on the train checkpoint's frozen
patch grid, trained on cached tokens; ground-truth masks stand in for the pseudo-labels (except where the
oracle switch itself is tested). The train checkpoint is a tiny random ViT written as `cpcx train` writes it."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx import atomic
from cpcx.data import build_dataset, load_label_png, save_label_png
from cpcx.data.views import ImageLabelDataset
from cpcx.feature_cache import FeatureCache
from cpcx.model import build_model
from cpcx.model.network import checkpoint_meta
from cpcx.recipe import Recipe
from cpcx.segment import run_segment
from cpcx.segment.grid import GridSegNet
from cpcx.segment.infer import predict_probs
from cpcx.segment.networks import load_segnet

IMAGES = 8


def make_recipe(voc_root, runs_dir, name="grid", **segment) -> Recipe:
    settings = {"arch": "deeplabv3", "encoder": "grid", "encoder_weights": None, "epochs": 2, "batch_size": 4,
                "head_channels": 16, "aspp_rates": [1, 2, 3], "scales": [1.0], "flip": True, "eval_every": 1,
                "workers": 0, "device": "cpu", "lr": 0.01}
    settings.update(segment)
    return Recipe.model_validate({
        "name": name, "runs_dir": str(runs_dir), "seed": 0,
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": IMAGES},
        "llm": {"provider": "static", "clusters": {"a": ["cat"]}},
        "model": {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img_size": 64, "cluster_dim": 8,
                  "topk": 2},
        "train": {"views": ["orig", "hflip"], "device": "cpu", "workers": 0},
        "segment": settings,
    })


def fake_train_checkpoint(recipe: Recipe) -> None:
    """A train-stage checkpoint (random tiny ViT + head) where `cpcx train` would write it."""
    torch.manual_seed(0)
    classes = build_dataset(recipe.dataset, "train").classes
    net = build_model(recipe.model, len(classes), 1)
    matrix = np.zeros((len(classes) - 1, 1), dtype=int)
    atomic.save_torch(recipe.run_dir("train") / "weights" / "last.pt",
                      {"model": net.state_dict(), "meta": checkpoint_meta(net, classes, matrix), "epoch": 1,
                       "loss": 0.0})


def fake_pseudo_labels(recipe: Recipe) -> None:
    dataset = build_dataset(recipe.dataset, "train")
    for i, image_id in enumerate(dataset.ids):
        save_label_png(recipe.run_dir("pseudo") / "labels" / f"{image_id}.png", dataset.load_mask(i))


def prepared(voc_root, runs_dir, name="grid", **segment) -> Recipe:
    recipe = make_recipe(voc_root, runs_dir, name, **segment)
    fake_train_checkpoint(recipe)
    fake_pseudo_labels(recipe)
    return recipe


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


@pytest.fixture(scope="module")
def finished(voc_root, tmp_path_factory):
    recipe = prepared(voc_root, tmp_path_factory.mktemp("runs"))
    # The train stage's token cache of these images, as `cpcx train` leaves it: the segmenter must read it.
    backbone = load_segnet_backbone(recipe)
    train = FeatureCache.build(recipe.feature_cache_root(), recipe.model.backbone, backbone,
                               ImageLabelDataset(build_dataset(recipe.dataset, "train")), 64,
                               ["orig", "hflip"], torch.device("cpu"), "fp32", 4, 0, log=lambda text: None)
    console = quiet()
    run_segment(recipe, console=console)
    return recipe, console.file.getvalue(), train.folder


def load_segnet_backbone(recipe):
    from cpcx.model import load_checkpoint

    net, _ = load_checkpoint(recipe.run_dir("train") / "weights" / "last.pt")
    return net.backbone


def test_grid_run_writes_every_artifact(finished):
    recipe, output, _ = finished
    folder = recipe.run_dir("segment")
    for name in ("weights/last.pt", "weights/best.pt", "metrics.csv", "metrics.json", "predictions.source.json"):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_miou"] for r in rows)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["encoder"] == "grid" and metrics["labels"] == "pseudo" and metrics["oracle"] is False
    val = build_dataset(recipe.dataset, "val")
    for i, image_id in enumerate(val.ids):
        label = load_label_png(folder / "predictions" / f"{image_id}.png")
        assert label.shape == val.load_mask(i).shape
        assert label.max() < val.num_classes
    assert "head on the frozen 4×4 grid" in output and "ORACLE" not in output


def test_grid_reads_the_train_stage_cache(finished):
    """The training tokens come from the train stage's cache; only the val images' tokens are extracted."""
    recipe, _, train_cache = finished
    own = sorted(p.parent for p in (recipe.run_dir("segment") / "features").glob("*/meta.json"))
    assert len(own) == 1 and own[0].name != train_cache.name
    key = json.loads((own[0] / "meta.json").read_text())["key"]
    assert key["num_images"] == len(build_dataset(recipe.dataset, "val")) and key["views"] == ["orig", "hflip"]


def test_grid_checkpoint_alone_segments_images(finished):
    """load_segnet rebuilds the whole network (backbone included) from best.pt: images in, the val
    predictions written from cached tokens out (float16 tokens: a few border pixels may differ)."""
    recipe, _, _ = finished
    model, meta = load_segnet(recipe.run_dir("segment") / "weights" / "best.pt")
    assert isinstance(model, GridSegNet) and meta["encoder"] == "grid" and meta["labels"] == "pseudo"
    val = build_dataset(recipe.dataset, "val")
    for i in range(3):
        probs = predict_probs(model, val.load_image(i), flip=True)
        written = load_label_png(recipe.run_dir("segment") / "predictions" / f"{val.ids[i]}.png")
        assert probs.shape[1:] == written.shape
        assert (probs.argmax(0).numpy() == written).mean() > 0.98


def test_grid_resume_ends_with_the_same_head(finished, voc_root, tmp_path, kill_after_epoch_1):
    """Killed after epoch 1, then --resume: the head equals the uninterrupted run's, and no row is repeated."""
    recipe, _, _ = finished
    again = prepared(voc_root, tmp_path)
    with kill_after_epoch_1():  # after last.pt of epoch 1 and its csv row: a kill between epochs
        run_segment(again, console=quiet())
    run_segment(again, resume=True, console=quiet())
    a = torch.load(recipe.run_dir("segment") / "weights" / "last.pt", weights_only=True)["model"]
    b = torch.load(again.run_dir("segment") / "weights" / "last.pt", weights_only=True)["model"]
    assert any(key.startswith("head.") for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    rows = list(csv.DictReader((again.run_dir("segment") / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_ground_truth_switch_is_an_oracle_marked_everywhere(voc_root, tmp_path):
    recipe = make_recipe(voc_root, tmp_path, labels="ground_truth", epochs=1, flip=False)
    fake_train_checkpoint(recipe)  # no pseudo-labels at all: the oracle does not read them
    console = quiet()
    run_segment(recipe, console=console)
    metrics = json.loads((recipe.run_dir("segment") / "metrics.json").read_text())
    assert metrics["labels"] == "ground_truth" and metrics["oracle"] is True
    output = console.file.getvalue()
    assert "GROUND-TRUTH masks: oracle reference" in output and "ORACLE" in output
    _, meta = load_segnet(recipe.run_dir("segment") / "weights" / "last.pt")
    assert meta["labels"] == "ground_truth"


def test_ground_truth_switch_on_the_image_segmenter(voc_root, tmp_path):
    recipe = Recipe.model_validate({
        **make_recipe(voc_root, tmp_path).model_dump(),
        "segment": {"arch": "deeplabv3plus", "encoder": "tu-test_efficientnet", "encoder_weights": None,
                    "epochs": 1, "batch_size": 4, "crop_size": 64, "scales": [1.0], "flip": False, "workers": 0,
                    "device": "cpu", "labels": "ground_truth"},
    })
    console = quiet()
    run_segment(recipe, console=console)
    metrics = json.loads((recipe.run_dir("segment") / "metrics.json").read_text())
    assert metrics["oracle"] is True and "oracle reference" in console.file.getvalue()


@pytest.mark.parametrize("change, words", [
    ({"arch": "deeplabv3plus"}, "encoder grid takes arch deeplabv3"),
    ({"scales": [0.5, 1.0]}, "test-time scales do not apply"),
    ({"encoder_file": "x.safetensors"}, "drop segment.encoder_file"),
])
def test_grid_contradictions_are_refused_at_validation(voc_root, tmp_path, change, words):
    if "encoder_file" in change:  # a file that exists: the contradiction, not the path, is what is refused
        (tmp_path / change["encoder_file"]).write_bytes(b"x")
        change = {"encoder_file": str(tmp_path / change["encoder_file"])}
    with pytest.raises(Exception) as caught:
        make_recipe(voc_root, tmp_path, **change)
    assert words in str(caught.value)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_grid_segmenter_exports_with_parity(finished, tmp_path, fmt):
    """The exported file (backbone + head, resize inside) matches torch on a real image at two sizes."""
    from cpcx.export import RELATIVE_TOLERANCE, export_segmenter

    recipe, _, _ = finished
    out, parity = export_segmenter(recipe, fmt, out=tmp_path / f"grid.{fmt}", console=quiet())
    assert out.is_file() and len(parity.sizes) == 2
    assert parity.worst_relative <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("shape, size", [((1, 3, 375, 500), 336), ((2, 3, 100, 90), 336), ((1, 3, 64, 64), 64),
                                         ((1, 3, 30, 41), 64)])
def test_exportable_resize_equals_torch_antialiased_bilinear(shape, size):
    """GridSegNet reads images as the token cache does (torch's antialiased bilinear), in exportable ops."""
    from cpcx.segment.grid import resize_antialiased

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=True)
    torch.testing.assert_close(resize_antialiased(x, size), reference, atol=1e-4, rtol=0)


def test_token_statistics_are_the_mean_and_std_of_every_token(tmp_path):
    from cpcx.segment.grid_train import token_statistics

    tokens = np.random.default_rng(0).normal(3.0, 2.0, size=(7, 2, 3, 3, 5)).astype(np.float16)
    np.save(tmp_path / "tokens.npy", tokens)

    class Cache:
        pass

    cache = Cache()
    cache.tokens = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    mean, std = token_statistics(cache, chunk=3)
    flat = tokens.astype(np.float64).reshape(-1, 5)
    np.testing.assert_allclose(mean.numpy(), flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), flat.std(0), rtol=1e-4)


def test_cpcx_predict_with_a_grid_checkpoint(finished, tmp_path):
    """`cpcx predict` needs only the grid checkpoint: labels at each image's size, overlays and probabilities."""
    from cpcx.predict import run_predict

    recipe, _, _ = finished
    val = build_dataset(recipe.dataset, "val")
    inputs = [str(val.image_path(i)) for i in range(2)]
    summary = run_predict(recipe, inputs, out=tmp_path / "out", probs=True, console=quiet())
    assert (summary.done, summary.failed) == (2, 0)
    for i in range(2):
        label = load_label_png(tmp_path / "out" / "labels" / f"{val.ids[i]}.png")
        assert label.shape == val.load_mask(i).shape
        assert (tmp_path / "out" / "overlays" / f"{val.ids[i]}.jpg").is_file()
        assert (tmp_path / "out" / "probs" / f"{val.ids[i]}.npz").is_file()


def test_training_curves_figure_beside_metrics_csv(finished):
    """figures/curves.png is drawn from metrics.csv after every epoch (loss, and val mIoU where measured)."""
    from PIL import Image

    recipe, _, _ = finished
    path = recipe.run_dir("segment") / "figures" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400


def test_training_curves_skip_unmeasured_epochs(tmp_path):
    from cpcx.viz import training_curves

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,lr,loss,val_miou,seconds\n1,0.01,1.5,,3\n2,0.01,1.1,0.31,3\n")
    assert training_curves(csv_path, tmp_path / "curves.png").is_file()
    (tmp_path / "empty.csv").write_text("epoch,lr,loss,val_miou,seconds\n")
    assert training_curves(tmp_path / "empty.csv", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
