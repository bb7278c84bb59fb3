"""How ``benchmarks/results.py`` runs things: a command measured from a small wrapper process (wall time, CPU
time, peak RSS), the environment every stage gets, and the local LLM server for the rows that need one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from results_rows import LOCAL_LLMS, ROOT


# ----------------------------------------------------------------------------------- measured runs
@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    cpu_seconds: float
    max_rss_mib: float


#: Runs the command and writes its exit code, CPU time and peak RSS as JSON. Measuring from this small process
#: matters: a child's ru_maxrss starts at its parent's RSS at fork time (hundreds of MiB for a parent with torch).
_WRAPPER = """
import json, os, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the command too: wait for it to stop
child = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # the benchmark stopped: stop the stage too
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime,
               "maxrss_kib": usage.ru_maxrss}, out)
"""


def run_wrapped(argv: Sequence[str], log: Path, env: dict[str, str],
                wrapper: str = _WRAPPER) -> tuple[float, dict | None]:
    """Run a command through ``wrapper`` (a script that writes its usage JSON to argv[1]), output to ``log``
    → (wall seconds, the usage JSON or None)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_suffix(".usage.json")
    usage_file.unlink(missing_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", wrapper, str(usage_file), *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            process.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: no stage may go on running without us
            process.terminate()
            process.wait()
            raise
        seconds = time.perf_counter() - start
    return round(seconds, 2), read_json(usage_file)


def run_measured(argv: Sequence[str], log: Path, env: dict[str, str]) -> Measured:
    """Run a command, output to ``log``; ``wait4`` in a small wrapper process gives its CPU time and peak RSS,
    its reaped children (the CRF workers) included: the largest resident set of the stage, whichever process."""
    seconds, usage = run_wrapped(argv, log, env)
    usage = usage or {"returncode": -1, "cpu": 0.0, "maxrss_kib": 0}
    return Measured(usage["returncode"], seconds, round(usage["cpu"], 1),
                    round(usage["maxrss_kib"] / 1024, 1))  # ru_maxrss is in KiB on Linux


def run_stages(recipe_file: str, args: Sequence[str], stages: Sequence[str], name: str, logs: Path) -> dict:
    """Each stage of one run as its own measured process, skipping stages already finished with this recipe
    (e.g. a copied run folder) → ``{"argv", "stages": {stage: seconds…}}`` plus ``"error"`` at the first failure."""
    from cpcx.recipe_io import load_recipe
    from cpcx.runs import read_stage_state, stage_is_current

    entry: dict = {"argv": " ".join(["cpcx", "<stage>", "-r", recipe_file, *args]), "stages": {}}
    recipe = load_recipe(ROOT / recipe_file, list(args))
    for stage in stages:
        if stage_is_current(recipe, stage):
            entry["stages"][stage] = {"seconds": read_stage_state(recipe, stage).get("seconds"), "reused": True}
            continue
        log = logs / f"{name}-{stage}.log"
        measured = run_measured([*cpcx_argv(), stage, "-r", recipe_file, *args], log, child_env())
        entry["stages"][stage] = {"seconds": measured.seconds, "cpu_seconds": measured.cpu_seconds,
                                  "max_rss_mib": measured.max_rss_mib}
        if measured.returncode != 0:
            entry["error"] = f"{stage} failed: {tail(log)}"
            break
    return entry


def pseudo_scores(pseudo: Path) -> dict:
    """CRF and no-CRF pseudo-label mIoU × 100 of a finished pseudo stage folder."""
    import numpy as np

    from cpcx.metrics import scores_from_confusion

    no_crf = scores_from_confusion(np.array(read_json(pseudo / "no_crf.json")["matrix"])).miou
    return {"crf": 100 * read_json(pseudo / "metrics.json")["miou"], "no_crf": 100 * float(no_crf)}


def save_results(results: dict, out: Path, stem: str, render) -> None:
    """Stamp ``results`` (date, machine) and write ``out/<stem>.json`` and its table ``out/<stem>.md``."""
    import datetime as dt
    import platform

    results.update({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": f"{os.cpu_count()} cores, {platform.machine()}, no GPU"})
    write_report(results, out / stem, render)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command a results file names: ``benchmarks/<script>`` and its arguments (``sys.argv`` when None)."""
    return " ".join([f"benchmarks/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def write_report(doc: dict, out: Path, render) -> str:
    """Write ``doc`` to ``out`` as .json and its table ``render(doc)`` as .md, each atomically (a killed
    benchmark leaves the previous pair whole); return the table."""
    from cpcx import atomic

    text = render(doc)
    atomic.ensure_dir(out.parent)
    atomic.write_json(out.with_suffix(".json"), doc)
    atomic.write_text(out.with_suffix(".md"), text)
    return text


def mean_std(values: Sequence[float]) -> str:
    """'m' for one value, 'm ± s' (sample standard deviation, ddof 1) for more, '—' for none."""
    import numpy as np

    if not values:
        return "—"
    return f"{np.mean(values):.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def cpcx_argv() -> list[str]:
    exe = Path(sys.executable).parent / "cpcx"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "cpcx"]


def tail(log: Path, lines: int = 2) -> str:
    """The last lines of a log that say something (rich draws tracebacks in boxes: those lines are skipped)."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    said = [line.strip() for line in text if line.strip() and line.lstrip()[:1] not in "│╭╰─┃┏┗━"]
    return " ".join(said[-lines:])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ the LLM
class LocalLLM:
    """One local model of tests/llm/serve.sh (``model``: gemma or qwen) behind llama-cpp-python's server; stopped
    at the end only if this script started it."""

    SCRIPT = ROOT / "tests" / "llm" / "serve.sh"

    def __init__(self, model: str, port: int, log: Path):
        self.model, self.port, self.log, self.started, self.note = model, port, log, False, "not needed"
        self.description = LOCAL_LLMS[model].description

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _up(self) -> bool:
        """The server on our port answers and serves the model the rows name (not some other server). The
        timeout is long because llama-cpp-python answers one request at a time: a server busy with another
        benchmark's query answers once that is done (no server at all fails at once: connection refused)."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=90) as response:
                return LOCAL_LLMS[self.model].alias in response.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return False

    def _script_server_alive(self) -> bool:
        """A server of this model that serve.sh started before us (maybe on another port): never ours to stop."""
        pidfile = Path(os.environ.get("CPCX_LLM_DIR", ROOT / ".cache" / "llm")) / f"server-{self.model}.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
            return True
        except (OSError, ValueError):
            return False

    def start(self) -> bool:
        if self._up():
            self.note = f"{self.description} already serving at {self.url}"
            return True
        other = self._script_server_alive()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            code = subprocess.run([str(self.SCRIPT), self.model, "start", str(self.port)], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=ROOT).returncode
        self.started = code == 0 and not other
        if other and not self._up():
            self.note = (f"none: a {self.model} server started by serve.sh runs on another port; stop it "
                         f"(`tests/llm/serve.sh {self.model} stop`) or pass its port")
            return False
        if code == 0 and self._up():
            self.note = f"{self.description} served by llama-cpp-python at {self.url}, 1 thread, seed 0"
            return True
        self.note = f"none: `tests/llm/serve.sh {self.model} start {self.port}` failed ({tail(self.log, 2)})"
        return False

    def stop(self) -> None:
        if self.started:
            subprocess.run([str(self.SCRIPT), self.model, "stop"], cwd=ROOT, capture_output=True)
            self.started = False
