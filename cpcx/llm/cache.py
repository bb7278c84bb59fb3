"""The LLM answer cache: SQLite, content-addressed, safe with several processes, portable as JSONL.

Key = sha256 of the canonical JSON of the request identity: provider, model, temperature, seed, messages,
answer schema, stage and query index, and ``CACHE_VERSION``. Never the API key, URL or timeouts: the same
question to the same model is the same key wherever it is asked. Value = the validated answer, the raw text
of every attempt and what the server said about the model. Only validated answers are stored.

Modes (``llm.cache_mode``): ``use`` reads and writes; ``refresh`` asks again and overwrites; ``readonly``
reads and treats a miss as an error (CI, air-gapped replays); ``off`` neither reads nor writes.
Concurrency: WAL journal and a busy timeout, so two ``cpcx clusters`` processes can share one cache.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from cpcx import atomic
from cpcx.errors import CpcxError
from cpcx.redact import redact

CACHE_VERSION = 1
FILE_NAME = "llm-answers.sqlite"
_BUSY_TIMEOUT_S = 30.0
_SCHEMA = "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, request TEXT NOT NULL, value TEXT NOT NULL)"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(identity: dict[str, Any]) -> str:
    """The content address of a request (``identity`` must already hold ``CACHE_VERSION`` as ``v``)."""
    return hashlib.sha256(canonical_json(identity).encode("utf-8")).hexdigest()


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_value(value: Any) -> dict[str, Any]:
    """A stored value must look like one we wrote; anything else is a corrupt row."""
    if not isinstance(value, dict):
        raise ValueError("value is not an object")
    if not isinstance(value.get("raw"), str) or not isinstance(value.get("answer"), list):
        raise ValueError("value lacks 'raw' text or the 'answer' list")
    if not all(isinstance(a, str) for a in value.get("attempts", [])):
        raise ValueError("'attempts' must be a list of texts")
    return value


class AnswerCache:
    """``get``/``put`` by key under a mode; one SQLite connection, opened on first use."""

    def __init__(self, cache_dir: str | Path, mode: str = "use", warn: Callable[[str], None] = _warn_stderr):
        self.path = Path(cache_dir).expanduser() / FILE_NAME
        self.mode = mode
        self.warn = warn
        self._conn: sqlite3.Connection | None = None

    @property
    def reads(self) -> bool:
        return self.mode in ("use", "readonly")

    @property
    def writes(self) -> bool:
        return self.mode in ("use", "refresh")

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not create and not self.path.exists():
                return None
            self._conn = open_db(self.path, readonly=self.mode == "readonly")
        return self._conn

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.reads:
            return None
        conn = self._connect(create=False)
        if conn is None:
            return None
        row = _query(conn, self.path, "SELECT request, value FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            if request_key(json.loads(row[0])) != key:
                raise ValueError("its request does not hash to its key")
            return check_value(json.loads(row[1]))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            self.warn(f"cache entry {key[:12]}… in {self.path} is unreadable ({exc}); asking the LLM again")
            return None

    def put(self, key: str, identity: dict[str, Any], value: dict[str, Any]) -> None:
        if not self.writes:
            return
        conn = self._connect(create=True)
        with conn:
            _query(conn, self.path, "INSERT OR REPLACE INTO answers (key, request, value) VALUES (?, ?, ?)",
                   (key, canonical_json(identity), canonical_json(check_value(redact(value)))))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _corrupt(path: Path, exc: Exception) -> CpcxError:
    return CpcxError(f"llm.cache_dir: {path} is not a readable cpcx answer cache ({exc}); move it away or delete "
                     "it (answers exported with `cpcx cache export` can be imported again)")


def open_db(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the cache database; a file that is not one is a single clear error.

    ``readonly`` opens the file read-only (a replay from a committed cache must not need write access).
    """
    try:
        if readonly:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level="DEFERRED")
    except (OSError, sqlite3.Error) as exc:
        raise CpcxError(f"llm.cache_dir: cannot open {path} ({exc}); fix llm.cache_dir or its permissions") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > CACHE_VERSION:
            conn.close()
            raise CpcxError(f"llm.cache_dir: {path} was written by a newer cpcx (format {version}); upgrade cpcx "
                            "or point llm.cache_dir elsewhere")
        if readonly:
            conn.execute("SELECT count(*) FROM answers").fetchone()  # a foreign file fails here, once
            return conn
        conn.execute("PRAGMA journal_mode = WAL")
        with conn:
            conn.execute(_SCHEMA)
            if version == 0:
                conn.execute(f"PRAGMA user_version = {CACHE_VERSION}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _corrupt(path, exc) from None
    return conn


def _query(conn: sqlite3.Connection, path: Path, sql: str, args: tuple = ()) -> sqlite3.Cursor:
    try:
        return conn.execute(sql, args)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise CpcxError(f"llm.cache_dir: {path} stayed locked for {_BUSY_TIMEOUT_S:g} s by another process; "
                            "retry when it has finished") from None
        raise _corrupt(path, exc) from None
    except sqlite3.DatabaseError as exc:
        raise _corrupt(path, exc) from None


# ------------------------------------------------------------------------------------------- JSONL
def _rows(conn: sqlite3.Connection, path: Path) -> Iterator[tuple[str, str, str]]:
    yield from _query(conn, path, "SELECT key, request, value FROM answers ORDER BY key")


def export_cache(cache_dir: str | Path, out: str | Path) -> int:
    """Write every cached answer as one JSON line ``{"key", "request", "value"}``, sorted by key."""
    path = Path(cache_dir).expanduser() / FILE_NAME
    out = Path(out)
    if out.is_dir():  # checked before reading the cache: atomic.write_text would end in IsADirectoryError
        raise CpcxError(f"{out}: is a folder; name the JSONL file to write, e.g. {out / 'answers.jsonl'}")
    if out.exists() and not out.is_file():  # the atomic rename would replace /dev/full itself (as root)
        raise CpcxError(f"{out}: is not a regular file (a device or pipe); name the JSONL file to write")
    if not path.exists():
        raise CpcxError(f"--cache-dir: no answer cache at {path}; run `cpcx clusters` first or pass --cache-dir")
    conn = open_db(path)
    lines, skipped = [], 0
    try:
        for key, request, value in _rows(conn, path):
            try:
                record = {"key": key, "request": json.loads(request), "value": check_value(json.loads(value))}
            except ValueError:
                skipped += 1
                continue
            lines.append(canonical_json(record))
    finally:
        conn.close()
    if skipped:
        _warn_stderr(f"{skipped} unreadable cache entries in {path} were not exported")
    try:
        atomic.write_text(out, "".join(line + "\n" for line in lines))
    except OSError as exc:
        raise CpcxError(f"{out}: cannot write ({exc.strerror or exc}); choose a writable file") from None
    return len(lines)


#: An export line holds one request (prompt, class list, schema) and its answers: tens of KB. The bounds keep
#: `cpcx cache import /dev/zero` or a stray multi-GB file from reading until memory runs out.
MAX_IMPORT_BYTES = 256 << 20
MAX_LINE_BYTES = 8 << 20


def _read_lines(src: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of a regular file, refusing what is not one and bounding lines and size."""
    import os
    import stat

    hint = "pass a file written by `cpcx cache export`"
    try:
        info = os.stat(src)  # stat, not open: opening a FIFO would block until someone writes to it
    except OSError as exc:
        raise CpcxError(f"{src}: cannot read ({exc.strerror or exc}); {hint}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CpcxError(f"{src}: is a folder; {hint}")
    if not stat.S_ISREG(info.st_mode):
        raise CpcxError(f"{src}: is not a regular file (a device, pipe or socket); {hint}")
    if info.st_size > MAX_IMPORT_BYTES:
        raise CpcxError(f"{src}: {info.st_size / 2**20:.0f} MiB is more than an answer export holds (at most "
                        f"{MAX_IMPORT_BYTES >> 20} MiB); {hint}, or split it into smaller files")
    total = 0
    try:
        with open(src, "rb") as handle:
            for number in itertools.count(1):
                raw = handle.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                total += len(raw)
                if len(raw) > MAX_LINE_BYTES or total > MAX_IMPORT_BYTES:  # the file may grow while we read
                    raise CpcxError(f"{src}:{number}: longer than {MAX_LINE_BYTES >> 20} MiB, which no cache line "
                                    f"is; {hint}")
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise CpcxError(f"{src}:{number}: not UTF-8 text; {hint}") from None
    except OSError as exc:
        raise CpcxError(f"{src}: cannot read ({exc.strerror or exc}); {hint}") from None


def request_classes(identity: dict[str, Any]) -> tuple[str, ...]:
    """The class list a request asked about, read back from its answer schema (what ``Asker`` sent)."""
    from cpcx.llm.answers import answer_schema

    shape, schema = identity.get("shape"), identity.get("schema")
    try:
        if shape == "mapping":
            classes = tuple(schema["required"])
        elif shape == "list":
            classes = tuple(schema["properties"]["clusters"]["items"]["properties"]["members"]["items"]["enum"])
        else:
            raise ValueError(f"its request has no answer shape 'mapping' or 'list' (got {shape!r})")
        if answer_schema(classes, shape) != schema:
            raise ValueError("its request's answer schema is not one cpcx sends")
    except (KeyError, TypeError):
        raise ValueError("its request holds no answer schema with the class list") from None
    return classes


def check_answer(identity: dict[str, Any], value: dict[str, Any]) -> None:
    """Validate a stored answer as a fresh one for this request is validated (``AnswerError`` if unusable):
    the answer fits the request's class list, is in canonical form, and is what its raw text says."""
    from cpcx.llm.answers import AnswerError, parse_answer, validate_answer

    classes = request_classes(identity)
    assignment = validate_answer(value["answer"], classes)
    if [{"name": n, "members": list(m)} for n, m in assignment] != value["answer"]:
        raise AnswerError(["the answer is not in the canonical form cpcx stores"])
    if parse_answer(value["raw"], classes) != assignment:
        raise AnswerError(["the answer differs from what its raw text says"])


def import_cache(cache_dir: str | Path, src: str | Path) -> int:
    """Load a JSONL export; each line is checked (its key is the hash of its request, its answer is valid for
    that request). Nothing is imported unless every line is good. Returns the count."""
    from cpcx.llm.answers import AnswerError

    src = Path(src)
    records, invalid = [], []
    for number, line in _read_lines(src):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key, identity, value = record["key"], record["request"], check_value(record["value"])
            if request_key(identity) != key:
                raise ValueError("its key is not the hash of its request (edited by hand?)")
            request_classes(identity)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested 10**5 deep
            raise CpcxError(f"{src}:{number}: not a cpcx cache line ({exc}); re-export it with "
                            "`cpcx cache export`") from None
        try:
            check_answer(identity, value)
        except AnswerError as exc:
            invalid.append((number, str(exc)))
        except RecursionError:
            invalid.append((number, "its raw text is nested too deeply"))
        records.append((key, canonical_json(identity), canonical_json(value)))
    if invalid:  # all or nothing: a half-imported file would be a second, quieter surprise
        number, problem = invalid[0]
        raise CpcxError(f"{src}: {len(invalid)} of {len(records)} answers are not valid for their request (line "
                        f"{number}: {problem}); nothing imported; delete those lines or re-export them from the "
                        "cache that made them")
    path = Path(cache_dir).expanduser() / FILE_NAME
    conn = open_db(path)
    try:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO answers (key, request, value) VALUES (?, ?, ?)", records)
    except sqlite3.DatabaseError as exc:
        raise _corrupt(path, exc) from None
    finally:
        conn.close()
    return len(records)
