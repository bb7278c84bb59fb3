"""Training and val predictions of the grid segmenter (:mod:`cpcx.segment.grid`) on cached tokens.

The frozen backbone's tokens of the training images come from the train stage's feature cache when it holds
them (same backbone weights, ``model.img_size``, ``train.views``, images), else they are extracted once into
``runs/<name>/segment/features`` (or the shared ``train.feature_cache_dir``); the val images' tokens (one view,
two with ``segment.flip``) likewise. An epoch shows each training image once, in one of ``train.views`` drawn
from (seed, epoch); its label is resized (nearest) to 4× the grid and put in the same view, and the loss is
the cross-entropy of the bilinearly upsampled logits there (255 ignored).

Checkpoints hold the whole :class:`GridSegNet` (backbone included), so ``cpcx predict`` and ``cpcx export``
need nothing else; ``--resume`` restores head and optimizer from ``weights/last.pt``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cpcx import distributed
from cpcx.augment import apply_view
from cpcx.device import autocast, seed_everything
from cpcx.feature_cache import FeatureCache, autocast_tag, cache_key, cache_name
from cpcx.metrics import ConfusionMatrix
from cpcx.recipe import Recipe
from cpcx.segment.grid import GRID_ENCODER, GridHead, GridSegNet, grid_meta

#: Labels are learned at this multiple of the grid: finer than the grid, far cheaper than the image.
LABEL_UPSAMPLE = 4


def grid_segnet_from_train(recipe: Recipe, num_classes: int) -> tuple[GridSegNet, dict]:
    """A fresh :class:`GridSegNet` on the train checkpoint's backbone → (network, its ``grid`` meta)."""
    from cpcx.model import load_checkpoint
    from cpcx.pseudo import find_checkpoint

    net, train_meta = load_checkpoint(find_checkpoint(recipe), map_location="cpu")
    cfg = recipe.segment
    head = GridHead(net.backbone.embed_dim, num_classes, cfg.head_channels, cfg.aspp_rates)
    model = GridSegNet(net.backbone, head, recipe.model.img_size)
    return model, grid_meta(train_meta["model_cfg"], recipe.model.img_size, cfg.head_channels, cfg.aspp_rates)


def token_cache(recipe: Recipe, backbone, dataset, views: list[str], device, log) -> FeatureCache:
    """Tokens of ``dataset`` in ``views``: the train stage's cache when it has this key, else built here."""
    from cpcx.data.views import ImageLabelDataset

    size = recipe.model.img_size
    key = cache_key(recipe.model.backbone, backbone, size, views, dataset.ids,
                    autocast=autocast_tag(device, recipe.segment.precision))
    train_root = recipe.feature_cache_root()
    own_root = recipe.train.feature_cache_dir or recipe.run_dir("segment") / "features"
    root = train_root if (train_root / cache_name(key) / "meta.json").is_file() else own_root
    return FeatureCache.build(root, recipe.model.backbone, backbone, ImageLabelDataset(dataset), size, views,
                              device, recipe.segment.precision, recipe.segment.batch_size, 0, log=log, prune=False)


def _label_grid(labels, index: int, size: int, views: list[str]) -> torch.Tensor:
    """(V, size, size) uint8: the image's label squashed to the square the backbone reads, in every view."""
    label = Image.fromarray(np.asarray(labels(index), dtype=np.uint8)).resize((size, size), Image.NEAREST)
    label = torch.from_numpy(np.array(label))
    return torch.stack([apply_view(label, v) for v in views])


