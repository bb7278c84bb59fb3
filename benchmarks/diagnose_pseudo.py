"""Where do the pseudo-labels of a trained run go wrong, and would another way of decoding them help?

    .venv/bin/python benchmarks/diagnose_pseudo.py -r recipes/voc-mini.yaml            # the demo run
    .venv/bin/python benchmarks/diagnose_pseudo.py -r recipes/voc-mini.yaml name=cpc-static-s1 runs_dir=runs-bench \
        train.feature_cache_dir=runs-bench/features-voc --variants none                   # a benchmark row

Reads the run's checkpoint and its frozen-backbone token cache (``pseudo.img_size`` = ``model.img_size``; the
ViT is not run), computes the label-conditioned patch probabilities exactly as ``cpcx pseudo`` does (so the
first line must equal the run's "mIoU without CRF"), and reports, without CRF, on the training images:

* the error split: foreground/background IoU, foreground recall and precision, and the share of pixels that
  are foreground in both prediction and truth but get another present class (confusion between objects);
* the resolution ceiling: the ground truth itself averaged over the same patch grid and decoded the same way;
* decoding variants that need no retraining: a fixed background threshold on the max-normalised class maps
  (CAM style), propagation of the maps along DINOv2 token affinities (random walk, as AffinityNet/PAR), and
  self-training a linear probe on the confident patches (only the image's classes compete), and taking
  object-vs-background from the tokens alone (first PCA component per image, or a class-agnostic probe), and
  the object class from dataset-level token prototypes (``decode_variants.py`` holds them all);
* the class probe of ``pseudo.class_probe`` (``cpcx/pseudo/class_probe.py``), when the recipe does not enable it
  (when it does, the first line is already decoded with it, as ``cpcx pseudo`` does); with ``pseudo.context_paste``
  the images with several object classes are decoded by the run's pasted network (``pseudo/paste/``) and its own
  probe, again as ``cpcx pseudo`` does;
* the same maps with the object's area of each image taken from the truth (``area_oracle_maps``: the network's
  ranking of the patches kept, the background scaled until the share called object is the truth's), for every
  image and for the multi-class images alone; ``--crf`` scores these and the labels as made through the recipe's
  CRF too, by scene and on the choose / report ids;
* a bound, not a decoding: a linear head on the same tokens trained on the ground-truth masks of the other
  images (10-fold cross-validation), label-conditioned the same way, with the background score scaled by a
  factor (the factors are compared on these images, so its best row is an optimistic bound);
* the largest confusions between objects (which class takes whose pixels).

Results go to ``benchmarks/results/diagnose.{json,md}`` (``--out``). Minutes on 2 CPU cores.
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
CRF_PARTS = ("all", "choose", "report", "single", "multi")
VARIANTS = ("threshold", "affinity", "selftrain", "objectness", "prototypes", "classprobe", "supervised")
# The variants that need the tokens on the maps' grid:
TOKEN_VARIANTS = ("affinity", "selftrain", "objectness", "prototypes", "classprobe", "supervised")

from backbones import CHOOSE  # noqa: E402  (the choose/report split every VOC benchmark uses)
from decode_variants import (  # noqa: E402  (re-exported: the tests and the sweep reach them through here)
    affinity_maps, object_share, pca_objectness, probe_objectness, prototype_maps, selftrain_maps,
    supervised_probe_probs, threshold_maps, with_objectness)


def load_run(recipe, checkpoint=None):
    """(dataset, raw flip-averaged patch probs (N, C, h, w), tokens of the original view (N, h, w, e)) of the run's
    network, or of the network saved at ``checkpoint``."""
    import numpy as np
    import torch

    from cpcx.data import build_dataset
    from cpcx.model import cluster_vectors, load_checkpoint
    from cpcx.pseudo import find_checkpoint
    from cpcx.pseudo.infer import PatchPredictor

    dataset = build_dataset(recipe.dataset, recipe.pseudo.split)
    net, meta = load_checkpoint(checkpoint or find_checkpoint(recipe))
    u = cluster_vectors(dataset.labels, meta.get("cluster_matrix")) if meta.get("num_clusters") else None
    cpu = torch.device("cpu")
    predictor = PatchPredictor(net, cpu, recipe.pseudo.precision, recipe.pseudo.img_size, flip=True,
                               class_max_norm=recipe.pseudo.class_max_norm, scales=recipe.pseudo.scales)
    cache = run_token_cache(recipe, net, dataset, predictor.size)
    probs, feats = [], []
    step = 8 if predictor.extra_sizes else 32  # larger inputs: smaller batches
    for start in range(0, len(dataset), step):
        batch = np.asarray(cache.tokens[start:start + step])[:, cache.views]  # (B, 2, ...): orig, hflip
        images = ([dataset.load_image(i) for i in range(start, start + len(batch))]
                  if predictor.extra_sizes else None)  # pseudo.scales: the other sizes run the ViT on the images
        probs.append(predictor.patch_probs(images, None if u is None else u[start:start + len(batch)], batch,
                                           cache.trunk))
        orig = torch.from_numpy(batch[:, 0]).float()
        if cache.trunk is not None:  # a trunk cache: the final tokens come out of the (fine-tuned) last blocks
            with torch.inference_mode():
                orig = net.backbone.forward_from(orig, cache.trunk)
        feats.append(orig)
    return dataset, torch.cat(probs), torch.cat(feats)


def load_paste_probs(recipe):
    """With ``pseudo.context_paste`` the images with several object classes are labelled by the pasted network(s) of
    ``pseudo/paste/`` (``paste-2/`` … with ``pseudo.context_paste.networks``): a list of their raw patch probs of
    every image (N, C, h, w), one per network, or None when the recipe leaves the switch off. A message naming the
    folder when the run's pseudo stage has not trained one yet."""
    from cpcx.errors import CpcxError
    from cpcx.pseudo.context_paste import paste_folder

    if not recipe.pseudo.context_paste.enabled:
        return None
    members = []
    for k in range(recipe.pseudo.context_paste.networks):
        checkpoint = paste_folder(recipe, k) / "weights" / "best.pt"
        if not checkpoint.is_file():
            raise CpcxError(f"{checkpoint}: the recipe enables pseudo.context_paste and the run has no pasted network "
                            "there; run `cpcx pseudo` with the same recipe first, or pass "
                            "pseudo.context_paste.enabled=false to diagnose the run's network alone")
        members.append(load_run(recipe, checkpoint)[1])
    return members


