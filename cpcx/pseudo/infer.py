"""Inference for the pseudo-label stage: label-conditioned patch probabilities at any input size.

``PatchPredictor`` resizes a batch of images of any sizes to ``pseudo.img_size`` square, runs the CPC
network on them (and on their mirror images, ``pseudo.flip``; at every factor of ``pseudo.scales``, the
maps averaged on the finest patch grid), and conditions the patch softmax Z on the image labels
(``condition_on_labels``). ``upsample`` takes one image's maps back to its own size.
``open_token_cache`` finds the training feature cache when it holds exactly the tokens the ViT would give
here, so that a run whose backbone stayed frozen skips the ViT, and a run that fine-tuned only the blocks
after a trunk cache runs only those blocks.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpcx.errors import CpcxError


# --------------------------------------------------------------------------------------- probabilities
def condition_on_labels(probs: torch.Tensor, labels: torch.Tensor, class_max_norm: bool) -> torch.Tensor:
    """Z (B, C, h, w) → a distribution over the image's classes only, as ViT-PCM's ``merge_class_labels``.

    1. absent classes are zeroed (image labels are known on the training set, as in all WSSS work);
    2. optionally (``class_max_norm``) each present class map is divided by its maximum over the image's
       patches, so a class the image is known to contain reaches 1 somewhere even when the always-present
       background dominates every patch;
    3. renormalised over the classes at each patch. The argmax does not change, but the CRF unary
       (-log p) needs a distribution: without it a patch whose mass went to an absent class would give all
       present classes near-equal, near-clipped unaries and leave the decision to the pairwise terms.
       Renormalising is conditioning on the label set, p(c | x, c ∈ Y) = p(c | x) / Σ_{c' ∈ Y} p(c' | x).
       A patch where every present class underflowed to 0 becomes uniform over the present classes.
    """
    labels = labels.to(probs.dtype)[:, :, None, None]
    probs = probs * labels
    if class_max_norm:
        probs = probs / probs.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    total = probs.sum(dim=1, keepdim=True)
    uniform = labels / labels.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.where(total > 0, probs / total.clamp_min(1e-12), uniform.expand_as(probs))


def snap_size(size: int, patch: int) -> int:
    """The nearest multiple of the patch size: flip averaging needs the patch grid to mirror exactly."""
    return max(patch, int(round(size / patch)) * patch)


class PatchPredictor:
    """Label-conditioned patch probabilities (B, C, h, w) for a batch of H×W×3 uint8 images of any sizes."""

    def __init__(self, net, device: torch.device, precision: str, img_size: int, flip: bool, class_max_norm: bool,
                 scales: Sequence[float] = (1.0,)):
        self.net = net.to(device).eval()
        self.device = device
        self.precision = precision
        self.size = snap_size(img_size, net.patch_size)
        # Further input sizes (multi-scale inference); the base size is always run (and may come from a cache).
        others = {snap_size(img_size * s, net.patch_size) for s in scales}
        self.extra_sizes = sorted(others - {self.size})
        self.flip = flip
        self.class_max_norm = class_max_norm
        self.mean = torch.tensor(net.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(net.std, device=device).view(1, 3, 1, 1) * 255.0

    def prepare(self, images: Sequence[np.ndarray], size: int | None = None) -> torch.Tensor:
        """Each image resized to size×size (default ``self.size``; bilinear, antialiased when shrinking), normalised."""
        size = size or self.size
        batch = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
            x = x.permute(2, 0, 1)[None].float()
            batch.append(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                       antialias=True))
        return (torch.cat(batch) - self.mean) / self.std

    def __call__(self, images: Sequence[np.ndarray], labels: np.ndarray, u: np.ndarray | None,
                 tokens: np.ndarray | None = None, trunk: int | None = None, with_tokens: bool = False):
        """``tokens`` (B, V, h, w, e), views (orig[, hflip]) from the training feature cache, skip the ViT;
        with ``trunk`` they are a trunk cache's (B, V, T, e) and only the blocks after it run. ``with_tokens``:
        (maps, the final patch tokens of the original view at the base size (B, h, w, e))."""
        labels_t = torch.tensor(np.asarray(labels), dtype=torch.float32, device=self.device)
        probs, final = self.patch_probs(images, u, tokens, trunk, with_tokens=True)
        maps = condition_on_labels(probs, labels_t, self.class_max_norm)
        return (maps, final) if with_tokens else maps

    @torch.inference_mode()
    def patch_probs(self, images: Sequence[np.ndarray] | None, u: np.ndarray | None,
                    tokens: np.ndarray | None = None, trunk: int | None = None, with_tokens: bool = False):
        """The patch softmax Z (B, C, h, w), averaged with the mirror image's, before label conditioning.
        ``images`` may be None when ``tokens`` are given and there are no extra scales. With extra scales the
        maps of every size are resized (bilinear) to the finest patch grid among them and averaged.
        ``with_tokens``: (Z, the base size's final patch tokens of the original view (B, h, w, e))."""
        from cpcx.device import autocast

        if self.extra_sizes and images is None:
            raise ValueError("pseudo.scales needs the images: the token cache holds the base size only")
        n = len(images) if tokens is None else len(tokens)
        u_t = None if u is None else torch.as_tensor(u, dtype=torch.float32, device=self.device)
        if self.flip and u_t is not None:
            u_t = torch.cat([u_t, u_t])
        with autocast(self.device, self.precision):
            if tokens is None:
                x = self.prepare(images, self.size)
                final = self.net.backbone(torch.cat([x, x.flip(-1)]) if self.flip else x)  # both views, one pass
            else:
                t = torch.from_numpy(np.asarray(tokens)).to(self.device).float()
                t = torch.cat([t[:, 0], t[:, 1]]) if self.flip else t[:, 0]
                final = t if trunk is None else self.net.backbone.forward_from(t, trunk)
            maps = [self.net(tokens=final, u=u_t)["probs"].float()]
            maps += [self._images_probs(images, size, u_t) for size in self.extra_sizes]
        if self.flip:
            maps = [0.5 * (m[:n] + m[n:].flip(-1)) for m in maps]
        if len(maps) == 1:
            probs = maps[0]
        else:
            grid = max((m.shape[-2:] for m in maps), key=lambda g: g[0] * g[1])
            probs = torch.stack([F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                                 for m in maps]).mean(0)
        return (probs, final[:n].float()) if with_tokens else probs

    def _images_probs(self, images: Sequence[np.ndarray], size: int, u_t: torch.Tensor | None) -> torch.Tensor:
        x = self.prepare(images, size)
        x = torch.cat([x, x.flip(-1)]) if self.flip else x  # both views in one forward pass
        return self.net(x, u_t)["probs"].float()


@dataclass
class TokenCache:
    """A usable training feature cache: ``tokens`` memmap, ``views`` the indices of orig[, hflip] in it,
    ``trunk`` the blocks a trunk cache holds (None: final patch tokens)."""

    tokens: np.ndarray
    views: list[int]
    trunk: int | None = None


def open_token_cache(recipe, net, dataset, size: int, flip: bool, warn=None,
                     autocast: str | None = None) -> TokenCache | None:
    """The training feature cache when it holds exactly what the ViT would compute here (same images, size,
    normalisation, backbone weights, views, autocast: ``feature_cache.autocast_tag`` of this stage), else None.

    The backbone-weight digest is the decisive test: a backbone fine-tuned after the warm-up no longer
    matches the cached tokens, whatever the schedule says; a trunk cache is compared on the weights of its
    own blocks only (the ones after it may have trained).
    """
    from cpcx.feature_cache import _shape, cache_digest, check_finished

    wanted = ["orig", "hflip"] if flip else ["orig"]
    ids_hash = hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest()
    found: list[TokenCache] = []
    for meta_path in sorted(recipe.feature_cache_root().glob("*/meta.json")):
        try:
            key = json.loads(meta_path.read_text())["key"]
            if not isinstance(key, dict):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (key.get("img_size") != size or key.get("ids") != ids_hash or key.get("backbone") != net.cfg.backbone
                or any(v not in key.get("views", []) for v in wanted)
                or list(key.get("mean", [])) != list(net.mean) or list(key.get("std", [])) != list(net.std)
                or key.get("autocast") != autocast):
            continue
        trunk = key.get("trunk_blocks")
        if key.get("weights") != cache_digest(net.backbone, trunk):
            continue
        problem = check_finished(meta_path.parent, key, _shape(key, net.backbone, size, len(key["views"]), trunk))
        if problem:  # never read a torn or foreign file as tokens: the ViT computes them instead
            if warn is not None:
                warn(f"feature cache {meta_path.parent}: {problem}; not used (the next `cpcx train` rebuilds it)")
            continue
        tokens = np.load(meta_path.parent / "tokens.npy", mmap_mode="r", allow_pickle=False)
        found.append(TokenCache(tokens, [key["views"].index(v) for v in wanted], trunk))
    # The deepest match: a frozen run whose shared cache folder also holds trunk caches reads its final tokens,
    # not a trunk it would have to finish (same answer up to float16 rounding, but it should not depend on
    # which other caches happen to sit in the folder).
    return max(found, key=lambda c: net.backbone.num_blocks if c.trunk is None else c.trunk, default=None)


def channel_argmax(probs: torch.Tensor) -> np.ndarray:
    """argmax over dim 0 of (k, H, W) as an H×W numpy array (channels-last first: 10× faster on CPU)."""
    return probs.permute(1, 2, 0).contiguous().argmax(dim=-1).cpu().numpy()


def upsample(probs: torch.Tensor, classes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """The present classes' maps of one image (C, h, w) → (k, H, W), bilinear (align_corners=False)."""
    index = torch.as_tensor(classes, device=probs.device, dtype=torch.long)
    return F.interpolate(probs[index][None], size=size, mode="bilinear", align_corners=False)[0]


def require_token_cache(cache: TokenCache | None, switch: str) -> None:
    """``switch`` (self-training's heads, context paste's second network) learns from the frozen backbone's cached
    tokens of both views: a clear refusal before any work if ``open_token_cache`` found none."""
    if cache is None or cache.trunk is not None or len(cache.views) < 2:
        raise CpcxError(f"{switch}: learns from the frozen backbone's cached tokens of both views, "
                        "and this run has none (they need train.feature_cache: true, train.unfreeze_blocks: 0, "
                        "pseudo.img_size = model.img_size, pseudo.flip: true and train.views holding orig and "
                        f"hflip); set those or {switch}.enabled: false")
