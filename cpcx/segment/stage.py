"""``cpcx segment``: train the DeepLab network on the pseudo-labels, then predict and score the val split.

Outputs in ``runs/<name>/segment/``: ``weights/{last,best}.pt`` (atomic, every epoch; best by val mIoU),
``metrics.csv`` (one row per epoch), ``predictions/<id>.png`` (multi-scale + flip, resumable) and
``metrics.json`` (val mIoU and per-class IoU, from ``cpcx.evaluate``).

Training is SGD with momentum, the poly learning rate ``lr·(1 - step/steps)^0.9`` per step, weight decay,
cross-entropy ignoring 255, bf16 autocast on CUDA, and DDP under torchrun (one process per GPU; the batch
size is over all of them). ``--resume`` restores model, optimizer and epoch from ``weights/last.pt``; the
random state needs no saving because every epoch reseeds torch from (seed, epoch, rank) and every crop's
augmentation draws from (seed, epoch, image), so a resumed run ends with the same weights.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from cpcx import atomic, distributed, viz
from cpcx.device import autocast, report_slow_bf16, seed_everything
from cpcx.errors import CpcxError
from cpcx.metrics import IGNORE_INDEX, ConfusionMatrix
from cpcx.recipe import Recipe
from cpcx.segment.grid import GRID_ENCODER

CSV_HEADER = ["epoch", "lr", "loss", "val_miou", "seconds"]
POLY_POWER = 0.9


# ------------------------------------------------------------------------------------------ the stage
def run_segment(recipe: Recipe, resume: bool = False, console: Console | None = None) -> Path:
    """Train on ``runs/<name>/pseudo/labels`` (train split), predict the val split, score it → the stage folder."""
    from cpcx.data import build_dataset
    from cpcx.runs import prepare_stage_dir
    from cpcx.segment.data import check_pseudo_labels

    console = console or Console()
    train_set = build_dataset(recipe.dataset, "train")
    val_set = build_dataset(recipe.dataset, "val")
    if recipe.segment.labels == "pseudo":
        check_pseudo_labels(train_set, recipe.run_dir("pseudo") / "labels")
    with distributed.joined(recipe.segment.device, "segment.device") as info:
        device, rank, world = info.device, info.rank, info.world_size
        log = (lambda text: console.print(text, soft_wrap=True)) if rank == 0 else (lambda text: None)
        report_slow_bf16(device, recipe.segment.precision, "segment.precision", log)
        if rank == 0:
            prepare_stage_dir(recipe, "segment", str(device))
        distributed.barrier()
        if recipe.segment.encoder == GRID_ENCODER:
            from cpcx.segment.grid_train import train_grid

            train_grid(recipe, train_set, val_set, device, rank, world, resume, console, log)
        else:
            _train(recipe, train_set, val_set, device, rank, world, resume, console, log)
        _predict_and_score(recipe, val_set, device, rank, world, console, log)
    return recipe.run_dir("segment")


# ------------------------------------------------------------------------------------------- training
def _train(recipe: Recipe, train_set, val_set, device, rank: int, world: int, resume: bool, console, log) -> None:
    from cpcx.segment.data import PseudoLabelCrops, TrainLabels
    from cpcx.segment.networks import build_segnet, segnet_meta

    cfg = recipe.segment
    folder = recipe.run_dir("segment")
    weights = folder / "weights"
    per_device = _per_device_batch(cfg, len(train_set), world)
    seed_everything(recipe.seed)  # identical initialisation on every rank
    checkpoint = _load_resume(weights / "last.pt") if resume else None
    if resume and checkpoint is None:
        log(f"[yellow]![/] {weights / 'last.pt'} not found: training from the start")
    model = build_segnet(cfg, train_set.num_classes, load_weights=checkpoint is None).to(device)
    meta = {**segnet_meta(cfg, train_set.classes), "labels": cfg.labels}
    optimizer = make_optimizer(cfg, model.parameters())
    start_epoch, best = start_or_resume(folder, checkpoint, meta, model.net, optimizer, rank)
    if start_epoch >= cfg.epochs:
        log(f"[green]✔[/] {weights / 'last.pt'}: training already finished ({start_epoch} epochs)")
        return

    if world > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    net = model.module if world > 1 else model
    labels = TrainLabels(train_set, recipe.run_dir("pseudo") / "labels", ground_truth=cfg.labels == "ground_truth")
    crops = PseudoLabelCrops(train_set, labels, cfg.crop_size, cfg.scale_range,
                             fill=net.mean.flatten().tolist(), seed=recipe.seed)
    sampler = torch.utils.data.DistributedSampler(crops, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed)
    steps_per_epoch = len(sampler) // per_device
    total_steps = steps_per_epoch * cfg.epochs
    what = "GROUND-TRUTH masks: oracle reference" if labels.ground_truth else "pseudo-labels"
    encoder = f"{cfg.encoder} (frozen)" if cfg.freeze_encoder else cfg.encoder
    log(f"segment: {cfg.arch} · {encoder} on {len(train_set)} images ({what}) · {device} × {world} · "
        f"batch {per_device * world} · crop {cfg.crop_size} · epochs {start_epoch + 1}–{cfg.epochs}")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        crops.epoch = epoch
        torch.manual_seed(_epoch_seed(recipe.seed, epoch, rank))
        loader = torch.utils.data.DataLoader(
            crops, batch_size=per_device, sampler=sampler, num_workers=cfg.workers, drop_last=True,
            pin_memory=device.type == "cuda",
        )
        model.train()
        loss_sum, loss_count, lr = torch.zeros((), device=device), 0, cfg.lr
        with _progress(console, f"epoch {epoch}/{cfg.epochs}", steps_per_epoch, rank == 0) as advance:
            for i, batch in enumerate(loader):
                step = (epoch - 1) * steps_per_epoch + i
                lr = cfg.lr * (1 - step / total_steps) ** POLY_POWER
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch["image"].to(device, non_blocking=True).float().div_(255)
                labels = batch["label"].to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    logits = model(images)
                loss = _loss(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                loss_count += 1
                advance(lambda: f"loss {loss.item():.3f} · lr {lr:.2e}")  # .item() only when shown
        mean_loss = _mean_over_ranks(loss_sum, loss_count, world)

        miou, val_started = None, time.perf_counter()
        if val_set.has_masks and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            miou = _val_miou(net, val_set, device, cfg.precision, rank, world, console)
        val_seconds = time.perf_counter() - val_started
        if rank == 0:
            best = record_epoch(folder, net.net.state_dict(), optimizer, meta, best, epoch, cfg.epochs, lr, mean_loss,
                                miou, val_set.has_masks, started, f"single scale, {val_seconds:.0f} s", log)
        distributed.barrier()


def start_or_resume(folder: Path, checkpoint: dict | None, meta: dict, network, optimizer, rank: int) -> tuple[int, dict]:
    """→ (epochs already done, best so far): from ``checkpoint`` (``weights/last.pt`` with --resume; metrics.csv
    cut back to it), or a fresh start that clears an earlier run's outputs."""
    if checkpoint is None:
        if rank == 0:
            clear_previous_run(folder)
        return 0, {"miou": None, "epoch": None}
    _check_compatible(checkpoint["meta"], meta, folder / "weights" / "last.pt")
    network.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    start_epoch = int(checkpoint["epoch"])
    if rank == 0:
        _truncate_csv(folder / "metrics.csv", start_epoch)
    return start_epoch, dict(checkpoint["best"])


