"""``cpcx clusters`` end to end: Algorithm 1 over the real VOC class list, through the real langchain clients,
against a scripted HTTP server on 127.0.0.1; the cache, the output file, the static provider, the CLI."""
from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from paths import VOC_ROOT
from fake_llm_server import FakeLLMServer
from rich.console import Console
from typer.testing import CliRunner

from cpcx.clusters import load_clusters, run_clusters
from cpcx.errors import CpcxError
from cpcx.llm.cache import FILE_NAME
from cpcx.recipe import load_recipe

VOC = VOC_ROOT
pytestmark = [
    pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC slice not found at {VOC} (set CPCX_DATA)"),
    pytest.mark.usefixtures("fast_backoff"),
]

VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
A = {"vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
     "animal": ["bird", "cat", "cow", "dog", "horse", "sheep"], "person": ["person"],
     "indoor": ["bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"]}
B = {"vehicle": A["vehicle"], "living": A["animal"] + ["person"], "household": A["indoor"]}
C = {name: [name] for name in VOC_NAMES}  # what a tiny model answers: every class on its own


def mapping(partition: dict[str, list[str]]) -> str:
    return json.dumps({member: name for name, members in partition.items() for member in members})


def groups(clusters: list[dict]) -> list[list[str]]:
    return [c["members"] for c in clusters]


def canonical(partition: dict[str, list[str]]) -> list[list[str]]:
    order = {c: i for i, c in enumerate(VOC_NAMES)}
    return sorted((sorted(m, key=order.get) for m in partition.values()), key=lambda m: order[m[0]])


def write_recipe(tmp_path: Path, llm: dict, clustering: dict | None = None) -> Path:
    path = tmp_path / "recipe.yaml"
    recipe = {"name": "t", "runs_dir": str(tmp_path / "runs"), "dataset": {"kind": "voc", "root": str(VOC)},
              "llm": llm, "clustering": clustering or {}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def recipe_for(tmp_path: Path, server: FakeLLMServer, overrides: tuple[str, ...] = (), provider: str = "openai",
               **clustering):
    llm = {"provider": provider, "model": "fake-model", "timeout_s": 5, "max_retries": 1,
           "base_url": server.openai_url if provider == "openai" else server.url, "cache_dir": str(tmp_path / "cache")}
    return load_recipe(write_recipe(tmp_path, llm, clustering), list(overrides))


def run(recipe, dry_run: bool = False) -> tuple[Path, str]:
    console = Console(file=io.StringIO(), width=240)
    out = run_clusters(recipe, dry_run=dry_run, console=console)
    return out, console.file.getvalue()


# ------------------------------------------------------------------------------------------ Algorithm 1
def test_vote_then_refine_until_three_equal(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=3, max_refine_iters=6)
    server.push(mapping(A), mapping(B), mapping(A),  # R = 3 queries: A wins 2-1
                mapping(B), mapping(B), mapping(B))  # refine: z1 = z2 = z3 = B, stop
    out, text = run(recipe)
    data = json.loads(out.read_text())
    assert out == tmp_path / "runs" / "t" / "clusters" / "clusters.json"
    assert data["classes"] == list(VOC_NAMES) and groups(data["clusters"]) == canonical(B)
    assert [e["count"] for e in data["vote"]["histogram"]] == [2, 1] and data["vote"]["winner"] == 0
    assert data["vote"]["histogram"][0]["queries"] == [1, 3]
    assert data["refine"]["converged"] is True and data["refine"]["iterations"] == 3
    assert [groups(z) for z in data["refine"]["trace"]] == [canonical(A)] + [canonical(B)] * 3
    assert data["provider"] == "openai" and data["model"] == "fake-model"
    assert len(data["prompts"]["generate"]["sha256"]) == 64 and data["answer_shape"] == "mapping"
    assert "3 clusters of 20 classes" in text and "converged" in text

    requests = server.chat_requests
    assert len(requests) == 6
    assert requests[0].body["messages"] == requests[2].body["messages"]  # the same p_gen ‖ l, R times
    # ... sampled with seed + r: a server that honours the seed would otherwise answer R copies of one answer
    assert [r.body["seed"] for r in requests] == [1, 2, 3, 0, 0, 0]
    refine_prompt = requests[3].body["messages"][-1]["content"]
    assert "- vehicle: aeroplane, bicycle, boat, bus, car, motorbike, train" in refine_prompt  # p_refine ‖ z0
    assert "- living: bird, cat, cow, dog, horse, sheep, person" not in refine_prompt

    answers = json.loads((out.parent / "answers.json").read_text())
    assert [(a["stage"], a["query"]) for a in answers] == [("generate", 1), ("generate", 2), ("generate", 3),
                                                           ("refine", 0), ("refine", 1), ("refine", 2)]
    assert answers[1]["raw"] == mapping(B) and len({a["key"] for a in answers}) == 6

    clusters = load_clusters(out)
    assert clusters.classes == VOC_NAMES and clusters.matrix.dtype == np.float32
    assert clusters.matrix.shape == (20, 3) and clusters.matrix.sum(axis=1).tolist() == [1.0] * 20
    labels = np.zeros(21, dtype=np.float32)
    labels[[0, VOC_NAMES.index("cat") + 1, VOC_NAMES.index("person") + 1]] = 1  # background, cat, person
    assert np.clip(labels[1:] @ clusters.matrix, 0, 1).tolist() == [0.0, 1.0, 0.0]


def test_pairs_vote_keeps_what_answers_that_never_repeat_agree_on(tmp_path, server):
    """Three sampled answers, no two the same partition: the paper's vote keeps the first; ``vote: pairs``
    keeps what most of them agree on pair by pair, and the refine prompt starts from that."""
    d = {**A, "animal": ["bird", "cat", "cow", "dog", "horse"], "farm": ["sheep"]}  # sheep split off
    e = {**A, "vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike"], "rail": ["train"]}
    answers = (mapping(B), mapping(d), mapping(e))
    server.push(*answers)
    (tmp_path / "partition").mkdir()
    (tmp_path / "pairs").mkdir()
    first, text = run(recipe_for(tmp_path / "partition", server, queries=3, refine=False))
    assert groups(json.loads(first.read_text())["clusters"]) == canonical(B) and "z0 got 1/3" in text

    server.push(*answers, mapping(A), mapping(A))  # refine: z1 = z2 = z0, converged
    out, text = run(recipe_for(tmp_path / "pairs", server, queries=3, max_refine_iters=4, vote="pairs"))
    data = json.loads(out.read_text())
    assert groups(data["vote"]["z0"]) == canonical(A)  # person with the animals in 1 of 3, sheep and train in 2
    assert data["vote"]["method"] == "pairs" and len(data["vote"]["histogram"]) == 3
    assert "z0 = their consensus pair by pair (4 clusters, equal to 0/3 answers)" in text
    first_refine = server.chat_requests[3 + 3].body["messages"][-1]["content"]  # after 3 + 3 generate queries
    assert "- person: person" in first_refine and "- household: bottle, chair" in first_refine
    assert data["refine"]["iterations"] == 2 and groups(data["clusters"]) == canonical(A)


