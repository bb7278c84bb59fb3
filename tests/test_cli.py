"""The command line as a user meets it: exit codes, one line per problem, no tracebacks, no secrets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "recipes_bad"


def cpcx(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cpcx", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=120)


def test_validate_ok(good_recipe):
    result = cpcx("validate", "-r", str(good_recipe), "model.topk=4")
    assert result.returncode == 0, result.stderr
    assert "valid recipe 'good'" in result.stdout


def test_validate_bad_recipe_exits_2_with_lines_and_no_traceback():
    path = BAD / "35_several_problems.yaml"
    result = cpcx("validate", "-r", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 3 and all(str(path) in line for line in lines)
    assert "did you mean 'img_size'?" in result.stderr


def test_missing_recipe_file():
    result = cpcx("show", "-r", "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml: file not found" in result.stderr


def test_show_prints_resolved_yaml_with_overrides(good_recipe):
    result = cpcx("show", "-r", str(good_recipe), "train.epochs=3", "crf.enabled=false")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["epochs"] == 3 and shown["crf"]["enabled"] is False
    assert shown["model"]["topk"] == 6 and shown["pseudo"]["img_size"] == 960


def test_bad_override_is_a_clear_error(good_recipe):
    result = cpcx("validate", "-r", str(good_recipe), "train.epochs=lots")
    assert result.returncode == 2
    assert "train.epochs: input should be a valid integer" in result.stderr


def test_doctor_reports_each_check(good_recipe):
    result = cpcx("doctor", "-r", str(good_recipe))
    out = result.stdout
    assert "dense CRF" in out and "torch" in out and "data (train): 311 images" in out
    assert "static clusters" in out
    assert result.returncode == 0, out


def test_doctor_names_unreachable_llm_server(tmp_path, voc_root):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "dataset": {"kind": "voc", "root": str(voc_root)},
        "llm": {"provider": "ollama", "base_url": "http://127.0.0.1:9", "timeout_s": 1},
    }))
    result = cpcx("doctor", "-r", str(path))
    assert result.returncode == 1
    assert "✘ LLM (ollama)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_bf16_on_a_cpu_that_emulates_it_is_named(monkeypatch):
    """precision bf16 on a CPU without bf16 hardware gets one line with the fix; fp32, auto and GPUs get none."""
    import torch

    from cpcx import device as dev

    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: False)
    cpu = torch.device("cpu")
    line = dev.slow_bf16_warning(cpu, "bf16", "train.precision")
    assert line is not None and "train.precision=fp32" in line and "\n" not in line
    assert dev.slow_bf16_warning(cpu, "auto", "train.precision") is None
    assert dev.slow_bf16_warning(torch.device("cuda"), "bf16", "train.precision") is None
    said: list[str] = []
    dev.report_slow_bf16(cpu, "bf16", "pseudo.precision", said.append)
    dev.report_slow_bf16(cpu, "fp32", "pseudo.precision", said.append)
    assert len(said) == 1 and "pseudo.precision=fp32" in said[0]
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    assert dev.slow_bf16_warning(cpu, "bf16", "train.precision") is None
    assert dev.autocast_dtype(cpu, "bf16") is torch.bfloat16


def test_doctor_names_int8_saliency_on_a_cpu_without_int8_dot_products(good_recipe, monkeypatch, tmp_path):
    """pseudo.saliency.precision int8 where the CPU has no VNNI: an optional check (!) with the fix; with VNNI, or
    in float, none."""
    from cpcx import device as dev
    from cpcx.doctor import _recipe_checks
    from cpcx.recipe import load_recipe

    network = tmp_path / "isnet.onnx"
    network.write_bytes(b"stand-in")
    on = ["pseudo.saliency.enabled=true", f"pseudo.saliency.weights={network}"]
    int8 = load_recipe(good_recipe, [*on, "pseudo.saliency.precision=int8"])
    monkeypatch.setattr(dev, "cpu_int8_dot", lambda: False)
    named = [c for c in _recipe_checks(int8) if c.name == "CPU int8"]
    assert len(named) == 1 and not named[0].ok and not named[0].required
    assert named[0].fix == "set pseudo.saliency.precision: float"
    assert not [c for c in _recipe_checks(load_recipe(good_recipe, on)) if c.name == "CPU int8"]
    monkeypatch.setattr(dev, "cpu_int8_dot", lambda: True)
    assert not [c for c in _recipe_checks(int8) if c.name == "CPU int8"]
