"""The weights of ``pseudo.saliency`` screened on a finished run's maps (docs/results.md 8n).

    .venv/bin/python benchmarks/saliency_screen.py --run runs-bench/sw-shipped-s0 --isnet weights/isnet.onnx \\
        --settings 0.1/0.1 0.2/0.2 0.35/0.35 0.5/0.5 0.7/0.7 0.5/0 0.5/0.1 0.5/0.2 0.7/0.2 --ids choose

Decodes the run's label-conditioned maps as ``cpcx pseudo`` does (``diagnose_pseudo.decode_as_pseudo``: class probe
and, with the context paste, the pasted network on the multi-class images), mixes ISNet's foreground into each
image's upsampled maps with ``cpcx.saliency.fuse`` at each setting ``single/multi`` (the weight on images with one
object class / with several; a ``+`` before a weight makes that scene's mix add object only; ``x2`` after the
multi-class weight takes that scene's maps from two passes, ``pseudo.saliency.passes_multi``, the second at
``--size-later``; 0/0 is the run as it is), and scores them through the run's CRF on the first 200 ids (``--ids
choose``, where the weights may be picked) or the other 111 (``report``), split by scene. The donors of the pasted
network are the run's own, as the switch makes them. The ISNet maps are computed once into ``--maps``
(``pseudo.saliency``'s folder layout) and shared by every run of the same images.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from backbones import CHOOSE  # noqa: E402
from results_exec import command_line, write_report  # noqa: E402

PARTS = ("all", "single", "multi")


def parse_setting(text: str) -> tuple[tuple[float, bool], tuple[float, bool], int]:
    """``single/multi[xP]`` → ((weight, add_only), (weight, add_only), passes on the multi-class images); a ``+``
    before a weight makes that scene's mix add object only (``fuse(add_only=True)``)."""
    single, _, multi = text.partition("/")
    multi, _, passes = (multi or single).partition("x")

    def one(part: str) -> tuple[float, bool]:
        return float(part.lstrip("+")), part.startswith("+")

    return one(single), one(multi), int(passes or 1)


def screen(run: Path, isnet: Path, settings: list[str], ids: str, maps: Path, workers: int, size: int = 1024,
           size_later: int = 512, precision: str = "float") -> dict:
    import numpy as np
    from rich.console import Console

    from cpcx.crf import CRFParams, crf_labels
    from cpcx.metrics import ConfusionMatrix
    from cpcx.pseudo.infer import upsample
    from cpcx.saliency import SaliencyMaps, fuse, saliency_folder
    from cpcx.recipe import load_recipe
    from diagnose_pseudo import decode_as_pseudo, load_paste_probs, load_run, miou_and_fg, scene_of

    start = time.perf_counter()
    recipe = load_recipe(run / "pseudo" / "recipe.resolved.yaml", [])
    dataset, probs, feats = load_run(recipe)
    decoded = decode_as_pseudo(probs, feats, dataset.labels, recipe, load_paste_probs(recipe)).float()
    cfg = SimpleNamespace(weights=isnet, size=size, cache_dir=maps, precision=precision)
    mix = SaliencyMaps(cfg, dataset, saliency_folder(cfg, maps, dataset))
    chosen = [i for i in range(len(dataset)) if (i < CHOOSE) == (ids == "choose")]
    mix.ensure(chosen, workers, Console())
    crf, scenes = CRFParams.from_config(recipe.crf), scene_of(dataset.labels)
    by_passes = {1: mix}
    for passes in sorted({parse_setting(s)[2] for s in settings} - {1}):
        by_passes[passes] = SaliencyMaps(cfg, dataset, saliency_folder(cfg, maps, dataset, passes, size_later),
                                         passes=passes, first=mix, later_size=size_later)
        by_passes[passes].ensure([i for i in chosen if scenes[i] == "multi"], workers, Console())
    matrices = {s: {p: ConfusionMatrix(dataset.num_classes) for p in PARTS} for s in settings}
    for i in chosen:
        mask, image = dataset.load_mask(i), dataset.load_image(i)
        classes = np.flatnonzero(dataset.labels[i] > 0)
        full = upsample(decoded[i], classes, mask.shape)
        for setting in settings:
            single, multi, passes = parse_setting(setting)
            weight, add_only = multi if scenes[i] == "multi" else single
            saliency = by_passes[passes if scenes[i] == "multi" else 1].map(i)
            mixed = fuse(full, classes, saliency, weight, add_only)
            labels = crf_labels(image, mixed.numpy(), classes, crf)
            for part in ("all", str(scenes[i])):
                matrices[setting][part].update(mask, labels)
    rows = {s: {p: miou_and_fg(m.matrix, dataset.classes) for p, m in parts.items()} for s, parts in matrices.items()}
    return {"run": str(run), "ids": ids, "images": len(chosen), "rows": rows,
            "seconds": round(time.perf_counter() - start)}


def render(doc: dict) -> str:
    lines = ["# pseudo.saliency's weights on a run's maps (issue 20)", "", f"`.venv/bin/python {doc['command']}`", "",
             f"Run `{doc['run']}`, {doc['images']} images ({doc['ids']} ids), CRF mIoU (object/background IoU); a "
             "setting is the weight on single-class / multi-class images.", "",
             "| single / multi | all | single-class | multi-class |", "|---|---:|---:|---:|"]
    for setting, parts in doc["rows"].items():
        cells = [f"{parts[p]['miou']:.1f} ({parts[p]['fg_iou']:.1f})" if p in parts else "—" for p in PARTS]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run with a finished pseudo stage")
    parser.add_argument("--isnet", type=Path, default=ROOT / "weights" / "isnet.onnx", help="make weights-saliency")
    parser.add_argument("--settings", nargs="+", default=["0/0", "0.5/0.2"], help="single/multi weights, + for add-only")
    parser.add_argument("--ids", choices=("choose", "report"), default="choose")
    parser.add_argument("--maps", type=Path, default=ROOT / "runs-bench" / "saliency-voc", help="ISNet maps' cache_dir")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="the network's input size (pseudo.saliency.size)")
    parser.add_argument("--size-later", type=int, default=512, help="pseudo.saliency.size_later (settings with x2)")
    parser.add_argument("--precision", choices=("float", "int8"), default="float", help="pseudo.saliency.precision")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "saliency-screen")
    args = parser.parse_args(argv)
    for setting in args.settings:
        try:
            *weights, passes = parse_setting(setting)
        except ValueError:
            parser.error(f"--settings {setting}: write single/multi weights, e.g. 0.5/0.2 (or 0.5/0.3x2)")
        if not all(0 <= w <= 1 for w, _ in weights):
            parser.error(f"--settings {setting}: weights lie in 0..1")
        if not 1 <= passes <= 3:
            parser.error(f"--settings {setting}: 1 to 3 passes (pseudo.saliency.passes_multi)")
    if not args.isnet.is_file():
        parser.error(f"--isnet {args.isnet}: no such file; build it with `make weights-saliency`")
    doc = screen(args.run, args.isnet, args.settings, args.ids, args.maps, args.workers, args.size, args.size_later,
                 args.precision)
    doc["command"] = command_line("benchmarks/saliency_screen.py", argv)
    print(write_report(doc, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
