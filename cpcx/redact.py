"""Keep API keys out of everything cpcx prints or writes: the one place that knows what a secret is.

The key itself is never put in a message, but a server can echo it back (an HTTP error body that repeats the
Authorization header) and a model can return it as text (it then lands in the answer cache, answers.json and
clusters.json). So the *value* of every key cpcx reads is registered here, and the boundaries (error
messages, the answer cache, the clusters stage's files) pass what they print or write through ``redact``.
Crash logs (``cpcx.crashlog``) may be posted publicly, so ``redact_environment`` goes wider: every
secret-looking variable of the environment too (names ending in _KEY/_TOKEN/_SECRET/_PASSWORD), whether cpcx
read it or not. Either way a value shows as ``[redacted $NAME]``.
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


SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
#: Environment values shorter than this are not blanked by ``redact_environment`` ("1", "yes" are no keys).
_MIN_ENV_LENGTH = 4


def _replace(text: str, secrets: dict[str, str]) -> str:
    for value, name in sorted(secrets.items(), key=lambda item: -len(item[0])):  # longest first: nested keys
        if value in text:
            text = text.replace(value, f"[redacted ${name}]")
    return text


def _text(text: str) -> str:
    return _replace(text, _secrets)


def redact_environment(text: str) -> str:
    """``text`` without the registered keys nor the value of any secret-looking environment variable."""
    found = {v: k for k, v in os.environ.items() if k.upper().endswith(SECRET_SUFFIXES) and len(v) >= _MIN_ENV_LENGTH}
    return _replace(text, {**found, **_secrets})


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
