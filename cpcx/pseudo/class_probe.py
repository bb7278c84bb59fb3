"""The class probe of the pseudo-label stage (``pseudo.class_probe``): which present object a patch belongs to,
learned from the images that hold a single object class.

Why: with image-level labels a class that co-occurs with another takes its pixels (on the VOC slice person takes
28 % of the car pixels, 25 % of motorbike, 18 % of horse: ``benchmarks/results/diagnose.md``). In an image
labelled with one object class there is no such ambiguity: every patch the network calls object is that class.
A linear head on the frozen patch tokens of those patches (a few seconds on a CPU) then re-decides, wherever
several present objects compete, how the network's object score is shared among them. Object-vs-background
stays the network's call. A class with fewer than ``min_images`` single-class images (on the VOC slice chair has
none, car one) also learns from the patches of multi-object images where it takes more than ``multi_confidence``
of the object score; a class still short of ``min_images`` images keeps the network's share.

``fit_from_batches`` trains it from batches of (conditioned maps, tokens, labels); ``ClassProbe.redecide``
applies it to a batch of conditioned maps; ``probe_images`` says which images train it. The stage saves the probe
beside the labels (``class_probe.pt``) so that a resumed run uses the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: Token scale before the linear head: unit tokens × 10 give logits in a useful range at Adam's 1e-2.
_TOKEN_SCALE = 10.0


def single_class_images(labels: np.ndarray) -> list[int]:
    """Indices of the images whose label row (background first) holds exactly one object class."""
    return [int(i) for i in np.flatnonzero((np.asarray(labels)[:, 1:] > 0).sum(1) == 1)]


def probe_images(labels: np.ndarray, cfg) -> list[int]:
    """The images the probe learns from: the single-class ones, and all others too with ``multi_confidence``."""
    return single_class_images(labels) if cfg.multi_confidence is None else list(range(len(labels)))


def object_patches(maps: torch.Tensor, tokens: torch.Tensor, labels: np.ndarray, threshold: float,
                   confidence: float | None = None):
    """Training rows → (tokens (n, e), object class index among the objects (n,), image index in the batch (n,),
    from a single-class image (n,) bool).

    ``maps`` (B, C, h, w) label-conditioned as ``cpcx pseudo`` makes them, ``tokens`` (B, h, w, e), ``labels``
    (B, C). A patch counts when the share of its score that goes to objects exceeds ``threshold``; in a
    single-class image it is that class; in a multi-object image (only with ``confidence``) it counts when one
    present object takes more than ``confidence`` of its object score, and is that object. Maps on a finer grid
    than the tokens (multi-scale inference) are resized to the tokens' grid first."""
    if maps.shape[-2:] != tokens.shape[1:3]:
        maps = F.interpolate(maps, size=tokens.shape[1:3], mode="bilinear", align_corners=False)
    present = np.asarray(labels)[:, 1:] > 0
    objects = maps[:, 1:]
    share = objects.sum(1) / maps.sum(1).clamp_min(1e-12)
    top, best = (objects / objects.sum(1, keepdim=True).clamp_min(1e-12)).max(1)
    count = torch.as_tensor(present.sum(1), device=maps.device)[:, None, None].expand_as(share)
    only = torch.as_tensor(present.argmax(1), device=maps.device)[:, None, None].expand_as(share)
    single = count == 1
    chosen = (share > threshold) & (single | ((count > 1) & (top > confidence) if confidence is not None
                                              else torch.zeros_like(single)))
    target = torch.where(single, only, best)
    image = torch.arange(len(maps), device=maps.device)[:, None, None].expand_as(share)
    return tokens[chosen].float().cpu(), target[chosen].cpu(), image[chosen].cpu(), single[chosen].cpu()


