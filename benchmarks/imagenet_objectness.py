"""The ImageNet classifiers' own heads as objectness: does their dense class evidence know the object's extent?

    .venv/bin/python benchmarks/imagenet_objectness.py --runs runs-cp/vm-s0 runs-cp/vm-s1 runs-cp/vm-s2

Issue 20 names "objectness from outside the classifier". The EfficientNet-Lite networks that `make weights` builds
keep their 1000-way ImageNet heads, trained on 1.28 M images with labels that no other signal here has, and cpcx
drops them. Applied at every location of the last feature map (a CAM with a softmax over the 1000 classes per
location), each VOC class gets the summed probability of the ImageNet classes it covers (``VOC_TO_IMAGENET``: dog
breeds for dog, liners and canoes for boat, clothing for person, which ImageNet lacks). The image is squashed to
``--size`` and averaged with its mirror, as the pipeline reads it.

Two questions, answered on the 311 training images with their masks (the image labels choose the classes):

1. *Objectness*: object vs background IoU of the present classes' summed probability above a threshold, against
   the pseudo-labels' own (the runs' CRF labels).
2. *Area*: the rank correlation (Spearman) of the share of the image it calls object with the truth's, by scene,
   against the pseudo-labels' own share (8j: the area the maps get wrong).

Results: ``benchmarks/results/imagenet-objectness.{json,md}``. About 0.6 s an image per network on one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


#: ImageNet-1k indices per VOC class (tests/test_imagenet_objectness.py checks them against timm's class names).
VOC_TO_IMAGENET: dict[str, list[int]] = {
    "aeroplane": [404, 895], "bicycle": [444, 671], "bird": _span(7, 24) + _span(80, 100) + _span(127, 146),
    "boat": [472, 484, 510, 554, 576, 625, 628, 693, 724, 780, 814, 833, 871, 914],
    "bottle": [440, 720, 737, 898, 907], "bus": [654, 779, 874],
    "car": [436, 468, 479, 511, 581, 609, 627, 656, 661, 675, 717, 734, 751, 817, 864],
    "cat": _span(281, 285), "chair": [423, 559, 765, 857], "cow": [345, 346, 347], "diningtable": [532],
    "dog": _span(151, 268), "horse": [339, 603], "motorbike": [665, 670],
    "person": [399, 400, 411, 433, 445, 451, 457, 459, 474, 515, 578, 601, 608, 610, 614, 617, 639, 652, 655, 689,
               697, 735, 834, 836, 837, 841, 842, 869, 981, 982, 983],
    "pottedplant": [738, 883], "sheep": [348, 349], "sofa": [831], "train": [466, 547, 565, 705, 820, 829],
    "tvmonitor": [527, 664, 782, 851],
}
NETWORKS = ("lite0", "lite2")
THRESHOLDS = (0.1, 0.2, 0.3)


def imagenet_classifier(name: str, weights: Path):
    """timm's ``tf_efficientnet_<name>`` with its 1000-way ImageNet head, from a ``cpcx weights import`` file."""
    import timm

    from cpcx.weights import load_state_dict_file

    net = timm.create_model(f"tf_efficientnet_{name}", pretrained=False, num_classes=1000)
    net.load_state_dict(load_state_dict_file(weights))
    return net.eval()


def dense_class_probs(net, image, classes: list[str], size: int):
    """(len(classes), h, w): the summed per-location ImageNet probability of each VOC class's ImageNet classes,
    image and mirror averaged. ``net``: a timm EfficientNet with its classifier."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    cfg = net.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (torch.cat([x, x.flip(-1)]) - mean) / std
    with torch.inference_mode():
        features = net.forward_features(x)  # (2, 1280, h, w): before the global pool
        logits = torch.einsum("bchw,kc->bkhw", features, net.classifier.weight)
        logits = logits + net.classifier.bias[None, :, None, None]
        probs = logits.softmax(1)
        probs = (probs[0] + probs[1].flip(-1)) / 2
    return torch.stack([probs[VOC_TO_IMAGENET[c]].sum(0) for c in classes]).numpy()


def present_mass(dense, labels):
    """(h, w) the summed probability of the image's object classes (``labels`` over background + classes)."""
    return dense[labels[1:] > 0].sum(0)


