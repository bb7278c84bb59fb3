"""LLM answers: the JSON schema we ask for, robust JSON extraction, and validation against the class list.

Two answer shapes exist (``clustering.answer_shape``):

* ``mapping`` (default): ``{"cat": "animal", "dog": "animal", "car": "vehicle"}``: one required key per
  class, so "every class exactly once" holds by construction when the provider enforces the schema. Small
  local models fill this shape far more reliably than nested lists.
* ``list``: ``{"clusters": [{"name": "animal", "members": ["cat", "dog"]}, ...]}`` (the wrapper object is
  there because OpenAI's structured output wants an object at the root; a bare list is accepted too).

Parsing is lenient about *form* (code fences, prose around the JSON, either shape, ``{cluster: [members]}``,
case and spacing of class names) and strict about *content* (each class exactly once, no unknown classes, no
empty cluster names). Content problems raise ``AnswerError`` whose ``feedback`` is sent back to the model.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal, Sequence

Shape = Literal["mapping", "list"]
Assignment = list[tuple[str, tuple[str, ...]]]  # [(cluster name, members in class order)], clusters ordered


class AnswerError(ValueError):
    """An answer that cannot be used. ``problems`` are short phrases; ``feedback`` is what the model reads."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    @property
    def feedback(self) -> str:
        return (
            "Your answer could not be used: " + "; ".join(self.problems) + ". "
            "Answer again with every class exactly once, spelled as given, and reply with the JSON only."
        )


# ------------------------------------------------------------------------------------------- schema
def answer_schema(classes: Sequence[str], shape: Shape) -> dict:
    """The JSON schema of a valid answer (kept to the subset OpenAI strict mode and Ollama both accept)."""
    if shape == "mapping":
        return {
            "type": "object",
            "properties": {name: {"type": "string"} for name in classes},
            "required": list(classes),
            "additionalProperties": False,
        }
    cluster = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "members": {"type": "array", "items": {"type": "string", "enum": list(classes)}},
        },
        "required": ["name", "members"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"clusters": {"type": "array", "items": cluster}},
        "required": ["clusters"],
        "additionalProperties": False,
    }


#: The worked example shown to the model uses other categories, so it teaches the form and the idea of a
#: cluster without suggesting any grouping of the real classes (and leaves no placeholder to copy).
EXAMPLE_CLASSES = ("apple", "hammer", "banana", "saw")
_EXAMPLE = (("fruit", ("apple", "banana")), ("tool", ("hammer", "saw")))


def example_answer(shape: Shape) -> str:
    """The answer for ``EXAMPLE_CLASSES`` in the requested shape (one line of JSON)."""
    if shape == "mapping":
        owner = {m: name for name, members in _EXAMPLE for m in members}
        return json.dumps({c: owner[c] for c in EXAMPLE_CLASSES})
    return json.dumps({"clusters": [{"name": n, "members": list(m)} for n, m in _EXAMPLE]})


def shape_description(shape: Shape) -> str:
    if shape == "mapping":
        return ("a JSON object with one key per class name (all of them, spelled exactly as listed) whose value "
                "is the name of that class's cluster")
    return ('a JSON object {"clusters": [...]} where each cluster is {"name": <cluster name>, "members": '
            "[<class names>]} and every class is a member of exactly one cluster")


# ------------------------------------------------------------------------------------------- extraction
_PLACEHOLDER = re.compile(r"^\s*[<\[{].*[>\]}]\s*$")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def _pairs_keep_duplicates(pairs: list[tuple[str, Any]]) -> Any:
    """json object hook: keep every key, so a class given twice in a mapping answer is seen, not dropped."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) == len(keys):
        return dict(pairs)
    return _DuplicateKeys(pairs)


class _DuplicateKeys(list):
    """A JSON object with repeated keys (a list of its pairs)."""


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text``: whole text, else inside code fences, else amid prose."""
    decoder = json.JSONDecoder(object_pairs_hook=_pairs_keep_duplicates)
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            return decoder.decode(candidate)
        except ValueError:
            pass
    # Prose around the JSON: try each opening bracket in turn; the first that decodes into a container wins.
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, (dict, list)) and value:
            return value
    raise AnswerError(["the answer holds no JSON object"])


