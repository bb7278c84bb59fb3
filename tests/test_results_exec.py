"""benchmarks/results_exec.py: the results pair every benchmark writes (json + its markdown table)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import results_exec  # noqa: E402


def test_write_report_writes_the_pair_into_a_new_folder_and_returns_the_table(tmp_path):
    out = tmp_path / "new" / "probe"
    text = results_exec.write_report({"b": 2, "a": [1]}, out, lambda doc: f"# {doc['b']}\n")
    assert text == "# 2\n" == (tmp_path / "new" / "probe.md").read_text()
    assert json.loads((tmp_path / "new" / "probe.json").read_text()) == {"a": [1], "b": 2}
    assert not [p for p in (tmp_path / "new").iterdir() if p.name not in ("probe.json", "probe.md")]  # no temp left


def test_save_results_stamps_the_machine_and_writes_through_write_report(tmp_path):
    results = {"rows": []}
    results_exec.save_results(results, tmp_path, "speed", lambda doc: doc["machine"])
    stored = json.loads((tmp_path / "speed.json").read_text())
    assert stored["date"] and "cores" in stored["machine"]
    assert (tmp_path / "speed.md").read_text() == stored["machine"]


def test_command_line_names_the_script_under_benchmarks_and_its_arguments():
    assert results_exec.command_line("/any/where/boundary_band.py", ["--runs", "a", "b"]) == \
        "benchmarks/boundary_band.py --runs a b"
