"""Scoring label folders: a hand-computed confusion matrix, the error cases, and `cpcx evaluate` on VOC."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from cpcx.data import build_dataset, load_label_png, save_label_png
from cpcx.errors import CpcxError
from cpcx.evaluate import confusion_csv, evaluate_label_folder, run_evaluate
from cpcx.recipe import load_recipe


class _TinyDataset:
    """The SegmentationDataset interface that evaluation uses, over masks held in memory."""

    name, split, source = "tiny", "train", "tiny.txt"
    classes = ("background", "cat", "dog", "car")
    num_classes = 4
    has_masks = True

    def __init__(self, masks: dict[str, np.ndarray]):
        self.ids = list(masks)
        self._masks = masks

    def index_of(self, image_id: str) -> int:
        return self.ids.index(image_id)

    def load_mask(self, i: int) -> np.ndarray:
        return self._masks[self.ids[i]]


def _write(folder, predictions):
    for image_id, labels in predictions.items():
        save_label_png(folder / f"{image_id}.png", np.array(labels, dtype=np.uint8))


def test_known_confusion_matrix(tmp_path):
    dataset = _TinyDataset({
        "a": np.array([[0, 0, 1, 1], [2, 2, 255, 1]], dtype=np.uint8),
        "b": np.zeros((2, 2), dtype=np.uint8),
    })
    _write(tmp_path, {"a": [[0, 1, 1, 1], [2, 0, 2, 1]], "b": [[0, 0], [0, 0]]})
    scores, confusion = evaluate_label_folder(dataset, tmp_path)
    # (truth, prediction) pairs, the 255 pixel skipped: a gives (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1); b four (0,0)
    expected = np.array([[5, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion.matrix, expected)
    # IoU = TP / (truth + prediction - TP), over the pixels of all images together
    iou = [5 / (6 + 6 - 5), 3 / (3 + 4 - 3), 1 / (2 + 1 - 1)]
    np.testing.assert_allclose(scores.iou[:3], iou)
    assert np.isnan(scores.iou[3])  # "car" is in neither: no IoU, and it does not count in the mean
    assert scores.miou == pytest.approx(sum(iou) / 3)
    assert scores.pixel_accuracy == pytest.approx(9 / 11)
    assert confusion_csv(confusion.matrix, dataset.classes).splitlines() == [
        "truth\\prediction,background,cat,dog,car", "background,5,1,0,0", "cat,0,3,0,0", "dog,1,0,1,0", "car,0,0,0,0",
    ]


def test_missing_mismatched_and_foreign_labels_are_refused(tmp_path):
    dataset = _TinyDataset({"a": np.zeros((2, 3), dtype=np.uint8), "b": np.zeros((2, 3), dtype=np.uint8)})
    _write(tmp_path, {"a": np.zeros((2, 3))})
    with pytest.raises(CpcxError, match="1 of 2 label PNGs missing"):
        evaluate_label_folder(dataset, tmp_path)
    _write(tmp_path, {"b": np.zeros((3, 2))})
    with pytest.raises(CpcxError, match="label map is 2×3 but the image is 3×2"):
        evaluate_label_folder(dataset, tmp_path)
    _write(tmp_path, {"b": np.full((2, 3), 9)})
    with pytest.raises(CpcxError, match="holds class 9"):
        evaluate_label_folder(dataset, tmp_path)


@pytest.fixture
def voc_recipe(tmp_path, voc_root):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ev", "runs_dir": str(tmp_path / "runs"),
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": 6},
        "llm": {"provider": "static", "clusters": {"all": ["cat"]}},
    }))
    return load_recipe(path)


def test_run_evaluate_on_voc_masks(voc_recipe):
    recipe = voc_recipe
    with pytest.raises(CpcxError, match="no pseudo outputs yet"):
        run_evaluate(recipe, "pseudo")
    dataset = build_dataset(recipe.dataset, "train")
    stage = recipe.run_dir("pseudo")
    stage.mkdir(parents=True)
    (stage / "metrics.json").write_text(json.dumps({"miou_no_crf": 0.25}))  # a key the stage wrote: kept
    for i, image_id in enumerate(dataset.ids):  # the ground truth itself (ignore → background) scores 100
        mask = dataset.load_mask(i)
        save_label_png(stage / "labels" / f"{image_id}.png", np.where(mask == 255, 0, mask))
    metrics = run_evaluate(recipe, "pseudo")
    assert metrics["miou"] == 1.0 and metrics["images"] == 6 and metrics["split"] == "train"
    present = {c for c, v in metrics["per_class_iou"].items() if v is not None}
    assert present == {dataset.classes[c] for c in np.flatnonzero(dataset.labels.any(0))}
    on_disk = json.loads((stage / "metrics.json").read_text())
    assert on_disk["miou"] == 1.0 and on_disk["miou_no_crf"] == 0.25
    rows = (stage / "confusion.csv").read_text().splitlines()
    assert len(rows) == 22 and rows[0].startswith("truth\\prediction,background,aeroplane")
    assert Image.open(stage / "figures" / "iou_per_class.png").size[0] > 100

    # one image labelled all-background: its objects become misses, the score drops below 1
    first = dataset.ids[0]
    save_label_png(stage / "labels" / f"{first}.png", np.zeros_like(load_label_png(stage / "labels" / f"{first}.png")))
    assert run_evaluate(recipe, "pseudo")["miou"] < 1.0


def test_segment_stage_scores_the_val_split(voc_recipe):
    recipe = voc_recipe
    dataset = build_dataset(recipe.dataset, "val")
    folder = recipe.run_dir("segment") / "predictions"
    for i, image_id in enumerate(dataset.ids):
        save_label_png(folder / f"{image_id}.png", np.zeros(dataset.load_mask(i).shape, dtype=np.uint8))
    metrics = run_evaluate(recipe, "segment")
    assert metrics["split"] == "val" and metrics["images"] == len(dataset)
    assert 0 < metrics["per_class_iou"]["background"] < 1 and metrics["miou"] < 0.1
    with pytest.raises(CpcxError, match="not a stage"):
        run_evaluate(recipe, "train")


def test_bounded_map_keeps_order_and_never_runs_more_than_its_window_ahead():
    """Executor.map ran every image's load ahead of the scoring loop and kept the results: memory grew with the
    val split (~200 MiB at 1,369 images in the scale benchmark)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from cpcx.evaluate import bounded_map

    started, lock = [0], threading.Lock()

    def load(i):
        with lock:
            started[0] += 1
        return i * i

    out = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        for consumed, value in enumerate(bounded_map(pool, load, range(40), window=5)):
            time.sleep(0.005)  # a slow consumer: the loads would run to the end of the list without the window
            assert started[0] <= consumed + 5
            out.append(value)
    assert out == [i * i for i in range(40)]
