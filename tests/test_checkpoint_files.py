"""Hostile checkpoint files (issue 19): torn, empty, a folder, foreign, or a pickle that would run code. Every
loader of cpcx answers one line of its own naming the file and the fix: never torch's multi-line advice to load
with weights_only=False, never terminal colour codes, and the pickle is never executed."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from cpcx.errors import CpcxError

MARKER = Path("/tmp/cpcx-hostile-pickle-ran")


class _Evil:
    def __reduce__(self):
        return (MARKER.write_text, ("ran",))


def _files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(4096)}, "meta": {}}, good)
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint at all\n" * 4}
    out = {name: tmp_path / f"{name}.pt" for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    out["folder"] = tmp_path / "folder.pt"
    out["folder"].mkdir()
    out["pickle"] = tmp_path / "pickle.pt"
    torch.save({"model": _Evil()}, out["pickle"])
    out["numpy"] = tmp_path / "numpy.pt"
    torch.save({"model": np.zeros(3, dtype=object)}, out["numpy"])
    return out


def _check_line(message: str, path: Path) -> None:
    assert "\n" not in message and "\x1b" not in message, message
    assert "weights_only" not in message and "trust the source" not in message, message
    assert message.startswith(str(path)), message


@pytest.fixture
def files(tmp_path):
    MARKER.unlink(missing_ok=True)
    yield _files(tmp_path)
    assert not MARKER.exists(), "a pickle in a checkpoint was executed"


def _loaders():
    from cpcx.pseudo.class_probe import ClassProbe
    from cpcx.model import load_checkpoint
    from cpcx.segment.stage import _load_resume
    from cpcx.segment.networks import load_segnet
    from cpcx.weights import load_state_dict_file

    return {"load_checkpoint": load_checkpoint, "load_segnet": load_segnet, "segment resume": _load_resume,
            "class probe": ClassProbe.load, "weights file": load_state_dict_file}


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_segnet", "segment resume", "class probe",
                                    "weights file"])
def test_every_loader_answers_one_line_of_its_own(files, loader):
    load = _loaders()[loader]
    for kind, path in files.items():
        with pytest.raises(CpcxError) as info:
            load(path)
        message = str(info.value)
        _check_line(message, path)
        expected = {"truncated": "truncated or not a torch file", "empty": "empty file (0 bytes",
                    "text": "truncated or not a torch file", "folder": "is a folder",
                    "pickle": "Python objects besides tensors", "numpy": "Python objects besides tensors"}[kind]
        assert expected in message, (kind, message)


def test_resume_from_an_unreadable_checkpoint_names_the_fix(files):
    from cpcx.checkpoint import load_for_resume

    for path in files.values():
        with pytest.raises(CpcxError) as info:
            load_for_resume(path, recipe=None, cluster_matrix=None)
        _check_line(str(info.value), path)
        assert "run `cpcx train` without --resume to start over" in str(info.value)


def test_cpcx_run_starts_an_unreadable_stage_over_instead_of_advising_resume(files, tmp_path):
    """`cpcx run` was never given --resume: a torn last.pt makes the stage start over, with a note."""
    from types import SimpleNamespace

    from cpcx.pipeline import _can_resume

    weights = tmp_path / "run" / "train" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").write_bytes(files["truncated"].read_bytes())
    recipe = SimpleNamespace(run_dir=lambda stage=None: tmp_path / "run" / stage)
    console = Console(file=io.StringIO(), width=400)
    assert _can_resume(recipe, "train", console) is False
    text = console.file.getvalue()
    assert f"{weights / 'last.pt'}: not a readable checkpoint: truncated or not a torch file" in text
    assert "train starts over (its finished epochs are redone)" in text and "--resume" not in text
