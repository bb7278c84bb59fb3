"""Unexpected errors: one line for the user, the full traceback in a log file, never an API key.

A ``CpcxError`` is a problem the user can fix and is printed as is. Anything else is a bug of ours (or a
fault we did not foresee): a Python traceback tells the user nothing, so the CLI prints one line with the
error type, its message and the path of a log file that holds the traceback for a bug report. With
``CPCX_DEBUG=1`` (or ``cpcx --debug``) the traceback is printed on the terminal as well.

The log may be attached to a public issue, so every text written is redacted first
(``cpcx.redact.redact_environment``): the value of any environment variable whose name ends in
_KEY/_TOKEN/_SECRET/_PASSWORD, and of the variable a loaded recipe names in ``llm.api_key_env`` (which may be
called anything), shows as ``[redacted $NAME]``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from cpcx.redact import redact_environment, register_env

def register_secret_env(name: str) -> None:
    """Redact this environment variable's value too (``llm.api_key_env`` of a loaded recipe, any name)."""
    register_env(name)


def redact(text: str) -> str:
    return redact_environment(text)


def debug_enabled() -> bool:
    return os.environ.get("CPCX_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _log_dirs() -> list[Path]:
    """Where a crash log may go, in order: $XDG_STATE_HOME/cpcx/logs, ~/.cache/cpcx/logs (beside the answer
    cache), then a per-user folder in the temp dir (a read-only or missing home must not lose the log)."""
    dirs = []
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        dirs.append(Path(state) / "cpcx" / "logs")
    try:
        dirs.append(Path.home() / ".cache" / "cpcx" / "logs")
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    dirs.append(Path(tempfile.gettempdir()) / f"cpcx-logs-{uid}")
    return dirs


def _owned_dir(folder: Path) -> bool:
    """Create ``folder`` (0700) and check it is ours: a shared temp dir may hold someone else's folder or link."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    return not folder.is_symlink() and (not hasattr(os, "getuid") or info.st_uid == os.getuid())


def write_crash_log(exc: BaseException) -> Path | None:
    """Write the redacted traceback to a new 0600 file; its path, or None when no folder takes it."""
    from cpcx import __version__

    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join([
        f"cpcx {__version__}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n",
        f"command: {' '.join(sys.argv)}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    data = redact(text).encode("utf-8", errors="replace")
    for folder in _log_dirs():
        try:
            if not _owned_dir(folder):
                continue
            path = folder / f"crash-{stamp}-{os.getpid()}.log"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return path
        except OSError:
            continue
    return None


def report_unexpected(exc: BaseException) -> int:
    """Print the one line (and the traceback in debug mode) on stderr; the exit code to use (1)."""
    path = write_crash_log(exc)
    if debug_enabled():
        _write_stderr(redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
    try:
        message = redact(str(exc)).strip().splitlines()
    except Exception:  # an exception whose __str__ fails must not hide the one line
        message = []
    text = message[0] if message else "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    where = f"the traceback is in {path}" if path else "no log folder was writable for the traceback"
    hint = "" if debug_enabled() else " (CPCX_DEBUG=1 or --debug prints it here)"
    _write_stderr(f"✘ unexpected error: {type(exc).__name__}: {text}; {where}{hint}; please report it\n")
    return 1


def _write_stderr(text: str) -> None:
    """stderr may be ASCII-only (PYTHONIOENCODING=ascii, an old terminal): escape rather than fail there."""
    try:
        sys.stderr.write(text)
    except UnicodeEncodeError:
        encoding = sys.stderr.encoding or "ascii"
        sys.stderr.write(text.encode(encoding, errors="backslashreplace").decode(encoding))
    sys.stderr.flush()
