"""A cross-validated self-training round on voc-mini's pseudo-labels (issue 20).

    .venv/bin/python benchmarks/cv_self_training.py --seeds 0 1 2

The self-training round of ``self_training_probe.py`` (results.md 8b) trains the grid segmenter on all the
pseudo-labels and relabels the same images: the head learns each image's labels back, errors included. Here each
image is relabelled by heads that never saw it: the grid segmenter's DeepLabV3 head (voc-mini's ``segment``
settings, ``--epochs``) is trained on the run's CRF pseudo-labels of the other images (``--folds``-fold, the
folds of ``supervised_bound.py``), so only what holds across images can carry over. Its softmax, both views
averaged and restricted to the image's labelled classes, is mixed with the run's own label-conditioned maps
(``alpha`` of the head), then decoded as ``cpcx pseudo`` decodes (voc-mini's CRF).

``alpha`` is screened without the CRF on the first 200 ids (choose) of the first seed only; every seed is then
reported with the CRF on all 311 ids, the choose ids and the other 111 (report), beside the run's own pseudo-labels
(voc-mini as it ships, ``variants.py``'s ``bf16-crf5`` runs ``var-bf16-crf5-sN``). Seed N draws the folds and the
heads' initialisation. Results: ``benchmarks/results/cv-self-training.{json,md}``; a killed run resumes at its
next seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from affinity_probe import RUN  # noqa: E402
from backbones import CHOOSE  # noqa: E402
from results_exec import mean_std  # noqa: E402
from results_rows import ROOT  # noqa: E402
from supervised_bound import resumable_doc, seed_heads  # noqa: E402


def run_pseudo_labels(runs: Path, seed: int, dataset) -> list:
    """The run's CRF pseudo-labels (what ``cpcx pseudo`` wrote), one array per training image, in data set order."""
    import numpy as np
    from PIL import Image

    folder = runs / RUN.format(seed=seed) / "pseudo" / "labels"
    return [np.array(Image.open(folder / f"{dataset.ids[i]}.png")) for i in range(len(dataset))]


def mixed(weak, head, classes, alpha: float):
    """(k, H, W): ``weak`` (the run's maps over the image's ``classes``) mixed with ``head`` (all classes)
    renormalised over those ``classes``: (1 - alpha) weak + alpha head. Both are distributions over the classes."""
    ours = head[classes]
    ours = ours / ours.sum(0, keepdim=True).clamp_min(1e-12)
    return (1 - alpha) * weak + alpha * ours


def score(dataset, maps, heads, alphas, crf, indices):
    """{alpha: score_decodings' parts} for the run's maps mixed with the cross-validated heads' (alpha 0: the run)."""
    import numpy as np

    from cpcx.pseudo.infer import upsample
    from diagnose_pseudo import score_decodings

    def decode(i, mask, classes):
        weak = upsample(maps[i], classes, mask.shape)
        head = upsample(heads[i], np.arange(dataset.num_classes), mask.shape)
        return {a: mixed(weak, head, classes, a).numpy() for a in alphas}

    return score_decodings(dataset, indices, alphas, decode, crf, CHOOSE)


def no_crf_figures(parts: dict, names) -> dict:
    from diagnose_pseudo import miou_and_fg

    return {f"{p}_no_crf": miou_and_fg(m[0].matrix, names) for p, m in parts.items() if m[0].matrix.sum()}