def objectness_iou(masks, maps, threshold: float) -> float:
    """Object/background IoU (percent) over all images of the maps (h, w) above ``threshold``, upsampled."""
    import torch
    import torch.nn.functional as F

    inter = union = 0
    for mask, grid in zip(masks, maps):
        up = F.interpolate(torch.from_numpy(grid)[None, None].float(), mask.shape, mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        valid = mask != 255
        predicted, truth = (up > threshold) & valid, (mask > 0) & valid
        inter += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
    return 100 * inter / max(union, 1)


def label_iou(masks, label_maps) -> float:
    """Object/background IoU (percent) of label maps (e.g. the pseudo-labels) over all images."""
    inter = union = 0
    for mask, labels in zip(masks, label_maps):
        valid = mask != 255
        predicted, truth = (labels > 0) & valid, (mask > 0) & valid
        inter += int((predicted & truth).sum())
        union += int((predicted | truth).sum())
    return 100 * inter / max(union, 1)


def measure(runs: list[Path], size: int, weights_dir: Path) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    from cpcx.data import build_dataset
    from cpcx.data.palette import load_label_png
    from cpcx.recipe import load_recipe
    from diagnose_pseudo import object_area_shares, scene_of

    recipe = load_recipe(runs[0] / "pseudo" / "recipe.resolved.yaml", [])
    dataset = build_dataset(recipe.dataset, recipe.pseudo.split)
    classes, labels = list(dataset.classes)[1:], np.asarray(dataset.labels)
    masks = [dataset.load_mask(i) for i in range(len(dataset))]
    truth = object_area_shares(masks)
    scenes = {s: scene_of(dataset.labels) == s for s in ("single", "multi")}
    rank = lambda est: {s: float(spearmanr(est[w], truth[w])[0]) for s, w in scenes.items()}  # noqa: E731
    doc: dict = {"pseudo": {}, "networks": {}}
    for run in runs:
        pseudo = [load_label_png(run / "pseudo" / "labels" / f"{i}.png") for i in dataset.ids]
        doc["pseudo"][str(run)] = {"fg_iou": label_iou(masks, pseudo), "area_rank": rank(object_area_shares(pseudo))}
    for name in NETWORKS:
        start = time.perf_counter()
        net = imagenet_classifier(name, weights_dir / f"efficientnet_{name}.safetensors")
        mass = [present_mass(dense_class_probs(net, dataset.load_image(i), classes, size), labels[i])
                for i in range(len(dataset))]
        doc["networks"][name] = {
            "fg_iou": {str(t): objectness_iou(masks, mass, t) for t in THRESHOLDS},
            "area_rank": {str(t): rank(np.array([(m > t).mean() for m in mass])) for t in THRESHOLDS},
            "seconds": round(time.perf_counter() - start)}
    return doc


def render(doc: dict) -> str:
    import numpy as np

    pseudo = list(doc["pseudo"].values())
    lines = ["# The ImageNet heads as objectness (issue 20)", "", f"`.venv/bin/python {doc['command']}`", "",
             "Object/background IoU over the 311 training images, and Spearman's rank correlation of the share of "
             "each image called object with the mask's, by scene. The pseudo-labels' row is the mean over the runs.",
             "", "| source | object/bg IoU | area rank corr., single-class | area rank corr., multi-class |",
             "|---|---:|---:|---:|",
             f"| the runs' CRF pseudo-labels | {np.mean([p['fg_iou'] for p in pseudo]):.1f} | "
             f"{np.mean([p['area_rank']['single'] for p in pseudo]):.2f} | "
             f"{np.mean([p['area_rank']['multi'] for p in pseudo]):.2f} |"]
    for name, row in doc["networks"].items():
        for t in row["fg_iou"]:
            lines.append(f"| {name}'s head, present classes' probability > {t} | {row['fg_iou'][t]:.1f} | "
                         f"{row['area_rank'][t]['single']:.2f} | {row['area_rank'][t]['multi']:.2f} |")
    seconds = ", ".join(f"{n} {r['seconds']} s" for n, r in doc["networks"].items())
    return "\n".join(lines + ["", f"Input {doc['size']} px, image and mirror; time for 311 images: {seconds}."]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished voc runs (cpcx pseudo done)")
    parser.add_argument("--size", type=int, default=448, help="input side in pixels (stride 32: 14 × 14 at 448)")
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "imagenet-objectness")
    args = parser.parse_args(argv)

    import torch

    from results_exec import command_line, write_report

    torch.set_num_threads(1)
    doc = {"command": command_line(__file__, argv),
           "size": args.size, **measure(args.runs, args.size, args.weights_dir)}
    print(write_report(doc, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
