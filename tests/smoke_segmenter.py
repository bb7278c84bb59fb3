"""A real segment checkpoint for the tests of `cpcx predict` and `cpcx export`: the smoke recipe's segmenter
(EfficientNet-Lite0 DeepLabV3+ with the offline ImageNet encoder weights), trained for its one epoch on 16 VOC
images whose ground-truth masks stand in for the pseudo-labels (the earlier stages are not what is tested)."""
from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"


def train_smoke_segmenter(runs_dir: Path, voc_root: Path) -> list[str]:
    """Train it under ``runs_dir`` → the overrides that point ``recipes/smoke.yaml`` at it (CLI and load_recipe)."""
    from cpcx.data import build_dataset, save_label_png
    from cpcx.recipe import load_recipe
    from cpcx.segment import run_segment

    overrides = [f"runs_dir={runs_dir}", f"dataset.root={voc_root}"]
    recipe = load_recipe(SMOKE, overrides)
    train = build_dataset(recipe.dataset, "train")
    for i, image_id in enumerate(train.ids):
        save_label_png(recipe.run_dir("pseudo") / "labels" / f"{image_id}.png", train.load_mask(i))
    run_segment(recipe, console=Console(file=io.StringIO()))
    assert (recipe.run_dir("segment") / "weights" / "best.pt").is_file()
    return overrides
