"""Shared test fixtures: where the real data lives, and a quiet, offline, single-threaded environment.

The real data root is ``$CPCX_DATA`` (default ../shared/data beside the checkout); tests that need a slice that is not there
are skipped with the reason, never failed.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_llm_server import FakeLLMServer
from paths import DATA_ROOT

# Before torch/numpy spin up thread pools: the test machines have 2 cores shared by several runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture(scope="session")
def voc_root(data_root: Path) -> Path:
    """The VOC2012 folder of the VOC slice (the one holding JPEGImages/)."""
    path = data_root / "voc2012-mini" / "VOC2012"
    if not (path / "JPEGImages").is_dir():
        pytest.skip(f"VOC slice not found at {path}; set CPCX_DATA to the folder holding voc2012-mini/")
    return path


@pytest.fixture(scope="session")
def coco_root(data_root: Path) -> Path:
    """The COCO slice root (annotations/, train2017/, val2017/)."""
    path = data_root / "coco2017-mini"
    if not (path / "annotations").is_dir():
        pytest.skip(f"COCO slice not found at {path}; set CPCX_DATA to the folder holding coco2017-mini/")
    return path


@pytest.fixture
def fast_backoff(monkeypatch):
    """Retry back-off of the LLM providers shrunk to milliseconds (tests of retries stay fast)."""
    import cpcx.llm.providers as providers

    monkeypatch.setattr(providers, "BACKOFF_BASE_S", 0.01)


@pytest.fixture
def server():
    """A scripted OpenAI/Ollama-speaking HTTP server on 127.0.0.1 (tests/fake_llm_server.py)."""
    with FakeLLMServer(models=("fake-model",)) as s:
        yield s


@pytest.fixture
def good_recipe(tmp_path, voc_root) -> Path:
    """A minimal valid recipe on the VOC slice (static clusters), for command-line tests."""
    import yaml

    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump({
        "name": "good", "dataset": {"kind": "voc", "root": str(voc_root)},
        "llm": {"provider": "static", "clusters": {"animal": ["cat", "dog"]}},
    }))
    return path


@pytest.fixture
def kill_after_epoch_1(monkeypatch):
    """``with kill_after_epoch_1(): run(...)``: the stage raises KeyboardInterrupt right after epoch 1's checkpoint and
    metrics.csv row (a kill between epochs); the real ``atomic.append_csv_row`` is back after the block."""
    import contextlib

    from cpcx import atomic

    real_append = atomic.append_csv_row

    def killed(path, header, row):
        real_append(path, header, row)
        if row[0] == 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def killing():
        monkeypatch.setattr(atomic, "append_csv_row", killed)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(atomic, "append_csv_row", real_append)

    return killing