# ------------------------------------------------------------------------------------------- validation
def _norm(name: str) -> str:
    """Class-name matching ignores case, spaces, underscores and hyphens ("Potted plant" = "pottedplant")."""
    return re.sub(r"[\s_\-]+", "", str(name)).casefold()


def _as_pairs(value: Any) -> tuple[list[tuple[str, Any]], str]:
    """Normalise the accepted forms into (class, cluster) pairs or (cluster, members) pairs; say which."""
    if isinstance(value, dict) and set(value) == {"clusters"}:
        value = value["clusters"]
    if isinstance(value, list) and not isinstance(value, _DuplicateKeys):
        pairs = []
        for item in value:
            if not isinstance(item, dict) or "members" not in item:
                raise AnswerError(['each cluster must be an object {"name": ..., "members": [...]}'])
            pairs.append((item.get("name", ""), item["members"]))
        return pairs, "list"
    if isinstance(value, _DuplicateKeys):
        pairs = list(value)
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise AnswerError(["the answer is not a JSON object"])
    if pairs and all(isinstance(v, list) for _, v in pairs):
        return pairs, "list"  # {"animal": ["cat", "dog"], ...}
    return pairs, "mapping"


def validate_answer(value: Any, classes: Sequence[str]) -> Assignment:
    """Check a decoded answer against the class list; return clusters in canonical order.

    Clusters are ordered by their first member in class order and members follow class order, so the same
    partition always reads the same way whatever order the model wrote it in.
    """
    index = {_norm(c): i for i, c in enumerate(classes)}
    pairs, kind = _as_pairs(value)
    owner: dict[int, str] = {}  # class index -> cluster key
    names: dict[str, str] = {}  # cluster key (normalised) -> display name (first spelling seen)
    unknown, duplicated, unnamed = [], [], []

    def assign(class_name: Any, cluster_name: Any) -> None:
        i = index.get(_norm(class_name)) if isinstance(class_name, str) else None
        if i is None:
            unknown.append(str(class_name))
            return
        if not isinstance(cluster_name, str) or not cluster_name.strip() or _PLACEHOLDER.match(cluster_name):
            unnamed.append(classes[i])  # "<cluster name>" copied from a prompt is no name either
            return
        if i in owner:  # even twice in the same cluster: the model lost track, so ask again
            duplicated.append(classes[i])
            return
        key = " ".join(cluster_name.split()).casefold()
        owner[i] = key
        names.setdefault(key, " ".join(cluster_name.split()))

    for first, second in pairs:
        if kind == "mapping":
            assign(first, second)
        else:
            if not isinstance(second, list):
                raise AnswerError([f"members of cluster {first!r} must be a list of class names"])
            for member in second:
                assign(member, first)

    problems = []
    missing = [c for i, c in enumerate(classes) if i not in owner and c not in unnamed and c not in duplicated]
    if missing:
        problems.append("you left out " + ", ".join(missing))
    if unknown:
        problems.append("not in the class list: " + ", ".join(dict.fromkeys(unknown)))
    if duplicated:
        problems.append("given more than once: " + ", ".join(dict.fromkeys(duplicated)))
    if unnamed:
        problems.append("no real cluster name (empty, or a placeholder like <name>) for " + ", ".join(unnamed))
    if problems:
        raise AnswerError(problems)

    members: dict[str, list[int]] = {}
    for i in sorted(owner):
        members.setdefault(owner[i], []).append(i)
    ordered = sorted(members.items(), key=lambda item: item[1][0])
    return [(names[key], tuple(classes[i] for i in idx)) for key, idx in ordered]


def parse_answer(text: str, classes: Sequence[str]) -> Assignment:
    """``extract_json`` then ``validate_answer``; raises ``AnswerError`` with model-readable feedback."""
    return validate_answer(extract_json(text), classes)