def clear_previous_run(folder: Path) -> None:
    """A fresh (not resumed) run: the outputs of an earlier one must not mix with this one's."""
    for stale in (folder / "metrics.csv", folder / "weights" / "best.pt", folder / "weights" / "last.pt"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(folder / "predictions", ignore_errors=True)


def record_epoch(folder: Path, model_state: dict, optimizer, meta: dict, best: dict, epoch: int, epochs: int,
                 lr: float, mean_loss: float, miou: float | None, has_masks: bool, started: float, how: str,
                 log) -> dict:
    """The end of an epoch on rank 0 → the new ``best``: ``weights/last.pt`` (and ``best.pt`` when val mIoU
    improved, or at the end without val masks), the metrics.csv row, the curves figure and the log line.
    Checkpoint before row: a kill in between redoes nothing and --resume truncates nothing it needs."""
    weights = folder / "weights"
    improved = miou is not None and (best["miou"] is None or miou > best["miou"])
    if improved:
        best = {"miou": miou, "epoch": epoch}
    state = {"model": model_state, "meta": meta, "epoch": epoch, "best": best}
    atomic.save_torch(weights / "last.pt", {**state, "optimizer": optimizer.state_dict()})
    if improved or (not has_masks and epoch == epochs):
        atomic.save_torch(weights / "best.pt", {**state, "val_miou": miou})
    seconds = time.perf_counter() - started
    atomic.append_csv_row(folder / "metrics.csv", CSV_HEADER,
                          [epoch, lr, mean_loss, "" if miou is None else miou, round(seconds, 2)])
    viz.training_curves(folder / "metrics.csv", folder / "figures" / "curves.png", title=f"{folder.parent.name} · segment")
    shown = "" if miou is None else f" · val mIoU {100 * miou:.1f} ({how})"
    log(f"epoch {epoch}/{epochs}: loss {mean_loss:.4f}{shown} · {seconds:.0f} s")
    return best


def make_optimizer(cfg, parameters) -> torch.optim.Optimizer:
    """``segment.optimizer``: SGD with momentum (DeepLab's) or AdamW; the poly schedule drives either's lr."""
    parameters = [p for p in parameters if p.requires_grad]  # a frozen encoder (segment.freeze_encoder) stays out
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (255 = padding/ignore); 0, not NaN, for a batch with none.

    Written as sum / count so that no host sync is needed to test for the empty case.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def _per_device_batch(cfg, num_images: int, world: int) -> int:
    if cfg.batch_size % world:
        raise CpcxError(f"segment.batch_size: {cfg.batch_size} does not split over {world} processes; "
                        f"use a multiple of {world}")
    per_device = cfg.batch_size // world
    per_device = min(per_device, max(1, num_images // world))  # a tiny data set still gets one step per epoch
    if per_device < 2 and cfg.arch != "deeplabv2":
        raise CpcxError(
            f"segment.batch_size: {cfg.arch} needs at least 2 images per device in training (BatchNorm in its "
            f"image-pooling branch), got {per_device}; raise segment.batch_size or use more images"
        )
    return per_device


def _val_miou(net, val_set, device, precision: str, rank: int, world: int, console) -> float:
    """Single-scale val mIoU; each rank scores a shard and the confusion matrices are summed."""
    from cpcx.segment.infer import confusion_on

    indices = range(rank, len(val_set), world)
    with _progress(console, "val (single scale)", len(indices), rank == 0, plain=False) as advance:
        confusion = confusion_on(net, val_set, indices, device, precision, on_image=advance)
    if world > 1:
        total = distributed.all_reduce_sum(torch.from_numpy(confusion.matrix).to(device))
        confusion = ConfusionMatrix(val_set.num_classes)
        confusion.matrix = total.cpu().numpy()
    return confusion.result().miou


# ----------------------------------------------------------------------------------------- inference
def _predict_and_score(recipe: Recipe, val_set, device, rank: int, world: int, console, log) -> None:
    from cpcx.crf import CRFParams
    from cpcx.segment.infer import val_saliency, write_val_predictions
    from cpcx.segment.networks import load_segnet

    cfg = recipe.segment
    folder = recipe.run_dir("segment")
    checkpoint = folder / "weights" / "best.pt"
    if not checkpoint.is_file():
        checkpoint = folder / "weights" / "last.pt"
    model, meta = load_segnet(checkpoint, map_location="cpu")
    model.to(device)
    crf_params = CRFParams.from_config(recipe.crf) if cfg.crf else None
    source = {"checkpoint": checkpoint.name, "epoch": meta["epoch"], "val_miou": meta["val_miou"],
              "scales": list(cfg.scales), "flip": cfg.flip, "crf": None if crf_params is None else vars(crf_params)}
    if cfg.saliency.enabled:  # keyed by the network's bytes: another file at the same path redoes the predictions
        source["saliency"] = {"weights": atomic.file_sha256(cfg.saliency.weights)[:12], "size": cfg.saliency.size,
                              "weight": cfg.saliency.weight}
    predictions = folder / "predictions"
    stamp = folder / "predictions.source.json"
    if rank == 0:
        # Predictions are skipped when present: only those made by this checkpoint and settings may stay.
        if _read_json(stamp) != source:
            shutil.rmtree(predictions, ignore_errors=True)
        atomic.ensure_dir(predictions)
        atomic.write_json(stamp, source)
    distributed.barrier()
    indices = range(rank, len(val_set), world)
    started = time.perf_counter()
    mix = val_saliency(recipe, val_set, [i for i in indices if not (predictions / f"{val_set.ids[i]}.png").is_file()],
                       console if rank == 0 else Console(quiet=True))
    how = f"{len(cfg.scales)} scale{'s' if len(cfg.scales) > 1 else ''}{' + flip' if cfg.flip else ''}" \
          f"{' + saliency' if mix is not None else ''}"
    with _progress(console, f"predict val ({how})", len(indices), rank == 0) as advance:
        written = write_val_predictions(recipe, model, meta, val_set, predictions, indices, device, crf_params,
                                        on_image=advance, log=log, mix=mix)
    written = int(distributed.all_reduce_sum(torch.tensor([written], device=device)).item())
    log(f"predictions: {written} written, {len(val_set) - written} already there · {predictions}")
    distributed.barrier()
    if rank != 0:
        return
    if not val_set.has_masks:
        log(f"[yellow]![/] {val_set.source}: the val split has no masks; predictions written, nothing to score")
        return
    from cpcx.evaluate import evaluate_label_folder, write_evaluation

    _, confusion = evaluate_label_folder(val_set, predictions)
    extra = {"stage": "segment", "best_epoch": source["epoch"], "best_val_miou_single_scale": source["val_miou"],
             "scales": source["scales"], "flip": cfg.flip, "crf": cfg.crf, "arch": cfg.arch, "encoder": cfg.encoder,
             "labels": meta.get("labels", "pseudo"),
             "saliency": cfg.saliency.weight if cfg.saliency.enabled else None,
             "oracle": meta.get("labels") == "ground_truth",  # trained on the true masks: a reference, not the method
             "train_seconds": _csv_seconds(folder / "metrics.csv"),
             "predict_seconds": round(time.perf_counter() - started, 1)}
    write_evaluation(folder, val_set.classes, confusion, split="val", images=len(val_set), extra=extra,
                     label="val (ORACLE: trained on ground truth)" if extra["oracle"] else "val", console=console)


# ------------------------------------------------------------------------------------ checkpoints/RNG
def _load_resume(path: Path) -> dict | None:
    from cpcx.torchload import load_torch_file

    if not path.exists():
        return None
    return load_torch_file(path, "segmentation checkpoint", "run `cpcx segment` without --resume to start over "
                                                            "(it replaces the file)")


def _check_compatible(saved: dict, current: dict, path: Path) -> None:
    defaults = {"labels": "pseudo", "freeze_encoder": False}  # what checkpoints written before these keys meant
    for key in ("arch", "encoder", "num_classes", "labels", "freeze_encoder", "img_size"):
        if saved.get(key, defaults.get(key)) != current.get(key, defaults.get(key)):
            raise CpcxError(
                f"{path}: was trained with {key}={saved.get(key)} but the recipe says {current.get(key)}; "
                "run without --resume to start afresh"
            )


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout's torch seed for one epoch on one rank: the RNG is a function of (seed, epoch, rank), as in
    ``cpcx train``, so it needs no saving and a resumed epoch draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank, 11]).generate_state(1)[0])


