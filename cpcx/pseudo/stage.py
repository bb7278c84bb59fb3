"""``cpcx pseudo``: pseudo-labels from a trained CPC network (paper §3.5 and §4.1), then their mIoU.

For each image of ``pseudo.split``: the network sees it resized to ``pseudo.img_size`` square (and its
horizontal flip, ``pseudo.flip``), the patch softmax Z is conditioned on the image's labels (see
``condition_on_labels``), upsampled bilinearly to the image's own size, and the dense CRF (``crf``)
turns it into ``labels/<id>.png``. The labelling itself is ``cpcx.pseudo.labelling``: a killed run
resumes where it stopped (finished images are skipped) and loses nothing.

With ``pseudo.self_training`` this is the second of two passes (``cpcx.pseudo.self_training``): the first writes
``labels_first/``, grid heads trained k-fold on those relabel each image they never saw, mixed into the maps.
With ``pseudo.context_paste`` the run's network labels only the images with at most one object class; a second
network, trained with their objects pasted in (``cpcx.pseudo.context_paste``), labels the others
(``cpcx.pseudo.routing``, in both passes when ``pseudo.self_training`` is on too). With ``pseudo.saliency`` a
salient-object network's foreground is mixed into the upsampled maps of every pass (``cpcx.pseudo.saliency``).

The mIoU without CRF (argmax of the upsampled Z) is scored in the same pass from the probabilities already
in memory, because the CRF can hurt (over-confident Z) and one should see by how much (``cpcx.pseudo.no_crf``).

Under torchrun (``cpcx.shard``) each rank labels every world-th batch of the images still to do; rank 0
prepares the folder and trains the class probe before the others start, and scores and draws once they are done.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from cpcx import atomic, shard
from cpcx.crf import CRFParams
from cpcx.device import report_slow_bf16
from cpcx.errors import CpcxError
from cpcx.feature_cache import autocast_tag
from cpcx.metrics import scores_from_confusion
from cpcx.pseudo.figures import draw_figures
from cpcx.pseudo.infer import PatchPredictor, open_token_cache, require_token_cache
from cpcx.pseudo.labelling import Labeller, load_or_fit_class_probe, remove_torn_files
from cpcx.pseudo.no_crf import MERGED_NAME, NoCRFScores, fold_parts, part_path
from cpcx.pseudo.routing import LabellingPasses


# -------------------------------------------------------------------------------------------- the stage
def find_checkpoint(recipe) -> Path:
    weights = recipe.run_dir("train") / "weights"
    for name in ("best.pt", "last.pt"):
        if (weights / name).exists():  # a folder or a torn file named best.pt is reported, not passed over
            return weights / name
    raise CpcxError(f"{weights / 'best.pt'}: no trained checkpoint; run `cpcx train -r <recipe>` first")


def _drop_if_new_checkpoint(recipe, stage_dir: Path, checkpoint: Path, console: Console) -> None:
    """Labels made by another checkpoint (re-trained with the same recipe) must not be kept as finished."""
    from cpcx.runs import drop_stale_outputs

    record = stage_dir / "checkpoint.json"
    current = {"path": str(checkpoint.resolve()), "sha256": atomic.file_sha256(checkpoint)}
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict):  # JSON of another shape: unknown, treated as a missing record
        previous = None
    if previous and previous.get("sha256") != current["sha256"]:
        dropped = drop_stale_outputs(recipe, "pseudo")
        console.print(f"[yellow]![/] {checkpoint} changed since the last pseudo-labels; "
                      f"dropped {', '.join(dropped) or 'nothing'}")
    atomic.write_json(record, current)


def run_pseudo(recipe, console: Console | None = None) -> Path:
    """Write ``runs/<name>/pseudo/labels/<id>.png`` for ``pseudo.split``; score and draw them if masks exist.

    Under torchrun every rank labels its own shard of the images (``cpcx.shard``); rank 0 alone prints."""
    with shard.joined(recipe.pseudo.device, "pseudo.device") as ranks:
        return _run_pseudo(recipe, ranks, (console or Console()) if ranks.is_main else Console(quiet=True))


def _run_pseudo(recipe, ranks, console: Console) -> Path:
    from cpcx.data import build_dataset
    from cpcx.model import cluster_vectors, load_checkpoint
    from cpcx.pseudo.class_probe import ClassProbe
    from cpcx.runs import output_written, prepare_stage_dir

    cfg = recipe.pseudo
    device = ranks.device
    report_slow_bf16(device, cfg.precision, "pseudo.precision", lambda text: console.print(text, soft_wrap=True))
    checkpoint = find_checkpoint(recipe)
    # Everything that can refuse the run is checked before a file is touched: an unreadable new checkpoint
    # must not cost the labels the old one made (they are dropped only once the new one is known to load).
    dataset = build_dataset(recipe.dataset, cfg.split)
    if dataset.num_classes > 255:
        raise CpcxError(f"{dataset.source}: {dataset.num_classes} classes do not fit 8-bit label PNGs (0..254, "
                        "255 = ignore); use at most 255 classes")
    net, meta = load_checkpoint(checkpoint, map_location="cpu")
    if tuple(meta["classes"]) != tuple(dataset.classes):
        raise CpcxError(
            f"{checkpoint}: trained on {len(meta['classes'])} classes ({', '.join(meta['classes'][:4])}, ...) but "
            f"the data set has {dataset.num_classes} ({', '.join(dataset.classes[:4])}, ...); train on this data set"
        )
    stage_dir = recipe.run_dir("pseudo")
    labels_dir = stage_dir / "labels"

    def prepare() -> None:
        # Rank 0 alone, before any rank writes a label: the torn-file sweep must not take another rank's temp files.
        prepare_stage_dir(recipe, "pseudo", str(device))
        _drop_if_new_checkpoint(recipe, stage_dir, checkpoint, console)
        atomic.ensure_dir(labels_dir)
        remove_torn_files(labels_dir)
        fold_parts(stage_dir, dataset.num_classes)  # the no-CRF scores a killed sharded run left per rank

    shard.main_first(ranks, prepare)
    u = cluster_vectors(dataset.labels, meta.get("cluster_matrix")) if meta.get("num_clusters") else None
    predictor = PatchPredictor(net, device, cfg.precision, cfg.img_size, cfg.flip, cfg.class_max_norm, cfg.scales)
    if predictor.size != cfg.img_size:
        console.print(f"[dim]pseudo.img_size {cfg.img_size} → {predictor.size} (a multiple of the "
                      f"{net.patch_size}-px patches)[/]")
    crf = CRFParams.from_config(recipe.crf) if recipe.crf.enabled else None
    cache = open_token_cache(recipe, net, dataset, predictor.size, cfg.flip,
                             warn=lambda text: console.print(f"[yellow]![/] {text}", soft_wrap=True),
                             autocast=autocast_tag(device, cfg.precision))
    for switch in ("self_training", "context_paste"):
        if getattr(cfg, switch).enabled:
            require_token_cache(cache, f"pseudo.{switch}")
    if cache is not None and cache.trunk is None:
        console.print("[dim]patch tokens from the training feature cache (the backbone never changed): no ViT pass[/]")
    elif cache is not None:
        console.print(f"[dim]tokens after block {cache.trunk} from the training trunk cache: only the ViT's last "
                      f"{net.backbone.num_blocks - cache.trunk} block(s) run[/]")

    # Every rank lists the images still to do before the barrier below, so that all shard the same list.
    todo = [i for i, image_id in enumerate(dataset.ids) if not output_written(labels_dir / f"{image_id}.png")]
    done_before = [dataset.ids[i] for i in sorted(set(range(len(dataset))) - set(todo))]
    # The probe is trained once, by rank 0 (the others would each train the same one), and read by the others.
    probe_path = stage_dir / "class_probe.pt"
    probe = shard.main_first(ranks, lambda: load_or_fit_class_probe(
        predictor, dataset, u, cache, cfg, recipe.seed, probe_path, console) if cfg.class_probe.enabled else None)
    if cfg.class_probe.enabled and not ranks.is_main:
        probe = ClassProbe.load(probe_path)
    no_crf = None
    if dataset.has_masks and ranks.enabled:  # each rank counts its images apart; rank 0 folds the parts at the end
        counted = NoCRFScores(stage_dir / MERGED_NAME, dataset.num_classes).ids
        no_crf = NoCRFScores(part_path(stage_dir, ranks.rank), dataset.num_classes, counted=counted, fresh=True)
    elif dataset.has_masks:
        no_crf = NoCRFScores(stage_dir / MERGED_NAME, dataset.num_classes)
    # The run's network labels the images; with pseudo.context_paste only those with at most one object class, and a
    # network trained with their objects pasted in labels the others (cpcx.pseudo.context_paste). With
    # pseudo.self_training the same routing makes the first pass, and the final pass mixes the heads into both.
    saliency = None
    if cfg.saliency.enabled:  # the salient-object maps of this rank's images first, cached (cpcx.pseudo.saliency)
        from cpcx.pseudo.saliency import SaliencyMix
        from cpcx.saliency import saliency_folder

        saliency = SaliencyMix(cfg.saliency, dataset, saliency_folder(cfg.saliency, stage_dir, dataset),
                               saliency_folder(cfg.saliency, stage_dir, dataset, cfg.saliency.passes_multi,
                                               cfg.saliency.size_later))
        saliency.ensure(shard.shard_blocks(todo, ranks.rank, ranks.world_size, cfg.batch_size), cfg.workers, console)
    passes = LabellingPasses(recipe, ranks, dataset, Labeller(predictor, probe, cache, u), console, saliency)
    heads = None
    if cfg.self_training.enabled:  # first pass and heads (read back once done); the labels below: the second pass
        from cpcx.pseudo.self_training import heads_for_stage

        heads = heads_for_stage(recipe, ranks, dataset, passes.first_pass, cache, crf, console)
    first_todo = passes.first_todo(todo)
    kind = " with at most one object class" if passes.multi is not None else ""
    console.print(f"pseudo-labels for {len(dataset)} {cfg.split} images at {predictor.size}² on {device}"
                  f" ({'CRF with ' + str(cfg.workers) + ' worker(s)' if crf else 'no CRF'}); "
                  f"{len(done_before)} already done"
                  + (f"; {ranks.world_size} processes, {len(passes.mine(first_todo))} of the {len(first_todo)}{kind} "
                     "to do here" if ranks.enabled else ""))
    start = time.perf_counter()
    confusion = passes.run(labels_dir, todo, crf, no_crf, heads)
    second, paste_info = passes.second, passes.paste_info
    if ranks.enabled:
        # Integer counts: the sum over ranks is exactly one process's matrix. Also waits for every rank's labels.
        confusion.matrix = shard.sum_over_ranks(confusion.matrix, ranks)
        if not ranks.is_main:
            return labels_dir
        if no_crf is not None:
            no_crf = fold_parts(stage_dir, dataset.num_classes)
    if todo:
        seconds = time.perf_counter() - start
        console.print(f"[green]✔[/] {len(todo)} labels in {seconds:.1f} s ({len(todo) / seconds:.2f} images/s"
                      f"{f' over {ranks.world_size} processes' if ranks.enabled else ''}) → {labels_dir}")

    if dataset.has_masks:
        info = {"checkpoint": str(checkpoint), "img_size": predictor.size, "extra_sizes": predictor.extra_sizes,
                "flip": cfg.flip,
                "class_max_norm": cfg.class_max_norm, "class_probe": cfg.class_probe.enabled,
                "self_training": cfg.self_training.enabled, "context_paste": cfg.context_paste.enabled,
                "saliency": cfg.saliency.enabled,
                **({"context_paste_" + k: v for k, v in paste_info.items()}), "feature_cache": cache is not None}
        _score(stage_dir, dataset, labels_dir, done_before, confusion, no_crf, crf, info, console)
    else:
        console.print(f"[dim]{dataset.source}: no ground-truth masks, so no mIoU[/]")
    if cfg.figures:
        draw_figures(passes.first, dataset, labels_dir, stage_dir / "figures", cfg.figures, heads, second, saliency)
        console.print(f"[green]✔[/] figures of {min(cfg.figures, len(dataset))} images → {stage_dir / 'figures'}")
    return labels_dir


def _score(stage_dir, dataset, labels_dir, done_before, confusion, no_crf, crf, info: dict, console) -> dict:
    """mIoU after (all labels: this run's in memory, earlier runs' read back) and before the CRF."""
    from cpcx.evaluate import evaluate_label_folder, write_evaluation

    if done_before:
        _, earlier = evaluate_label_folder(dataset, labels_dir, ids=done_before)
        confusion.merge(earlier)
    before = scores_from_confusion(no_crf.confusion.matrix)
    extra = {
        "miou_no_crf": before.miou,
        "per_class_iou_no_crf": before.as_dict(dataset.classes)["per_class_iou"],
        "images_no_crf": len(no_crf.ids),
        "crf": None if crf is None else vars(crf),
        **info,
    }
    if len(no_crf.ids) < len(dataset):
        console.print(f"[yellow]![/] mIoU without CRF covers {len(no_crf.ids)} of {len(dataset)} images "
                      "(the rest were labelled by an interrupted run before its score was saved)")
    columns = {"no CRF": before} if crf is not None else {}
    metrics = write_evaluation(stage_dir, dataset.classes, confusion, split=dataset.split, images=len(dataset),
                               extra=extra, extra_columns=columns, label="CRF" if crf else "", console=console)
    if crf is not None:
        change = 100 * (metrics["miou"] - before.miou)
        colour = "green" if change >= 0 else "yellow"
        console.print(f"mIoU without CRF {100 * before.miou:.1f} → with CRF {100 * metrics['miou']:.1f} "
                      f"([{colour}]{change:+.1f}[/])")
    return metrics