def test_warm_rerun_makes_no_call_and_writes_the_same_bytes(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=2, max_refine_iters=3)
    server.push(mapping(A), mapping(A), mapping(A), mapping(A))
    out, _ = run(recipe)
    first, calls = out.read_bytes(), len(server.chat_requests)
    assert calls == 4

    out, text = run(recipe)
    assert len(server.chat_requests) == calls and out.read_bytes() == first
    assert "4 from the cache, 0 calls" in text
    out, _ = run(recipe_for(tmp_path, server, ("llm.cache_mode=readonly",), queries=2, max_refine_iters=3))
    assert len(server.chat_requests) == calls and out.read_bytes() == first

    _, text = run(recipe_for(tmp_path, server, queries=2, max_refine_iters=3), dry_run=True)
    assert text.count("(cached)") == 2 and len(server.chat_requests) == calls

    server.push(mapping(A), mapping(A), mapping(A), mapping(A))
    run(recipe_for(tmp_path, server, ("llm.cache_mode=refresh",), queries=2, max_refine_iters=3))
    assert len(server.chat_requests) == 2 * calls

    other = recipe_for(tmp_path, server, ("llm.cache_mode=readonly", f"llm.cache_dir={tmp_path / 'empty'}"),
                       queries=2)
    with pytest.raises(CpcxError, match=r"readonly, and the cache .* has no answer for generate query 1"):
        run(other)


