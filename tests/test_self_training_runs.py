"""benchmarks/self_training_runs.py: each pass of a run is scored against the masks, split choose / report, and
the stage's times are read from its log."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import self_training_runs as runs  # noqa: E402

from cpcx.data import build_dataset  # noqa: E402
from cpcx.data.palette import save_label_png  # noqa: E402
from cpcx.recipe import load_recipe  # noqa: E402
from test_pseudo import _recipe  # noqa: E402


def test_each_pass_is_scored_on_the_runs_own_data_set(tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root))  # 8 VOC train images
    dataset = build_dataset(recipe.dataset, "train")
    run = tmp_path / "runs" / "tiny"
    from cpcx.recipe_io import dump_recipe

    (run / "pseudo").mkdir(parents=True)
    (run / "pseudo" / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        save_label_png(run / "pseudo" / "labels" / f"{image_id}.png", np.where(mask == 255, 0, mask))  # the truth
        save_label_png(run / "pseudo" / "labels_first" / f"{image_id}.png", np.zeros_like(mask))  # all background
    log = tmp_path / "pseudo.log"
    log.write_text("✔ first pass: 8 labels in 12.5 s → x\nself-training: heads trained in 40 s → y\n"
                   "✔ 8 labels in 9.1 s (0.88 images/s) → z\n")
    runs.main(["--runs", str(run), "--logs", str(log), "--out", str(tmp_path / "out")])
    doc = __import__("json").loads((tmp_path / "out.json").read_text())["runs"]["tiny"]
    assert doc["labels"]["all"]["miou"] == 100.0 and doc["labels"]["all"]["fg_iou"] == 100.0
    assert doc["labels_first"]["all"]["fg_iou"] == 0.0 and doc["labels_first"]["all"]["miou"] < 100.0
    # 8 images, all below the 200 choose ids; single- and multi-class ones among them
    assert set(doc["labels"]) == {"all", "choose", "single", "multi", "choose_single", "choose_multi"}
    assert doc["seconds"] == {"first_pass": 12.5, "heads": 40, "second_pass": 9.1}
    assert "+ pseudo.self_training" in (tmp_path / "out.md").read_text()
    assert doc["first_pass_crf"] is True
    assert "first pass (the recipe without the switch)" in (tmp_path / "out.md").read_text()

    recipe_no_crf = load_recipe(_recipe(tmp_path, voc_root), ["pseudo.self_training.first_pass_crf=false"])
    (run / "pseudo" / "recipe.resolved.yaml").write_text(dump_recipe(recipe_no_crf))
    runs.main(["--runs", str(run), "--out", str(tmp_path / "out")])
    assert runs.FIRST_NO_CRF in (tmp_path / "out.md").read_text()  # the first pass is named for what it was


def test_a_routed_folder_takes_the_multi_class_images_labels_from_the_other(tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root))  # 8 VOC train images, both kinds of scene
    dataset = build_dataset(recipe.dataset, "train")
    truth, empty = tmp_path / "truth", tmp_path / "empty"
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        save_label_png(truth / f"{image_id}.png", np.where(mask == 255, 0, mask))
        save_label_png(empty / f"{image_id}.png", np.zeros_like(mask))  # all background
    routed = runs.score_folder(dataset, truth, multi_folder=empty)
    assert routed["single"]["miou"] == 100.0 and routed["multi"]["fg_iou"] == 0.0
    assert routed["choose_single"] == routed["single"]
    assert 0.0 < routed["all"]["fg_iou"] < 100.0
