"""Context decoupling in token space (issue 20): are the pseudo-labels' errors in the multi-class images a matter of
co-occurrence that breaking the context while training would fix?

    .venv/bin/python benchmarks/context_paste_probe.py --seeds 0 1 2
    .venv/bin/python benchmarks/context_paste_probe.py --seeds 0 --probability 1.0 --out /tmp/paste   # another rate

Two thirds of the object/background errors of voc-mini's pseudo-labels lie in the images that hold more than one
class (``scene_split`` below: object/background IoU about 58 there, 71 in the single-class images), where classes
that always appear together (person with horse, motorbike, chair; plants with rooms) share each other's context.
Context decoupling augmentation (CDA, Su et al., ICCV 2021) pastes objects cut from other images into the training
images, so that a class is seen away from its usual companions. Here it is done on the cached token grids that
voc-mini trains from: with ``--probability`` a training sample gets the object patches of a single-class donor
image whose class it lacks (the patches where the donor's first-pass CRF pseudo-label is that class on more than
half of the patch, at least 4), shifted by up to a quarter of the grid without wrapping, and the donor's class
joins the sample's labels (and its cluster vector). Everything else is voc-mini as it ships (``variants.py``'s
``bf16-crf5``); the donors' masks come from that recipe's run of the same seed (``runs-bench/var-bf16-crf5-sN``),
so this is a second round: train, label, train again with pastes, label.

Each seed trains ``cpcx train`` with the pasting (``PastedItems`` replaces the trainer's item set in this process
only) and labels with ``cpcx pseudo`` unchanged, in ``runs-ag/paste<P>-sN``; the CRF pseudo-labels of both rounds
are scored on all 311 ids, the first 200 (choose) and the other 111 (report), and on the single- and the
multi-class images apart. Results: ``benchmarks/results/context-paste.{json,md}`` (``--out``); seeds already in the
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
from backbones import CHOOSE  # noqa: E402
from results_rows import VOC_MINI_BEFORE_TRIM, VOC_RECIPE  # noqa: E402
from variants import VARIANTS  # noqa: E402

BASE_RUN = "var-bf16-crf5-s{seed}"  # voc-mini as it ships (variants.py), the first round
MIN_CELLS = 4  # a donor needs at least this many object patches
SHIFT = 0.25  # pasted objects move by up to this share of the grid, each axis
SALT = 7919  # the pasting's random stream, apart from the view draw of the same sample


# ----------------------------------------------------------------------------------------------- the pasting
def donor_masks(dataset, labels_dir: Path, grid: int) -> dict:
    """{image index: (class, (grid, grid) bool patch mask)} of the single-class images: the patches whose area is
    more than half that class in the image's label PNG (squashed to the square grid, as the token cache is)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cpcx.data.palette import load_label_png

    labels = np.asarray(dataset.labels)
    out = {}
    for i, image_id in enumerate(dataset.ids):
        present = np.flatnonzero(labels[i, 1:]) + 1
        if len(present) != 1:
            continue
        c = int(present[0])
        area = torch.from_numpy((load_label_png(labels_dir / f"{image_id}.png") == c).astype(np.float32))
        mask = F.adaptive_avg_pool2d(area[None, None], (grid, grid))[0, 0] > 0.5
        if int(mask.sum()) >= MIN_CELLS:
            out[i] = (c, mask)
    return out


def paste(x, label, donor_x, donor_mask, donor_class: int, dy: int, dx: int):
    """Host tokens ``x`` (h, w, e) and ``label`` (C,) with the donor's masked tokens shifted by (dy, dx) patches
    pasted over them (cells shifted past an edge are dropped, not wrapped) → (tokens, label with the donor's
    class), new tensors."""
    import torch

    h, w = donor_mask.shape
    moved = torch.zeros_like(donor_mask)
    moved_x = torch.zeros_like(donor_x)
    ys, yd = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
    xs, xd = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
    moved[yd, xd] = donor_mask[ys, xs]
    moved_x[yd, xd] = donor_x[ys, xs]
    out = x.clone()
    out[moved] = moved_x[moved]
    label = label.clone()
    label[donor_class] = 1
    return out, label


