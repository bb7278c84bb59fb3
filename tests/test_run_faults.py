"""Faults around the run folder (issue 19): a runs_dir that cannot be written, two commands on one run folder at
once, temp files left by a killed atomic write. Real subprocesses of `python -m cpcx`, real kills, a real
read-only file system (a tmpfs mounted read-only, where this machine allows mounting)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"


def _env(data_root: Path, **extra: str) -> dict:
    return {**os.environ, "CPCX_DATA": str(data_root), "COLUMNS": "300", **extra}


def cpcx(data_root: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpcx", *args], capture_output=True, text=True,
                          env=_env(data_root, **env), timeout=timeout)


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _seed_run(root: Path) -> None:
    """What a user already had: a finished pseudo stage (a label and its stage record)."""
    stage = root / "smoke" / "pseudo"
    (stage / "labels").mkdir(parents=True)
    (stage / "labels" / "2007_000032.png").write_bytes(b"\x89PNG pretend")
    (stage / "stage.json").write_text(json.dumps({"stage": "pseudo", "status": "done", "fingerprint": "x"}))


# ------------------------------------------------------------------------------------ unwritable runs_dir
@pytest.mark.parametrize("command", [["run"], ["train"], ["evaluate", "--stage", "pseudo"], ["clusters"]])
def test_runs_dir_under_a_regular_file(tmp_path, data_root, voc_root, command):
    (tmp_path / "plain-file").write_text("not a folder")
    done = cpcx(data_root, *command, "-r", str(SMOKE), f"runs_dir={tmp_path / 'plain-file' / 'runs'}")
    assert done.returncode == 1
    line = _error_line(done)
    assert f"runs_dir: cannot write to {tmp_path / 'plain-file' / 'runs' / 'smoke'}" in line
    assert "a part of the path is a file" in line and "point runs_dir at a writable folder" in line


@pytest.fixture
def read_only_runs(tmp_path):
    """A tmpfs holding a run, remounted read-only; skipped where mounting is not allowed."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        _seed_run(mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("command", [["run"], ["train"], ["pseudo"], ["evaluate", "--stage", "pseudo"]])
def test_read_only_runs_dir_is_one_line_and_loses_nothing(read_only_runs, data_root, voc_root, command):
    before = _snapshot(read_only_runs)
    done = cpcx(data_root, *command, "-r", str(SMOKE), f"runs_dir={read_only_runs}")
    assert done.returncode == 1
    line = _error_line(done)
    assert f"cannot write to {read_only_runs / 'smoke'} (Read-only file system)" in line
    assert _snapshot(read_only_runs) == before


def test_atomic_write_into_a_read_only_folder(read_only_runs):
    from cpcx import atomic
    from cpcx.errors import CpcxError

    target = read_only_runs / "smoke" / "pseudo" / "stage.json"
    with pytest.raises(CpcxError, match=r"cannot write stage.json \(read-only file system\).*unchanged"):
        atomic.write_json(target, {"new": 1})
    assert json.loads(target.read_text())["status"] == "done"


