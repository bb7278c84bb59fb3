"""`cpcx run` end to end on the smoke recipe (16 real VOC images, real weights), and resume after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
WEIGHTS = [REPO / "weights" / "dinov2_vits14.safetensors", REPO / "weights" / "efficientnet_lite0.safetensors"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _weights():
    missing = [str(p) for p in WEIGHTS if not p.is_file()]
    if missing:
        pytest.fail(f"offline weights missing: {missing}; run `make weights` (make test does it)")


def _cmd(runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cpcx", "run", "-r", str(SMOKE), f"runs_dir={runs}", *extra]


def _env(data_root: Path) -> dict:
    return {**os.environ, "CPCX_DATA": str(data_root), "COLUMNS": "160"}


def test_run_end_to_end_then_skip_everything(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    first = subprocess.run(_cmd(runs), capture_output=True, text=True, env=_env(data_root), timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = runs / "smoke"
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    assert {c["name"] for c in clusters["clusters"]} == {"vehicle", "animal", "person", "indoor"}
    assert (root / "train" / "weights" / "best.pt").is_file() and (root / "train" / "metrics.csv").is_file()
    assert len(list((root / "pseudo" / "labels").glob("*.png"))) == 16
    assert list((root / "pseudo" / "figures").rglob("*.png"))
    assert len(list((root / "segment" / "predictions").glob("*.png"))) == 16
    for stage in ("clusters", "train", "pseudo", "segment"):
        assert (root / stage / "recipe.resolved.yaml").is_file() and (root / stage / "env.json").is_file()
        assert json.loads((root / stage / "stage.json").read_text())["status"] == "done"
    summary = json.loads((root / "summary.json").read_text())
    assert 0 < summary["pseudo_miou"] <= 1 and 0 <= summary["val_miou"] <= 1
    assert set(summary["seconds"]) == {"clusters", "train", "pseudo", "segment"}

    again = subprocess.run(_cmd(runs), capture_output=True, text=True, env=_env(data_root), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") == 4

    changed = subprocess.run(_cmd(runs, "crf.iterations=2"), capture_output=True, text=True, env=_env(data_root),
                             timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("up to date, skipped") == 2  # clusters and train; pseudo and segment redone


def test_run_resumes_after_a_kill_during_pseudo(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    labels = runs / "smoke" / "pseudo" / "labels"
    proc = subprocess.Popen(_cmd(runs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(data_root),
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if labels.is_dir() and any(labels.glob("*.png")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = sorted(p.name for p in labels.glob("*.png"))
    assert 0 < len(written), "the run never reached the pseudo stage"
    stamps = {name: (labels / name).stat().st_mtime_ns for name in written}

    resumed = subprocess.run(_cmd(runs), capture_output=True, text=True, env=_env(data_root), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "train: up to date, skipped" in resumed.stdout.replace("• ", "")
    final = sorted(p.name for p in labels.glob("*.png"))
    assert len(final) == 16 and not list(labels.glob(".*.tmp"))
    # labels finished before the kill were kept, not redone
    assert all((labels / name).stat().st_mtime_ns == stamps[name] for name in written if name in final)
    assert json.loads((runs / "smoke" / "summary.json").read_text())["val_miou"] is not None


def test_standalone_stage_commands_record_their_stage_done(tmp_path, data_root, voc_root):
    """`cpcx clusters`, `cpcx train`, `cpcx pseudo` one by one leave their stages `done` with their time, so a
    later `cpcx run` skips them instead of redoing them as interrupted work."""
    from cpcx.pipeline import plan
    from cpcx.recipe import load_recipe

    overrides = [f"runs_dir={tmp_path / 'runs'}", "train.epochs=1", "crf.enabled=false", "pseudo.figures=0"]
    for stage in ("clusters", "train", "pseudo"):
        done = subprocess.run([sys.executable, "-m", "cpcx", stage, "-r", str(SMOKE), *overrides],
                              capture_output=True, text=True, env=_env(data_root), timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recipe = load_recipe(SMOKE, overrides)
    for stage in ("train", "pseudo"):
        state = json.loads((recipe.run_dir(stage) / "stage.json").read_text())
        assert state["status"] == "done" and state["seconds"] > 0
    assert plan(recipe) == {"clusters": "skip", "train": "skip", "pseudo": "skip", "segment": "run"}
