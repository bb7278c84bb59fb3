"""Real local models: ``cpcx clusters`` for the 20 VOC classes through the ``openai`` provider against
llama-cpp-python serving base Gemma-3-270M and Qwen2.5-Coder-0.5B-Instruct (``tests/llm/serve.sh run`` =
``make test-llm``).

What must hold for any model: a valid partition, the same file from two cold runs, and a warm replay that calls
nothing. The base 270M model clusters nothing (it puts every class on its own); the instruction-tuned Qwen model
groups classes, which is what the cluster token needs: that is checked of it alone.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
from paths import VOC_ROOT
import yaml
from rich.console import Console

from cpcx.clusters import load_clusters, run_clusters
from cpcx.llm.cache import export_cache, import_cache
from cpcx.recipe import load_recipe

pytestmark = pytest.mark.llm

VOC = VOC_ROOT
#: model → (the environment variable that holds its server's URL, the model alias the server answers to)
MODELS = {"gemma": ("CPCX_LLM_URL", "gemma-3-270m"), "qwen": ("CPCX_QWEN_URL", "qwen2.5-coder-0.5b-instruct")}


def server(model: str) -> tuple[str, str]:
    """(base URL, model alias) of a running server, or a skip that says how to start one."""
    env, alias = MODELS[model]
    url = os.environ.get(env)
    if not url:
        pytest.skip(f"no local {model} server ({env} unset): run `tests/llm/serve.sh run` (make test-llm)")
    return url, alias


def clusters_run(tmp_path: Path, model: str, cache: str, mode: str = "use") -> tuple[bytes, str]:
    base_url, alias = server(model)
    recipe = {
        "name": f"voc-{model}", "runs_dir": str(tmp_path / f"runs-{cache}-{mode}"),
        "dataset": {"kind": "voc", "root": str(VOC)},
        "llm": {"provider": "openai", "model": alias, "base_url": base_url,
                "schema_style": "json_object",  # llama-cpp-python's form of a schema-constrained answer
                "max_tokens": 512, "timeout_s": 300, "max_retries": 1,
                "cache_dir": str(tmp_path / cache), "cache_mode": mode},
        "clustering": {"queries": 3, "max_refine_iters": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    console = Console(file=io.StringIO(), width=200)
    out = run_clusters(load_recipe(path), console=console)
    return out.read_bytes(), console.file.getvalue()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_local_model_clusters_voc_validly_deterministically_and_replays(tmp_path, model):
    first, text = clusters_run(tmp_path, model, "cache-a")
    calls = int(re.search(r"(\d+) calls\)", text).group(1))
    assert calls >= 4  # 3 generate queries + at least one refine
    data = json.loads(first)
    members = [m for cluster in data["clusters"] for m in cluster["members"]]
    assert sorted(members) == sorted(data["classes"]) and len(data["classes"]) == 20
    assert all(cluster["name"].strip() for cluster in data["clusters"])
    clusters = load_clusters(tmp_path / "runs-cache-a-use" / f"voc-{model}" / "clusters" / "clusters.json")
    assert clusters.matrix.shape == (20, len(data["clusters"])) and (clusters.matrix.sum(axis=1) == 1).all()

    second, _ = clusters_run(tmp_path, model, "cache-b")  # a cold run again: same answers, same bytes
    assert second == first

    warm, text = clusters_run(tmp_path, model, "cache-a")
    assert warm == first and " 0 calls)" in text

    export_cache(tmp_path / "cache-a", tmp_path / "answers.jsonl")  # replay elsewhere, offline, read-only
    import_cache(tmp_path / "cache-c", tmp_path / "answers.jsonl")
    replay, text = clusters_run(tmp_path, model, "cache-c", mode="readonly")
    assert replay == first and " 0 calls)" in text


def test_the_instruction_tuned_model_groups_the_voc_classes(tmp_path):
    """Qwen (greedy, seed 0) puts the VOC animals together and needs far fewer clusters than classes: a cluster
    token that carries a grouping, unlike base Gemma's one cluster per class."""
    answer, _ = clusters_run(tmp_path, "qwen", "cache-q")
    groups = [set(cluster["members"]) for cluster in json.loads(answer)["clusters"]]
    assert len(groups) <= 12
    assert any({"cat", "dog", "cow", "sheep"} <= group for group in groups)
    assert not any({"cat", "car"} <= group for group in groups)