def paste_members(paste) -> list:
    """``paste`` as ``load_paste_probs`` gives it (a list, one raw-probs tensor per pasted network) or as one tensor
    (a single network) → the list."""
    return list(paste) if isinstance(paste, (list, tuple)) else [paste]


def raw_paste_probs(paste):
    """One raw-probs tensor for the variants that start from the raw probs: the pasted network's, or with several the
    mean of theirs (``cpcx pseudo`` averages their decoded maps instead: ``decode_as_pseudo``)."""
    if paste is None:
        return None
    members = paste_members(paste)
    return sum(members) / len(members)


def run_token_cache(recipe, net, dataset, size: int):
    """The run's frozen-backbone token cache of ``dataset`` at ``size`` in views orig + hflip, as ``cpcx pseudo``
    would reuse it; a message naming the cache folder when there is none."""
    import torch

    from cpcx.errors import CpcxError
    from cpcx.feature_cache import autocast_tag
    from cpcx.pseudo.infer import open_token_cache

    cache = open_token_cache(recipe, net, dataset, size, flip=True,
                             autocast=autocast_tag(torch.device("cpu"), recipe.pseudo.precision))
    if cache is None:
        raise CpcxError(f"{recipe.feature_cache_root()}: no token cache matching pseudo.img_size with views "
                        "orig+hflip; this diagnosis needs a frozen-backbone run (train.feature_cache: true)")
    return cache


def with_class_probe(maps, feats, labels, recipe, seed: int | None = None):
    """The maps with the object class re-decided by ``pseudo.class_probe`` as ``cpcx pseudo`` does: the probe
    trained (with the recipe's settings and seed, or ``seed``) on the single-class images' maps and tokens, then
    applied."""
    from cpcx.pseudo.class_probe import fit_from_batches, probe_images

    chosen = probe_images(labels, recipe.pseudo.class_probe)
    probe, _ = fit_from_batches([(maps[chosen], feats[chosen], labels[chosen])], labels[chosen],
                                recipe.pseudo.class_probe, recipe.seed if seed is None else seed)
    return probe.redecide(maps, feats, labels)


