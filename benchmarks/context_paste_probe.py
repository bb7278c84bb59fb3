"""Context decoupling in token space (issue 20): are the pseudo-labels' errors in the multi-class images a matter of
co-occurrence that breaking the context while training would fix?

    .venv/bin/python benchmarks/context_paste_probe.py --seeds 0 1 2
    .venv/bin/python benchmarks/context_paste_probe.py --seeds 0 --probability 1.0 --out /tmp/paste   # another rate

voc-mini's pseudo-labels are far worse in the images that hold more than one class than in the others (this
script's single / multi parts: object/background IoU about 57 against 71), where classes that always appear together (person with horse, motorbike, chair; plants with rooms) share each other's context.
Context decoupling augmentation (CDA, Su et al., ICCV 2021) pastes objects cut from other images into the training
images, so that a class is seen away from its usual companions. Here it is done on the cached token grids that
voc-mini trains from: with ``--probability`` a training sample gets the object patches of a single-class donor
image whose class it lacks (the patches where the donor's first-pass CRF pseudo-label is that class on more than
half of the patch, at least 4), shifted by up to a quarter of the grid without wrapping, and the donor's class
joins the sample's labels (and its cluster vector). Everything else is voc-mini as it ships (``variants.py``'s
``bf16-crf5``); the donors' masks come from that recipe's run of the same seed (``runs-bench/var-bf16-crf5-sN``),
so this is a second round: train, label, train again with pastes, label. The pipeline switch that routes by scene
inside one pseudo stage is ``pseudo.context_paste`` (``cpcx/pseudo/context_paste.py``, which this script's pasting uses).

Each seed trains cpcx's trainer with the pasting (``cpcx.pseudo.context_paste.PastedItems`` as its item set) and labels
every image with ``cpcx pseudo`` unchanged, in ``runs-ag/paste<P>-sN``; the CRF pseudo-labels of both rounds
are scored on all 311 ids, the first 200 (choose) and the other 111 (report), and on the single- and the
multi-class images apart (``self_training_runs.score_folder``), and routed by scene: the first round's labels for the
single-class images, the second's for the others (``--rescore`` scores the seeds in the json again from their
runs, without training). Results: ``benchmarks/results/context-paste.{json,md}`` (``--out``); seeds already in the
json are kept, so two processes can share the seeds (each merges its own on writing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_rows import VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402
from self_training_runs import score_folder  # noqa: E402
from supervised_bound import resumable_doc  # noqa: E402
from variants import VARIANTS  # noqa: E402

BASE_RUN = "var-bf16-crf5-s{seed}"  # voc-mini as it ships (variants.py), the first round
MIN_CELLS = 4  # a donor needs at least this many object patches (pseudo.context_paste.min_patches' default)
SHIFT = 0.25  # pasted objects move by up to this share of the grid, each axis (pseudo.context_paste.shift's)


# ------------------------------------------------------------------------------------------------- one seed
def recipe_of(seed: int, name: str, runs: Path):
    from cpcx.recipe_io import load_recipe

    return load_recipe(ROOT / VOC_RECIPE, [f"name={name}", f"seed={seed}", f"runs_dir={runs}",
                                           f"train.feature_cache_dir={ROOT / 'runs-bench' / 'features-bb'}",
                                           *VOC_MINI_BEFORE_TRIM, *VARIANTS["bf16-crf5"][1]])


def run_seed(seed: int, probability: float, runs: Path) -> dict:
    import functools

    import torch
    from rich.console import Console

    from cpcx import distributed
    from cpcx import train as trainer
    from cpcx.pseudo.context_paste import PastedItems, donor_masks
    from cpcx.data import build_dataset
    from cpcx.pseudo import run_pseudo

    torch.set_num_threads(1)
    base = ROOT / "runs-bench" / BASE_RUN.format(seed=seed)
    if not (base / "pseudo" / "labels").is_dir():
        raise SystemExit(f"{base}: no first round; run `.venv/bin/python benchmarks/variants.py --only bf16-crf5` "
                         f"(seed {seed}) first")
    name = f"paste{probability:g}-s{seed}"
    recipe = recipe_of(seed, name, runs)
    if not (runs / name / "clusters").is_dir():  # the first round's clusters: the same cluster token
        shutil.copytree(base / "clusters", runs / name / "clusters")
    dataset = build_dataset(recipe.dataset, "train")
    grid = (recipe.model.img_size // 14,) * 2
    donors = donor_masks(dataset.labels, dataset.ids, base / "pseudo" / "labels", grid, MIN_CELLS)
    items = functools.partial(PastedItems, donors=donors, matrix=trainer.run_cluster_matrix(recipe, dataset.classes),
                              probability=probability, shift=SHIFT)
    started = time.perf_counter()
    # cpcx train's own trainer with the pasted item set: the whole second round, labels for every image (the
    # pipeline switch, pseudo.context_paste, trains the same network inside the pseudo stage and routes by scene)
    with distributed.joined(recipe.train.device) as info:
        trainer.Trainer(recipe, info, Console(highlight=False), items=items).fit(resume=False)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    run_pseudo(recipe)
    return {"donors": len(donors), "train_s": round(train_s), "pseudo_s": round(time.perf_counter() - started),
            **scores(seed, probability, runs, dataset)}


def scores(seed: int, probability: float, runs: Path, dataset) -> dict:
    """Both rounds' labels scored, and the two routed by scene: the first round's for the single-class images,
    the second's (pasted) for the multi-class ones."""
    first = ROOT / "runs-bench" / BASE_RUN.format(seed=seed) / "pseudo" / "labels"
    second = runs / f"paste{probability:g}-s{seed}" / "pseudo" / "labels"
    return {"base": score_folder(dataset, first), "paste": score_folder(dataset, second),
            "routed": score_folder(dataset, first, multi_folder=second)}