@dataclass
class ClassProbe:
    """A linear head over the object classes (``weight`` (K, e), ``bias`` (K,), K = C - 1) and the classes it
    may decide (``known`` (K,) bool: at least ``min_images`` images gave it training rows); ``mix`` weighs it
    against the network."""

    weight: torch.Tensor
    bias: torch.Tensor
    known: torch.Tensor
    mix: float

    def redecide(self, maps: torch.Tensor, tokens: torch.Tensor, labels) -> torch.Tensor:
        """Conditioned maps (B, C, h, w) → the same with the object classes' shares re-decided.

        Per patch the network's object mass (the sum over present objects) and the background are kept; the
        part of it that the network gives to known present classes is shared among them by the probe's softmax
        over the known present classes (weight ``mix``, the network's own shares the rest). Sums are unchanged,
        so the maps stay distributions for the CRF. ``tokens`` (B, h', w', e) are resized to the maps' grid when
        it differs (multi-scale inference)."""
        if not bool(self.known.any()):  # nothing it may decide (e.g. no single-class images at all)
            return maps
        dev = maps.device
        present = torch.as_tensor(np.asarray(labels)[:, 1:] > 0, device=dev)[:, :, None, None]
        logits = F.normalize(tokens.float(), dim=-1) @ self.weight.to(dev).T * _TOKEN_SCALE + self.bias.to(dev)
        logits = logits.permute(0, 3, 1, 2)  # (B, K, h', w')
        if logits.shape[-2:] != maps.shape[-2:]:
            logits = F.interpolate(logits, size=maps.shape[-2:], mode="bilinear", align_corners=False)
        decidable = present & self.known.to(dev)[None, :, None, None]
        objects = maps[:, 1:]
        mass = objects.sum(1, keepdim=True)
        network = objects / mass.clamp_min(1e-12)
        probe = logits.masked_fill(~decidable, -1e4).softmax(1) * decidable
        probe = torch.where(decidable, probe * (network * decidable).sum(1, keepdim=True), network)
        out = maps.clone()
        out[:, 1:] = mass * (self.mix * probe + (1 - self.mix) * network)
        return out

    def save(self, path: Path) -> None:
        from cpcx import atomic

        atomic.save_torch(path, {"weight": self.weight, "bias": self.bias, "known": self.known, "mix": self.mix})

    @classmethod
    def load(cls, path: Path) -> "ClassProbe":
        from cpcx.errors import CpcxError
        from cpcx.torchload import load_torch_file

        fix = "delete it and re-run `cpcx pseudo` (it trains the probe again)"
        state = load_torch_file(path, "class probe", fix)
        try:
            return cls(state["weight"], state["bias"], state["known"], float(state["mix"]))
        except (KeyError, TypeError, ValueError):
            raise CpcxError(f"{path}: not a class probe (weight/bias/known/mix missing); {fix}") from None


