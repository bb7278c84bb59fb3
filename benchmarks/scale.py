"""How cpcx scales with the number of images (issue 21, point 1): a data set that grows, N = 300, 1,000, 3,000
and 10,000 images at VOC sizes, through clusters → train (token cache) → pseudo (CRF) → segment.

    .venv/bin/python benchmarks/scale.py --sizes 300 1000              # build the sets (once), run, write results
    .venv/bin/python benchmarks/scale.py --sizes 3000 10000            # the larger sizes, added to the same json
    .venv/bin/python benchmarks/scale.py --build-only --sizes 10000    # only the data set
    .venv/bin/python benchmarks/scale.py --render                      # re-write the md from the json
    .venv/bin/python benchmarks/scale.py --sizes 300 1000 --stages segment   # re-measure one stage after a change

**The data.** ``build_scaled_set`` makes a ``folder`` data set (``images/``, ``masks/``, ``labels.csv``,
``manifest.json``) of N train images and ``round(N · 1449 / 10582)`` val images (full VOC's val:train ratio)
from the VOC slice ($CPCX_DATA/voc2012-mini): each one is a real slice image (train images from the slice's
train split, val from its val split, cycled in a seeded order), randomly mirrored, cropped (60–100 % of each
side, keeping at least one object pixel) and rescaled to a long side of 320–500 px (VOC's sizes), its mask
through the same flip/crop (nearest-neighbour resize), its image-level labels the classes present in the new
mask. So every stage sees distinct files of VOC sizes and the pseudo-label mIoU stays measurable. The set lives
outside the repository (``--data-dir``, default ``../scale-data`` beside the checkout, with the run folders and
recipes' runs under ``<data-dir>/runs``); it is built in a temp folder renamed into place when complete, and a
re-run reuses a set of the same N, val size, seed and builder version.

**The setting.** The point is how cpcx's own code scales (caches, file handling, memory held per image), not
the networks' cost per image, which is measured elsewhere (README, ``docs/results.md``) and multiplied for the
projection. So every run is ``recipes/voc-mini.yaml`` with the data set replaced and ``CHEAP`` overrides: timm's
random-init ``test_vit`` (64 wide, 16-px patches) at the demo's 336 px (a 21×21 grid, the demo's 24×24 in
shape), one HV-BiLSTM epoch, the demo's class probe and CRF (5 iterations, pinned in ``CHEAP`` so that a
later change to voc-mini cannot change a recorded row; full image size: the real per-image CRF cost), one CRF
worker, no figures, the grid segmenter for 2 epochs. Child processes get ``OMP_NUM_THREADS=1`` (the machine's
2 cores are shared; one CRF worker plus the main process use about one).

**What is measured.** Each stage is its own process under a small wrapper (``_WRAPPER``): wall seconds, CPU
seconds (its children included), ``ru_maxrss`` (peak resident set of the largest process, which counts the pages
of the memory-mapped token cache it has touched), and, sampled every 0.2 s over the whole process tree, the
peak anonymous memory (``RssAnon``: what the code holds; file-backed pages of a memory map are page cache the
kernel can drop) and the peak file-backed resident memory. Disk: each stage's folder, the token cache, the data
set. Per image: seconds / N. Checks, in the md: time grows linearly (per-image CPU and wall seconds at each N within
+30 % of the previous N's; fixed costs make it fall, which passes) and memory stays flat (peak anonymous memory
at each N at most 20 % and 32 MiB above the smallest N's); a violation is flagged with its stage.

Results: ``benchmarks/results/scale.{json,md}``; sizes already in the json are skipped (``--redo`` measures
again); logs under ``<data-dir>/logs``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_exec import child_env, cpcx_argv, read_json, run_wrapped, save_results, tail  # noqa: E402
from results_rows import ROOT, SALIENCY_OFF, VOC_RECIPE  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
SIZES = (300, 1000, 3000, 10000)
STAGES = ("clusters", "train", "pseudo", "segment")
#: Full VOC 2012: train_aug 10,582 images, val 1,449.
VAL_RATIO = 1449 / 10582
BUILDER_VERSION = 1
LONG_SIDE = (320, 500)
CROP_SIDE = (0.6, 1.0)
#: The cheap setting: voc-mini with these (and the data set) overridden.
CHEAP = ("model.backbone=test_vit", "model.pretrained=false", "model.weights=null", "model.fuse=null",
         "model.img_size=336", "model.lstm_hidden=16", "train.epochs=1", "train.warmup_epochs=0",
         "train.workers=0", "pseudo.img_size=336", "pseudo.workers=1", "pseudo.figures=0",
         "segment.epochs=2", "segment.eval_every=2", "segment.workers=0", "crf.iterations=5",
         "pseudo.context_paste.enabled=false", *SALIENCY_OFF)
#: Checks: per-image wall seconds may grow by this factor from one N to the next; peak anonymous memory may
#: exceed the smallest N's by this fraction and this many MiB.
TIME_GROWTH = 1.30
MEMORY_GROWTH, MEMORY_SLACK_MIB = 0.20, 32.0


# ------------------------------------------------------------------------------------------- the data set
def scaled_set_name(n: int, seed: int) -> str:
    return f"voc-scaled-n{n}-s{seed}"


def val_size(n: int) -> int:
    return max(1, round(n * VAL_RATIO))


def vary(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random mirror, crop (keeping an object pixel when one of 10 draws does) and rescale of an image and its
    mask, the same geometry for both (bilinear for the image, nearest for the mask)."""
    from PIL import Image

    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    h, w = mask.shape
    for _ in range(10):
        ch, cw = (int(round(s * rng.uniform(*CROP_SIDE))) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = mask[y:y + ch, x:x + cw]
        if ((crop > 0) & (crop < 255)).any():
            image, mask = image[y:y + ch, x:x + cw], crop
            break
    h, w = mask.shape
    scale = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1)) / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize(size, Image.NEAREST))
    return image, mask


