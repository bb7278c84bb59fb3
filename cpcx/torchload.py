"""Reading ``.pt`` files safely, with one line of our own when it fails.

Every torch file cpcx reads is loaded with ``weights_only=True``: a checkpoint is data, and unpickling
arbitrary objects could run code. When that refuses a file, torch's message is several lines of advice (with
terminal colour codes) whose first option is to load it with ``weights_only=False``, the unsafe path. None of
it is relayed: the user gets what is wrong with the file and what to do, in one line.
"""
from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any

from cpcx.errors import CpcxError


def _reason(exc: BaseException, size: int) -> str:
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, pickle.UnpicklingError) and ("unsupported global" in lowered or "unsupported class" in lowered):
        return ("it holds Python objects besides tensors and plain containers, which cpcx does not unpickle "
                "(that could run code)")
    if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):  # EINVAL: torch on a torn zip
        return f"cannot read it ({exc.strerror})"
    if isinstance(exc, (EOFError, RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError)):
        return f"truncated or not a torch file ({size} bytes; a save killed mid-way?)"
    return f"unreadable ({type(exc).__name__})"


def check_torch_file(path: str | Path, what: str, fix: str) -> Path:
    """``path`` if it is a non-empty regular file, else the one-line ``CpcxError`` ("<path>: <why>; <fix>")."""
    path = Path(path)
    if path.is_dir():
        raise CpcxError(f"{path}: is a folder, not a {what}; {fix}")
    if not path.is_file():
        raise CpcxError(f"{path}: no {what} (not found or not a regular file); {fix}")
    if path.stat().st_size == 0:
        raise CpcxError(f"{path}: empty file (0 bytes: a save killed at its start?), not a {what}; {fix}")
    return path


def load_torch_file(path: str | Path, what: str, fix: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is ``CpcxError("<path>: <why>; <fix>")``.

    ``what`` names the file in the message ("training checkpoint"), ``fix`` says what to do about it.
    """
    import torch

    path = check_torch_file(path, what, fix)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torn, foreign or hostile: each is the same answer for the user
        raise CpcxError(f"{path}: not a readable {what}: {_reason(exc, path.stat().st_size)}; {fix}") from None


def readable(path: str | Path) -> str | None:
    """None when ``path`` loads (weights only), else the reason it does not (for advice, not for raising)."""
    try:
        load_torch_file(path, "checkpoint", "-")
    except CpcxError as exc:
        return str(exc).split(": ", 1)[-1].rsplit("; ", 1)[0]
    return None
