"""The SQLite answer cache: keys, modes, corruption, two processes at once, JSONL export/import."""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3

import pytest

from cpcx.errors import CpcxError
from cpcx.llm.answers import answer_schema
from cpcx.llm.cache import FILE_NAME, AnswerCache, export_cache, import_cache, request_key


def _identity(query: int = 1, **extra) -> dict:
    """A request as ``Asker.identity`` builds it: the answer schema carries the class list."""
    return {"v": 1, "provider": "openai", "model": "m", "temperature": 0.0, "seed": 0,
            "messages": [{"role": "user", "content": "group cat, dog"}], "schema": answer_schema(("cat", "dog"), "mapping"),
            "shape": "mapping", "stage": "generate", "query": query, **extra}


def _value(name: str = "animal") -> dict:
    return {"raw": json.dumps({"cat": name, "dog": name}), "attempts": ["x"], "meta": {},
            "answer": [{"name": name, "members": ["cat", "dog"]}]}


def test_key_is_content_addressed():
    a = _identity()
    assert request_key(a) == request_key(dict(reversed(list(a.items()))))  # order of keys does not matter
    assert request_key(a) != request_key(_identity(query=2))  # the query index is part of the identity
    assert len(request_key(a)) == 64


def test_modes(tmp_path):
    key, identity = request_key(_identity()), _identity()
    with AnswerCache(tmp_path, "off") as cache:
        cache.put(key, identity, _value())
        assert cache.get(key) is None
    assert not (tmp_path / FILE_NAME).exists()  # off never creates the file
    with AnswerCache(tmp_path, "readonly") as cache:
        cache.put(key, identity, _value())
        assert cache.get(key) is None
    with AnswerCache(tmp_path, "use") as cache:
        cache.put(key, identity, _value("animal"))
        assert cache.get(key)["answer"][0]["name"] == "animal"
    with AnswerCache(tmp_path, "refresh") as cache:
        assert cache.get(key) is None  # refresh asks again...
        cache.put(key, identity, _value("pet"))  # ...and overwrites
    with AnswerCache(tmp_path, "readonly") as cache:
        assert cache.get(key)["answer"][0]["name"] == "pet"


def test_corrupt_row_is_a_miss_with_a_warning(tmp_path):
    key = request_key(_identity())
    with AnswerCache(tmp_path) as cache:
        cache.put(key, _identity(), _value())
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        conn.execute("UPDATE answers SET value = '{not json' WHERE key = ?", (key,))
    warnings = []
    with AnswerCache(tmp_path, warn=warnings.append) as cache:
        assert cache.get(key) is None
    assert len(warnings) == 1 and key[:12] in warnings[0] and "asking the LLM again" in warnings[0]


def test_corrupt_file_is_one_clear_error(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"this is not a database, it is a text file\n" * 100)
    for mode in ("use", "readonly"):
        with pytest.raises(CpcxError) as info:
            AnswerCache(tmp_path, mode).get("0" * 64)
        message = str(info.value)
        assert "\n" not in message and "llm.cache_dir" in message and "not a readable cpcx answer cache" in message


def _writer(cache_dir: str, worker: int, n: int) -> None:
    with AnswerCache(cache_dir) as cache:
        for i in range(n):
            identity = _identity(query=worker * 1000 + i)
            cache.put(request_key(identity), identity, _value(f"w{worker}"))
            assert cache.get(request_key(_identity(query=worker * 1000))) is not None


