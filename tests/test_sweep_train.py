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
                               "miou": 0.4012, "fg_iou": 0.605, "wrong_class_in_fg": 0.218}}}
    table = sweep.render(doc)
    assert "| topk-3 (fewer patches) | `model.topk=3` | 40.1 | 60.5 | 21.8 % | 151 |" in table


def test_unknown_variant_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--only", "nope"])
    assert "unknown variant(s) nope; pick from voc-mini" in capsys.readouterr().err
