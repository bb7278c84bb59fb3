"""Hostile inputs met through the real command line (#19): one clear line, exit code, no traceback, no hang."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "recipes_bad"


def cpcx(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120,
         pre: str | None = None) -> subprocess.CompletedProcess:
    """``python -m cpcx ARGS``; ``pre`` is Python run first in the same process (to plant a fault)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    if "CPCX_DEBUG" not in (env or {}):
        full_env.pop("CPCX_DEBUG", None)  # the developer's own debug switch must not change what tests see
    command = [sys.executable, "-m", "cpcx", *args] if pre is None else \
        [sys.executable, "-c", f"{pre}\nimport sys\nsys.argv[0] = 'cpcx'\nfrom cpcx.cli import main\nmain()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", ["38_alias_bomb", "39_alias_cycle", "40_nested_3000_deep", "41_duplicate_top_key"])
def test_yaml_bombs_end_fast_in_one_line(name):
    start = time.perf_counter()
    result = cpcx("validate", "-r", str(BAD / f"{name}.yaml"), timeout=60)
    assert time.perf_counter() - start < 30
    assert result.returncode == 2
    assert _one_line(result).startswith(f"✘ {BAD / name}.yaml: ")


def test_list_override_message_keeps_its_brackets(good_recipe):
    # rich would read '[orig,vflip]' as markup and print nothing of it
    result = cpcx("validate", "-r", str(good_recipe), "train.views.1=vflip")
    assert result.returncode == 2
    assert _one_line(result) == ("✘ override 'train.views.1=vflip': train.views is a list, so its items have no "
                                 "keys; override the whole list, e.g. train.views=[orig,vflip]")


def test_root_that_is_a_file(good_recipe):
    result = cpcx("validate", "-r", str(good_recipe), f"dataset.root={good_recipe}")
    assert _one_line(result) == (f"✘ {good_recipe}: dataset.root: {good_recipe} is a file, not a folder; point it at "
                                 "the folder that holds the data set")


def test_recipe_from_dev_zero_is_refused_at_once():
    result = cpcx("validate", "-r", "/dev/zero", timeout=60)
    assert result.returncode == 2
    assert _one_line(result) == "✘ /dev/zero: is not a regular file; pass a recipe YAML file, e.g. -r recipes/voc-mini.yaml"


