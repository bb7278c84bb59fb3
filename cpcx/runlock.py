"""One command at a time per run folder: ``runs/<name>/.lock``, held (``fcntl.flock``) for the command's life.

Two ``cpcx run`` of one recipe at once used to redo every stage side by side, each dropping the other's
outputs, and ``metrics.json`` could count a half-written label set. The second command now refuses at once
with the holder's PID (``CPCX_WAIT_FOR_LOCK=1`` makes it wait instead). The lock is advisory and dies with
its process (a kill leaves no stale lock to clean). The file is never deleted: deleting a lock file races
with a process that has just opened it.

Taking the lock is also the first write of every stage command, so a ``runs_dir`` that cannot be written
(read-only file system, no permission, a path under a regular file) is reported here, in one line, before
anything is touched. Holding it, the command removes the temp files that killed atomic writes left behind
(``cpcx.atomic.remove_stale_temp_files``): no other cpcx command can be writing them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from cpcx.errors import CpcxError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # run folders this process holds -> nesting depth (cpcx run calls stage code)


def unwritable(folder: Path, exc: OSError) -> CpcxError:
    """The one line for a run folder that cannot be written."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOTDIR:
        reason += ": a part of the path is a file"
    return CpcxError(f"runs_dir: cannot write to {folder} ({reason}); point runs_dir at a writable folder "
                     "(e.g. runs_dir=/tmp/runs) or fix its permissions; nothing was changed", code=1)


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its PID yet"


@contextlib.contextmanager
def run_lock(folder: Path, command: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder/.lock`` for the block; refuse (or wait, ``CPCX_WAIT_FOR_LOCK=1``) if another process has it.

    Under torchrun only rank 0 takes it (the other ranks are the same command).
    """
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if os.environ.get("RANK", "0") != "0" or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise CpcxError(f"{path}: is a folder, but cpcx keeps the run folder's lock in this file; remove the "
                        "folder (it holds nothing of cpcx's)") from None
    except OSError as exc:
        raise unwritable(folder, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if os.environ.get("CPCX_WAIT_FOR_LOCK", "") not in ("", "0"):
                (log or (lambda text: print(text, file=sys.stderr)))(
                    f"{folder} is in use by {holder}; waiting for it to finish (CPCX_WAIT_FOR_LOCK is set)")
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                raise CpcxError(f"{folder}: in use by another cpcx command ({holder}); wait for it to finish, "
                                "or set CPCX_WAIT_FOR_LOCK=1 to wait for it; nothing was changed") from None
        except OSError as exc:  # a file system without locks (some network mounts): say so, do not guess
            raise CpcxError(f"{path}: cannot lock the run folder ({exc.strerror}); put runs_dir on a local file "
                            "system") from None
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"PID {os.getpid()} (cpcx {command}, since {stamp})\n".encode())
        except OSError as exc:
            raise unwritable(folder, exc) from None
        from cpcx.atomic import remove_stale_temp_files

        removed = remove_stale_temp_files(folder)
        if removed and log is not None:
            log(f"removed {len(removed)} temp file(s) left by an interrupted write in {folder} "
                f"({', '.join(p.name for p in removed[:3])}{', …' if len(removed) > 3 else ''})")
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing releases the flock