def label_grids(labels, n: int, size: int, views: list[str], folder: Path) -> np.ndarray:
    """(N, V, size, size) uint8: every training image's label grid in every view, in a memory map on an unnamed
    temporary file in the run folder (gone when the process ends). Page cache the kernel may drop, not memory the
    process holds: at 4 × 24 cells and two views a grid is 18 KB an image, 1.4 GB for COCO's 82,081 images, which
    a list of tensors stacked in RAM held twice over (``benchmarks/results/scale.md``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix=".label-grids-") as handle:  # the map keeps the file alive
        grids = np.memmap(handle, dtype=np.uint8, mode="w+", shape=(n, len(views), size, size))
    for i in range(n):
        grids[i] = _label_grid(labels, i, size, views).numpy()
    return grids


class _Epoch:
    """(image, view) pairs of one epoch on one rank: a permutation and view draws from (seed, epoch)."""

    def __init__(self, n: int, num_views: int, seed: int, epoch: int, rank: int, world: int):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**32, epoch, 13]).generate_state(1)[0]))
        order = torch.randperm(n, generator=g)
        views = torch.randint(num_views, (n,), generator=g)
        per_rank = n // world
        self.order = order[rank * per_rank:(rank + 1) * per_rank]
        self.views = views[self.order]


def train_grid(recipe: Recipe, train_set, val_set, device, rank: int, world: int, resume: bool, console, log) -> None:
    from cpcx.segment.data import TrainLabels
    from cpcx.segment.stage import (POLY_POWER, _epoch_seed, _load_resume, _loss, _mean_over_ranks,
                                    _per_device_batch, _progress, make_optimizer, record_epoch, start_or_resume)

    cfg, views = recipe.segment, list(recipe.train.views)
    folder = recipe.run_dir("segment")
    weights = folder / "weights"
    per_device = _per_device_batch(cfg, len(train_set), world)
    seed_everything(recipe.seed)
    checkpoint = _load_resume(weights / "last.pt") if resume else None
    if resume and checkpoint is None:
        log(f"[yellow]![/] {weights / 'last.pt'} not found: training from the start")
    model, grid = grid_segnet_from_train(recipe, train_set.num_classes)
    labels = TrainLabels(train_set, recipe.run_dir("pseudo") / "labels", ground_truth=cfg.labels == "ground_truth")
    meta = segment_meta(recipe, train_set.classes, model, grid)
    optimizer = make_optimizer(cfg, model.head.parameters())
    start_epoch, best = start_or_resume(folder, checkpoint, meta, model, optimizer, rank)
    if start_epoch >= cfg.epochs:
        log(f"[green]✔[/] {weights / 'last.pt'}: training already finished ({start_epoch} epochs)")
        return
    model.to(device)
    tokens = token_cache(recipe, model.backbone, train_set, views, device, log)
    val_tokens = token_cache(recipe, model.backbone, val_set, val_views(cfg.flip), device, log) \
        if val_set.has_masks else None
    if checkpoint is None:
        model.head.set_standardization(*token_statistics(tokens))
    grid_h, grid_w = tokens.tokens.shape[2:4]
    size = LABEL_UPSAMPLE * grid_h
    targets = label_grids(labels, len(train_set), size, views, folder)  # (N, V, s, s)
    head = model.head
    if world > 1:
        head = torch.nn.parallel.DistributedDataParallel(head, device_ids=[device] if device.type == "cuda" else None)
    steps_per_epoch = (len(train_set) // world) // per_device
    total_steps = steps_per_epoch * cfg.epochs
    log(f"segment: {cfg.arch} head on the frozen {grid_h}×{grid_w} grid of {recipe.model.backbone}"
        f"{' + ' + recipe.model.fuse.backbone if recipe.model.fuse else ''} · {len(train_set)} images "
        f"({_what(labels.kind)}) · {device} × {world} · batch {per_device * world} · epochs {start_epoch + 1}–{cfg.epochs}")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(_epoch_seed(recipe.seed, epoch, rank))
        plan = _Epoch(len(train_set), len(views), recipe.seed, epoch, rank, world)
        model.train()
        loss_sum, loss_count, lr = torch.zeros((), device=device), 0, cfg.lr
        with _progress(console, f"epoch {epoch}/{cfg.epochs}", steps_per_epoch, rank == 0, plain=False) as advance:
            for i in range(steps_per_epoch):
                step = (epoch - 1) * steps_per_epoch + i
                lr = cfg.lr * (1 - step / total_steps) ** POLY_POWER
                for group in optimizer.param_groups:
                    group["lr"] = lr
                pick, view = plan.order[i * per_device:(i + 1) * per_device], plan.views[i * per_device:(i + 1) * per_device]
                x = torch.from_numpy(np.stack([tokens.tokens[int(a), int(b)] for a, b in zip(pick, view)]))
                y = torch.from_numpy(targets[pick.numpy(), view.numpy()]).long()
                with autocast(device, cfg.precision):
                    logits = head(x.to(device, non_blocking=True))
                logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
                loss = _loss(logits, y.to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                loss_count += 1
                advance(lambda: f"loss {loss.item():.3f} · lr {lr:.2e}")
        mean_loss = _mean_over_ranks(loss_sum, loss_count, world)
        miou, val_started = None, time.perf_counter()
        if val_tokens is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and rank == 0:
            miou = confusion_from_tokens(model, val_tokens, val_set, device).result().miou
        val_seconds = time.perf_counter() - val_started
        if rank == 0:
            best = record_epoch(folder, model.state_dict(), optimizer, meta, best, epoch, cfg.epochs, lr, mean_loss,
                                miou, val_set.has_masks, started, f"{val_seconds:.0f} s", log)
        distributed.barrier()


def token_statistics(cache: FeatureCache, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of every cached token (all images, views and cells), in float64 chunks."""
    total = total_sq = None
    count = 0
    for start in range(0, cache.tokens.shape[0], chunk):
        x = torch.from_numpy(np.array(cache.tokens[start:start + chunk])).double().reshape(-1, cache.tokens.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    return mean.float(), (total_sq / count - mean * mean).clamp_min(0).sqrt().float()


def _what(kind: str) -> str:
    return "GROUND-TRUTH masks: oracle reference" if kind == "ground_truth" else "pseudo-labels"


def val_views(flip: bool) -> list[str]:
    return ["orig", "hflip"] if flip else ["orig"]


def segment_meta(recipe: Recipe, classes, model: GridSegNet, grid: dict) -> dict:
    cfg = recipe.segment
    return {"arch": cfg.arch, "encoder": GRID_ENCODER, "num_classes": len(classes), "classes": list(classes),
            "mean": list(model.backbone.mean), "std": list(model.backbone.std), "grid": grid, "labels": cfg.labels}


@torch.no_grad()
def probs_from_tokens(model: GridSegNet, tokens: torch.Tensor, views: list[str], size: tuple[int, int]) -> torch.Tensor:
    """C×H×W class probabilities of one image from its (V, h, w, e) tokens: softmax per view, views undone
    (each is its own inverse) and averaged, upsampled bilinearly to the image's ``size``."""
    logits = model.head(tokens.float())
    probs = torch.stack([apply_view(p, v) for p, v in zip(logits.softmax(1), views)]).mean(0)
    return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]