def _truncate_csv(path: Path, last_epoch: int) -> None:
    """Drop rows of epochs after the checkpoint (written by a run killed before its next checkpoint)."""
    if not path.is_file():
        return
    def epoch(line: str) -> int | None:
        try:
            return int(line.split(",")[0])
        except ValueError:
            return None

    # A line that is not a row of ours (edited by hand, a foreign or binary file) goes too, instead of
    # stopping the resume with a ValueError: metrics.csv must be the checkpoint's history, nothing else.
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = lines[:1] + [line for line in lines[1:] if (e := epoch(line)) is not None and e <= last_epoch]
    if kept != lines:
        atomic.write_text(path, "\n".join(kept) + "\n")


def _csv_seconds(path: Path) -> float:
    """Training time of all epochs (their validation included), from metrics.csv: resumes add up."""
    import csv

    try:
        with path.open() as handle:
            return round(sum(float(row["seconds"]) for row in csv.DictReader(handle)), 1)
    except (OSError, ValueError, KeyError):
        return float("nan")


def _read_json(path: Path) -> dict | None:
    import json

    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------- distributed
def _mean_over_ranks(total: torch.Tensor, count: int, world: int) -> float:
    both = torch.stack([total.float(), torch.tensor(float(count), device=total.device)])
    both = distributed.all_reduce_sum(both)
    return float(both[0]) / max(float(both[1]), 1.0)


# ---------------------------------------------------------------------------------------- progress
@contextlib.contextmanager
def _progress(
    console: Console, description: str, total: int, enabled: bool, plain: bool = True
) -> Iterator[Callable[..., None]]:
    """``advance(info=None)`` per item, ``info`` a callable giving the status text (called only when shown):
    a rich bar on a terminal, else plain lines (if ``plain``: every 10 % and at least every 30 s, with rate and
    ETA; cpcx.progress); nothing off rank 0."""
    if not enabled or not (plain or console.is_terminal):
        yield lambda info=None: None
        return
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[info]}"), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total, info="")
            shown = [0.0]

            def advance_bar(info: Callable[[], str] | None = None) -> None:
                fields = {}
                if info is not None and time.monotonic() - shown[0] > 0.5:  # text at most twice a second
                    fields["info"], shown[0] = info(), time.monotonic()
                bar.update(task, advance=1, **fields)

            yield advance_bar
        return
    from cpcx.progress import PlainProgress

    lines = PlainProgress(description, total, lambda text: console.print(text, soft_wrap=True, highlight=False),
                          unit="steps" if description.startswith("epoch") else "images")

    yield lambda info=None: lines(1, info)