def build_scaled_set(voc_root: Path, n: int, seed: int, data_dir: Path, val: int | None = None,
                     log=print) -> Path:
    """``<data_dir>/voc-scaled-n<n>-s<seed>``: a folder data set of ``n`` train and ``val`` (default
    ``val_size(n)``) val images varied from the VOC slice; an existing complete set of the same kind is reused."""
    from PIL import Image

    from cpcx.data import build_dataset
    from cpcx.data.classes import VOC_CLASSES
    from cpcx.data.palette import save_label_png
    from cpcx.recipe import VOCDatasetConfig

    val = val_size(n) if val is None else val
    folder = Path(data_dir) / scaled_set_name(n, seed)
    want = {"version": BUILDER_VERSION, "train": n, "val": val, "seed": seed, "source": str(Path(voc_root).resolve())}
    found = read_json(folder / "manifest.json")
    if {k: found.get(k) for k in want} == want:
        return folder
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(data_dir).glob(f".{folder.name}.tmp-*"):  # an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(data_dir) / f".{folder.name}.tmp-{os.getpid()}"
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    start = time.perf_counter()
    rng = np.random.default_rng([seed, n, val])
    rows = []
    for split, count, prefix in (("train", n, "t"), ("val", val, "v")):
        source = build_dataset(VOCDatasetConfig(root=voc_root), split)
        order = np.concatenate([rng.permutation(len(source)) for _ in range(-(-count // len(source)))])[:count]
        for k, src in enumerate(order):
            image, mask = vary(source.load_image(int(src)), source.load_mask(int(src)), rng)
            image_id = f"{prefix}{k:05d}_{source.ids[src]}"
            Image.fromarray(image).save(tmp / "images" / f"{image_id}.jpg", quality=90)
            save_label_png(tmp / "masks" / f"{image_id}.png", mask)
            present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:len(VOC_CLASSES) + 1])
            rows.append(f"{image_id}.jpg,{';'.join(VOC_CLASSES[c] for c in present)},{split}")
    (tmp / "labels.csv").write_text("image,labels,split\n" + "\n".join(rows) + "\n")
    manifest = {**want, "classes": list(VOC_CLASSES), "long_side": list(LONG_SIDE), "crop_side": list(CROP_SIDE),
                "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if folder.exists():  # another kind of set under this name: replaced
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log(f"built {folder}: {n} train + {val} val images in {manifest['seconds']} s")
    return folder


def dataset_override(folder: Path) -> str:
    from cpcx.data.classes import VOC_CLASSES

    return f"dataset={{kind: folder, root: '{folder}', masks: masks, classes: [{', '.join(VOC_CLASSES)}]}}"


# ------------------------------------------------------------------------------------- measured stages
#: Runs the command; ``wait4`` gives CPU time and ``ru_maxrss``; a thread samples RssAnon / RssFile of the whole
#: process tree (the CRF workers included) every 0.2 s. Measured from this small process: a child's ru_maxrss
#: starts at its parent's RSS at fork time.
_WRAPPER = r"""
import json, os, signal, subprocess, sys, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
peak = {"anon_kib": 0, "file_kib": 0, "samples": 0}
stop = threading.Event()

def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out

def status(pid):
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    got[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return got

def sample():
    while not stop.wait(0.2):
        anon = file_ = 0
        for p in tree(child.pid):
            s = status(p)
            anon += s.get("RssAnon", 0)
            file_ += s.get("RssFile", 0)
        peak["anon_kib"] = max(peak["anon_kib"], anon)
        peak["file_kib"] = max(peak["file_kib"], file_)
        peak["samples"] += 1

thread = threading.Thread(target=sample, daemon=True)
thread.start()
_, status_, usage = os.wait4(child.pid, 0)
stop.set()
thread.join()
with open(sys.argv[1], "w") as out:
    json.dump({"returncode": os.waitstatus_to_exitcode(status_), "cpu": usage.ru_utime + usage.ru_stime,
               "maxrss_kib": usage.ru_maxrss, **peak}, out)
"""


def run_sampled(argv: Sequence[str], log: Path, env: dict[str, str]) -> dict:
    """One measured process (see ``_WRAPPER``) → {returncode, seconds, cpu_seconds, max_rss_mib, peak_anon_mib,
    peak_file_mib}."""
    seconds, u = run_wrapped(argv, log, env, _WRAPPER)
    u = u or {"returncode": -1, "cpu": 0.0, "maxrss_kib": 0, "anon_kib": 0, "file_kib": 0}
    return {"returncode": u["returncode"], "seconds": seconds, "cpu_seconds": round(u["cpu"], 1),
            "max_rss_mib": round(u["maxrss_kib"] / 1024, 1), "peak_anon_mib": round(u.get("anon_kib", 0) / 1024, 1),
            "peak_file_mib": round(u.get("file_kib", 0) / 1024, 1)}


def du_mib(path: Path) -> float:
    """Bytes on disk (allocated blocks: a sparse file counts what it holds) under ``path``, in MiB."""
    if not path.exists():
        return 0.0
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return round(sum(p.stat().st_blocks * 512 for p in paths) / 2**20, 2)


def _csv_seconds(path: Path) -> float | None:
    """Sum of the ``seconds`` column of a stage's metrics.csv (its epochs)."""
    import csv

    try:
        with open(path, newline="") as handle:
            return round(sum(float(row["seconds"]) for row in csv.DictReader(handle)), 2)
    except (OSError, KeyError, ValueError):
        return None


def run_size(n: int, seed: int, voc_root: Path, data_dir: Path, logs: Path, stages: Sequence[str] = STAGES,
             before: dict | None = None) -> dict:
    """Measure ``stages`` of size ``n``; with only some stages (``--stages``), the others' measurements are kept
    from ``before`` (the json's entry) and their outputs from the run folder, and the re-measured stages' folders
    are removed first (a stage measured from scratch, its own caches included)."""
    folder = build_scaled_set(voc_root, n, seed, data_dir)
    name = f"scale-n{n}-s{seed}"
    runs = data_dir / "runs"
    args = [dataset_override(folder), f"name={name}", f"seed={seed}", f"runs_dir={runs}", *CHEAP]
    if tuple(stages) == STAGES or not before:
        stages, before = STAGES, None
        shutil.rmtree(runs / name, ignore_errors=True)  # every stage measured from scratch
    else:
        for stage in stages:
            shutil.rmtree(runs / name / stage, ignore_errors=True)
    entry: dict = {"n": n, "val": val_size(n), "data_set": str(folder),
                   "argv": " ".join(["cpcx", "<stage>", "-r", VOC_RECIPE, *(f'"{a}"' if " " in a else a for a in args)]),
                   "data_mib": du_mib(folder), "stages": dict((before or {}).get("stages", {}))}
    if before:  # what the stage measured before (e.g. before a fix), kept beside the new figures
        import datetime as dt

        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        entry["remeasured"] = {**before.get("remeasured", {}), **{s: now for s in stages}}
        entry["previous"] = {**before.get("previous", {}), **{s: before["stages"][s] for s in stages
                                                              if s in before.get("stages", {})}}
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for stage in stages:
        measured = run_sampled([*cpcx_argv(), stage, "-r", VOC_RECIPE, *args], logs / f"{name}-{stage}.log", env)
        code = measured.pop("returncode")
        measured["disk_mib"] = du_mib(runs / name / stage)
        entry["stages"][stage] = measured
        print(f"N={n} {stage}: {measured}", flush=True)
        if code != 0:
            entry["error"] = f"{stage} failed: {tail(logs / f'{name}-{stage}.log')}"
            break
    if "error" not in entry:
        run = runs / name
        entry["token_cache_mib"] = du_mib(run / "train" / "features")
        entry["segment_features_mib"] = du_mib(run / "segment" / "features")
        entry["train_epoch_seconds"] = _csv_seconds(run / "train" / "metrics.csv")
        entry["segment_epoch_seconds"] = _csv_seconds(run / "segment" / "metrics.csv")
        pseudo = read_json(run / "pseudo" / "metrics.json")
        entry["pseudo_miou"] = 100 * pseudo.get("miou", float("nan"))
        entry["pseudo_miou_no_crf"] = 100 * pseudo.get("miou_no_crf", float("nan"))
        entry["segment_val_miou"] = 100 * read_json(run / "segment" / "metrics.json").get("miou", float("nan"))
    return entry


# --------------------------------------------------------------------------------------------- checks
def checks(entries: dict[int, dict]) -> list[str]:
    """Flags: a stage whose per-image CPU seconds (or wall seconds) grow by more than TIME_GROWTH from one N to the
    next, or whose peak anonymous memory exceeds the smallest N's by more than MEMORY_GROWTH and MEMORY_SLACK_MIB.
    CPU seconds are the primary time check: other jobs on the machine's cores stretch wall seconds, not CPU ones."""
    sizes = sorted(n for n, e in entries.items() if "error" not in e)
    flags = []
    for stage in STAGES:
        for a, b in zip(sizes, sizes[1:]):
            for key, what in (("cpu_seconds", "CPU"), ("seconds", "wall")):
                per_a = entries[a]["stages"][stage][key] / a
                per_b = entries[b]["stages"][stage][key] / b
                if per_b > TIME_GROWTH * per_a:
                    flags.append(f"time ({what}): {stage} {1000 * per_a:.1f} ms/image at N={a} → {1000 * per_b:.1f} "
                                 f"at N={b} (×{per_b / per_a:.2f} > ×{TIME_GROWTH})")
        if sizes:
            base = entries[sizes[0]]["stages"][stage]["peak_anon_mib"]
            for b in sizes[1:]:
                mem = entries[b]["stages"][stage]["peak_anon_mib"]
                if mem > base * (1 + MEMORY_GROWTH) and mem - base > MEMORY_SLACK_MIB:
                    flags.append(f"memory: {stage} peak anonymous {base:.0f} MiB at N={sizes[0]} → {mem:.0f} at N={b}")
    return flags


def marginal_rows(entries: dict[int, dict]) -> list[str]:
    """Per-image cost between consecutive N, (t_b − t_a) / (b − a): the fixed costs (start-up, model load, the
    CRF worker's import) cancel, so this is the number to multiply by a full data set's size."""
    sizes = sorted(n for n, e in entries.items() if "error" not in e)
    rows = []
    for a, b in zip(sizes, sizes[1:]):
        cells = []
        for stage in STAGES:
            sa, sb = entries[a]["stages"][stage], entries[b]["stages"][stage]
            wall = 1000 * (sb["seconds"] - sa["seconds"]) / (b - a)
            cpu = 1000 * (sb["cpu_seconds"] - sa["cpu_seconds"]) / (b - a)
            cells.append(f"{wall:.1f} / {cpu:.1f}")
        rows.append(f"| {a} → {b} | " + " | ".join(cells) + " |")
    return rows


def memory_slope(entries: dict[int, dict], stage: str, key: str = "peak_anon_mib") -> float | None:
    """MiB per 1,000 images between the smallest and largest N (least squares over all N)."""
    sizes = sorted(n for n, e in entries.items() if "error" not in e)
    if len(sizes) < 2:
        return None
    y = [entries[n]["stages"][stage][key] for n in sizes]
    return float(np.polyfit(np.array(sizes) / 1000, y, 1)[0])


# ------------------------------------------------------------------- inputs of the full-scale projection
#: The real networks' per-image costs on this 2-core machine, from the measurements the README quotes (voc-mini at
#: bf22919: ViT-S/14 + EfficientNet-Lite0 fused 24×24 grid of 816 channels, 311 train / 172 val images):
#: (what, seconds per image, how it was derived).
DEMO_COSTS = (
    ("train: token extraction, 2 views, both networks", 230 / 311, "230 s / 311 images"),
    ("train: one HV-BiLSTM epoch on cached tokens", 38 / 311, "38 s / 311 images (voc-mini: 6 epochs)"),
    ("pseudo: network + class probe + CRF (2 workers)", 177 / 311, "177 s / 311 images, class probe 29 s of it"),
    ("segment: a val image through both networks", 61 / 172, "61 s / 172 val images"),
    ("segment: one grid-head epoch", 118 / 16 / 311, "118 s / 16 epochs / 311 images (voc-mini: 16 epochs)"),
)
#: The demo's token cache: 24 × 24 cells × 816 channels × float16, per view.
DEMO_TOKEN_BYTES_PER_VIEW = 24 * 24 * 816 * 2
FULL_SETS = (("VOC train_aug", 10582, 1449), ("COCO train2014", 82081, 40504))


def projection_inputs() -> list[str]:
    lines = ["## Inputs for the full-scale projection (issue 21, point 2)", "",
             "The real networks' cost per image on this machine (2 cores), from the voc-mini demo's measured stages "
             "(README, at bf22919; fused ViT-S/14 + EfficientNet-Lite0 grid, 24 × 24 × 816):", "",
             "| what | s / image | from |", "|---|---:|---|"]
    lines += [f"| {what} | {sec:.3f} | {how} |" for what, sec, how in DEMO_COSTS]
    per_view = DEMO_TOKEN_BYTES_PER_VIEW
    lines += ["", f"Token cache of the demo grid: 24 × 24 × 816 × 2 B = {per_view / 2**20:.2f} MiB per image and view; "
              "training caches 2 views (orig + hflip), the segmenter's val cache 1:", ""]
    lines += [f"- {name}: train {n:,} × 2 views × {per_view / 2**20:.2f} MiB = **{n * 2 * per_view / 2**30:.1f} GiB**, "
              f"val {val:,} × 1 view = {val * per_view / 2**30:.1f} GiB" for name, n, val in FULL_SETS]
    lines += ["", "These were measured on 311 images (the CRF, image decoding and label files are in them); the "
              "benchmark above, with cheap networks, says whether cpcx's part of each holds per image as N grows "
              "(then multiply by N), and how memory grows (the line under Checks)."]
    return lines


# --------------------------------------------------------------------------------------------- the md
def render(results: dict) -> str:
    entries = {int(n): e for n, e in results.get("sizes", {}).items()}
    ok = {n: e for n, e in entries.items() if "error" not in e}
    lines = [
        "# Scale benchmark: cpcx's stages against the number of images", "",
        f"Generated by `benchmarks/scale.py` ({results.get('date', '?')}; {results.get('machine', '?')}; child "
        "processes OMP_NUM_THREADS=1, other jobs sharing the cores). Data: a `folder` set of N train images (and "
        "N·1449/10582 val) at VOC sizes, varied from the VOC slice (mirror, crop, rescale; masks alike). "
        "Setting: `recipes/voc-mini.yaml` with the data set replaced and these overrides (the networks are "
        "cheap on purpose; the CRF, class probe, caches and files are the demo's):", "",
        "    " + " ".join(results.get("cheap", CHEAP)), "",
        "Per stage: wall s, CPU s (children included), ru_maxrss (largest process; counts the token memmap "
        "pages it touched), peak anonymous memory of the process tree (sampled every 0.2 s: what the code "
        "holds), peak file-backed resident memory (mostly the memory-mapped token cache: page cache), disk of "
        "the stage's run folder.", "",
        "| N | stage | wall s | CPU s | ms/image (wall) | ms/image (CPU) | ru_maxrss MiB | peak anon MiB "
        "| peak file MiB | disk MiB | disk KiB/image |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(entries):
        e = entries[n]
        for stage, m in e["stages"].items():
            lines.append(f"| {n} | {stage} | {m['seconds']:.1f} | {m['cpu_seconds']:.1f} | {1000 * m['seconds'] / n:.1f} "
                         f"| {1000 * m['cpu_seconds'] / n:.1f} | {m['max_rss_mib']:.0f} | {m['peak_anon_mib']:.0f} "
                         f"| {m['peak_file_mib']:.0f} | {m['disk_mib']:.1f} | {1024 * m['disk_mib'] / n:.1f} |")
        if "error" in e:
            lines.append(f"| {n} | **failed** | {e['error']} |||||||||")
        for stage, m in e.get("previous", {}).items():
            lines.append(f"| {n} | {stage} (earlier run) | {m['seconds']:.1f} "
                         f"| {m['cpu_seconds']:.1f} | {1000 * m['seconds'] / n:.1f} | {1000 * m['cpu_seconds'] / n:.1f} "
                         f"| {m['max_rss_mib']:.0f} | {m['peak_anon_mib']:.0f} | {m['peak_file_mib']:.0f} "
                         f"| {m['disk_mib']:.1f} | {1024 * m['disk_mib'] / n:.1f} |")
    lines += ["", "| N | val | data set MiB | token cache MiB (KiB/image) | segment val-token cache MiB "
              "| train epoch s | segment epochs s | pseudo mIoU (no CRF) | segment val mIoU |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for n in sorted(ok):
        e = ok[n]
        lines.append(f"| {n} | {e['val']} | {e['data_mib']:.0f} | {e['token_cache_mib']:.1f} "
                     f"({1024 * e['token_cache_mib'] / n:.0f}) | {e['segment_features_mib']:.1f} "
                     f"| {e['train_epoch_seconds']} | {e['segment_epoch_seconds']} "
                     f"| {e['pseudo_miou']:.1f} ({e['pseudo_miou_no_crf']:.1f}) | {e['segment_val_miou']:.1f} |")
    if len(ok) >= 2:
        lines += ["", "Marginal cost per image between consecutive N, ms wall / ms CPU (fixed costs cancel):", "",
                  "| N | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES), *marginal_rows(ok)]
    flags = checks(entries)
    lines += ["", "## Checks", "",
              f"Time linear: per-image CPU seconds (and wall seconds) of each stage at each N within ×{TIME_GROWTH} "
              f"of the previous N's (fixed costs make them fall, which passes). Memory flat: peak anonymous memory at each N at most {100 * MEMORY_GROWTH:.0f} % and "
              f"{MEMORY_SLACK_MIB:.0f} MiB above the smallest N's. Sizes measured: "
              f"{', '.join(str(n) for n in sorted(ok)) or 'none'}.", ""]
    lines += [f"- **FLAG** {f}" for f in flags] or ["- all stages pass both checks"]
    if len(ok) >= 2:
        lines += ["", "Growth of peak anonymous memory, MiB per 1,000 images (fit over the N measured): " +
                  ", ".join(f"{s} {memory_slope(ok, s):+.1f}" for s in STAGES) + "; of ru_maxrss: " +
                  ", ".join(f"{s} {memory_slope(ok, s, 'max_rss_mib'):+.1f}" for s in STAGES) + "."]
    lines += ["", *projection_inputs()]
    if results.get("notes"):
        lines += ["", "## Notes", "", *results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "scale-data",
                        help="where the data sets, run folders and logs go (outside the repository)")
    parser.add_argument("--voc", type=Path, default=None, help="the VOC slice (default $CPCX_DATA/voc2012-mini)")
    parser.add_argument("--build-only", action="store_true", help="build the data sets and stop")
    parser.add_argument("--redo", action="store_true", help="measure sizes already in the json again")
    parser.add_argument("--render", action="store_true", help="re-write the md from the json and stop")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="re-measure only these stages of sizes already run (the others' outputs are reused)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    voc = args.voc or Path(os.environ.get("CPCX_DATA", ROOT.parent / "shared" / "data")) / "voc2012-mini"
    data_dir = args.data_dir.resolve()
    results = read_json(args.out / "scale.json")
    if args.render:
        (args.out / "scale.md").write_text(render(results))
        return
    if args.build_only:
        for n in args.sizes:
            build_scaled_set(voc, n, args.seed, data_dir)
        return
    results.setdefault("sizes", {})
    results["cheap"] = list(CHEAP)
    for n in args.sizes:
        partial = tuple(args.stages) != STAGES
        if str(n) in results["sizes"] and "error" not in results["sizes"][str(n)] and not args.redo and not partial:
            print(f"N={n}: in {args.out / 'scale.json'} already (--redo to measure again)")
            continue
        results["sizes"][str(n)] = run_size(n, args.seed, voc, data_dir, data_dir / "logs", args.stages,
                                            results["sizes"].get(str(n)))
        save_results(results, args.out, "scale", render)  # after every size: a later failure loses nothing
    save_results(results, args.out, "scale", render)


if __name__ == "__main__":
    main()