def test_two_processes_share_one_cache(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with sqlite3.connect(tmp_path / FILE_NAME) as conn:
        assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == 120
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_export_import_round_trip(tmp_path):
    src, dst, out = tmp_path / "a", tmp_path / "b", tmp_path / "answers.jsonl"
    with AnswerCache(src) as cache:
        for q in (2, 1):
            cache.put(request_key(_identity(q)), _identity(q), _value())
    assert export_cache(src, out) == 2
    lines = out.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == sorted(json.loads(x)["key"] for x in lines)
    assert import_cache(dst, out) == 2
    with AnswerCache(dst, "readonly") as cache:
        assert cache.get(request_key(_identity(1)))["answer"] == _value()["answer"]
    export_cache(dst, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()

    record = json.loads(lines[1])
    record["value"]["answer"][0]["name"] = "edited"
    record["request"]["query"] = 99  # an edited request no longer hashes to its key
    out.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(CpcxError, match=r"answers.jsonl:2: not a cpcx cache line"):
        import_cache(dst, out)
    with pytest.raises(CpcxError, match="no answer cache"):
        export_cache(tmp_path / "empty", out)


# ------------------------------------------------------------------------------- hostile files (#19)
def _line(identity: dict, value: dict) -> str:
    return json.dumps({"key": request_key(identity), "request": identity, "value": value}) + "\n"


def test_import_refuses_answers_invalid_for_their_request(tmp_path):
    good = _value()
    missing = {"raw": json.dumps({"cat": "animal"}), "attempts": [], "meta": {},
               "answer": [{"name": "animal", "members": ["cat"]}]}  # dog left out: a fresh answer would be re-asked
    unknown = {"raw": "{}", "attempts": [], "meta": {}, "answer": [{"name": "a", "members": ["cat", "dog", "cow"]}]}
    lied = {**_value("animal"), "raw": json.dumps({"cat": "pet", "dog": "pet"})}  # raw text says otherwise
    src = tmp_path / "answers.jsonl"
    src.write_text(_line(_identity(1), good) + _line(_identity(2), missing) + _line(_identity(3), unknown)
                   + _line(_identity(4), lied))
    with pytest.raises(CpcxError) as info:
        import_cache(tmp_path / "cache", src)
    assert str(info.value) == (f"{src}: 3 of 4 answers are not valid for their request (line 2: you left out dog); "
                               "nothing imported; delete those lines or re-export them from the cache that made them")
    assert not (tmp_path / "cache" / FILE_NAME).exists()  # all or nothing
    src.write_text(_line(_identity(1), good))
    assert import_cache(tmp_path / "cache", src) == 1


def test_import_refuses_a_request_without_its_class_list(tmp_path):
    src = tmp_path / "answers.jsonl"
    src.write_text(_line(_identity(1, schema=None), _value()))
    with pytest.raises(CpcxError, match=r"answers.jsonl:1: not a cpcx cache line \(its request holds no answer schema"):
        import_cache(tmp_path / "cache", src)


def test_import_bounds_what_it_reads(tmp_path, monkeypatch):
    import cpcx.llm.cache as cache

    with pytest.raises(CpcxError, match=r"^/dev/zero: is not a regular file \(a device, pipe or socket\)"):
        import_cache(tmp_path, "/dev/zero")
    with pytest.raises(CpcxError, match=r": is a folder; pass a file written by `cpcx cache export`$"):
        import_cache(tmp_path, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block forever: refused from its stat
    with pytest.raises(CpcxError, match="is not a regular file"):
        import_cache(tmp_path, fifo)
    monkeypatch.setattr(cache, "MAX_LINE_BYTES", 1000)
    src = tmp_path / "long.jsonl"
    src.write_text(_line(_identity(1), _value()) + "x" * 5000 + "\n")
    with pytest.raises(CpcxError) as info:
        import_cache(tmp_path, src)
    assert str(info.value) == f"{src}:2: longer than 0 MiB, which no cache line is; pass a file written by `cpcx cache export`"
    monkeypatch.setattr(cache, "MAX_IMPORT_BYTES", 100)
    with pytest.raises(CpcxError, match=r"MiB is more than an answer export holds"):
        import_cache(tmp_path, src)
    deep = tmp_path / "deep.jsonl"
    monkeypatch.setattr(cache, "MAX_IMPORT_BYTES", 1 << 20)
    monkeypatch.setattr(cache, "MAX_LINE_BYTES", 1 << 20)
    deep.write_text("[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(CpcxError, match=r"deep.jsonl:1: not a cpcx cache line"):
        import_cache(tmp_path, deep)


def test_export_to_a_folder_or_unwritable_place(tmp_path):
    with AnswerCache(tmp_path / "c") as cache:
        cache.put(request_key(_identity()), _identity(), _value())
    with pytest.raises(CpcxError) as info:
        export_cache(tmp_path / "c", tmp_path)
    assert str(info.value) == f"{tmp_path}: is a folder; name the JSONL file to write, e.g. {tmp_path / 'answers.jsonl'}"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a device or pipe is never replaced by the atomic rename (as root that would be /dev/full)
    with pytest.raises(CpcxError, match=r"fifo: is not a regular file \(a device or pipe\); name the JSONL file"):
        export_cache(tmp_path / "c", fifo)
    assert fifo.is_fifo()
    with pytest.raises(CpcxError, match=r"^/proc/answers.jsonl: cannot write \("):
        export_cache(tmp_path / "c", "/proc/answers.jsonl")
