"""Keep API keys out of everything cpcx prints or writes.

The key itself is never put in a message, but a server can echo it back (an HTTP error body that repeats the
Authorization header) and a model can return it as text (it then lands in the answer cache, answers.json and
clusters.json). So the *value* of every key cpcx reads is registered here, and the boundaries (error
messages, the answer cache, the clusters stage's files) pass what they print or write through ``redact``.
"""
from __future__ import annotations

import os
from typing import Any

#: Keys shorter than this are not secrets worth hiding (and replacing them would mangle ordinary text).
_MIN_LENGTH = 6
_secrets: dict[str, str] = {}  # value -> name of the environment variable it came from


def register_env(name: str | None) -> None:
    """Remember the value of environment variable ``name`` (when set) as a secret to redact."""
    value = os.environ.get(name or "", "")
    if len(value) >= _MIN_LENGTH:
        _secrets[value] = name or "?"


def _text(text: str) -> str:
    for value, name in sorted(_secrets.items(), key=lambda item: -len(item[0])):  # longest first: nested keys
        if value in text:
            text = text.replace(value, f"[redacted ${name}]")
    return text


def redact(obj: Any) -> Any:
    """``obj`` with every registered key value replaced by ``[redacted $VAR]`` (strings inside lists, tuples
    and dicts, keys included); other values are returned as they are."""
    if not _secrets:
        return obj
    if isinstance(obj, str):
        return _text(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj
