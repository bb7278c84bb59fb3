"""benchmarks/sweep_train.py: every variant is a valid recipe, and the table says what each row was."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sweep_train as sweep  # noqa: E402


@pytest.mark.parametrize("name", list(sweep.VARIANTS))
def test_every_variant_is_a_valid_recipe_that_changes_it(name, voc_root):
    from cpcx.recipe import load_recipe

    overrides, why = sweep.VARIANTS[name]
    base = load_recipe(ROOT / sweep.RECIPE, [f"name=sweep-{name}", *sweep.SHARED])
    variant = load_recipe(ROOT / sweep.RECIPE, [f"name=sweep-{name}", *sweep.SHARED, *overrides])
    assert why
    assert (variant.model_dump() != base.model_dump()) == bool(overrides)  # an override that changes nothing is a typo


def test_render_lists_each_row_with_its_overrides_and_scores():
    doc = {"rows": {"topk-3": {"overrides": ["model.topk=3"], "why": "fewer patches", "train_seconds": 151.2,
                               "miou": 0.4012, "fg_iou": 0.605, "fg_recall": 0.758, "fg_precision": 0.751,
                               "wrong_class_in_fg": 0.218}}}
    table = sweep.render(doc)
    assert "| topk-3: fewer patches | `model.topk=3` | 40.1 | 60.5 | 75.8 / 75.1 | 21.8 % | 151 |" in table


def test_unknown_variant_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--only", "nope"])
    assert "unknown variant(s) nope; pick from voc-mini" in capsys.readouterr().err


def test_merge_folds_parallel_outputs_in_variant_order(tmp_path):
    import json

    row = {"overrides": [], "why": "w", "train_seconds": 1.0, "miou": 0.4, "fg_iou": 0.6, "fg_recall": 0.7,
           "fg_precision": 0.7, "wrong_class_in_fg": 0.2}
    (tmp_path / "a.json").write_text(json.dumps({"date": "2026-11-30", "rows": {"topk-3": row}}))
    (tmp_path / "b.json").write_text(json.dumps({"date": "2026-11-30", "rows": {"voc-mini": row, "gone": row}}))
    out = tmp_path / "sweep"
    assert sweep.main(["--out", str(out), "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert sorted(json.loads(out.with_suffix(".json").read_text())["rows"]) == ["topk-3", "voc-mini"]  # "gone" dropped
    table = out.with_suffix(".md").read_text()
    assert table.count("| 40.0 |") == 2 and table.index("| voc-mini:") < table.index("| topk-3:")  # VARIANTS' order
