"""Answer parsing and validation, prompt templates, and the partition vote (no network)."""
from __future__ import annotations

import json

import pytest

from cpcx.data.classes import VOC_CLASSES
from cpcx.errors import CpcxError
from cpcx.llm.answers import AnswerError, answer_schema, example_answer, extract_json, parse_answer
from cpcx.llm.prompts import load_template
from cpcx.partition import Partition, consensus, converged, vote
from cpcx.recipe import PROMPTS_DIR

CLASSES = ("cat", "dog", "car", "bus", "pottedplant")
GOOD = {"cat": "animal", "dog": "animal", "car": "vehicle", "bus": "vehicle", "pottedplant": "plant"}
CANONICAL = [("animal", ("cat", "dog")), ("vehicle", ("car", "bus")), ("plant", ("pottedplant",))]


# ------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
    "Sure! Here are the clusters you asked for:\n\n" + json.dumps(GOOD) + "\n\nLet me know if {you} need more.",
    "I grouped them [roughly] like this ```\n" + json.dumps(GOOD) + "```",
])
def test_json_is_found_in_fences_and_prose(text):
    assert parse_answer(text, CLASSES) == CANONICAL


def test_no_json_is_an_answer_error():
    with pytest.raises(AnswerError, match="no JSON"):
        extract_json("I cannot help with that.")


# ------------------------------------------------------------------------------------ validation
def test_order_of_the_answer_does_not_matter():
    shuffled = dict(reversed(list(GOOD.items())))
    assert parse_answer(json.dumps(shuffled), CLASSES) == CANONICAL


@pytest.mark.parametrize("value", [
    {"clusters": [{"name": "animal", "members": ["cat", "dog"]}, {"name": "vehicle", "members": ["bus", "car"]},
                  {"name": "plant", "members": ["pottedplant"]}]},
    [{"name": "plant", "members": ["pottedplant"]}, {"name": "animal", "members": ["dog", "cat"]},
     {"name": "vehicle", "members": ["car", "bus"]}],
    {"animal": ["cat", "dog"], "vehicle": ["car", "bus"], "plant": ["pottedplant"]},
    {"Cat": "animal", "DOG": "Animal", "car": "vehicle", "bus": "vehicle", "Potted Plant": "plant"},
])
def test_every_accepted_form_gives_the_same_clusters(value):
    assert [members for _, members in parse_answer(json.dumps(value), CLASSES)] == [m for _, m in CANONICAL]


@pytest.mark.parametrize("text, phrase", [
    (json.dumps({k: v for k, v in GOOD.items() if k != "bus"}), "you left out bus"),
    (json.dumps({**GOOD, "kitten": "animal"}), "not in the class list: kitten"),
    ('{"cat": "animal", "cat": "pet", "dog": "animal", "car": "v", "bus": "v", "pottedplant": "p"}',
     "given more than once: cat"),
    (json.dumps({"clusters": [{"name": "a", "members": ["cat", "dog"]}, {"name": "b", "members": ["dog", "car",
                 "bus", "pottedplant"]}]}), "given more than once: dog"),
    (json.dumps({**GOOD, "car": "  "}), "no real cluster name"),
    (json.dumps({**GOOD, "car": "<cluster name>"}), "no real cluster name"),
])
def test_content_problems_are_named_for_the_model(text, phrase):
    with pytest.raises(AnswerError) as info:
        parse_answer(text, CLASSES)
    assert phrase in str(info.value)
    assert phrase in info.value.feedback and "exactly once" in info.value.feedback


def test_schema_requires_every_class_and_nothing_else():
    schema = answer_schema(VOC_CLASSES, "mapping")
    assert schema["required"] == list(VOC_CLASSES) and schema["additionalProperties"] is False
    members = answer_schema(VOC_CLASSES, "list")["properties"]["clusters"]["items"]["properties"]["members"]
    assert members["items"]["enum"] == list(VOC_CLASSES)
    assert json.loads(example_answer("mapping"))["banana"] == "fruit"


# ------------------------------------------------------------------------------------ partitions
def _p(*groups, names=None):
    names = names or [f"c{i}" for i in range(len(groups))]
    return Partition.from_assignment(list(zip(names, groups)), CLASSES)


def test_partitions_compare_without_names_or_order():
    a = _p(("cat", "dog"), ("car", "bus", "pottedplant"), names=["animal", "thing"])
    b = _p(("bus", "car", "pottedplant"), ("dog", "cat"), names=["objects", "pets"])
    assert a.groups == b.groups and a.names != b.names
    assert a.matrix(CLASSES).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]


