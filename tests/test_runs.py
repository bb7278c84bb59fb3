"""Atomic writes, run folders, stage fingerprints and the `cpcx run` plan."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from cpcx import atomic
from cpcx.pipeline import plan
from cpcx.recipe import load_recipe
from cpcx.runs import fingerprint, mark_stage_done, prepare_stage_dir, read_stage_state


@pytest.fixture
def recipe_path(tmp_path, voc_root):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"),
        "dataset": {"kind": "voc", "root": str(voc_root)},
        "llm": {"provider": "static", "clusters": {"a": ["cat"]}},
    }))
    return path


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text() == atomic.write_json(tmp_path / "y.json", {"a": [1, 2], "b": 1}).read_text()

    def boom(handle):
        handle.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, boom)
    assert json.loads(target.read_text())["b"] == 1
    assert sorted(os.listdir(tmp_path)) == ["x.json", "y.json"]


def test_append_csv_row(tmp_path):
    path = tmp_path / "m.csv"
    atomic.append_csv_row(path, ["epoch", "loss"], [1, 0.5])
    atomic.append_csv_row(path, ["epoch", "loss"], [2, 0.25])
    assert path.read_text() == "epoch,loss\n1,0.5\n2,0.25\n"


def test_stage_dir_holds_resolved_recipe_and_env(recipe_path):
    recipe = load_recipe(recipe_path)
    folder = prepare_stage_dir(recipe, "train", device="cpu")
    assert yaml.safe_load((folder / "recipe.resolved.yaml").read_text())["name"] == "t"
    env = json.loads((folder / "env.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu"
    assert read_stage_state(recipe, "train")["status"] == "running"


def test_fingerprints_follow_upstream_sections_and_ignore_neutral_keys(recipe_path):
    base = load_recipe(recipe_path)
    changed_crf = load_recipe(recipe_path, ["crf.bi_w=5"])
    assert fingerprint(base, "train") == fingerprint(changed_crf, "train")
    assert fingerprint(base, "pseudo") != fingerprint(changed_crf, "pseudo")
    assert fingerprint(base, "segment") != fingerprint(changed_crf, "segment")  # downstream of pseudo
    assert fingerprint(base, "pseudo") == fingerprint(load_recipe(recipe_path, ["pseudo.workers=1"]), "pseudo")
    assert fingerprint(base, "clusters") != fingerprint(load_recipe(recipe_path, ["clustering.queries=3"]), "clusters")


def test_options_added_later_leave_fingerprints_alone_at_their_old_behaviour(recipe_path):
    """A recipe that does not use train.trunk_cache / train.backbone_lr / pseudo.scales / pseudo.class_probe /
    pseudo.self_training / pseudo.context_paste / pseudo.saliency / clustering.vote hashes as it did before those options existed (the dump without them); setting one changes
    the fingerprint of its stage."""
    import hashlib
    import json

    from cpcx.runs import STAGES, _strip_neutral

    base = load_recipe(recipe_path, [])
    dumped = base.model_dump(mode="json")
    for section, key in (("train", "trunk_cache"), ("train", "backbone_lr"), ("pseudo", "scales"),
                         ("pseudo", "class_probe"), ("pseudo", "self_training"), ("clustering", "vote"),
                         ("model", "feature_strides"), ("pseudo", "context_paste"),
                         ("model", "fuse"), ("pseudo", "saliency")):
        del dumped[section][key]
    sections = [s for stage in ("clusters", "train", "pseudo") for s in STAGES[stage]]
    before = hashlib.sha256(json.dumps({s: _strip_neutral(dumped[s]) for s in sections}, sort_keys=True).encode())
    assert fingerprint(base, "pseudo") == before.hexdigest()[:16]
    assert fingerprint(base, "train") != fingerprint(load_recipe(recipe_path, ["train.backbone_lr=0.0001"]), "train")
    assert fingerprint(base, "train") != fingerprint(load_recipe(recipe_path, ["train.trunk_cache=true"]), "train")
    assert fingerprint(base, "clusters") != fingerprint(load_recipe(recipe_path, ["clustering.vote=pairs"]), "clusters")
    scaled = load_recipe(recipe_path, ["pseudo.scales=[1.0, 1.5]"])
    assert fingerprint(base, "train") == fingerprint(scaled, "train")
    assert fingerprint(base, "pseudo") != fingerprint(scaled, "pseudo")
    probed = load_recipe(recipe_path, ["pseudo.class_probe.enabled=true"])
    assert fingerprint(base, "train") == fingerprint(probed, "train")
    assert fingerprint(base, "pseudo") != fingerprint(probed, "pseudo")
    mixed = load_recipe(recipe_path, ["pseudo.class_probe.enabled=true", "pseudo.class_probe.mix=0.8"])
    assert fingerprint(probed, "pseudo") != fingerprint(mixed, "pseudo")
    trained = load_recipe(recipe_path, ["pseudo.self_training.enabled=true"])
    assert fingerprint(base, "train") == fingerprint(trained, "train")
    assert fingerprint(base, "pseudo") != fingerprint(trained, "pseudo")
    # a key added inside pseudo.self_training later: a switched-on run hashes as before it existed
    dumped = trained.model_dump(mode="json")
    del dumped["pseudo"]["self_training"]["first_pass_crf"]
    for section, key in (("train", "trunk_cache"), ("train", "backbone_lr"), ("pseudo", "scales"),
                         ("pseudo", "class_probe"), ("clustering", "vote"), ("model", "feature_strides"),
                         ("model", "fuse"), ("pseudo", "context_paste"), ("pseudo", "saliency")):
        del dumped[section][key]
    before = hashlib.sha256(json.dumps({s: _strip_neutral(dumped[s]) for s in sections}, sort_keys=True).encode())
    assert fingerprint(trained, "pseudo") == before.hexdigest()[:16]
    no_first_crf = load_recipe(recipe_path, ["pseudo.self_training.enabled=true",
                                             "pseudo.self_training.first_pass_crf=false"])
    assert fingerprint(trained, "pseudo") != fingerprint(no_first_crf, "pseudo")
    set_but_off = load_recipe(recipe_path, ["pseudo.self_training.first_pass_crf=false"])
    assert fingerprint(base, "pseudo") != fingerprint(set_but_off, "pseudo")  # off, yet set: a changed recipe
    frozen = load_recipe(recipe_path, ["train.unfreeze_blocks=0"])
    pasted = load_recipe(recipe_path, ["train.unfreeze_blocks=0", "pseudo.context_paste.enabled=true"])
    assert fingerprint(frozen, "train") == fingerprint(pasted, "train")
    assert fingerprint(frozen, "pseudo") != fingerprint(pasted, "pseudo")
    fused = load_recipe(recipe_path, ["model.fuse.backbone=tf_efficientnet_lite0", "model.fuse.feature_strides=[16]"])
    assert fingerprint(base, "clusters") == fingerprint(fused, "clusters")
    assert fingerprint(base, "train") != fingerprint(fused, "train")
    # segment.saliency (added later, test-time only): off it leaves the segment stage as it was, whatever its neutral
    # keys say; on, it changes the segment stage alone
    dumped = base.model_dump(mode="json")
    for section, key in (("train", "trunk_cache"), ("train", "backbone_lr"), ("pseudo", "scales"),
                         ("pseudo", "class_probe"), ("pseudo", "self_training"), ("clustering", "vote"),
                         ("model", "feature_strides"), ("pseudo", "context_paste"), ("model", "fuse"),
                         ("pseudo", "saliency"), ("segment", "saliency"), ("segment", "head_channels"),
                         ("segment", "aspp_rates"), ("segment", "labels"), ("segment", "optimizer"),
                         ("segment", "freeze_encoder")):
        dumped[section].pop(key, None)
    sections = [s for stage in STAGES for s in STAGES[stage]]
    before = hashlib.sha256(json.dumps({s: _strip_neutral(dumped[s]) for s in sections}, sort_keys=True).encode())
    assert fingerprint(base, "segment") == before.hexdigest()[:16]
    for neutral in ("segment.saliency.workers=4", "segment.saliency.cache_dir=/tmp/maps",
                    "pseudo.saliency.cache_dir=x"):
        assert fingerprint(base, "segment") == fingerprint(load_recipe(recipe_path, [neutral]), "segment"), neutral
    weights = recipe_path.parent / "isnet.onnx"
    weights.write_bytes(b"stand-in")
    lit = load_recipe(recipe_path, ["segment.saliency.enabled=true", f"segment.saliency.weights={weights}"])
    assert fingerprint(base, "pseudo") == fingerprint(lit, "pseudo")
    assert fingerprint(base, "segment") != fingerprint(lit, "segment")
    on = ["pseudo.saliency.enabled=true", f"pseudo.saliency.weights={weights}"]
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") == \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.multi_mode=mix"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") != \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.multi_mode=add"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") == \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.passes_multi=1"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") != \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.passes_multi=2"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") == \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.precision=float"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, on), "pseudo") != \
        fingerprint(load_recipe(recipe_path, [*on, "pseudo.saliency.precision=int8"]), "pseudo")
    # pseudo.context_paste.networks (added 6 Dec 2026): 1 is the older recipe, 2 another
    paste = ["pseudo.context_paste.enabled=true", "train.feature_cache=true", "train.unfreeze_blocks=0"]
    assert fingerprint(load_recipe(recipe_path, paste), "pseudo") == \
        fingerprint(load_recipe(recipe_path, [*paste, "pseudo.context_paste.networks=1"]), "pseudo")
    assert fingerprint(load_recipe(recipe_path, paste), "pseudo") != \
        fingerprint(load_recipe(recipe_path, [*paste, "pseudo.context_paste.networks=2"]), "pseudo")


def test_plan_skips_done_stages_resumes_interrupted_and_redoes_changed(recipe_path):
    recipe = load_recipe(recipe_path)
    assert plan(recipe) == {"clusters": "run", "train": "run", "pseudo": "run", "segment": "run"}
    from cpcx.clusters import class_names

    names = list(class_names(recipe))
    for stage in ("clusters", "train"):
        prepare_stage_dir(recipe, stage)
        mark_stage_done(recipe, stage)
    atomic.write_json(recipe.run_dir("clusters") / "clusters.json",
                      {"classes": names, "clusters": [{"name": "all", "members": names}]})
    # done, but its checkpoint is gone: the record alone is not trusted (issue 19)
    assert plan(recipe) == {"clusters": "skip", "train": "run", "pseudo": "run", "segment": "run"}
    atomic.write_bytes(recipe.run_dir("train") / "weights" / "best.pt", b"a checkpoint")
    prepare_stage_dir(recipe, "pseudo")  # interrupted: status running
    assert plan(recipe) == {"clusters": "skip", "train": "skip", "pseudo": "resume", "segment": "run"}
    changed = load_recipe(recipe_path, ["model.topk=3"])
    assert plan(changed) == {"clusters": "skip", "train": "run", "pseudo": "run", "segment": "run"}


def test_changed_recipe_drops_stale_pseudo_labels(recipe_path):
    recipe = load_recipe(recipe_path)
    folder = prepare_stage_dir(recipe, "pseudo")
    (folder / "labels").mkdir()
    (folder / "labels" / "a.png").write_bytes(b"x")
    prepare_stage_dir(recipe, "pseudo")  # same recipe: kept (resume)
    assert (folder / "labels" / "a.png").exists()
    prepare_stage_dir(load_recipe(recipe_path, ["crf.enabled=false"]), "pseudo")
    assert not (folder / "labels").exists()


def test_atomic_files_get_normal_permissions(tmp_path):
    path = atomic.write_text(tmp_path / "p.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
