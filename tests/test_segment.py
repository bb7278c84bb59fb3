"""`cpcx segment` on real VOC images: ground-truth masks stand in for pseudo-labels, a tiny encoder and crop.

One uninterrupted 2-epoch run (module fixture) is checked artifact by artifact and is the reference for the
resume test; the multi-scale inference and the crop augmentation are checked on their own.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.data import build_dataset, load_label_png, save_label_png
from cpcx.errors import CpcxError
from cpcx.recipe import Recipe, SegmentConfig
from cpcx.segment import run_segment
from cpcx.segment.data import random_scale_crop
from cpcx.segment.infer import predict_probs
from cpcx.segment.networks import build_segnet

IMAGES = 8


def make_recipe(voc_root, runs_dir, name="seg", **segment) -> Recipe:
    settings = {"arch": "deeplabv3plus", "encoder": "tu-test_efficientnet", "encoder_weights": None, "epochs": 2,
                "batch_size": 4, "crop_size": 64, "scale_range": (0.5, 1.0), "scales": [0.5, 1.0], "flip": True,
                "eval_every": 1, "workers": 0, "device": "cpu", "lr": 0.01}
    settings.update(segment)
    return Recipe.model_validate({
        "name": name, "runs_dir": str(runs_dir), "seed": 0,
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": IMAGES},
        "llm": {"provider": "static", "clusters": {"a": ["cat"]}},
        "segment": settings,
    })


def fake_pseudo_labels(recipe: Recipe) -> list[str]:
    """Copy the train masks as the pseudo-labels of ``recipe`` (as `cpcx pseudo` would write them)."""
    dataset = build_dataset(recipe.dataset, "train")
    folder = recipe.run_dir("pseudo") / "labels"
    for i, image_id in enumerate(dataset.ids):
        save_label_png(folder / f"{image_id}.png", dataset.load_mask(i))
    return dataset.ids


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def finished(voc_root, tmp_path_factory):
    """One uninterrupted run: (recipe, console output)."""
    recipe = make_recipe(voc_root, tmp_path_factory.mktemp("runs"))
    fake_pseudo_labels(recipe)
    console = quiet()
    folder = run_segment(recipe, console=console)
    assert folder == recipe.run_dir("segment")
    return recipe, console.file.getvalue()


def test_run_writes_every_artifact(finished):
    recipe, output = finished
    folder = recipe.run_dir("segment")
    val = build_dataset(recipe.dataset, "val")
    for name in ("weights/last.pt", "weights/best.pt", "metrics.csv", "metrics.json", "recipe.resolved.yaml",
                 "env.json", "predictions.source.json"):
        assert (folder / name).is_file(), name

    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "lr", "loss", "val_miou", "seconds"}
    assert all(0 < float(r["lr"]) <= 0.01 and float(r["loss"]) > 0 and 0 <= float(r["val_miou"]) <= 1 for r in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # poly decay

    last = torch.load(folder / "weights/last.pt", weights_only=True)
    best = torch.load(folder / "weights/best.pt", weights_only=True)
    assert last["epoch"] == 2 and {"model", "optimizer", "meta", "best"} <= set(last)
    assert best["val_miou"] == pytest.approx(max(float(r["val_miou"]) for r in rows), rel=1e-5)
    assert best["epoch"] == last["best"]["epoch"]

    for i, image_id in enumerate(val.ids):
        prediction = load_label_png(folder / "predictions" / f"{image_id}.png")
        assert prediction.shape == val.load_mask(i).shape and prediction.max() < val.num_classes

    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["images"] == IMAGES and metrics["best_epoch"] == best["epoch"]
    assert 0 <= metrics["miou"] <= 1 and set(metrics["per_class_iou"]) == set(val.classes)
    assert "val mIoU" in output and "mIoU" in output

    from cpcx.evaluate import run_evaluate  # `cpcx evaluate --stage segment` scores the same files

    again = run_evaluate(recipe, stage="segment", console=quiet())
    assert again["miou"] == pytest.approx(metrics["miou"])


def test_predictions_resume_and_training_is_not_redone(finished):
    recipe, _ = finished
    folder = recipe.run_dir("segment")
    predictions = sorted((folder / "predictions").glob("*.png"))
    predictions[0].unlink()
    kept = {p: p.stat().st_mtime_ns for p in predictions[1:]}
    weights = (folder / "weights/last.pt").stat().st_mtime_ns
    console = quiet()
    run_segment(recipe, resume=True, console=console)
    assert "training already finished" in console.file.getvalue()
    assert predictions[0].is_file() and "1 written" in console.file.getvalue()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (folder / "weights/last.pt").stat().st_mtime_ns == weights


def test_resume_after_epoch_1_ends_with_the_same_weights(finished, voc_root, tmp_path, kill_after_epoch_1):
    reference, _ = finished
    recipe = make_recipe(voc_root, tmp_path / "runs")
    fake_pseudo_labels(recipe)

    with kill_after_epoch_1():  # after last.pt of epoch 1 and its csv row: a kill between epochs
        run_segment(recipe, console=quiet())
    assert torch.load(recipe.run_dir("segment") / "weights/last.pt", weights_only=True)["epoch"] == 1

    run_segment(recipe, resume=True, console=quiet())
    resumed = torch.load(recipe.run_dir("segment") / "weights/last.pt", weights_only=True)
    uninterrupted = torch.load(reference.run_dir("segment") / "weights/last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    rows = list(csv.DictReader((recipe.run_dir("segment") / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_missing_pseudo_labels_name_the_fix(voc_root, tmp_path):
    recipe = make_recipe(voc_root, tmp_path / "runs")
    ids = fake_pseudo_labels(recipe)
    for image_id in ids[:3]:
        (recipe.run_dir("pseudo") / "labels" / f"{image_id}.png").unlink()
    with pytest.raises(CpcxError) as info:
        run_segment(recipe, console=quiet())
    assert "3 of 8 pseudo-labels" in str(info.value) and "cpcx pseudo" in str(info.value)
    shutil.rmtree(recipe.run_dir("pseudo"))
    with pytest.raises(CpcxError, match="8 of 8"):
        run_segment(recipe, console=quiet())


def test_cli_reports_missing_pseudo_labels_in_one_line(voc_root, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from cpcx.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(json.loads(make_recipe(voc_root, tmp_path / "runs").model_dump_json())))
    result = CliRunner().invoke(app, ["segment", "-r", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "8 of 8 pseudo-labels" in lines[0] and "cpcx pseudo" in lines[0]


def test_pseudo_label_of_another_size_is_reported(voc_root, tmp_path):
    recipe = make_recipe(voc_root, tmp_path / "runs")
    ids = fake_pseudo_labels(recipe)
    save_label_png(recipe.run_dir("pseudo") / "labels" / f"{ids[2]}.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(CpcxError, match=f"{ids[2]}.png: pseudo-label is 10×10"):
        run_segment(recipe, console=quiet())


# ---------------------------------------------------------------------------------- inference pieces
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_segnet(SegmentConfig(arch="deeplabv2", encoder="tu-test_efficientnet", encoder_weights=None),
                        num_classes=6).eval()


def test_multiscale_probabilities_average_the_single_scale_passes(tiny_model, voc_root):
    image = build_dataset(make_recipe(voc_root, "/tmp/unused").dataset, "val").load_image(0)[:90, :131]
    single = predict_probs(tiny_model, image, scales=[1.0])
    assert single.shape == (6, 90, 131)
    torch.testing.assert_close(single.sum(0), torch.ones(90, 131))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(single, tiny_model(x)[0].softmax(0))

    half = predict_probs(tiny_model, image, scales=[0.5])
    both = predict_probs(tiny_model, image, scales=[0.5, 1.0])
    torch.testing.assert_close(both, (half + single) / 2)
    assert not torch.allclose(half, single)  # the scales really differ

    # With flips the prediction of the mirrored image is the mirrored prediction.
    flipped = predict_probs(tiny_model, image[:, ::-1].copy(), scales=[0.5, 1.0], flip=True)
    torch.testing.assert_close(flipped.flip(-1), predict_probs(tiny_model, image, scales=[0.5, 1.0], flip=True))


def test_random_scale_crop_pads_with_the_fill_colour_and_ignore():
    image = np.full((20, 30, 3), 7, np.uint8)
    label = np.ones((20, 30), np.uint8)
    fill = np.array([124, 116, 104], np.uint8)
    crop, crop_label = random_scale_crop(image, label, np.random.default_rng(0), 48, (1.0, 1.0), fill, hflip=0.0)
    assert crop.shape == (48, 48, 3) and crop_label.shape == (48, 48)
    assert (crop_label == 255).sum() == 48 * 48 - 20 * 30  # everything outside the image is ignored
    assert (crop[crop_label == 255] == fill).all() and (crop[crop_label == 1] == 7).all()

    big = np.random.default_rng(1).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    big_label = np.random.default_rng(2).integers(0, 21, (100, 120), dtype=np.uint8)
    a = random_scale_crop(big, big_label, np.random.default_rng(5), 32, (0.5, 1.5), fill)
    b = random_scale_crop(big, big_label, np.random.default_rng(5), 32, (0.5, 1.5), fill)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # a function of the generator alone
    assert a[0].shape == (32, 32, 3) and set(np.unique(a[1])) <= set(range(21))


def test_crf_refinement_of_predictions(tiny_model, voc_root):
    from cpcx.crf import CRFParams
    from cpcx.segment.infer import predict_label

    image = build_dataset(make_recipe(voc_root, "/tmp/unused").dataset, "val").load_image(2)[:60, :70]
    plain = predict_label(tiny_model, image, scales=[1.0])
    refined = predict_label(tiny_model, image, scales=[1.0], crf_params=CRFParams(iterations=3))
    assert refined.shape == plain.shape == (60, 70) and refined.dtype == np.uint8
    assert set(np.unique(refined)) <= set(np.unique(plain))  # the CRF only chooses among predicted classes


def test_bf16_autocast_inference_runs_and_agrees(tiny_model, voc_root):
    image = build_dataset(make_recipe(voc_root, "/tmp/unused").dataset, "val").load_image(1)[:64, :80]
    fp32 = predict_probs(tiny_model, image, scales=[1.0], flip=True)
    bf16 = predict_probs(tiny_model, image, scales=[1.0], flip=True, precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


DDP_SCRIPT = """
import sys
from rich.console import Console
from cpcx.recipe import Recipe
from cpcx.segment import run_segment
from cpcx.distributed import end_rank
recipe = Recipe.model_validate_json(open(sys.argv[1]).read())
run_segment(recipe, console=Console(width=200))
end_rank(0)  # as `cpcx`'s main ends a rank: no interpreter teardown, where gloo can abort
"""


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(voc_root, tmp_path):
    """torchrun with 2 gloo processes: the batch is split, val and predictions are sharded, rank 0 writes."""
    recipe = make_recipe(voc_root, tmp_path / "runs", scales=[1.0])
    fake_pseudo_labels(recipe)
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(tmp_path / "ddp.py"), str(tmp_path / "recipe.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cpu × 2 · batch 4" in done.stdout and "8 written, 0 already there" in done.stdout
    folder = recipe.run_dir("segment")
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one row per epoch, not one per process
    assert len(list((folder / "predictions").glob("*.png"))) == IMAGES
    assert 0 <= json.loads((folder / "metrics.json").read_text())["miou"] <= 1
