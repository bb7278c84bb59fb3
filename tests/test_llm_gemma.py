"""A real local model: ``cpcx clusters`` for the 20 VOC classes through the ``openai`` provider against
Gemma-3-270M served by llama-cpp-python (``tests/llm/serve_gemma.sh run`` = ``make test-llm``).

The base 270M model clusters nothing (it tends to put every class on its own): the test checks what must hold
for any model: a valid partition, the same file from two cold runs, and a warm replay that calls nothing.
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

URL = os.environ.get("CPCX_LLM_URL")
VOC = VOC_ROOT


@pytest.fixture(scope="module")
def base_url() -> str:
    if not URL:
        pytest.skip("no local LLM server: run `tests/llm/serve_gemma.sh run` (make test-llm)")
    return URL


def clusters_run(tmp_path: Path, base_url: str, cache: str, mode: str = "use") -> tuple[bytes, str]:
    recipe = {
        "name": "voc-gemma", "runs_dir": str(tmp_path / f"runs-{cache}-{mode}"),
        "dataset": {"kind": "voc", "root": str(VOC)},
        "llm": {"provider": "openai", "model": "gemma-3-270m", "base_url": base_url,
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


def test_gemma_clusters_voc_validly_deterministically_and_replays(tmp_path, base_url):
    first, text = clusters_run(tmp_path, base_url, "cache-a")
    calls = int(re.search(r"(\d+) calls\)", text).group(1))
    assert calls >= 4  # 3 generate queries + at least one refine
    data = json.loads(first)
    members = [m for cluster in data["clusters"] for m in cluster["members"]]
    assert sorted(members) == sorted(data["classes"]) and len(data["classes"]) == 20
    assert all(cluster["name"].strip() for cluster in data["clusters"])
    clusters = load_clusters(tmp_path / "runs-cache-a-use" / "voc-gemma" / "clusters" / "clusters.json")
    assert clusters.matrix.shape == (20, len(data["clusters"])) and (clusters.matrix.sum(axis=1) == 1).all()

    second, _ = clusters_run(tmp_path, base_url, "cache-b")  # a cold run again: same answers, same bytes
    assert second == first

    warm, text = clusters_run(tmp_path, base_url, "cache-a")
    assert warm == first and " 0 calls)" in text

    export_cache(tmp_path / "cache-a", tmp_path / "answers.jsonl")  # replay elsewhere, offline, read-only
    import_cache(tmp_path / "cache-c", tmp_path / "answers.jsonl")
    replay, text = clusters_run(tmp_path, base_url, "cache-c", mode="readonly")
    assert replay == first and " 0 calls)" in text
