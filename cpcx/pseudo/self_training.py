"""``pseudo.self_training``: a cross-validated self-training round over the pseudo-labels (docs/results.md, 8h).

A self-training round trains a segmenter on the pseudo-labels and relabels the images with it. Trained on all the
images, the grid head learns each image's labels back, errors included (results.md 8b). Here every image is
relabelled by heads that never saw it: the images are split into ``folds``, a grid head (DeepLabV3 on the frozen
token grid, as ``cpcx segment`` trains it) is trained on the first pass's labels of all folds but one, and predicts
the images of that one. Only what holds across images carries over. The heads' softmax (both views, undone and
averaged) is then mixed into the label-conditioned maps, ``mix`` of it, over the image's classes.

The stage runs in two passes: the first writes ``labels_first/``, the heads' predictions go to
``self_training.pt`` (atomic), and the second writes ``labels/``. A killed stage resumes at the pass it was in.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: The file holding the heads' predictions of every image, (N, C, h, w) float16.
PREDICTIONS = "self_training.pt"
#: The first pass's labels, which the heads learn from.
FIRST_PASS = "labels_first"
#: The views the heads see: the token cache's original and mirrored grids.
VIEWS = ("orig", "hflip")


def folds_of(n: int, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train, held-out) index tensors of a ``folds``-fold split of ``n`` images drawn with ``seed``: every image
    is held out exactly once."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = []
    for k in range(folds):
        held = order[k::folds].sort().values
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        out.append((torch.nonzero(keep).flatten(), held))
    return out


def _views_of(tokens, index: int, views: Sequence[int]) -> torch.Tensor:
    """(V, h, w, e) float tokens of one image in ``views`` (indices into the cache's view axis)."""
    return torch.as_tensor(np.asarray(tokens[index])[list(views)]).float()


def _statistics(tokens, images: torch.Tensor, views: Sequence[int], chunk: int = 32):
    """Per-channel mean and (unbiased) std of the tokens of ``images`` in ``views``, accumulated in float64 chunks
    (a memory-mapped cache is never read whole)."""
    total = total_sq = None
    count = 0
    for start in range(0, len(images), chunk):
        x = torch.cat([_views_of(tokens, int(i), views) for i in images[start:start + chunk]]).double()
        x = x.reshape(-1, x.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    var = (total_sq - count * mean * mean) / max(1, count - 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


def fit_head(tokens, views: Sequence[int], targets, train: torch.Tensor, cfg, num_classes: int, seed: int,
             on_epoch: Callable[[], None] | None = None):
    """A grid head trained on the images ``train``: ``tokens[i]`` (V_all, h, w, e), ``targets`` (N, len(views),
    s, s) uint8 labels (255 ignored) in the same views; AdamW, the segmenter's poly schedule, each image once an
    epoch in a view drawn from (seed, epoch), cross-entropy at the targets' size. ``cfg``: head_channels,
    aspp_rates, lr, weight_decay, batch_size, epochs."""
    from cpcx.segment.grid import GridHead
    from cpcx.segment.grid_train import _Epoch
    from cpcx.segment.stage import POLY_POWER, _loss

    torch.manual_seed(seed)
    probe = _views_of(tokens, int(train[0]), views)
    head = GridHead(probe.shape[-1], num_classes, cfg.head_channels, cfg.aspp_rates)
    head.set_standardization(*_statistics(tokens, train, views))
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch, size = min(cfg.batch_size, len(train)), targets.shape[-1]
    steps = len(train) // batch
    total = steps * cfg.epochs
    head.train()
    for epoch in range(1, cfg.epochs + 1):
        plan = _Epoch(len(train), len(views), seed, epoch, 0, 1)
        for i in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (1 - ((epoch - 1) * steps + i) / total) ** POLY_POWER
            pick, view = train[plan.order[i * batch:(i + 1) * batch]], plan.views[i * batch:(i + 1) * batch]
            x = torch.stack([_views_of(tokens, int(a), [views[int(b)]])[0] for a, b in zip(pick, view)])
            y = torch.as_tensor(np.asarray(targets[pick.numpy(), view.numpy()])).long()
            logits = F.interpolate(head(x), size=(size, size), mode="bilinear", align_corners=False)
            loss = _loss(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()
    return head.eval()


@torch.no_grad()
def predict_views(head, tokens, index: int, views: Sequence[int]) -> torch.Tensor:
    """(C, h, w) softmax of a trained head on image ``index`` in ``views`` (named as ``VIEWS``), undone and
    averaged."""
    from cpcx.augment import apply_view

    probs = head(_views_of(tokens, index, views)).softmax(1)
    return torch.stack([apply_view(p, v) for p, v in zip(probs, VIEWS[:len(views)])]).mean(0)


def cross_validated_probs(tokens, views: Sequence[int], targets, cfg, num_classes: int, seed: int,
                          on_epoch: Callable[[], None] | None = None) -> torch.Tensor:
    """(N, C, h, w) softmax of every image from the head of the ``cfg.folds`` fold it is held out of, its
    ``views`` (named as ``VIEWS``) undone and averaged. Fold k's head is initialised with ``seed * 1000 + k``."""
    out = None
    for k, (train, held) in enumerate(folds_of(targets.shape[0], cfg.folds, seed)):
        head = fit_head(tokens, views, targets, train, cfg, num_classes, seed * 1000 + k, on_epoch)
        for i in held.tolist():
            probs = predict_views(head, tokens, i, views)
            if out is None:
                out = torch.zeros(targets.shape[0], *probs.shape)
            out[i] = probs
    return out


class HeadMix:
    """The heads' predictions (N, C, h, w), any float dtype, and their share ``mix`` in the decoded maps."""

    def __init__(self, probs: torch.Tensor, mix: float):
        self.probs, self.mix = probs, float(mix)

    def __call__(self, maps: torch.Tensor, indices: Sequence[int], labels) -> torch.Tensor:
        """Label-conditioned ``maps`` (B, C, h, w) of images ``indices`` → (1 - mix) maps + mix heads, the heads
        renormalised over each image's ``labels`` (B, C); where they give its classes nothing, the maps alone."""
        head = self.probs[list(indices)].to(maps.device, torch.float32)
        if head.shape[2:] != maps.shape[2:]:
            head = F.interpolate(head, size=maps.shape[2:], mode="bilinear", align_corners=False)
        head = head * torch.tensor(np.asarray(labels), dtype=head.dtype, device=maps.device)[:, :, None, None]
        total = head.sum(1, keepdim=True)
        head = torch.where(total > 0, head / total.clamp_min(1e-12), maps.float())
        return ((1 - self.mix) * maps.float() + self.mix * head).to(maps.dtype)


def train_heads(cache, first_labels: Callable[[int], np.ndarray], n: int, cfg, num_classes: int, seed: int,
                folder, progress) -> torch.Tensor:
    """The heads' predictions of the ``n`` images from the token ``cache`` (``open_token_cache``'s answer, both
    views) and the first pass's labels (``first_labels(i)``); ``progress(1)`` after every epoch of every fold."""
    from cpcx.segment.grid_train import LABEL_UPSAMPLE, label_grids

    size = LABEL_UPSAMPLE * cache.tokens.shape[2]
    targets = label_grids(first_labels, n, size, list(VIEWS), folder)
    return cross_validated_probs(cache.tokens, cache.views, targets, cfg, num_classes, seed, lambda: progress(1))


def load_or_train(path, n: int, train: Callable[[], torch.Tensor], log) -> torch.Tensor:
    """The predictions saved by an earlier (interrupted) run of the stage, or trained now and saved atomically."""
    from cpcx import atomic
    from cpcx.errors import CpcxError
    from cpcx.torchload import load_torch_file

    if path.is_file():
        fix = "delete it and re-run `cpcx pseudo` (it trains the heads again)"
        probs = load_torch_file(path, "self-training predictions", fix)
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[0] != n:
            raise CpcxError(f"{path}: not the heads' predictions of {n} images; {fix}")
        log(f"[dim]self-training: the heads' predictions from {path}[/]")
        return probs.half()
    start = time.perf_counter()
    probs = train().half()  # the run decodes what a resumed one reads back: the same labels either way
    atomic.save_torch(path, probs)
    log(f"[dim]self-training: heads trained in {time.perf_counter() - start:.0f} s → {path}[/]")
    return probs  # float16 (2 bytes per image, class and cell): HeadMix converts a batch at a time


def heads_for_stage(recipe, ranks, dataset, first_pass, cache, crf, console) -> HeadMix:
    """The first pass (``labels_first/``, resumable; ``first_pass(folder, todo, crf)`` labels every rank's list
    ``todo`` into ``folder``, as ``routing.LabellingPasses.first_pass`` does), then the heads trained on it by rank 0
    (or read back from ``self_training.pt``) → the :class:`HeadMix` the second pass decodes with."""
    from cpcx import atomic, distributed, shard
    from cpcx.data.palette import load_label_png
    from cpcx.pseudo.labelling import remove_torn_files, with_progress
    from cpcx.runs import output_written

    st = recipe.pseudo.self_training
    stage_dir = recipe.run_dir("pseudo")
    first = stage_dir / FIRST_PASS
    if ranks.is_main:
        atomic.ensure_dir(first)
        remove_torn_files(first)
    distributed.barrier()
    todo = [i for i, image_id in enumerate(dataset.ids) if not output_written(first / f"{image_id}.png")]
    distributed.barrier()  # every rank has listed the same images before any writes one
    if todo:
        console.print(f"self-training, first pass: {len(todo)} of {len(dataset)} images to label → {first}")
    start = time.perf_counter()
    # Called even when every image is done: with pseudo.context_paste it also makes (or reads back) the second network.
    first_pass(first, todo, crf if st.first_pass_crf else None)
    if todo:
        console.print(f"[green]✔[/] first pass: {len(todo)} labels in {time.perf_counter() - start:.1f} s → {first}")
    distributed.barrier()  # the heads learn from every image's first-pass label

    def train() -> torch.Tensor:
        console.print(f"self-training: {st.folds} grid heads × {st.epochs} epochs on the first-pass labels")
        return with_progress(console, st.folds * st.epochs, lambda advance: train_heads(
            cache, lambda i: load_label_png(first / f"{dataset.ids[i]}.png"), len(dataset), st, dataset.num_classes,
            recipe.seed, stage_dir, advance), label="self-training", unit="epochs")

    path = stage_dir / PREDICTIONS
    probs = shard.main_first(ranks, lambda: load_or_train(path, len(dataset), train, console.print))
    if probs is None:  # another rank: rank 0 has saved them
        probs = load_or_train(path, len(dataset), train, console.print)
    return HeadMix(probs, st.mix)