def confusion_of(pairs, num_classes: int):
    """The C×C confusion matrix (rows: truth) of (mask, predicted label map) pairs; 255 is ignored."""
    from cpcx.metrics import ConfusionMatrix

    confusion = ConfusionMatrix(num_classes)
    for mask, prediction in pairs:
        confusion.update(mask, prediction)
    return confusion.matrix


def scores_of(matrix, names) -> dict:
    """Everything this diagnosis reports of one decoding, from its confusion matrix alone: mIoU, per-class IoU
    and the error split (object/background IoU, recall, precision; the share of the pixels that are object in
    both truth and prediction but get another class)."""
    import numpy as np

    from cpcx.metrics import scores_from_confusion

    tp, fp, fn = int(matrix[1:, 1:].sum()), int(matrix[0, 1:].sum()), int(matrix[1:, 0].sum())
    wrong = tp - int(np.trace(matrix[1:, 1:]))
    scores = scores_from_confusion(matrix)
    return {"miou": scores.miou, "per_class_iou": scores.as_dict(names)["per_class_iou"],
            "fg_iou": tp / max(1, tp + fp + fn), "fg_recall": tp / max(1, tp + fn),
            "fg_precision": tp / max(1, tp + fp), "wrong_class_in_fg": wrong / max(1, tp)}


def score_decodings(dataset, indices, settings, decode, crf=None, choose: int = 200):
    """Confusions of several decodings of the same images, split as the probes report them: ``decode(i, mask,
    classes)`` → {setting: (k, H, W) probabilities over the image's ``classes``, numpy}; → {setting: {"choose" |
    "report" | "all": [no-CRF confusion, CRF confusion or None]}}, "choose" being the ids below ``choose`` (where
    settings are picked) and "report" the others. With ``crf`` (``CRFParams``) each decoding also goes through it."""
    import numpy as np

    from cpcx.crf import crf_labels
    from cpcx.metrics import ConfusionMatrix

    out = {s: {p: [ConfusionMatrix(dataset.num_classes), ConfusionMatrix(dataset.num_classes) if crf else None]
               for p in ("choose", "report", "all")} for s in settings}
    for i in indices:
        mask, classes = dataset.load_mask(i), np.flatnonzero(dataset.labels[i] > 0)
        image = dataset.load_image(i) if crf else None
        for s, probs in decode(i, mask, classes).items():
            labels = crf_labels(image, probs, classes, crf) if crf else None
            for part in ("choose" if i < choose else "report", "all"):
                out[s][part][0].update(mask, classes[probs.argmax(0)])
                if crf:
                    out[s][part][1].update(mask, labels)
    return out


def scene_of(labels):
    """(N,) array of "single" / "multi": whether each image's labels hold one object class or several (as
    ``pseudo.context_paste`` routes them)."""
    import numpy as np

    from cpcx.pseudo.context_paste import multi_class

    return np.where(multi_class(labels), "multi", "single")


def with_crf(dataset, recipe, decodings: dict, indices=None) -> dict:
    """{name: {part: mIoU and object/background IoU}} of label-conditioned maps (N, C, h, w) through the recipe's
    CRF, parts ``CRF_PARTS``: all images (or ``indices``), the choose / report ids, the single- / multi-class
    images; a part no image falls in is left out."""
    import numpy as np

    from cpcx.crf import CRFParams, crf_labels
    from cpcx.metrics import ConfusionMatrix
    from cpcx.pseudo.infer import upsample

    crf, scenes = CRFParams.from_config(recipe.crf), scene_of(dataset.labels)
    out = {name: {p: ConfusionMatrix(dataset.num_classes) for p in CRF_PARTS} for name in decodings}
    for i in range(len(dataset)) if indices is None else indices:
        mask, image, classes = dataset.load_mask(i), dataset.load_image(i), np.flatnonzero(dataset.labels[i] > 0)
        for name, maps in decodings.items():
            labels = crf_labels(image, upsample(maps[i].float(), classes, mask.shape).numpy(), classes, crf)
            for part in ("all", "choose" if i < CHOOSE else "report", str(scenes[i])):
                out[name][part].update(mask, labels)
    return {name: {p: miou_and_fg(m.matrix, dataset.classes) for p, m in parts.items() if m.matrix.sum()}
            for name, parts in out.items()}


def miou_and_fg(matrix, names) -> dict:
    """mIoU and object/background IoU (percent) of a confusion matrix."""
    scores = scores_of(matrix, names)
    return {"miou": 100 * scores["miou"], "fg_iou": 100 * scores["fg_iou"]}