def test_invalid_answer_is_asked_again_with_feedback(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=1, refine=False)
    bad = mapping({k: [m for m in v if m != "bus"] for k, v in A.items()})
    server.push(bad, mapping(A))
    out, _ = run(recipe)
    assert groups(json.loads(out.read_text())["clusters"]) == canonical(A)
    retry = server.chat_requests[1].body["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    assert retry[2]["content"] == bad and "you left out bus" in retry[3]["content"]
    (answer,) = json.loads((out.parent / "answers.json").read_text())
    assert answer["attempts"] == [bad, mapping(A)] and answer["raw"] == mapping(A)


def test_prose_and_fences_around_the_json(tmp_path, server):
    recipe = recipe_for(tmp_path, server, ("llm.json_schema=false",), queries=2, refine=False)
    server.push("Sure! Here is the grouping:\n" + mapping(A) + "\nI hope {this} helps.",
                "```json\n" + json.dumps(json.loads(mapping(A)), indent=2) + "\n```")
    out, _ = run(recipe)
    data = json.loads(out.read_text())
    assert data["vote"]["histogram"][0]["count"] == 2 and data["refine"] is None
    assert len(server.chat_requests) == 2 and "response_format" not in server.chat_requests[0].body
    assert data["schema_enforced"] is False


@pytest.mark.parametrize("bad, phrase", [
    (json.dumps({**json.loads(mapping(A)), "kitten": "animal"}), "not in the class list: kitten"),
    (json.dumps({"clusters": [{"name": "all", "members": list(VOC_NAMES)}, {"name": "pets", "members": ["cat"]}]}),
     "given more than once: cat"),
])
def test_answers_that_stay_invalid_fail_clearly(tmp_path, server, bad, phrase):
    recipe = recipe_for(tmp_path, server, queries=2, refine=False, max_retries=1)
    server.push(bad, bad)
    with pytest.raises(CpcxError) as info:
        run(recipe)
    message = str(info.value)
    assert "generate query 1" in message and phrase in message and "after 2 tries" in message
    kept = json.loads((tmp_path / "runs" / "t" / "clusters" / "invalid-answers.json").read_text())
    assert kept["attempts"] == [bad, bad]
    assert not (tmp_path / "cache" / FILE_NAME).exists()  # invalid answers are never cached


def test_vote_ties_go_to_the_earliest_partition(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=4, refine=False)
    server.push(mapping(B), mapping(A), mapping(A), mapping(B))
    out, _ = run(recipe)
    data = json.loads(out.read_text())
    assert [e["count"] for e in data["vote"]["histogram"]] == [2, 2]
    assert groups(data["clusters"]) == canonical(B) and len(server.chat_requests) == 4


def test_refine_that_never_converges_keeps_the_last_and_warns(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=1, max_refine_iters=4)
    server.push(mapping(A), mapping(B), mapping(A), mapping(B), mapping(C))
    out, text = run(recipe)
    data = json.loads(out.read_text())
    assert data["refine"]["converged"] is False and data["refine"]["iterations"] == 4
    assert groups(data["clusters"]) == canonical(C) and len(data["clusters"]) == 20
    assert "did not converge in 4 iterations" in text and "kept the last partition z_4 (20 clusters" in text
    assert len(server.chat_requests) == 5


def test_dry_run_sends_and_writes_nothing(tmp_path, server):
    recipe = recipe_for(tmp_path, server, queries=3)
    out, text = run(recipe, dry_run=True)
    assert server.requests == [] and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    assert "- diningtable" in text and text.count("(not cached)") == 3 and "p_refine" in text
    assert out == tmp_path / "runs" / "t" / "clusters" / "clusters.json"


def test_api_key_reaches_the_server_but_no_file(tmp_path, server, monkeypatch):
    secret = "sk-cpcx-test-5ecret-0f-th1s-run"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    recipe = recipe_for(tmp_path, server, queries=2, max_refine_iters=2)
    server.push(mapping(A), mapping(A), mapping(A), mapping(A))
    run(recipe)
    assert server.chat_requests[0].headers["authorization"] == f"Bearer {secret}"
    files = [p for root in (tmp_path / "cache", tmp_path / "runs") for p in root.rglob("*") if p.is_file()]
    assert any(p.name == FILE_NAME for p in files) and any(p.name == "clusters.json" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_ollama_provider_with_the_list_shape(tmp_path, server):
    recipe = recipe_for(tmp_path, server, provider="ollama", queries=2, refine=False, answer_shape="list")
    listed = json.dumps({"clusters": [{"name": k, "members": v} for k, v in B.items()]})
    server.push(listed, listed)
    out, _ = run(recipe)
    assert groups(json.loads(out.read_text())["clusters"]) == canonical(B)
    body = server.chat_requests[0].body
    assert body["format"]["required"] == ["clusters"] and "members" in body["messages"][-1]["content"]
    assert [r.body["options"]["seed"] for r in server.chat_requests] == [1, 2]


# ------------------------------------------------------------------------------------------ static + CLI
def test_static_clusters_are_checked_against_the_data_set(tmp_path):
    path = write_recipe(tmp_path, {"provider": "static", "clusters": A})
    out, text = run(load_recipe(path))
    data = json.loads(out.read_text())
    assert data["provider"] == "static" and groups(data["clusters"]) == canonical(A)
    assert load_clusters(out).matrix.shape == (20, 4) and "4 clusters of 20 classes" in text

    for clusters, phrase in (
        ({**A, "animal": A["animal"] + ["kitten"]}, "llm.clusters.animal: 'kitten' is not a class"),
        ({**A, "pets": ["cat"]}, "class 'cat' is listed in both 'animal' and 'pets'"),
        ({k: v for k, v in A.items() if k != "person"}, "classes in no cluster: person"),
    ):
        with pytest.raises(CpcxError, match=phrase):
            run(load_recipe(write_recipe(tmp_path, {"provider": "static", "clusters": clusters})))


def test_cli_unreachable_server_is_one_line(tmp_path):
    from cpcx.cli import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write_recipe(tmp_path, {"provider": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1",
                                   "max_retries": 0, "cache_dir": str(tmp_path / "cache")})
    result = CliRunner().invoke(app, ["clusters", "-r", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "connection refused" in lines[0] and f"127.0.0.1:{port}" in lines[0] and "after 1 try" in lines[0]