def confusion_from_tokens(model: GridSegNet, cache: FeatureCache, dataset, device) -> ConfusionMatrix:
    confusion = ConfusionMatrix(dataset.num_classes)
    was_training = model.training
    model.eval()
    try:
        for index in range(len(dataset)):
            mask = dataset.load_mask(index)
            probs = probs_from_tokens(model, cache.get_all(index).to(device), cache.views, mask.shape)
            confusion.update(mask, probs.argmax(0).to(torch.uint8).cpu().numpy())
    finally:
        model.train(was_training)
    return confusion


def write_grid_predictions(recipe: Recipe, model: GridSegNet, val_set, folder: Path, indices, device,
                           crf_params=None, on_image=None, log=print, mix=None) -> int:
    """``folder/<id>.png`` for ``val_set[indices]`` from cached tokens (resumable: existing files are kept);
    ``mix(index, probs)`` as in ``infer.write_predictions``."""
    from cpcx.data.palette import save_label_png
    from cpcx.segment.infer import refine_labels

    cache = token_cache(recipe, model.backbone, val_set, val_views(recipe.segment.flip), device, log)
    written = 0
    model.eval()
    for index in indices:
        path = folder / f"{val_set.ids[index]}.png"
        if not path.is_file():
            image = val_set.load_image(index)
            probs = probs_from_tokens(model, cache.get_all(index).to(device), cache.views, image.shape[:2])
            if mix is not None:
                probs = mix(index, probs)
            save_label_png(path, refine_labels(image, probs, crf_params))
            written += 1
        if on_image is not None:
            on_image()
    return written