def test_vote_picks_the_most_frequent_and_the_earliest_on_ties():
    a, b, c = _p(("cat", "dog", "car", "bus", "pottedplant")), _p(("cat", "dog"), ("car", "bus", "pottedplant")), \
        _p(*[(x,) for x in CLASSES])
    winner, hist = vote([a, b, b, c])
    assert hist[winner].partition.groups == b.groups and hist[winner].queries == (2, 3)
    winner, hist = vote([c, b, b, c])  # 2-2 tie: c came first
    assert hist[winner].partition.groups == c.groups and [e.count for e in hist] == [2, 2]
    winner, _ = vote([b, a, c])
    assert winner == 0


def test_pairwise_consensus_keeps_the_majority_pairs_and_does_not_chain():
    classes = ["cat", "dog", "cow", "car", "bus", "person"]

    def p(*clusters):
        return Partition.from_assignment(clusters, classes)

    answers = [p(("animal", ["cat", "dog", "cow"]), ("vehicle", ["car", "bus"]), ("human", ["person"])),
               p(("pet", ["cat", "dog"]), ("farm", ["cow"]), ("vehicle", ["car", "bus", "person"])),
               p(("animal", ["cat", "dog", "cow", "person"]), ("vehicle", ["car", "bus"]))]
    assert len(vote(answers)[1]) == 3  # no partition repeats: the paper's vote has a three-way tie
    agreed = consensus(answers, classes)
    assert agreed.groups == p(("a", ["cat", "dog", "cow"]), ("v", ["car", "bus"]), ("h", ["person"])).groups
    assert agreed.names == ["animal", "vehicle", "human"]  # the best-overlapping answer cluster's name
    # cat~dog and dog~car each in 3 of 5 answers, cat~car in 1: single linkage would chain all three into one
    # cluster; average linkage merges one pair, then the third class is with it in (1 + 3) / 10 < 1/2 of the pairs
    three = ["cat", "dog", "car"]

    def q(*clusters):
        return Partition.from_assignment(clusters, three)

    chain = [q(("x", three)), *[q(("x", ["cat", "dog"]), ("y", ["car"]))] * 2,
             *[q(("x", ["cat"]), ("y", ["dog", "car"]))] * 2]
    assert consensus(chain, three).groups == (("cat", "dog"), ("car",))
    # two consensus clusters whose best answer clusters share a name: the second is numbered
    twice = [q(("animal", ["cat", "dog"]), ("animal", ["car"]))] * 2
    assert consensus(twice, three).names == ["animal", "animal 2"]


def test_stop_condition_needs_three_equal_partitions_in_a_row():
    a, b = _p(("cat", "dog", "car", "bus", "pottedplant")), _p(*[(x,) for x in CLASSES])
    assert not converged([a, a]) and not converged([a, b, a, a]) and converged([b, a, a, a])


# ------------------------------------------------------------------------------------ templates
def test_shipped_templates_render_every_placeholder():
    for name, kind in (("cluster_generate.md", "generate"), ("cluster_refine.md", "refine")):
        template = load_template(PROMPTS_DIR / name, kind, "prompts")
        values = {k: f"<<{k}>>" for k in ("classes", "n_classes", "clusters", "n_clusters", "format", "example",
                                          "example_classes", "schema")}
        messages = template.render(values)
        assert [m["role"] for m in messages] == ["system", "user"]
        text = "\n".join(m["content"] for m in messages)
        assert "<!--" not in text and "{" not in text.replace("{{", "")
        assert ("<<classes>>" if kind == "generate" else "<<clusters>>") in text


def test_template_format_rules(tmp_path):
    path = tmp_path / "p.md"
    path.write_text("<!-- note {anything} -->\nGroup {classes} as {{json}} like {\"a\": 1}.\n")
    messages = load_template(path, "generate", "prompts.generate").render({"classes": "X"})
    assert messages == [{"role": "user", "content": 'Group X as {json} like {"a": 1}.'}]

    path.write_text("Group {clases}.\n")
    with pytest.raises(CpcxError, match=r"unknown placeholder \{clases\}"):
        load_template(path, "generate", "prompts.generate")
    path.write_text("--- user ---\nImprove these.\n")
    with pytest.raises(CpcxError, match=r"never uses \{clusters\}"):
        load_template(path, "refine", "prompts.refine")
    path.write_text("{clusters} in a generate template\n{classes}\n")
    with pytest.raises(CpcxError, match="unknown placeholder"):
        load_template(path, "generate", "prompts.generate")