def train_linear_head(x: torch.Tensor, out_features: int, batch_loss, epochs: int, seed: int,
                      generator: torch.Generator | None = None) -> torch.nn.Linear:
    """A linear head on the rows of ``x`` (initialised under ``seed``), Adam at 1e-2 over batches of 4096 rows
    shuffled by ``generator`` (the global RNG when None), ``epochs`` epochs; ``batch_loss(logits, idx)`` is the
    loss of the batch of rows ``idx``. Shared by the class probe and the benchmarks' probes."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], out_features)
    optimizer = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 4096):
            idx = order[start:start + 4096]
            loss = batch_loss(head(x[idx]), idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head


def fit_from_batches(batches, labels: np.ndarray, cfg, seed: int) -> tuple[ClassProbe, int]:
    """The probe from ``batches`` of (label-conditioned maps, tokens, label rows) of the ``probe_images``, in
    order; ``labels`` are those images' label rows. → (probe, training patches).

    Multi-object images' rows are kept only for the classes with fewer than ``cfg.min_images`` single-class
    images; a class is known (may be decided) when its single-class images plus the multi-object images that
    gave it rows reach ``cfg.min_images``. Each batch keeps at most its share of ``cfg.max_patches`` (drawn with
    ``seed``), so memory stays bounded on a full-size data set (10 000 images at 960 px would otherwise hold
    millions of token rows)."""
    present = np.asarray(labels)[:, 1:] > 0
    singles = present[present.sum(1) == 1].sum(0)
    rare = torch.as_tensor(singles < cfg.min_images)
    generator = torch.Generator().manual_seed(seed)
    total = max(1, len(labels))
    rows, pairs, offset = [], set(), 0
    for maps, tokens, batch_labels in batches:
        x, y, image, single = object_patches(maps, tokens, batch_labels, cfg.object_threshold, cfg.multi_confidence)
        keep = single | rare[y]
        x, y, image, single = x[keep], y[keep], image[keep], single[keep]
        pairs.update((offset + int(i), int(c)) for i, c in zip(image[~single], y[~single]))
        offset += len(batch_labels)
        cap = -(-cfg.max_patches * len(batch_labels) // total)  # ceil: the shares add up to at least max_patches
        if len(y) > cap:
            keep = torch.randperm(len(y), generator=generator)[:cap]
            x, y = x[keep], y[keep]
        rows.append((x, y))
    images_per_class = singles + np.bincount([c for _, c in pairs], minlength=present.shape[1])
    count = sum(len(r[1]) for r in rows)
    return fit_class_probe(rows, images_per_class, cfg, seed), count


def gather_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], cap: int, generator: torch.Generator):
    """``torch.cat`` of the rows' (x, y), and at most ``cap`` of them drawn with ``generator`` as
    ``cat[randperm(n)[:cap]]`` would (the same rows in the same order), with one copy of the rows in memory: each
    block is copied into a float32 buffer of the kept size and dropped from ``rows`` (which ends empty). At the
    demo grid's 816 channels the cap is 623 MiB; the concatenation, the draw and the normalisation made up to
    three such copies at once."""
    if not rows:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
    total = sum(len(r[1]) for r in rows)
    keep = torch.randperm(total, generator=generator)[:cap] if total > cap else None
    size, width = (total if keep is None else len(keep)), rows[0][0].shape[1]
    x, y = torch.empty(size, width, dtype=torch.float32), torch.empty(size, dtype=torch.long)
    if keep is not None:  # the kept rows sorted once, so each block finds its own with a binary search
        kept, slots_in_order = keep.sort()
    rows.reverse()  # pop() from the end: the blocks in their order, each dropped once copied
    offset = 0
    while rows:
        bx, by = rows.pop()
        if keep is None:
            x[offset:offset + len(by)], y[offset:offset + len(by)] = bx, by
        else:
            lo, hi = torch.searchsorted(kept, torch.tensor([offset, offset + len(by)])).tolist()
            slots = slots_in_order[lo:hi]
            x[slots], y[slots] = bx[kept[lo:hi] - offset].float(), by[kept[lo:hi] - offset]
        offset += len(by)
    return x, y


def normalise_rows_(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1) * _TOKEN_SCALE``, the same values, computed in place: ``x`` is the one copy of the
    probe's rows (up to 623 MiB at the demo grid), so no second one is made."""
    return x.div_(x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mul_(_TOKEN_SCALE)


def fit_class_probe(rows: list[tuple[torch.Tensor, torch.Tensor]], images_per_class: np.ndarray, cfg,
                    seed: int) -> ClassProbe:
    """Train the probe on ``object_patches`` rows (tokens, object class index).

    ``images_per_class`` (K,) counts the images that gave each object class rows; ``cfg`` is the recipe's
    ``pseudo.class_probe``. Class-balanced cross-entropy (a frequent class must not win the shared patches by
    count), Adam at 1e-2, batches of 4096 rows, ``cfg.epochs`` epochs; at most ``cfg.max_patches`` rows, drawn
    with ``seed``."""
    k = len(images_per_class)
    generator = torch.Generator().manual_seed(seed)
    x, y = gather_rows(rows, cfg.max_patches, generator)
    known = torch.as_tensor(np.asarray(images_per_class) >= cfg.min_images)
    x = normalise_rows_(x)
    weight = None
    if len(x):
        counts = torch.bincount(y, minlength=k).float()
        weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros(k))
        weight = weight / weight[counts > 0].mean()
    head = train_linear_head(x, k, lambda logits, idx: F.cross_entropy(logits, y[idx], weight=weight), cfg.epochs,
                             seed, generator)
    return ClassProbe(head.weight.detach().clone(), head.bias.detach().clone(), known, cfg.mix)