def split_figures(parts: dict, names) -> dict:
    """``score_decodings``' {split: (no-CRF, CRF confusion)} of one decoding → {"<split>_crf" / "<split>_no_crf":
    mIoU and object/background IoU}, the per-seed entry every probe writes."""
    return {f"{part}_{'crf' if c else 'no_crf'}": miou_and_fg(m[c].matrix, names) for part, m in parts.items()
            for c in (0, 1)}


def seed_rows(seeds: dict, label=lambda key: key) -> list[str]:
    """Markdown rows ``| seed | decoding | CRF all | CRF choose / report | no CRF all |`` of {seed: {decoding:
    split_figures}}, each mIoU with its object/background IoU in brackets; ``label`` names a decoding key."""
    lines = []
    for seed, rows in seeds.items():
        for key, f in rows.items():
            lines.append(f"| {seed} | {label(key)} | {f['all_crf']['miou']:.1f} ({f['all_crf']['fg_iou']:.1f}) | "
                         f"{f['choose_crf']['miou']:.1f} / {f['report_crf']['miou']:.1f} | "
                         f"{f['all_no_crf']['miou']:.1f} ({f['all_no_crf']['fg_iou']:.1f}) |")
    return lines


def top_confusions(matrix, names, top: int = 8) -> list[dict]:
    """The ``top`` largest flows of object pixels into another object class: truth, predicted, and the share of
    the truth class's pixels (ignored pixels left out) that went there."""
    import numpy as np

    share = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    pairs = [(t, p) for t in range(1, len(names)) for p in range(1, len(names)) if t != p]
    pairs.sort(key=lambda tp: -share[tp])
    return [{"truth": names[t], "predicted": names[p], "share": float(share[t, p])} for t, p in pairs[:top]]


