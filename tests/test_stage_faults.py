"""Faults inside a finished run (issue 19), through the real CLI on the smoke recipe (16 real VOC images, real
weights): deleted outputs that `cpcx run` must notice, a new checkpoint that cannot be loaded (the old labels
must survive it), hostile files in the run folder. One run is made per module and copied for each test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
FAST = ["train.epochs=1", "crf.enabled=false", "pseudo.figures=0", "pseudo.workers=1"]

pytestmark = pytest.mark.slow


def _env(data_root: Path) -> dict:
    return {**os.environ, "CPCX_DATA": str(data_root), "COLUMNS": "300"}


def cpcx(data_root: Path, runs: Path, *args: str) -> subprocess.CompletedProcess:
    command, rest = args[0], args[1:]
    return subprocess.run([sys.executable, "-m", "cpcx", command, "-r", str(SMOKE), f"runs_dir={runs}", *FAST, *rest],
                          capture_output=True, text=True, env=_env(data_root), timeout=900)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root, voc_root) -> Path:
    runs = tmp_path_factory.mktemp("base") / "runs"
    done = cpcx(data_root, runs, "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs


@pytest.fixture
def runs(finished, tmp_path) -> Path:
    copy = tmp_path / "runs"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def _labels(runs: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((runs / "smoke" / "pseudo" / "labels").glob("*.png"))}


# ------------------------------------------------------------------------------------ outputs are verified
def test_run_redoes_a_deleted_label_and_deleted_predictions(runs, data_root):
    root = runs / "smoke"
    labels = sorted((root / "pseudo" / "labels").glob("*.png"))
    kept = {p.name: p.stat().st_mtime_ns for p in labels[2:]}
    labels[0].unlink()
    labels[1].write_bytes(b"")  # emptied by hand: no label either
    shutil.rmtree(root / "segment" / "predictions")
    done = cpcx(data_root, runs, "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert "clusters: up to date, skipped" in out and "train: up to date, skipped" in out
    assert (f"pseudo: recorded done, but 2 of 16 files in labels/ are missing (first: {labels[0].name}); "
            "redoing what is missing") in out
    assert labels[1].stat().st_size > 0
    assert "segment: recorded done, but 16 of 16 files in predictions/ are missing" in out
    assert labels[0].is_file() and len(list((root / "segment" / "predictions").glob("*.png"))) == 16
    assert all((root / "pseudo" / "labels" / name).stat().st_mtime_ns == t for name, t in kept.items())
    again = cpcx(data_root, runs, "run")
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 4


def test_run_retrains_when_both_checkpoints_are_gone(runs, data_root):
    from cpcx.pipeline import plan
    from cpcx.recipe import load_recipe

    weights = runs / "smoke" / "train" / "weights"
    (weights / "best.pt").unlink()
    (weights / "last.pt").unlink()
    os.environ.setdefault("CPCX_DATA", str(data_root))
    recipe = load_recipe(SMOKE, [f"runs_dir={runs}", *FAST])
    notes: dict[str, str] = {}
    assert plan(recipe, notes) == {"clusters": "skip", "train": "run", "pseudo": "run", "segment": "run"}
    assert notes == {"train": "weights/best.pt and weights/last.pt are missing"}


# ------------------------------------------------------------------------------------ nothing is lost
def test_pseudo_with_an_unreadable_new_checkpoint_keeps_the_old_labels(runs, data_root):
    before = _labels(runs)
    record = (runs / "smoke" / "pseudo" / "checkpoint.json").read_bytes()
    best = runs / "smoke" / "train" / "weights" / "best.pt"
    best.write_bytes(best.read_bytes()[:4096])  # a new, torn checkpoint
    line = _one_error_line(cpcx(data_root, runs, "pseudo"))
    assert line.startswith(f"✘ {best}: not a readable cpcx training checkpoint: truncated or not a torch file")
    assert "weights_only" not in line and "\x1b" not in line
    assert _labels(runs) == before and len(before) == 16
    assert (runs / "smoke" / "pseudo" / "checkpoint.json").read_bytes() == record


def test_checkpoint_that_is_a_folder(runs, data_root):
    before = _labels(runs)
    best = runs / "smoke" / "train" / "weights" / "best.pt"
    best.unlink()
    best.mkdir()
    line = _one_error_line(cpcx(data_root, runs, "pseudo"))
    assert line == (f"✘ {best}: is a folder, not a cpcx training checkpoint; delete it and re-run "
                    "`cpcx train -r <recipe>`")
    assert _labels(runs) == before


def test_run_after_a_truncated_segment_checkpoint_starts_the_stage_over(runs, data_root):
    """The stage was interrupted (status running) and its last.pt is torn: cpcx run neither gets stuck nor
    advises a --resume it was never given."""
    root = runs / "smoke" / "segment"
    state = json.loads((root / "stage.json").read_text())
    (root / "stage.json").write_text(json.dumps({**state, "status": "running"}))
    last = root / "weights" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    done = cpcx(data_root, runs, "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    assert f"{last}: not a readable checkpoint: truncated or not a torch file (1000 bytes" in out
    assert "segment starts over (its finished epochs are redone) and replaces it" in out
    assert "--resume" not in out + done.stderr
    import torch

    assert torch.load(last, weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------------------------ hostile run files
def test_hostile_files_in_the_run_folder(runs, data_root):
    root = runs / "smoke"
    (root / "pseudo" / "labels" / "notes.txt").write_text("a stray file")  # not a PNG: ignored
    (root / "summary.json").write_text("{ torn")  # rewritten
    (root / "train" / "stage.json").write_text("")  # 0 bytes: the train stage is no longer known done
    done = cpcx(data_root, runs, "evaluate", "--stage", "pseudo")
    assert done.returncode == 0, done.stderr[-3000:]
    clusters = root / "clusters" / "clusters.json"
    clusters.write_text("")
    line = _one_error_line(cpcx(data_root, runs, "train"))
    assert line.startswith(f"✘ {clusters}:"), line


def test_labels_folder_that_is_a_file(runs, data_root):
    labels = runs / "smoke" / "pseudo" / "labels"
    shutil.rmtree(labels)
    labels.write_text("not a folder")
    line = _one_error_line(cpcx(data_root, runs, "pseudo"))
    assert line == f"✘ {labels}: is a file, but cpcx keeps a folder there; move the file away"
    assert labels.read_text() == "not a folder"


def test_pseudo_with_a_mask_of_another_size(runs, data_root, voc_root, tmp_path):
    """The ground truth of the first image is half its size: one line naming the mask, both sizes, the fix."""
    from PIL import Image

    from cpcx.data import build_dataset
    from cpcx.recipe import VOCDatasetConfig

    ids = build_dataset(VOCDatasetConfig(root=voc_root, limit=16), "train").ids
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        (root / "JPEGImages" / f"{i}.jpg").symlink_to(voc_root / "JPEGImages" / f"{i}.jpg")
        (root / "SegmentationClass" / f"{i}.png").symlink_to(voc_root / "SegmentationClass" / f"{i}.png")
        if (voc_root / "Annotations" / f"{i}.xml").is_file():
            (root / "Annotations" / f"{i}.xml").symlink_to(voc_root / "Annotations" / f"{i}.xml")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    mask = root / "SegmentationClass" / f"{ids[0]}.png"
    with Image.open(voc_root / "SegmentationClass" / f"{ids[0]}.png") as image:
        width, height = image.size
        mask.unlink()
        image.resize((width // 2, height // 2), Image.NEAREST).save(mask)
    done = cpcx(data_root, runs, "pseudo", f"dataset.root={root}")
    line = _one_error_line(done)
    assert line == (f"✘ {mask}: mask is {width // 2}×{height // 2} but its image {root / 'JPEGImages' / (ids[0] + '.jpg')} "
                    f"is {width}×{height}; masks must match their image pixel for pixel: replace the mask (or remove "
                    "the image from the split)")


def test_json_files_of_another_shape(runs, data_root):
    """Valid JSON that is not an object (a list, a number, null) where cpcx keeps a record: never an
    AttributeError; the record counts as missing and nothing the user had is dropped."""
    from cpcx.pipeline import plan
    from cpcx.recipe import load_recipe

    root = runs / "smoke"
    (root / "summary.json").write_text("[]")
    (root / "pseudo" / "metrics.json").write_text("[1, 2]")
    (root / "pseudo" / "no_crf.json").write_text("3")
    (root / "pseudo" / "checkpoint.json").write_text("null")
    (root / "segment" / "metrics.json").write_text('"text"')
    done = cpcx(data_root, runs, "run")
    assert done.returncode == 0 and done.stdout.count("up to date, skipped") == 4, done.stderr[-3000:]
    assert json.loads((root / "summary.json").read_text())["name"] == "smoke"
    for stage in ("pseudo", "segment"):
        evaluated = cpcx(data_root, runs, "evaluate", "--stage", stage)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert "miou" in json.loads((root / stage / "metrics.json").read_text())
    before = {p.name: p.stat().st_mtime_ns for p in (root / "pseudo" / "labels").glob("*.png")}
    (root / "pseudo" / "checkpoint.json").write_text("[]")
    for meta in (root / "train" / "features").glob("*/meta.json"):
        meta.write_text('{"key": [1]}')
    labelled = cpcx(data_root, runs, "pseudo")
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "pseudo" / "labels").glob("*.png")} == before
    (root / "segment" / "stage.json").write_text("[1]")
    os.environ.setdefault("CPCX_DATA", str(data_root))
    assert plan(load_recipe(SMOKE, [f"runs_dir={runs}", *FAST]))["segment"] == "run"