# ---------------------------------------------------------------------------------------- LLM cache
def test_cache_export_to_a_folder(tmp_path):
    from cpcx.llm.cache import AnswerCache, request_key
    from test_llm_cache import _identity, _value

    with AnswerCache(tmp_path / "c") as cache:
        cache.put(request_key(_identity()), _identity(), _value())
    result = cpcx("cache", "export", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1
    assert _one_line(result) == f"✘ {tmp_path}: is a folder; name the JSONL file to write, e.g. {tmp_path}/answers.jsonl"


def test_cache_import_from_dev_zero_ends_at_once(tmp_path):
    result = cpcx("cache", "import", "/dev/zero", "--cache-dir", str(tmp_path), timeout=60)
    assert result.returncode == 1
    assert _one_line(result) == ("✘ /dev/zero: is not a regular file (a device, pipe or socket); pass a file "
                                 "written by `cpcx cache export`")


def test_cache_import_refuses_an_invalid_answer(tmp_path):
    from test_llm_cache import _identity, _line

    bad = {"raw": '{"cat": "animal"}', "attempts": [], "meta": {}, "answer": [{"name": "animal", "members": ["cat"]}]}
    src = tmp_path / "answers.jsonl"
    src.write_text(_line(_identity(1), bad))
    result = cpcx("cache", "import", str(src), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1
    assert _one_line(result) == (f"✘ {src}: 1 of 1 answers are not valid for their request (line 1: you left out "
                                 "dog); nothing imported; delete those lines or re-export them from the cache that "
                                 "made them")


# ------------------------------------------------------------------------------- unexpected errors
KEY = "sk-test-0123456789abcdef"
BOOM = ("import cpcx.recipe\n"
        "def boom(*args, **kwargs):\n"
        f"    raise ValueError('the server echoed {KEY} back\\nsecond line')\n"
        "cpcx.recipe.load_recipe = boom")


def _crash_env(tmp_path: Path, **extra: str) -> dict:
    return {"OPENAI_API_KEY": KEY, "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path / "home"),
            "TMPDIR": str(tmp_path / "tmp"), **extra}


def test_unexpected_error_is_one_line_and_a_redacted_log(tmp_path, good_recipe):
    result = cpcx("validate", "-r", str(good_recipe), pre=BOOM, env=_crash_env(tmp_path))
    assert result.returncode == 1
    line = _one_line(result)
    logs = list((tmp_path / "state" / "cpcx" / "logs").glob("crash-*.log"))
    assert len(logs) == 1
    assert line == (f"✘ unexpected error: ValueError: the server echoed [redacted $OPENAI_API_KEY] back; the traceback is in {logs[0]} "
                    "(CPCX_DEBUG=1 or --debug prints it here); please report it")
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text and "second line" in text
    assert KEY not in text + result.stderr + result.stdout
    assert oct(logs[0].stat().st_mode & 0o777) == "0o600"


def test_unexpected_error_log_falls_back_to_the_temp_dir(tmp_path, good_recipe):
    (tmp_path / "tmp").mkdir()
    env = _crash_env(tmp_path, XDG_STATE_HOME="/proc/no-such-state", HOME="/proc/no-such-home")
    result = cpcx("validate", "-r", str(good_recipe), pre=BOOM, env=env)
    assert result.returncode == 1
    logs = list((tmp_path / "tmp").glob("cpcx-logs-*/crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in _one_line(result)


@pytest.mark.parametrize("switch", ["env", "option"])
def test_debug_switch_shows_the_traceback_redacted(tmp_path, good_recipe, switch):
    env = _crash_env(tmp_path, **({"CPCX_DEBUG": "1"} if switch == "env" else {}))
    args = ["--debug"] * (switch == "option") + ["validate", "-r", str(good_recipe)]
    result = cpcx(*args, pre=BOOM, env=env)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "in boom" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("✘ unexpected error: ValueError: the server echoed [redacted $OPENAI_API_KEY] back")
    assert KEY not in result.stderr + result.stdout


def test_key_named_by_the_recipe_is_redacted(tmp_path, voc_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "r", "dataset": {"kind": "voc", "root": str(voc_root)},
        "llm": {"provider": "openai", "api_key_env": "MY_LLM_CREDENTIAL"},
    }))
    pre = ("import cpcx.clusters\n"
           "def boom(*args, **kwargs):\n"
           "    import os; raise RuntimeError('got ' + os.environ['MY_LLM_CREDENTIAL'])\n"
           "cpcx.clusters.run_clusters = boom")
    result = cpcx("clusters", "-r", str(recipe), pre=pre, env=_crash_env(tmp_path, MY_LLM_CREDENTIAL="hunter2-secret"))
    assert result.returncode == 1
    assert "RuntimeError: got [redacted $MY_LLM_CREDENTIAL]" in _one_line(result)
    log = next((tmp_path / "state" / "cpcx" / "logs").glob("crash-*.log")).read_text()
    assert "hunter2-secret" not in log and "got [redacted $MY_LLM_CREDENTIAL]" in log


def test_user_errors_and_exits_are_not_reported_as_crashes(tmp_path, good_recipe):
    result = cpcx("validate", "-r", str(tmp_path / "missing.yaml"), env=_crash_env(tmp_path))
    assert result.returncode == 2 and "unexpected" not in result.stderr
    result = cpcx("doctor", "-r", str(good_recipe), env=_crash_env(tmp_path))  # ends with typer.Exit
    assert "unexpected" not in result.stderr + result.stdout
    assert not (tmp_path / "state").exists()


def test_unexpected_error_line_survives_an_ascii_terminal(tmp_path, good_recipe):
    result = cpcx("validate", "-r", str(good_recipe), pre=BOOM, env=_crash_env(tmp_path, PYTHONIOENCODING="ascii"))
    assert result.returncode == 1
    assert _one_line(result).startswith("\\u2718 unexpected error: ValueError: the server echoed [redacted $OPENAI_API_KEY] back")
