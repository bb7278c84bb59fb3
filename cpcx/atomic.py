"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace`` (and ``file_sha256``, the one
file hash that tells whether an input changed).

A stage killed half-way therefore leaves either the old file or the new one, never a torn one.
Every output of cpcx goes through these helpers.
"""
from __future__ import annotations

import contextlib
import hashlib
import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from cpcx.errors import CpcxError

_UMASK = os.umask(0)
os.umask(_UMASK)
#: The temp names ``mkstemp`` gives below: ``.<name>.<8 random chars>.tmp``.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
#: Errors that say "this place cannot take the file" (as opposed to a bug): one line, not a traceback.
_PLACE_ERRORS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file",
                 errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def _place_error(path: Path, exc: OSError) -> CpcxError:
    return CpcxError(f"{path.parent}: cannot write {path.name} ({_PLACE_ERRORS[exc.errno]}); free space or "
                     "point the recipe's runs_dir (or the file's folder) at a writable place; the previous "
                     f"{path.name}, if any, is unchanged")


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p`` with one line instead of a traceback when a file sits where the folder should be (or the
    place cannot be written)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CpcxError(f"{path}: is a file, but cpcx keeps a folder there; move the file away") from None
    except OSError as exc:
        if exc.errno in _PLACE_ERRORS:
            raise CpcxError(f"{path}: cannot create the folder ({_PLACE_ERRORS[exc.errno]}); point the recipe's "
                            "runs_dir at a writable place") from None
        raise
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files that atomic writes killed mid-way left under ``folder`` (a killed checkpoint save
    leaves one as big as the checkpoint). Only call it where no other process is writing: under the run lock."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        if _TEMP_NAME.match(path.name) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    if path.is_dir():  # os.replace onto a folder fails only after the whole file is written
        raise CpcxError(f"{path}: is a folder, but cpcx writes a file there; move the folder away")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in _PLACE_ERRORS:
            raise _place_error(path, exc) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _PLACE_ERRORS:  # a full disk mid-write: the old file stays, the temp file goes
            raise _place_error(path, exc) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Canonical JSON (sorted keys, fixed separators, trailing newline): same object, same bytes."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    return write_text(path, text + "\n")


def write_with(path: str | Path, writer: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through a callback that takes a binary file object (PIL ``save``, ``np.save``, ...)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            writer(handle)
    return Path(path)


def save_torch(path: str | Path, obj: Any) -> Path:
    import torch

    return write_with(path, lambda handle: torch.save(obj, handle))


def append_csv_row(path: str | Path, header: list[str], row: list[Any]) -> None:
    """Append one row (header first if new); rewritten atomically so a kill never tears a line."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else [",".join(header)]
    lines.append(",".join(_csv_cell(v) for v in row))
    write_text(path, "\n".join(lines) + "\n")


def _csv_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return f'"{text}"' if "," in text else text


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