# ------------------------------------------------------------------------------------ one command per folder
def _wait_for_lock(lock: Path, proc: subprocess.Popen, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.is_file() and lock.read_text().startswith("PID"):
            return lock.read_text()
        time.sleep(0.05)
    raise AssertionError("the first command never took the lock")


def test_second_concurrent_run_refuses_naming_the_holder(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, "-m", "cpcx", "run", "-r", str(SMOKE), f"runs_dir={runs}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(data_root),
                             start_new_session=True)
    try:
        holder = _wait_for_lock(runs / "smoke" / ".lock", first)
        assert holder.startswith(f"PID {first.pid} (cpcx run, since ")
        for command in (["run"], ["pseudo"], ["evaluate", "--stage", "segment"]):
            second = cpcx(data_root, *command, "-r", str(SMOKE), f"runs_dir={runs}", timeout=60)
            assert second.returncode == 1
            line = _error_line(second)
            assert f"{runs / 'smoke'}: in use by another cpcx command (PID {first.pid} (cpcx run" in line
            assert "CPCX_WAIT_FOR_LOCK=1" in line and "nothing was changed" in line
        assert first.poll() is None  # the first one was left alone
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # a kill leaves no stale lock: the next command takes it at once
    after = cpcx(data_root, "evaluate", "-r", str(SMOKE), f"runs_dir={runs}", "--stage", "segment")
    assert "in use by another" not in after.stderr


_HOLD = """
import sys, time
from pathlib import Path
from cpcx.runlock import run_lock
with run_lock(Path(sys.argv[1]), "test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_waits_for_the_lock_when_asked(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(runs / "smoke"), "3"], stdout=subprocess.PIPE,
                              text=True, env=_env(data_root))
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    done = cpcx(data_root, "evaluate", "-r", str(SMOKE), f"runs_dir={runs}", "--stage", "pseudo",
                CPCX_WAIT_FOR_LOCK="1")
    holder.wait()
    assert "waiting for it to finish" in done.stdout and time.monotonic() - start > 1.5
    assert "in use by another" not in done.stderr  # it waited, then went on (to its own, unrelated, error)


# ------------------------------------------------------------------------------------ temp files of kills
_SLOW_SAVE = """
import sys, time
from cpcx import atomic
def writer(handle):
    handle.write(b"x" * (8 << 20))
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic.write_with(sys.argv[1], writer)
"""


def test_temp_file_of_a_killed_save_is_removed_by_the_next_command(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    weights = runs / "smoke" / "train" / "weights"
    weights.mkdir(parents=True)
    (weights / "last.pt").write_bytes(b"the user's checkpoint")
    saver = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(weights / "last.pt")], stdout=subprocess.PIPE,
                             text=True, env=_env(data_root))
    assert saver.stdout.readline().strip() == "writing"
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    (left,) = list(weights.glob(".last.pt.*.tmp"))
    assert left.stat().st_size == 8 << 20
    done = cpcx(data_root, "evaluate", "-r", str(SMOKE), f"runs_dir={runs}", "--stage", "pseudo")
    assert f"removed 1 temp file(s) left by an interrupted write in {runs / 'smoke'} ({left.name})" in done.stdout
    assert not left.exists() and (weights / "last.pt").read_bytes() == b"the user's checkpoint"


def test_lock_file_that_is_a_folder(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    (runs / "smoke" / ".lock").mkdir(parents=True)
    done = cpcx(data_root, "evaluate", "-r", str(SMOKE), f"runs_dir={runs}", "--stage", "pseudo")
    assert done.returncode == 1
    assert _error_line(done) == (f"✘ {runs / 'smoke' / '.lock'}: is a folder, but cpcx keeps the run folder's lock "
                                 "in this file; remove the folder (it holds nothing of cpcx's)")


def test_output_that_is_a_folder_and_folder_that_is_a_file(tmp_path):
    from cpcx import atomic
    from cpcx.errors import CpcxError

    (tmp_path / "summary.json").mkdir()
    with pytest.raises(CpcxError) as info:
        atomic.write_json(tmp_path / "summary.json", {})
    assert str(info.value) == f"{tmp_path / 'summary.json'}: is a folder, but cpcx writes a file there; move the folder away"
    (tmp_path / "labels").write_text("a file")
    with pytest.raises(CpcxError) as info:
        atomic.ensure_dir(tmp_path / "labels")
    assert str(info.value) == f"{tmp_path / 'labels'}: is a file, but cpcx keeps a folder there; move the file away"
    assert not list(tmp_path.glob(".*.tmp"))


def test_clusters_json_that_is_a_folder(tmp_path, data_root, voc_root):
    runs = tmp_path / "runs"
    (runs / "smoke" / "clusters" / "clusters.json").mkdir(parents=True)
    done = cpcx(data_root, "clusters", "-r", str(SMOKE), f"runs_dir={runs}")
    assert done.returncode == 1
    assert _error_line(done).endswith("clusters.json: is a folder, but cpcx writes a file there; move the folder away")


def test_segment_resume_with_a_garbled_metrics_csv(tmp_path):
    from cpcx.segment.stage import _truncate_csv

    path = tmp_path / "metrics.csv"
    path.write_bytes(b"epoch,loss,seconds\n1,0.5,3\nhello world\n\xff\xfe\x00binary\n2,0.4,3\n3,0.3,3\n")
    _truncate_csv(path, 2)
    assert path.read_text() == "epoch,loss,seconds\n1,0.5,3\n2,0.4,3\n"


@pytest.fixture
def immutable_runs(tmp_path):
    """A run folder made immutable with chattr +i (root ignores permission bits, not this); skipped where the
    file system has no such attribute."""
    runs = tmp_path / "runs"
    _seed_run(runs)
    if subprocess.run(["chattr", "+i", str(runs / "smoke")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield runs
    finally:
        subprocess.run(["chattr", "-i", str(runs / "smoke")], capture_output=True)


@pytest.mark.parametrize("command", [["run"], ["segment"], ["evaluate", "--stage", "pseudo"]])
def test_run_folder_without_write_permission(immutable_runs, data_root, voc_root, command):
    before = _snapshot(immutable_runs)
    done = cpcx(data_root, *command, "-r", str(SMOKE), f"runs_dir={immutable_runs}")
    assert done.returncode == 1
    assert f"cannot write to {immutable_runs / 'smoke'} (Operation not permitted)" in _error_line(done)
    assert _snapshot(immutable_runs) == before