def pasted_items_class(donors: dict, labels, matrix, probability: float):
    """The trainer's item set with the pasting: a subclass of ``cpcx.train._Items`` (cached tokens only)."""
    import numpy as np
    import torch

    from cpcx import train as trainer
    from cpcx.augment import sample_generator
    from cpcx.model.network import cluster_vectors

    order = sorted(donors)
    labels = np.asarray(labels)

    class PastedItems(trainer._Items):
        def __getitem__(self, key):
            item = super().__getitem__(key)
            epoch, i = key
            g = sample_generator(self.seed + SALT, epoch, i)
            if self.cache is None or float(torch.rand((), generator=g)) >= probability:
                return item
            pool = [j for j in order if j != i and labels[i, donors[j][0]] == 0]
            if not pool:
                return item
            j = pool[int(torch.randint(len(pool), (1,), generator=g))]
            c, mask = donors[j]
            view = int(torch.randint(len(self.cache.views), (1,), generator=g))
            if self.cache.views[view] == "hflip":
                mask = mask.flip(-1)
            reach = int(SHIFT * mask.shape[0])
            dy, dx = (int(v) for v in torch.randint(-reach, reach + 1, (2,), generator=g))
            x, label = paste(item["x"], item["label"], self.cache.get(j, view), mask, c, dy, dx)
            u = torch.from_numpy(cluster_vectors(label[None].numpy(), matrix)[0])
            return {**item, "x": x, "label": label, "u": u}

    return PastedItems


# ------------------------------------------------------------------------------------------------ the scores
def scene_split(dataset, folder: Path, multi_folder: Path | None = None) -> dict:
    """{all | choose | report | single | multi: mIoU and object/background IoU} of the label PNGs in ``folder``;
    single / multi: the images with one / several object classes. With ``multi_folder`` the multi-class images'
    labels come from there (one run's labels for the single-class images, another's for the rest)."""
    import numpy as np

    from cpcx.data.palette import load_label_png
    from cpcx.metrics import ConfusionMatrix
    from diagnose_pseudo import miou_and_fg

    labels = np.asarray(dataset.labels)
    parts = {p: ConfusionMatrix(dataset.num_classes) for p in ("all", "choose", "report", "single", "multi")}
    for i, image_id in enumerate(dataset.ids):
        scene = "single" if labels[i, 1:].sum() == 1 else "multi"
        source = multi_folder if scene == "multi" and multi_folder is not None else folder
        mask, predicted = dataset.load_mask(i), load_label_png(source / f"{image_id}.png")
        for part in ("all", "choose" if i < CHOOSE else "report", scene):
            parts[part].update(mask, predicted)
    return {p: miou_and_fg(m.matrix, dataset.classes) for p, m in parts.items() if m.matrix.sum()}


# ------------------------------------------------------------------------------------------------- one seed
def recipe_of(seed: int, name: str, runs: Path):
    from cpcx.recipe_io import load_recipe

    return load_recipe(ROOT / VOC_RECIPE, [f"name={name}", f"seed={seed}", f"runs_dir={runs}",
                                           f"train.feature_cache_dir={ROOT / 'runs-bench' / 'features-bb'}",
                                           *VOC_MINI_BEFORE_TRIM, *VARIANTS["bf16-crf5"][1]])


def run_seed(seed: int, probability: float, runs: Path) -> dict:
    import torch

    from cpcx import train as trainer
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
    donors = donor_masks(dataset, base / "pseudo" / "labels", recipe.model.img_size // 14)
    matrix = trainer._cluster_matrix(recipe, dataset.classes)
    original = trainer._Items
    trainer._Items = pasted_items_class(donors, dataset.labels, matrix, probability)
    try:
        started = time.perf_counter()
        trainer.run_train(recipe)
        train_s = time.perf_counter() - started
    finally:
        trainer._Items = original
    started = time.perf_counter()
    run_pseudo(recipe)
    return {"donors": len(donors), "train_s": round(train_s), "pseudo_s": round(time.perf_counter() - started),
            **scores(seed, probability, runs, dataset)}


def scores(seed: int, probability: float, runs: Path, dataset) -> dict:
    """Both rounds' labels scored, and the two routed by scene: the first round's for the single-class images,
    the second's (pasted) for the multi-class ones."""
    first = ROOT / "runs-bench" / BASE_RUN.format(seed=seed) / "pseudo" / "labels"
    second = runs / f"paste{probability:g}-s{seed}" / "pseudo" / "labels"
    return {"base": scene_split(dataset, first), "paste": scene_split(dataset, second),
            "routed": scene_split(dataset, first, multi_folder=second)}


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
    command = "benchmarks/context_paste_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for seed in args.seeds:
        doc = json.loads(path.read_text()) if path.is_file() else {}
        if doc.get("probability") != args.probability:
            doc = {"probability": args.probability, "command": command, "seeds": {}}
        if str(seed) in doc["seeds"]:
            print(f"seed {seed}: done, kept", flush=True)
            continue
        entry = run_seed(seed, args.probability, args.runs_dir.resolve())
        print(f"seed {seed}: {json.dumps(entry)}", flush=True)
        doc = json.loads(path.read_text()) if path.is_file() else doc  # another process may have added seeds
        if doc.get("probability") != args.probability:
            doc = {"probability": args.probability, "command": command, "seeds": {}}
        doc["seeds"][str(seed)] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, doc)
        atomic.write_text(args.out.with_suffix(".md"), render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