def render(doc: dict) -> str:
    seeds = {int(k): v for k, v in doc["seeds"].items()}
    alpha = doc["alpha"]
    screen = [f"| {a} | {f['choose_no_crf']['miou']:.1f} | {f['choose_no_crf']['fg_iou']:.1f} |"
              for a, f in doc.get("screen", {}).items()]
    lines = ["# A cross-validated self-training round (issue 20)", "",
             f"`.venv/bin/python {doc['command']}` — the grid segmenter's head trained on the run's CRF pseudo-labels "
             f"of the other training images ({doc['folds']}-fold, {doc['epochs']} epochs), its softmax mixed with the "
             f"run's maps (alpha = the head's share), decoded as `cpcx pseudo` (labelled classes, voc-mini's CRF); runs "
             f"var-bf16-crf5-sN (voc-mini as it ships). mIoU (object/background IoU); choose = the first {CHOOSE} ids, "
             "report = the other 111.", "",
             f"Screen of alpha, seed {doc.get('screen_seed', '—')}, no CRF, choose ids:", "",
             "| alpha | mIoU | object/bg IoU |", "|---:|---:|---:|", *screen,
             "", f"Chosen: alpha {alpha}.", "",
             "| seed | pseudo-labels | CRF all | CRF choose / report | no CRF all | seconds (heads) |",
             "|---|---|---:|---|---:|---:|"]
    names = {"0.0": "voc-mini as it ships", str(alpha): f"+ cross-validated self-training, alpha {alpha}"}
    for seed, entry in sorted(seeds.items()):
        for key, label in names.items():
            f = entry["figures"][key]
            lines.append(f"| {seed} | {label} | {f['all_crf']['miou']:.1f} ({f['all_crf']['fg_iou']:.1f}) | "
                         f"{f['choose_crf']['miou']:.1f} / {f['report_crf']['miou']:.1f} | "
                         f"{f['all_no_crf']['miou']:.1f} ({f['all_no_crf']['fg_iou']:.1f}) | "
                         + (f"{entry['train_seconds']:.0f}" if key != "0.0" else "—") + " |")
    for key, label in names.items():
        pick = lambda part: [e["figures"][key][part]["miou"] for e in seeds.values()]  # noqa: E731
        fg = sum(e["figures"][key]["all_crf"]["fg_iou"] for e in seeds.values()) / len(seeds)
        lines.append(f"| mean | {label} | {mean_std(pick('all_crf'))} ({fg:.1f}) | "
                     f"{mean_std(pick('choose_crf'))} / {mean_std(pick('report_crf'))} | {mean_std(pick('all_no_crf'))} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="alpha is screened on the first")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=16, help="the heads' epochs (voc-mini's segmenter: 16)")
    parser.add_argument("--alphas", default="0.3,0.5,0.7,1.0", help="the head's shares screened")
    parser.add_argument("--alpha", type=float, default=None,
                        help="the head's share, as screened by an earlier run (no screen: for seeds run apart)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs-bench", help="where the var-bf16-crf5-sN runs are")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cv-self-training")
    args = parser.parse_args(argv)

    import torch

    from cpcx import atomic
    from cpcx.crf import CRFParams
    from diagnose_pseudo import split_figures

    torch.set_num_threads(1)
    path = args.out.with_suffix(".json")
    doc = resumable_doc(path, "benchmarks/cv_self_training.py", argv, folds=args.folds, epochs=args.epochs)
    if args.alpha is not None:
        doc.setdefault("alpha", args.alpha)
    runs = args.runs_dir.resolve()
    for seed in args.seeds:
        if str(seed) in doc["seeds"]:
            print(f"seed {seed}: done, kept", flush=True)
            continue
        started = time.perf_counter()  # the heads, with the reads of their tokens and labels
        recipe, dataset, maps, heads = seed_heads(seed, runs, lambda d: run_pseudo_labels(runs, seed, d),
                                                  args.folds, args.epochs)
        seconds = time.perf_counter() - started
        if "alpha" not in doc:  # screened once, on the choose ids of the first seed, without the CRF
            alphas = [0.0, *(float(a) for a in args.alphas.split(","))]
            screen = score(dataset, maps, heads, alphas, None, range(CHOOSE))
            doc["screen"] = {str(a): no_crf_figures(parts, dataset.classes) for a, parts in screen.items()}
            doc["screen_seed"] = seed
            doc["alpha"] = max(alphas[1:], key=lambda a: doc["screen"][str(a)]["choose_no_crf"]["miou"])
            print(f"screen: {json.dumps(doc['screen'])}; chosen alpha {doc['alpha']}", flush=True)
        scored = score(dataset, maps, heads, [0.0, doc["alpha"]], CRFParams.from_config(recipe.crf),
                       range(len(dataset)))
        doc["seeds"][str(seed)] = {"train_seconds": seconds,
                                   "figures": {str(a): split_figures(p, dataset.classes) for a, p in scored.items()}}
        print(json.dumps(doc["seeds"][str(seed)]), flush=True)
        atomic.write_json(path, doc)
    atomic.write_text(args.out.with_suffix(".md"), render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
