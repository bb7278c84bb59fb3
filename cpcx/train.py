"""``cpcx train``: the CPC network from image-level labels (paper §3.3–3.5, §4.1), on CPU, one or several GPUs.

Schedule (ViT-PCM's): Adam at ``train.lr`` for ``train.warmup_epochs`` with the ViT frozen, then
``train.lr_after_warmup`` with the last ``train.unfreeze_blocks`` blocks (and the final norm) trainable;
``unfreeze_blocks: 0`` keeps the ViT frozen throughout. While it is frozen and ``train.feature_cache`` is on,
the patch tokens come from the on-disk cache (see ``cpcx.feature_cache``: no photometric augmentation then)
and each image takes one of ``train.views`` per epoch; with the cache off the same view choice is made and
the crop/colour augmentations of ``train.augment`` are added. Once ViT blocks train, geometry follows the
flip/transpose probabilities of ``train.augment``; with ``train.trunk_cache`` every epoch instead reads the
tokens entering the last ``unfreeze_blocks`` blocks from a trunk cache and runs only those blocks (views as
in frozen epochs): fine-tuning the ViT's end costs a fraction of a full forward pass, on a CPU too.
The trained blocks have their own rate, ``train.backbone_lr`` (default: the head's rate of the epoch).

Outputs in ``runs/<name>/train/``: ``weights/last.pt`` and ``weights/best.pt`` (lowest epoch loss), both
written atomically after every epoch, and ``metrics.csv`` (one row per epoch). ``--resume`` continues from
``last.pt`` exactly (see ``cpcx.checkpoint``). Under torchrun every process trains on its share of each
batch (DistributedSampler) and DDP averages the gradients.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cpcx import atomic, checkpoint, distributed, viz
from cpcx.augment import TrainTransform, pick_view, sample_generator
from cpcx.device import autocast, report_slow_bf16, seed_everything
from cpcx.errors import CpcxError
from cpcx.feature_cache import FeatureCache, trunk_depth
from cpcx.model import CPCNet, build_model, checkpoint_meta, cluster_vectors
from cpcx.model.losses import saliency_loss, total_loss
from cpcx.recipe import LossConfig, Recipe
from cpcx.runs import prepare_stage_dir

METRICS_HEADER = ["epoch", "lr", "loss", "mce", "pce", "precision", "recall", "f1", "seconds"]


# ------------------------------------------------------------------------------------------ data views
class EpochSampler(Sampler):
    """DistributedSampler order for one epoch (seeded by seed + epoch), yielding (epoch, index) pairs so the
    dataset can seed each sample's augmentation; works the same with one process."""

    def __init__(self, n: int, epoch: int, seed: int, world: int = 1, rank: int = 0):
        self.inner = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.inner.set_epoch(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        return ((self.epoch, int(i)) for i in self.inner)


class TrainingItems(Dataset):
    """Training items {"x", "label", "u", "index"}: images through ``transform`` or cached tokens."""

    def __init__(self, labels: torch.Tensor, u: torch.Tensor, seed: int, images=None,
                 transform: TrainTransform | None = None, cache: FeatureCache | None = None):
        self.labels, self.u, self.seed = labels, u, seed
        self.images, self.transform, self.cache = images, transform, cache

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, i = key
        g = sample_generator(self.seed, epoch, i)
        if self.cache is not None:  # "view": which of the cache's views (the pasted items' saliency follows it)
            view = pick_view(self.cache.views, g)
            return {"x": self.cache.get(i, view), "label": self.labels[i], "u": self.u[i], "index": i, "view": view}
        x = self.transform(self.images[i]["image"], g)
        return {"x": x, "label": self.labels[i], "u": self.u[i], "index": i}


# ------------------------------------------------------------------------------------------ one step
def forward_loss(model: torch.nn.Module, net: CPCNet, batch: dict, loss_cfg: LossConfig, device: torch.device,
                 precision: str, cached: bool, trunk: int | None = None,
                 saliency_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Forward (through ``model``, the DDP wrapper or ``net``) and the losses of eq. 8 for one batch;
    ``cached``: the batch holds tokens, those of a trunk cache of ``trunk`` blocks when it is given. With
    ``saliency_weight`` the batch's ``saliency`` targets and ``saliency_mask`` add that much of ``saliency_loss``
    (``pseudo.saliency.paste_loss``)."""
    x = batch["x"].to(device, non_blocking=True)
    u = batch["u"].to(device, non_blocking=True) if net.num_clusters else None
    with autocast(device, precision):
        out = model(tokens=x.float(), u=u, trunk=trunk) if cached else model(images=x, u=u)
    losses = total_loss(out, batch["label"].to(device), loss_cfg, net.classifier.weight)
    losses["saliency"] = losses["mce"].new_zeros(())
    if saliency_weight > 0:
        target, mask = batch["saliency"].to(device), batch["saliency_mask"].to(device)
        losses["saliency"] = saliency_loss(out["probs"], target, mask)
        losses["loss"] = losses["loss"] + saliency_weight * losses["saliency"]
    losses["image_probs"] = out["image_probs"].detach()
    return losses


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank, 7]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    """A rich bar (loss, ETA) on a terminal, plain lines every ``log_every`` steps otherwise; rank 0 only."""

    def __init__(self, console: Console, enabled: bool, log_every: int):
        self.console, self.enabled, self.log_every = console, enabled, log_every
        self.bar = None

    def start(self, title: str, total: int) -> None:
        self.title, self.total, self.t0 = title, total, time.perf_counter()
        if self.enabled and self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, loss=float("nan"))

    def step(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss)
        elif done % self.log_every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.total - done)
            self.console.print(f"{self.title} step {done}/{self.total} loss {loss:.4f} "
                               f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", soft_wrap=True)

    def stop(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.enabled:
            self.console.print(summary, soft_wrap=True)


# ------------------------------------------------------------------------------------------ the run
def run_train(recipe: Recipe, resume: bool = False, console: Console | None = None) -> Path:
    """Train the CPC network of ``recipe``; returns ``runs/<name>/train/weights/best.pt``."""
    with distributed.joined(recipe.train.device) as info:
        return Trainer(recipe, info, console or Console(highlight=False)).fit(resume)


def run_cluster_matrix(recipe: Recipe, classes: Sequence[str]) -> np.ndarray:
    """The (foreground classes, clusters) matrix of the run's ``clusters/clusters.json``, checked against the data
    set's classes; a message naming the file and the command that makes it when it is missing or stale."""
    path = recipe.run_dir("clusters") / "clusters.json"
    if not path.is_file():
        raise CpcxError(f"{path}: no clusters yet; run `cpcx clusters -r <recipe>` first "
                        "(or set model.cluster_token: false)")
    from cpcx.clusters import load_clusters

    clusters = load_clusters(path)
    if tuple(clusters.classes) != tuple(classes[1:]):
        raise CpcxError(f"{path}: its classes differ from the data set's; re-run `cpcx clusters -r <recipe>`")
    return np.asarray(clusters.matrix, dtype=np.float32)


class Trainer:
    """One training of the CPC network. ``folder``, ``items`` and ``name`` let a stage train a second network with
    the same recipe elsewhere (``pseudo.context_paste``): its own folder instead of ``runs/<name>/train`` (no stage
    record of its own: it belongs to the calling stage), its own item set for the cached tokens, and ``init``: a
    checkpoint whose network weights it starts from (a fresh start only; a resume continues its own);
    ``backbone_from``: a checkpoint whose backbone weights alone it starts from (the frozen backbone whose tokens are
    cached, whatever the recipe's seed would initialise); ``saliency_loss``: the weight of the items' saliency
    targets in the loss (their items must carry them)."""

    def __init__(self, recipe: Recipe, info: distributed.DistInfo, console: Console, folder: Path | None = None,
                 items: Callable[..., Dataset] | None = None, name: str = "train", init: Path | None = None,
                 saliency_loss: float = 0.0, backbone_from: Path | None = None):
        self.recipe, self.info, self.console = recipe, info, console
        self.saliency_loss, self.backbone_from = saliency_loss, backbone_from
        self.own_folder, self.make_items, self.name, self.init = folder, items or TrainingItems, name, init
        self.device = info.device
        self.cache: FeatureCache | None = None
        t = recipe.train
        self.trunk = t.trunk_cache and t.unfreeze_blocks > 0  # every epoch from the trunk cache
        self.ddp: tuple[int, torch.nn.Module] | None = None

    def log(self, text: str) -> None:
        if self.info.is_main:
            self.console.print(text, soft_wrap=True)

    # ---------------------------------------------------------------- set-up
    def fit(self, resume: bool) -> Path:
        from cpcx.data import ImageLabelDataset, build_dataset

        r, t = self.recipe, self.recipe.train
        if t.batch_size % self.info.world_size:
            raise CpcxError(f"train.batch_size: {t.batch_size} does not split over {self.info.world_size} "
                            "processes; use a multiple of the process count")
        self.per_rank = t.batch_size // self.info.world_size
        seed_everything(r.seed)
        self.images = ImageLabelDataset(build_dataset(r.dataset, "train"))
        classes = self.images.classes
        matrix = run_cluster_matrix(r, classes) if r.model.cluster_token else None
        self.labels = self.images.labels
        self.u = torch.from_numpy(cluster_vectors(self.labels.numpy(), matrix))
        self.net = net = build_model(r.model, len(classes), 0 if matrix is None else matrix.shape[1]).to(self.device)
        self.meta = checkpoint_meta(net, classes, matrix)
        self.folder = folder = self.own_folder or r.run_dir("train")
        self.optimizer = torch.optim.Adam(
            [{"params": net.head_parameters()}, {"params": net.backbone.trainable_parameters(t.unfreeze_blocks)}],
            lr=t.lr, weight_decay=t.weight_decay)
        start, self.history, self.best = 0, [], (math.inf, 0)
        if resume:  # checked before the run folder is touched: a refused resume changes nothing
            ckpt = checkpoint.load_for_resume(folder / "weights" / "last.pt", r, self.meta["cluster_matrix"])
            net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            start, self.history = ckpt["epoch"], ckpt["history"]
            self.best = (ckpt["best_loss"], ckpt["best_epoch"])
            self.log(f"{self.name}: resuming after epoch {start} of {t.epochs} from {folder / 'weights' / 'last.pt'}")
        elif (folder / "weights" / "last.pt").is_file():
            self.log(f"{self.name}: starting over; {folder / 'weights'} will be replaced (--resume continues instead)")
        if self.init is not None and not resume:
            from cpcx.torchload import load_torch_file

            start_from = load_torch_file(self.init, "training checkpoint", "train the run again (`cpcx train`)")
            net.load_state_dict(start_from["model"])
            self.log(f"{self.name}: starting from the network of {self.init}")
        elif self.backbone_from is not None and not resume:
            from cpcx.torchload import load_torch_file

            start_from = load_torch_file(self.backbone_from, "training checkpoint",
                                         "train the run again (`cpcx train`)")
            backbone = {k[len("backbone."):]: v for k, v in start_from["model"].items() if k.startswith("backbone.")}
            net.backbone.load_state_dict(backbone)
            self.log(f"{self.name}: the backbone of {self.backbone_from}")
        if self.info.is_main and self.own_folder is None:
            prepare_stage_dir(r, "train", str(self.device))
        elif self.info.is_main:
            atomic.ensure_dir(folder)
        distributed.barrier()
        if self.info.is_main:  # metrics.csv is exactly the history of the checkpoint we continue from
            (folder / "metrics.csv").unlink(missing_ok=True)
            for row in self.history:
                atomic.append_csv_row(folder / "metrics.csv", METRICS_HEADER, row)
        report_slow_bf16(self.device, t.precision, "train.precision", self.log)
        self.log(f"{self.name}: {len(self.images)} images, {len(classes)} classes, {net.num_clusters} clusters, "
                 f"{r.model.backbone} on {self.device} × {self.info.world_size}, epochs {start + 1}..{t.epochs}")
        for epoch in range(start, t.epochs):
            self._epoch(epoch)
        if start >= t.epochs:
            self.log(f"{self.name}: already trained for {t.epochs} epochs; raise train.epochs to continue")
        return folder / "weights" / "best.pt"

    def _loader(self, epoch: int, frozen: bool, cached: bool) -> DataLoader:
        r, t = self.recipe, self.recipe.train
        if cached:
            if self.cache is None:
                self.cache = FeatureCache.build(
                    r.feature_cache_root(), r.model.backbone, self.net.backbone, self.images, r.model.img_size,
                    t.views, self.device, t.precision, self.per_rank, t.workers, log=self.log,
                    prune=t.feature_cache_dir is None,
                    depth=trunk_depth(self.net.backbone, t.unfreeze_blocks) if self.trunk else None)
            items = self.make_items(self.labels, self.u, r.seed, cache=self.cache)
        else:
            transform = TrainTransform(t.augment, r.model.img_size, self.net.mean, self.net.std,
                                       views=t.views if frozen else None)
            items = TrainingItems(self.labels, self.u, r.seed, images=self.images, transform=transform)
        sampler = EpochSampler(len(items), epoch, r.seed, self.info.world_size, self.info.rank)
        return DataLoader(items, batch_size=self.per_rank, sampler=sampler, num_workers=t.workers,
                          pin_memory=self.device.type == "cuda")

    def _model(self, trainable_blocks: int) -> torch.nn.Module:
        """The network, wrapped in DDP under torchrun (re-wrapped when the set of trained parameters changes)."""
        if not self.info.enabled:
            return self.net
        if self.ddp is None or self.ddp[0] != trainable_blocks:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = (trainable_blocks, DistributedDataParallel(self.net, device_ids=ids))
        return self.ddp[1]

    # ---------------------------------------------------------------- one epoch
    def _epoch(self, epoch: int) -> None:
        r, t = self.recipe, self.recipe.train
        frozen = epoch < t.warmup_epochs or t.unfreeze_blocks == 0
        blocks = 0 if frozen else t.unfreeze_blocks
        lr = t.lr if epoch < t.warmup_epochs else t.lr_after_warmup
        cached = self.trunk or (frozen and t.feature_cache)
        self.net.backbone.set_trainable_blocks(blocks)
        head, vit = self.optimizer.param_groups
        head["lr"], vit["lr"] = lr, t.backbone_lr or lr
        loader = self._loader(epoch, frozen, cached)
        trunk = self.cache.depth if cached else None
        model = self._model(blocks)
        self.net.train()
        torch.manual_seed(_epoch_seed(r.seed, epoch, self.info.rank))  # dropout: same stream on resume
        mode = ("images" if not cached else "cached" if trunk is None else f"trunk cache of {trunk} blocks")
        mode += ", backbone frozen" if frozen else f", last {blocks} backbone blocks at lr {vit['lr']:g}"
        progress = _Progress(self.console, self.info.is_main, t.log_every)
        progress.start(f"epoch {epoch + 1}/{t.epochs}", len(loader))
        t0 = time.perf_counter()
        # loss·n, mce·n, pce·n, n, true positives, false positives, false negatives (foreground, at 0.5), saliency·n
        sums = torch.zeros(8, dtype=torch.float64)
        for step, batch in enumerate(loader, 1):
            losses = forward_loss(model, self.net, batch, r.loss, self.device, t.precision, cached, trunk,
                                  self.saliency_loss)
            if not torch.isfinite(losses["loss"]):
                raise CpcxError(f"{self.name}: the loss is {losses['loss'].item()} at epoch {epoch + 1} step {step}; "
                                "lower train.lr (or use train.precision: fp32) and train again")
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
            n = len(batch["index"])
            pred = (losses["image_probs"][:, 1:] > 0.5).cpu()
            true = batch["label"][:, 1:] > 0.5
            loss, mce, pce = (losses[k].item() for k in ("loss", "mce", "pce"))
            sums += torch.tensor([loss * n, mce * n, pce * n, n, (pred & true).sum(), (pred & ~true).sum(),
                                  (~pred & true).sum(), losses["saliency"].item() * n], dtype=torch.float64)
            progress.step(step, loss)
        sums = distributed.all_reduce_sum(sums.to(self.device)).cpu()
        loss, mce, pce = (sums[:3] / sums[3].clamp_min(1)).tolist()
        tp, fp, fn = sums[4:7].tolist()
        saliency = f" saliency {sums[7].item() / max(sums[3].item(), 1):.4f}" if self.saliency_loss > 0 else ""
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        seconds = time.perf_counter() - t0
        row = [epoch + 1, lr, loss, mce, pce, precision, recall, f1, round(seconds, 2)]
        progress.stop(f"epoch {epoch + 1}/{t.epochs} ({mode}) loss {loss:.4f} mce {mce:.4f} pce {pce:.4f}{saliency} "
                      f"P/R/F1 {precision:.2f}/{recall:.2f}/{f1:.2f} lr {lr:g} {seconds:.1f}s")
        self.history.append(row)
        if loss < self.best[0]:
            self.best = (loss, epoch + 1)
        if self.info.is_main:
            self._save(epoch + 1, loss, new_best=self.best[1] == epoch + 1)
            atomic.append_csv_row(self.folder / "metrics.csv", METRICS_HEADER, row)
            viz.training_curves(self.folder / "metrics.csv", self.folder / "figures" / "curves.png",
                                title=f"{self.recipe.name} · {self.name}")
        distributed.barrier()

    def _save(self, epochs_done: int, loss: float, new_best: bool) -> None:
        state = {
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "meta": self.meta,
            "epoch": epochs_done, "loss": loss, "best_loss": self.best[0], "best_epoch": self.best[1],
            "history": self.history, "recipe": self.recipe.model_dump(mode="json"),
        }
        weights = self.folder / "weights"
        if new_best:  # best before last: a kill in between redoes this epoch and rewrites both
            checkpoint.save(weights / "best.pt", state)
        checkpoint.save(weights / "last.pt", state)
