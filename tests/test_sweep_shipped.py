"""benchmarks/sweep_shipped.py: every variant is a valid recipe that changes voc-mini, and the table keeps the
choose and report ids apart, seed by seed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_shipped as sweep  # noqa: E402


@pytest.mark.parametrize("name", list(sweep.VARIANTS))
def test_every_variant_is_a_valid_recipe_that_changes_what_it_says(name, voc_root):
    from cpcx.recipe_io import load_recipe
    from cpcx.runs import fingerprint

    overrides, why = sweep.VARIANTS[name]
    # check_inputs=False: the saliency variant names weights/isnet.onnx, which `make test` does not build (npm)
    base = load_recipe(ROOT / sweep.RECIPE, sweep.overrides_of("shipped", 0, "c"), check_inputs=False)
    variant = load_recipe(ROOT / sweep.RECIPE, sweep.overrides_of(name, 0, "c"), check_inputs=False)
    assert why and variant.name == f"sw-{name}-s0" and variant.seed == 0
    # An override that leaves the stages' fingerprints as they are is a typo (or a neutral key: not a variant).
    assert (fingerprint(variant, "pseudo") != fingerprint(base, "pseudo")) == bool(overrides)


def _entry(all_miou: float, choose: float) -> dict:
    part = {"miou": all_miou, "fg_iou": 60.0}
    parts = {p: dict(part) for p in sweep.PARTS}
    parts["choose"] = {"miou": choose, "fg_iou": 61.0}
    return {"parts": parts, "miou_no_crf": 50.0, "seconds": {"train": 100.0, "pseudo": 300.0}}


def test_render_gives_each_seed_and_keeps_choose_and_report_apart():
    doc = {"rows": {"topk3": {"1": _entry(56.0, 54.0), "0": _entry(55.0, 53.0)}}, "invocations": ["x"]}
    table = sweep.render(doc)
    assert "`.venv/bin/python x`" in table  # one invocation: its command heads the table
    row = next(line for line in table.splitlines() if line.startswith("| topk3:"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "0, 1"
    assert cells[3] == "55.5 ± 0.7 (60.0) [55.0 / 56.0]"  # seeds in order, not in the json's order
    assert cells[4] == "53.5 ± 0.7 (61.0)" and cells[5] == "55.5 ± 0.7 (60.0)"
    assert cells[8:] == ["100", "300"]


def test_unknown_variant_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--only", "nope"])
    assert "unknown variant(s) nope; pick from shipped" in capsys.readouterr().err


def test_merge_folds_seeds_of_parallel_sweeps_into_one_row(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"rows": {"topk3": {"0": _entry(55.0, 53.0)}},
                                                 "invocations": ["a"], "notes": ["made by a shell loop"]}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": {"topk3": {"1": _entry(56.0, 54.0)},
                                                          "shipped": {"0": _entry(55.8, 53.9)}},
                                                 "invocations": ["b"]}))
    out = tmp_path / "sweep"
    assert sweep.main(["--out", str(out), "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert list(doc["rows"]) == ["shipped", "topk3"] and sorted(doc["rows"]["topk3"]) == ["0", "1"]
    assert doc["invocations"] == ["a", "b"]
    assert "- made by a shell loop" in out.with_suffix(".md").read_text()


def test_score_only_skips_runs_that_do_not_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "RUNS_DIR", str(tmp_path / "none"))
    out = tmp_path / "sweep"
    assert sweep.main(["--only", "topk3", "--score-only", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == {}


def test_a_decoding_variant_copies_the_shipped_training_and_a_training_variant_does_not(tmp_path, monkeypatch,
                                                                                         voc_root):
    from cpcx.recipe_io import load_recipe
    from cpcx.runs import mark_stage_done, stage_is_current

    monkeypatch.setattr(sweep, "RUNS_DIR", str(tmp_path))
    recipe_of = {v: load_recipe(ROOT / sweep.RECIPE, sweep.overrides_of(v, 1, "c")) for v in ("shipped", "crf-t1",
                                                                                               "topk3")}
    shipped = recipe_of["shipped"]
    for stage in ("clusters", "train"):
        shipped.run_dir(stage).mkdir(parents=True)
        (shipped.run_dir(stage) / "weights.pt").write_text(stage)
        mark_stage_done(shipped, stage)
    decoding, training = recipe_of["crf-t1"], recipe_of["topk3"]
    assert sweep.reuse_shipped(decoding, shipped, "train") and stage_is_current(decoding, "train")
    assert (decoding.run_dir("train") / "weights.pt").read_text() == "train"
    assert not sweep.reuse_shipped(training, shipped, "train") and not training.run_dir("train").exists()
    assert sweep.reuse_shipped(training, shipped, "clusters")  # topk leaves the clusters as they are


def test_render_orders_the_rows_as_the_variants_are_listed_whatever_the_json_order():
    doc = {"rows": {"zz-unknown": {"0": _entry(1.0, 1.0)}, "topk3": {"0": _entry(2.0, 2.0)},
                    "shipped": {"0": _entry(3.0, 3.0)}}, "invocations": ["x", "y"]}
    rows = [line.split(":")[0] for line in sweep.render(doc).splitlines() if line.startswith("| ") and ":" in line
            and not line.startswith("| variant")]
    assert rows == ["| shipped", "| topk3", "| zz-unknown"]