class Scorer:
    """Scores of patch-grid score maps, upsampled and argmaxed over the present classes as ``cpcx pseudo`` does."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.masks = [dataset.load_mask(i) for i in range(len(dataset.labels))]

    def predictions(self, maps, which=None):
        """(mask, predicted label map) of every image, or of those where ``which`` (N,) bool is true."""
        import numpy as np

        from cpcx.pseudo.infer import channel_argmax, upsample

        for i, mask in enumerate(self.masks):
            if which is not None and not which[i]:
                continue
            classes = np.flatnonzero(self.dataset.labels[i] > 0)
            yield mask, classes[channel_argmax(upsample(maps[i], classes, mask.shape))]

    def confusion(self, maps, which=None):
        return confusion_of(self.predictions(maps, which), self.dataset.num_classes)

    def scores(self, maps, which=None) -> dict:
        """mIoU, per-class IoU and the error split (``scores_of``), in one decoding pass (of the images ``which``)."""
        return scores_of(self.confusion(maps, which), self.dataset.classes)

    def oracles(self, maps) -> dict:
        """mIoU with one half of the decision taken from the ground truth: ``truth_background`` keeps the
        network's choice among the present object classes but takes object-vs-background from the mask (what
        a perfect background would give); ``truth_class`` keeps the network's object-vs-background but gives
        every pixel it calls object, where the truth is an object, its true class (no confusion between
        objects). Where the gap to 100 lies, the other half is the limit."""
        import numpy as np

        from cpcx.metrics import ConfusionMatrix

        perfect_bg, perfect_class = (ConfusionMatrix(self.dataset.num_classes) for _ in range(2))
        for i, (mask, prediction) in enumerate(self.predictions(maps)):
            classes = np.flatnonzero(self.dataset.labels[i] > 0)
            objects = classes[classes > 0]
            truth_fg = (mask > 0) & (mask != 255)
            if len(objects):
                import torch.nn.functional as F

                full = F.interpolate(maps[i][objects][None], size=mask.shape, mode="bilinear", align_corners=False)[0]
                best_object = objects[full.argmax(0).numpy()]
            else:
                best_object = np.zeros_like(mask)
            perfect_bg.update(mask, np.where(truth_fg, best_object, 0))
            perfect_class.update(mask, np.where((prediction > 0) & truth_fg, mask, prediction))
        return {"truth_background": perfect_bg.result().miou, "truth_class": perfect_class.result().miou}


def decode_as_pseudo(probs, feats, labels, recipe, paste=None, seed: int | None = None):
    """The label-conditioned maps ``cpcx pseudo`` decodes for this recipe: ``probs`` conditioned on the image
    labels, and with ``pseudo.class_probe`` enabled the object class re-decided by the probe (fitted with the recipe's
    seed, or ``seed``). ``paste``: the pasted network's raw probs, or a list of several networks' (as
    ``load_paste_probs`` gives them), which decode the images with several object classes as
    ``pseudo.context_paste`` does: each network with a class probe of its own, fitted with the seed that network
    trained with (the run's + k · ``SEED_STEP``), their maps averaged."""
    import torch

    from cpcx.pseudo.infer import condition_on_labels

    # torch.tensor copies: the data set's label array may be read-only
    maps = condition_on_labels(probs, torch.tensor(labels).float(), recipe.pseudo.class_max_norm)
    if recipe.pseudo.class_probe.enabled:
        maps = with_class_probe(maps, feats, labels, recipe, seed)
    if paste is not None:
        from cpcx.pseudo.context_paste import SEED_STEP, multi_class

        members = paste_members(paste)
        multi = torch.from_numpy(multi_class(labels))
        decoded = [decode_as_pseudo(member, feats, labels, recipe, seed=recipe.seed + k * SEED_STEP)[multi]
                   for k, member in enumerate(members)]
        maps[multi] = sum(decoded) / len(decoded)
    return maps


def object_area_shares(masks):
    """(N,) share of each label map's pixels that are object (ground-truth masks or pseudo-labels), ignored pixels
    (255) left out."""
    import numpy as np

    return np.array([float(((m > 0) & (m != 255)).sum() / max(1, (m != 255).sum())) for m in masks])


def area_scaled_maps(maps, shares, which=None):
    """The maps with each image's background score scaled so that the share of its patches called object is
    ``shares[i]``: the network's ranking of the patches kept, the *amount* of object given. ``which`` (N,) bool:
    only those images; the others keep their maps."""
    import torch

    out = maps.clone().float()
    for i, share in enumerate(shares):
        if which is not None and not which[i]:
            continue
        background, objects = out[i, 0], out[i, 1:].amax(0)
        ratio = (background / objects.clamp_min(1e-12)).flatten().double()
        # a patch is object where background / cut < its best object, i.e. where ratio < cut
        cut = ratio.max() * 2 if share >= 1 else torch.quantile(ratio, float(share)) if share > 0 else ratio.min() / 2
        out[i, 0] = background / float(cut.clamp_min(1e-12))
        out[i] = out[i] / out[i].sum(0, keepdim=True).clamp_min(1e-12)  # a distribution again, for the CRF
    return out.to(maps.dtype)


def area_oracle_maps(maps, masks, which=None):
    """``area_scaled_maps`` with each image's object share from its ground-truth mask: what one number per image,
    the object's area, would be worth (an oracle)."""
    return area_scaled_maps(maps, object_area_shares(masks), which)


def own_shares(maps):
    """(N,) share of each image's patches that its label-conditioned maps call object (the maps' own area)."""
    return (maps[:, 0] < maps[:, 1:].amax(1)).float().mean((1, 2)).numpy()


def score_as_pseudo(scorer: Scorer, probs, feats, recipe, paste=None):
    """The no-CRF pseudo-labels as ``cpcx pseudo`` decodes ``probs`` (and ``paste``, ``decode_as_pseudo``) →
    (label-conditioned maps, their scores, their confusion matrix): the row every other decoding here, and every
    variant of ``sweep_train.py``, is compared with."""
    maps = decode_as_pseudo(probs, feats, scorer.dataset.labels, recipe, paste)
    matrix = scorer.confusion(maps)
    return maps, scores_of(matrix, scorer.dataset.classes), matrix


def truth_on_grid(masks, num_classes: int, grid: tuple[int, int]):
    """Each ground-truth mask as class shares per patch (N, C, h, w), area-averaged over the whole image as the
    pseudo stage squeezes it onto its patch grid: scored like the network's maps, the best any patch-level
    prediction can do (the resolution ceiling). Ignored pixels (255) count for no class."""
    import torch
    import torch.nn.functional as F

    maps = []
    for mask in masks:
        truth = torch.from_numpy(mask.astype("int64"))
        valid = truth != 255
        onehot = F.one_hot(torch.where(valid, truth, 0), num_classes).permute(2, 0, 1).float() * valid
        maps.append(F.interpolate(onehot[None], size=grid, mode="area")[0])
    return torch.stack(maps)


def open_run(args, loader):
    """(recipe, ``loader(recipe)``) for the command line's recipe and overrides, or None after one line on
    stderr for a bad recipe or a run that is not there (no traceback)."""
    from cpcx.errors import CpcxError
    from cpcx.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        return recipe, loader(recipe)
    except CpcxError as exc:
        print(f"✘ {exc}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-r", "--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value, as for cpcx")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)} or none")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diagnose")
    parser.add_argument("--crf", action="store_true", help="also score the labels as cpcx pseudo and the area "
                        "oracles through the recipe's CRF (about 0.4 s per image and decoding on one core)")
    args = parser.parse_args(argv)

    import torch

    from cpcx import atomic
    from cpcx.errors import CpcxError

    torch.set_num_threads(1)
    start = time.perf_counter()
    opened = open_run(args, load_run)
    if opened is None:
        return 2
    recipe, (dataset, probs, feats) = opened
    if recipe.pseudo.saliency.enabled:  # voc-mini's since late on 5 Dec 2026: its labels are not what is decoded here
        print("! pseudo.saliency is on in this recipe: the decodings below leave it out (the maps alone), so the first "
              "line is not the run's own no-CRF mIoU; benchmarks/saliency_screen.py scores the mix", file=sys.stderr)
    try:
        paste = load_paste_probs(recipe)
    except CpcxError as exc:
        print(f"✘ {exc}", file=sys.stderr)
        return 2
    labels = torch.tensor(dataset.labels).float()
    scorer = Scorer(dataset)
    base, first, base_confusion = score_as_pseudo(scorer, probs, feats, recipe, paste)
    multi = scene_of(dataset.labels) == "multi"
    if paste is not None:  # the variants below that start from the raw probs take each image's labelling network's
        probs = torch.where(torch.from_numpy(multi)[:, None, None, None], raw_paste_probs(paste), probs)
    rows = [{"variant": "as cpcx pseudo (no CRF)", **first}]
    truth = truth_on_grid(scorer.masks, dataset.num_classes, tuple(probs.shape[2:]))
    rows.append({"variant": f"ground truth averaged on the {probs.shape[2]}×{probs.shape[3]} patch grid "
                 "(resolution ceiling)", **scorer.scores(truth)})
    oracle = scorer.oracles(base)
    rows.append({"variant": "oracle: object vs background from the ground truth, object class from the maps",
                 "miou": oracle["truth_background"]})
    rows.append({"variant": "oracle: object vs background from the maps, object class from the ground truth",
                 "miou": oracle["truth_class"]})
    areas = {"every image": area_oracle_maps(base, scorer.masks),
               "the images with several object classes": area_oracle_maps(base, scorer.masks, multi)}
    for which, maps in areas.items():
        rows.append({"variant": f"oracle: the object's area from the ground truth ({which}), the maps' ranking of "
                     "the patches", **scorer.scores(maps)})
    wanted = [] if args.variants == "none" else args.variants.split(",")
    if probs.shape[2:] != feats.shape[1:3] and set(TOKEN_VARIANTS) & set(wanted):
        print(f"pseudo.scales: the maps are on a {tuple(probs.shape[2:])} grid, the tokens on {tuple(feats.shape[1:3])};"
              " the token-based variants are skipped", file=sys.stderr)
        wanted = [w for w in wanted if w not in TOKEN_VARIANTS]
    if "threshold" in wanted:
        for background in (0.1, 0.2, 0.3, 0.5):
            rows.append({"variant": f"fixed background score {background}",
                         **scorer.scores(threshold_maps(probs, labels, background))})
    if "affinity" in wanted:
        for tau in (0.02, 0.05, 0.1):
            for steps in (1, 2):
                rows.append({"variant": f"token-affinity walk, tau {tau}, {steps} step(s)",
                             **scorer.scores(affinity_maps(base, feats, tau, steps))})
    if "selftrain" in wanted:
        for confidence in (0.5, 0.8):
            maps, kept = selftrain_maps(base, feats, labels, confidence)
            rows.append({"variant": f"linear probe self-trained on patches with p > {confidence} ({100 * kept:.0f} %)",
                         **scorer.scores(maps)})
    if "objectness" in wanted:
        rows.append({"variant": "object vs background from the first PCA component of each image's tokens",
                     **scorer.scores(with_objectness(base, pca_objectness(base, feats)))})
        rows.append({"variant": "object vs background from a class-agnostic probe self-trained on the confident "
                     "patches (averaged with the maps)", **scorer.scores(with_objectness(base, probe_objectness(base, feats)))})
    if "prototypes" in wanted:
        for confidence in (0.5, 0.8):
            rows.append({"variant": f"object class from dataset-level token prototypes (patches won with p > "
                         f"{confidence}), object vs background from the maps",
                         **scorer.scores(prototype_maps(base, feats, labels, confidence))})
    if "classprobe" in wanted and not recipe.pseudo.class_probe.enabled:
        rows.append({"variant": "object class re-decided by the class probe (pseudo.class_probe.enabled=true)",
                     **scorer.scores(with_class_probe(base, feats, dataset.labels, recipe))})
    if "supervised" in wanted:
        from cpcx.pseudo.infer import condition_on_labels

        supervised = condition_on_labels(supervised_probe_probs(feats, truth), labels, recipe.pseudo.class_max_norm)
        for factor in (1.0, 0.5, 0.2, 0.1):
            scaled = supervised.clone()
            scaled[:, 0] *= factor
            rows.append({"variant": f"bound: linear probe trained on the ground truth of the other images (10-fold), "
                         f"background × {factor}", **scorer.scores(scaled)})
    scenes = {"single": scorer.scores(base, ~multi), "multi": scorer.scores(base, multi)}
    crf_rows = with_crf(dataset, recipe, {"as cpcx pseudo": base, **{f"area oracle, {k}": v for k, v in areas.items()}}
                        ) if args.crf else {}
    doc = {"command": " ".join(["benchmarks/diagnose_pseudo.py", "-r", args.recipe, *args.overrides,
                                *(["--crf"] if args.crf else [])]),
           "run": str(recipe.run_dir()), "images": len(dataset), "seconds": time.perf_counter() - start,
           "context_paste": paste is not None, "rows": rows, "scenes": scenes, "crf": crf_rows,
           "confusions": top_confusions(base_confusion, dataset.classes)}
    atomic.write_json(args.out.with_suffix(".json"), doc)
    first = rows[0]
    lines = [f"# Pseudo-label diagnosis of `{doc['run']}` ({len(dataset)} images, no CRF)", "",
             f"`{doc['command']}`", "",
             f"Error split of the pseudo-labels as `cpcx pseudo` makes them: foreground/background IoU "
             f"{100 * first['fg_iou']:.1f}, foreground recall {100 * first['fg_recall']:.1f}, precision "
             f"{100 * first['fg_precision']:.1f}; {100 * first['wrong_class_in_fg']:.1f} % of the pixels that are "
             "foreground in both truth and prediction get another present class.", "",
             "| decoding | mIoU |", "|---|---:|"]
    lines += [f"| {row['variant']} | {100 * row['miou']:.1f} |" for row in rows]
    lines += ["", "By scene, as `cpcx pseudo` (no CRF): " + "; ".join(
        f"{name}-class images mIoU {100 * sc['miou']:.1f}, object/background IoU {100 * sc['fg_iou']:.1f} (recall "
        f"{100 * sc['fg_recall']:.1f}, precision {100 * sc['fg_precision']:.1f})" for name, sc in scenes.items()) + "."]
    if crf_rows:
        lines += ["", f"With the recipe's CRF (mIoU, object/background IoU in brackets; choose = the first {CHOOSE} "
                  "ids, report = the others):", "", "| decoding | " + " | ".join(CRF_PARTS) + " |",
                  "|---|" + "---:|" * len(CRF_PARTS)]
        lines += [f"| {name} | " + " | ".join(f"{f[p]['miou']:.1f} ({f[p]['fg_iou']:.1f})" if p in f else "—"
                                             for p in CRF_PARTS) + " |" for name, f in crf_rows.items()]
    per_class = sorted(first["per_class_iou"].items(), key=lambda kv: (kv[1] is None, kv[1] or 0.0))
    lines += ["", "Per-class IoU as `cpcx pseudo` (no CRF), worst first:", "",
              ", ".join(f"{name} {'–' if iou is None else f'{100 * iou:.1f}'}" for name, iou in per_class)]
    lines += ["", "Largest confusions between objects (share of the truth class's pixels, as `cpcx pseudo`):", "",
              ", ".join(f"{c['truth']} → {c['predicted']} {100 * c['share']:.0f} %" for c in doc["confusions"])]
    atomic.write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
