"""benchmarks/saliency_screen.py: settings parse as single/multi weights, bad ones are refused before any work, and
the table gives each setting's scene split."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import saliency_screen as screen  # noqa: E402


def test_a_setting_is_single_slash_multi_and_one_number_means_both():
    assert screen.parse_setting("0.5/0.2") == ((0.5, False), (0.2, False), 1)
    assert screen.parse_setting("0.35") == ((0.35, False), (0.35, False), 1)
    assert screen.parse_setting("0.5/+0.7") == ((0.5, False), (0.7, True), 1)  # + : the mix only adds object
    assert screen.parse_setting("0.5/0.3x2") == ((0.5, False), (0.3, False), 2)  # x2: two passes, multi-class


@pytest.mark.parametrize("bad, says", [("half/0.2", "single/multi"), ("0.5/1.5", "0..1"), ("0.5/+1.5", "0..1"),
                                       ("0.5/0.3x4", "1 to 3 passes"), ("0.5/0.3xtwo", "single/multi")])
def test_bad_settings_and_a_missing_network_are_refused_first(bad, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        screen.main(["--run", str(tmp_path), "--isnet", str(tmp_path / "x.onnx"), "--settings", bad])
    assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        screen.main(["--run", str(tmp_path), "--isnet", str(tmp_path / "x.onnx")])
    assert "make weights-saliency" in capsys.readouterr().err


def test_render_gives_each_setting_its_scenes():
    part = {"miou": 50.0, "fg_iou": 60.0}
    doc = {"command": "c", "run": "r", "ids": "choose", "images": 200,
           "rows": {"0/0": {"all": part, "single": part, "multi": part}, "0.5/0.2": {"all": part, "single": part}}}
    lines = screen.render(doc).splitlines()
    assert "| 0/0 | 50.0 (60.0) | 50.0 (60.0) | 50.0 (60.0) |" in lines
    assert "| 0.5/0.2 | 50.0 (60.0) | 50.0 (60.0) | — |" in lines
