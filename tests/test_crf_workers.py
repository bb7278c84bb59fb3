"""CRF worker processes never outlive the command that started them.

Found in a benchmark run: a `cpcx pseudo` stopped with SIGTERM left its spawn workers behind, each waiting
forever on the pool's task semaphore and holding a core. Two ways a command ends without Ctrl-C are checked
on real processes: SIGTERM (the CLI turns it into Ctrl-C, so the pool is shut down in ``finally``) and SIGKILL
(nothing runs in the parent; each worker notices that its parent is gone and exits).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The pool exactly as `cpcx pseudo` makes it, in a process that prints its workers' pids and then waits.
_PARENT = """
import sys, time
from cpcx.cli import stop_on_sigterm
from cpcx.crf import crf_pool
if sys.argv[1] == "cli":
    stop_on_sigterm()
pool = crf_pool(2)
try:
    while len(pool._processes) < 2 or any(p.pid is None for p in pool._processes.values()):
        time.sleep(0.05)
    pool.submit(sum, [1, 2]).result()  # the workers are up and serving
    print(" ".join(str(pid) for pid in pool._processes), flush=True)
    time.sleep(120)
finally:
    pool.shutdown(wait=True, cancel_futures=True)
    print("pool shut down", flush=True)
"""


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], seconds: float = 30.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


def _start(mode: str) -> tuple[subprocess.Popen, list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = parent.stdout.readline()
    if not line.strip():
        parent.kill()
        pytest.fail(f"the pool did not start: {parent.stderr.read()[-2000:]}")
    return parent, [int(pid) for pid in line.split()]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_workers_exit_when_their_parent_is_killed():
    parent, workers = _start("plain")
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)  # no finally, no atexit: the pool is never shut down
    parent.wait()
    left = _wait_gone(workers)
    for pid in left:  # do not leave them behind for the rest of the suite either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"CRF workers {left} outlived their killed parent"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_sigterm_ends_a_command_like_ctrl_c_and_shuts_the_pool_down():
    parent, workers = _start("cli")
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=60)
    # the handler raised KeyboardInterrupt: the finally block ran (in a command, user_errors then prints
    # "interrupted ... re-run to resume" and exits 130); Python's default would have died of the signal
    assert "pool shut down" in out and parent.returncode != -signal.SIGTERM, err[-2000:]
    assert "KeyboardInterrupt" in err
    assert not _wait_gone(workers, 10.0), "CRF workers survived the pool's shutdown"


def test_in_process_use_of_the_cli_leaves_sigterm_alone():
    """Only `cpcx` itself turns SIGTERM into Ctrl-C: a test suite or notebook calling the app in-process keeps its
    own handler (a pytest that took it on made its forked pool workers raise inside pytest, and hang)."""
    from typer.testing import CliRunner

    from cpcx.cli import app

    before = signal.getsignal(signal.SIGTERM)
    assert CliRunner().invoke(app, ["doctor", "--help"]).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_worker_forked_from_cpcx_gets_sigterm_back_to_its_default():
    script = ("import signal; from cpcx.cli import stop_on_sigterm; from cpcx.crf import init_worker; "
              "stop_on_sigterm(); assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL; "
              "init_worker(); print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


@pytest.mark.parametrize("sig, says, stopped", [(signal.SIGKILL, "SIGKILL: the out-of-memory killer", False),
                                                (signal.SIGTERM, "stopped by SIGTERM from outside", True),
                                                (signal.SIGABRT, "died (signal 6 (SIGABRT))", False)])
def test_a_broken_pool_says_why_its_workers_died(sig, says, stopped):
    """A scheduler's cancel sends SIGTERM to every process of the job: the message must not blame memory then
    (it said "out of memory?" for any death), and must when the kernel's OOM killer sent SIGKILL."""
    from concurrent.futures.process import BrokenProcessPool

    from cpcx.crf import crf_pool, worker_death

    pool = crf_pool(2)
    try:
        pool.submit(sum, [1, 2]).result()
        while len(pool._processes) < 2 or any(p.pid is None for p in pool._processes.values()):
            time.sleep(0.05)
        pids = list(pool._processes)
        for pid in pids if sig == signal.SIGTERM else pids[:1]:  # SIGTERM: the whole group; else one worker
            os.kill(pid, sig)
        with pytest.raises(BrokenProcessPool):
            for _ in range(100):
                pool.submit(sum, [1, 2]).result()
                time.sleep(0.05)
        why, from_outside = worker_death(pool)
        assert says in why and from_outside is stopped
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def test_a_broken_pool_is_one_message_naming_its_workers_the_field_and_the_fix():
    """Both pools of `cpcx pseudo` (CRF, saliency) say it the same way: what died, what is kept, what to lower."""
    from concurrent.futures.process import BrokenProcessPool

    from cpcx.crf import broken_pool_error, crf_pool

    pool = crf_pool(1)
    try:
        pool.submit(sum, [1, 2]).result()
        os.kill(next(iter(pool._processes)), signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            for _ in range(100):
                pool.submit(sum, [1, 2]).result()
                time.sleep(0.05)
        error = broken_pool_error(pool, "pseudo.saliency", "the finished maps are kept", "pseudo.workers",
                                  kind="saliency")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    text = str(error)
    assert text.startswith("pseudo.saliency: a saliency worker process was killed (SIGKILL")
    assert "the finished maps are kept, lower pseudo.workers and re-run" in text
