"""benchmarks/context_paste_runs.py: a run's labels and its base folder are scored against the masks, and the
second network's training time is read from the stage's log (the first network's epochs are not counted)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import context_paste_runs as runs  # noqa: E402

from cpcx.data import build_dataset  # noqa: E402
from cpcx.data.palette import save_label_png  # noqa: E402
from cpcx.recipe import load_recipe  # noqa: E402
from cpcx.recipe_io import dump_recipe  # noqa: E402
from test_pseudo import _recipe  # noqa: E402


def test_a_run_and_its_base_are_scored_on_the_runs_data_set(tmp_path, voc_root):
    recipe = load_recipe(_recipe(tmp_path, voc_root))  # 8 VOC train images
    dataset = build_dataset(recipe.dataset, "train")
    run, base = tmp_path / "runs" / "tiny", tmp_path / "base"
    (run / "pseudo").mkdir(parents=True)
    (run / "pseudo" / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        save_label_png(run / "pseudo" / "labels" / f"{image_id}.png", np.where(mask == 255, 0, mask))  # the truth
        save_label_png(base / f"{image_id}.png", np.zeros_like(mask))  # all background
    log = tmp_path / "pseudo.log"
    log.write_text("epoch 1/6 (cached, backbone frozen) loss 0.3 lr 0.001 99.0s\n"  # not the second network
                   "context paste: 4 donors among the 5 images with one object class; a second network learns\n"
                   "epoch 1/2 (cached, backbone frozen) loss 0.3665 mce 0.3610 P/R/F1 0.73/0.15/0.25 lr 0.001 24.5s\n"
                   "epoch 2/2 (cached, backbone frozen) loss 0.3077 mce 0.2055 P/R/F1 0.87/0.43/0.57 lr 0.001 23.6s\n"
                   "✔ 8 labels in 60.4 s (0.13 images/s) → z\n")
    runs.main(["--runs", str(run), "--base", str(base), "--logs", str(log), "--out", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out.json").read_text())["runs"]["tiny"]
    assert doc["paste"]["all"]["miou"] == 100.0 and doc["paste"]["multi"]["fg_iou"] == 100.0
    assert doc["base"]["all"]["fg_iou"] == 0.0 and doc["base"]["all"]["miou"] < 100.0
    assert doc["seconds"] == {"paste_training": 48, "labelling": 60}
    assert "segment" not in doc
    assert "| mean | + pseudo.context_paste | 100.0" in (tmp_path / "out.md").read_text()