# ------------------------------------------------------------------------------------------------ the report
def render(doc: dict) -> str:
    import numpy as np

    from results_exec import mean_std

    seeds = sorted(doc["seeds"], key=int)
    lines = ["# Context decoupling in token space (issue 20)", "",
             f"`{doc['command']}`; pasting probability {doc['probability']:g}; seeds {', '.join(seeds)}. CRF "
             "pseudo-labels of the 311 train ids, mIoU (object/background IoU in brackets), mean ± std over the "
             "seeds, each seed's figures after the colon.", "",
             "| pseudo-labels | all 311 | choose 200 | report 111 | single-class images | multi-class images |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, title in (("base", "voc-mini as it ships (first round)"), ("paste", "+ pasted single-class objects"),
                       ("routed", "first round on single-class images, pasted on multi-class ones")):
        if any(key not in doc["seeds"][s] for s in seeds):
            continue
        cells = []
        for part in ("all", "choose", "report", "single", "multi"):
            miou = [doc["seeds"][s][key][part]["miou"] for s in seeds]
            fg = np.mean([doc["seeds"][s][key][part]["fg_iou"] for s in seeds])
            cells.append(f"{mean_std(miou)} ({fg:.1f})" + (": " + " / ".join(f"{v:.1f}" for v in miou)
                                                              if part == "all" else ""))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if all("choose_single" in doc["seeds"][s]["base"] for s in seeds):
        lines += ["", "On the 200 choose ids alone, mIoU per seed (" + ", ".join(seeds) + "):", "",
                  "| pseudo-labels | single-class images | multi-class images |", "|---|---|---|"]
        for key, title in (("base", "first round"), ("paste", "pasted")):
            cells = [" / ".join(f"{doc['seeds'][s][key][f'choose_{scene}']['miou']:.1f}" for s in seeds)
                     for scene in ("single", "multi")]
            lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += ["", "Seconds per seed (train with pastes, then the pseudo stage): " + "; ".join(
        f"seed {s}: {doc['seeds'][s]['train_s']} + {doc['seeds'][s]['pseudo_s']}" for s in seeds) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probability", type=float, default=0.5, help="share of the training samples pasted into")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs-ag")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "context-paste")
    parser.add_argument("--rescore", action="store_true",
                        help="score the seeds already in the json again from their runs (no training)")
    args = parser.parse_args(argv)
    from cpcx import atomic

    if args.rescore:
        from cpcx.data import build_dataset

        path = args.out.with_suffix(".json")
        doc = json.loads(path.read_text())
        dataset = build_dataset(recipe_of(0, "rescore", args.runs_dir.resolve()).dataset, "train")
        for seed in doc["seeds"]:
            doc["seeds"][seed].update(scores(int(seed), doc["probability"], args.runs_dir.resolve(), dataset))
        atomic.write_json(path, doc)
        atomic.write_text(args.out.with_suffix(".md"), render(doc))
        return 0

    path = args.out.with_suffix(".json")
    for seed in args.seeds:
        doc = resumable_doc(path, "benchmarks/context_paste_probe.py", argv, probability=args.probability)
        if str(seed) in doc["seeds"]:
            print(f"seed {seed}: done, kept", flush=True)
            continue
        entry = run_seed(seed, args.probability, args.runs_dir.resolve())
        print(f"seed {seed}: {json.dumps(entry)}", flush=True)
        # read again: a process running other seeds beside this one may have written its own since
        doc = resumable_doc(path, "benchmarks/context_paste_probe.py", argv, probability=args.probability)
        doc["seeds"][str(seed)] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, doc)
        atomic.write_text(args.out.with_suffix(".md"), render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
