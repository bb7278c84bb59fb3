"""``segment.saliency``: a salient-object network's foreground mixed into the segmenter's probabilities, in the val
predictions of `cpcx segment` (maps cached, predictions redone when the setting changes, the weight in metrics.json)
and in `cpcx predict` (the same mix on a user's image), refused without its network."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from saliency_net import left_half_onnx
from smoke_segmenter import SMOKE, train_smoke_segmenter

from cpcx.data import load_label_png
from cpcx.errors import CpcxError
from cpcx.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory):
    """The smoke segmenter (trained once) and a 64² stand-in saliency network: left half foreground."""
    folder = tmp_path_factory.mktemp("segsal")
    return folder, train_smoke_segmenter(folder / "runs", voc_root), left_half_onnx(folder / "half.onnx", 64)


def _switch(network, weight: float, **more) -> list[str]:
    extra = [f"segment.saliency.{k}={v}" for k, v in more.items()]
    return ["segment.saliency.enabled=true", f"segment.saliency.weights={network}", "segment.saliency.size=64",
            f"segment.saliency.weight={weight}", *extra]


def test_val_predictions_follow_the_saliency_and_keep_its_maps(trained, tmp_path):
    from cpcx.segment import run_segment

    folder, overrides, network = trained
    runs = tmp_path / "runs"
    shutil.copytree(folder / "runs", runs)  # the module's run stays as trained for the other tests
    plain = load_recipe(SMOKE, [*overrides, f"runs_dir={runs}"])
    predictions = plain.run_dir("segment") / "predictions"
    before = {p.name: load_label_png(p) for p in predictions.glob("*.png")}
    assert len(before) == 16
    recipe = load_recipe(SMOKE, [*overrides, f"runs_dir={runs}", *_switch(network, 1.0, cache_dir=tmp_path / "maps")])
    console = Console(file=io.StringIO(), width=200)
    run_segment(recipe, resume=True, console=console)  # training is finished: only the predictions are redone
    assert "training already finished" in console.file.getvalue()
    assert "+ saliency" in console.file.getvalue()
    after = {p.name: load_label_png(p) for p in predictions.glob("*.png")}
    assert after.keys() == before.keys()
    for name, label in after.items():  # at weight 1 the saliency alone says object or background
        width = label.shape[1]
        assert (label[:, : int(0.4 * width)] > 0).all(), name
        assert (label[:, int(0.6 * width):] == 0).all(), name
    metrics = json.loads((recipe.run_dir("segment") / "metrics.json").read_text())
    assert metrics["saliency"] == 1.0
    maps = sorted((tmp_path / "maps" / "saliency").glob("*/*.png"))
    assert len(maps) == 16
    # a re-run with the same setting keeps predictions and maps; another weight redoes the predictions only
    stamps = {p: p.stat().st_mtime_ns for p in maps}
    run_segment(recipe, resume=True, console=Console(file=io.StringIO()))
    assert {p.name: load_label_png(p).tobytes() for p in predictions.glob("*.png")} == \
        {k: v.tobytes() for k, v in after.items()}
    lighter = load_recipe(SMOKE, [*overrides, f"runs_dir={runs}", *_switch(network, 0.3, cache_dir=tmp_path / "maps")])
    run_segment(lighter, resume=True, console=Console(file=io.StringIO()))
    assert {p: p.stat().st_mtime_ns for p in maps} == stamps
    assert json.loads((recipe.run_dir("segment") / "metrics.json").read_text())["saliency"] == 0.3
    mixed = {p.name: load_label_png(p) for p in predictions.glob("*.png")}
    assert any(not np.array_equal(mixed[k], after[k]) for k in after)
    # and the switch off gives back the plain predictions
    run_segment(plain, resume=True, console=Console(file=io.StringIO()))
    for name, label in before.items():
        np.testing.assert_array_equal(load_label_png(predictions / name), label)


def test_predict_mixes_the_saliency_into_a_users_image(trained, voc_root, tmp_path):
    import torch

    from cpcx.predict import open_segmenter, run_predict
    from cpcx.saliency import mix_prediction, predict
    from cpcx.segment.infer import predict_probs

    folder, overrides, network = trained
    recipe = load_recipe(SMOKE, [*overrides, *_switch(network, 0.4)], check_inputs=False)
    image_path = sorted((voc_root / "JPEGImages").glob("*.jpg"))[0]
    console = Console(file=io.StringIO(), width=200)
    summary = run_predict(recipe, [str(image_path)], out=tmp_path, console=console)
    assert (summary.done, summary.failed) == (1, 0)
    assert "1 scale + saliency 0.4 · " in console.file.getvalue()
    image = np.array(Image.open(image_path).convert("RGB"))
    model, _ = open_segmenter(recipe)
    probs = predict_probs(model, image, [1.0], False, "cpu", recipe.segment.precision)
    expected = mix_prediction(probs, predict(str(network), image, 64), 0.4).argmax(0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(load_label_png(tmp_path / "labels" / f"{image_path.stem}.png"), expected)
    # a network of another input size fails before any output, naming the field to set
    wrong = load_recipe(SMOKE, [*overrides, *_switch(network, 0.4, size=128)], check_inputs=False)
    with pytest.raises(CpcxError, match=r"segment\.saliency\.size: 64"):
        run_predict(wrong, [str(image_path)], out=tmp_path / "wrong", console=Console(file=io.StringIO()))
    assert not (tmp_path / "wrong").exists()


def test_recipe_refuses_segment_saliency_without_its_network(trained):
    _, overrides, _ = trained
    with pytest.raises(RecipeError, match=r"segment\.saliency.*cpcx weights import isnet"):
        load_recipe(SMOKE, [*overrides, "segment.saliency.enabled=true"])
    with pytest.raises(RecipeError, match=r"nowhere\.onnx does not exist"):
        load_recipe(SMOKE, [*overrides, "segment.saliency.enabled=true", "segment.saliency.weights=nowhere.onnx"])


def test_the_weight_screen_scores_what_the_stage_writes(trained, tmp_path):
    """benchmarks/segment_saliency.py at weight 0 gives the stage's own val mIoU (the same predictions), and splits
    the val ids in a choose and a report half."""
    import sys

    sys.path.insert(0, str(SMOKE.parents[1] / "benchmarks"))
    import segment_saliency

    folder, overrides, network = trained
    recipe = load_recipe(SMOKE, overrides)
    run = recipe.run_dir("segment").parent
    doc = segment_saliency.screen_run(run, network, [0.0, 1.0], tmp_path / "maps", 1, size=64)
    stage = json.loads((recipe.run_dir("segment") / "metrics.json").read_text())
    assert doc["rows"]["0"]["all"] == pytest.approx(100 * stage["miou"], abs=0.01)
    assert (doc["images"], doc["choose"]) == (16, 8)
    assert doc["rows"]["1"]["all"] != doc["rows"]["0"]["all"]
    table = segment_saliency.render({"runs": {str(run): doc}, "command": "c"})
    assert f"| 0 | {doc['rows']['0']['all']:.1f} | {doc['rows']['0']['choose']:.1f} |" in table
