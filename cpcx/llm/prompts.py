"""Prompt templates: plain text files a user edits (``prompts/cluster_generate.md``, ``cluster_refine.md``).

File format, kept deliberately small:

* ``<!-- ... -->`` comments are notes for the editor and are stripped before anything is sent.
* A line ``--- system ---`` / ``--- user ---`` / ``--- assistant ---`` starts a message with that role.
  A file without such lines is one user message.
* ``{name}`` is replaced by a value (see ``PLACEHOLDERS``); an unknown ``{name}`` is an error, so a typo
  never reaches the model. Write ``{{name}}`` for a literal ``{name}``. Other braces (JSON examples) are
  left alone.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cpcx.errors import CpcxError

Kind = Literal["generate", "refine"]

PLACEHOLDERS: dict[str, str] = {
    "classes": "the class names, one per line ('- cat')",
    "n_classes": "how many classes there are",
    "clusters": "the current clusters, one per line ('- animal: cat, dog'); refine template only",
    "n_clusters": "how many clusters the current partition has; refine template only",
    "format": "a one-sentence description of the answer's JSON shape",
    "example": "a worked example answer in that shape, for other categories ({example_classes})",
    "example_classes": "the categories of the worked example: apple, hammer, banana, saw",
    "schema": "the JSON schema of a valid answer",
}
REQUIRED: dict[str, tuple[str, ...]] = {"generate": ("classes",), "refine": ("clusters",)}
_REFINE_ONLY = ("clusters", "n_clusters")

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_ROLE = re.compile(r"^---[ \t]*(system|user|assistant)[ \t]*---[ \t]*$", re.MULTILINE)
_FIELD = re.compile(r"\{\{([A-Za-z_]+)\}\}|\{([A-Za-z_]+)\}")


@dataclass(frozen=True)
class PromptTemplate:
    path: Path
    kind: Kind
    text: str  # the file as written (hashed into the output, so an edit is visible there)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, values: dict[str, str]) -> list[dict[str, str]]:
        """The chat messages ``[{"role", "content"}]`` with every placeholder filled."""
        body = _COMMENT.sub("", self.text)

        def fill(match: re.Match) -> str:
            if match.group(1) is not None:
                return "{" + match.group(1) + "}"
            return values[match.group(2)]

        parts = _ROLE.split(body)
        messages = []
        if len(parts) == 1:
            messages.append({"role": "user", "content": _FIELD.sub(fill, body).strip()})
        else:
            for role, content in zip(parts[1::2], parts[2::2]):
                messages.append({"role": role, "content": _FIELD.sub(fill, content).strip()})
        return [m for m in messages if m["content"]]


def load_template(path: Path, kind: Kind, field: str) -> PromptTemplate:
    """Read and check a template: readable, known placeholders only, required ones present."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CpcxError(f"{field}: cannot read prompt template {path} ({exc}); fix the path") from None
    body = _COMMENT.sub("", text)
    used = {m.group(2) for m in _FIELD.finditer(body) if m.group(2) is not None}
    allowed = set(PLACEHOLDERS) - (set() if kind == "refine" else set(_REFINE_ONLY))
    unknown = sorted(used - allowed)
    if unknown:
        raise CpcxError(
            f"{path}: unknown placeholder {{{unknown[0]}}}; use one of "
            + ", ".join("{" + p + "}" for p in PLACEHOLDERS if p in allowed)
            + " (write {{name}} for literal braces)"
        )
    missing = [p for p in REQUIRED[kind] if p not in used]
    if missing:
        raise CpcxError(f"{path}: the {kind} template never uses {{{missing[0]}}}; "
                        "add it where the model should read it")
    before = _ROLE.split(body)[0]
    if len(_ROLE.split(body)) > 1 and before.strip():
        raise CpcxError(f"{path}: text before the first '--- role ---' line; "
                        "move it below a role line or into <!-- -->")
    return PromptTemplate(Path(path), kind, text)
