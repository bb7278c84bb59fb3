"""Training augmentations, drawn from a per-sample generator so that a run is reproducible and resumable.

Every random choice for image i in epoch e comes from a generator seeded with (seed, e, i): the same
images get the same augmentations whatever the number of loader workers or processes, and a resumed run
continues exactly. Geometry has two modes:

* ``views`` (while the backbone is frozen): each image takes one of ``train.views`` (orig, hflip, vflip,
  transpose), uniformly, the same choice the feature cache makes; so the cached and uncached paths see
  the same inputs. Only the uncached path can add the random resized crop and photometric jitter.
* probabilities (after the warm-up, when ViT blocks train): ``augment.hflip``/``vflip``/``transpose``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpcx.recipe import AugmentConfig

VIEWS = ("orig", "hflip", "vflip", "transpose")


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator private to one (seed, epoch, sample): independent of workers, ranks and call order."""
    state = np.random.SeedSequence([seed % 2**32, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def pick_view(views: Sequence[str], g: torch.Generator) -> int:
    """Index of the view of this sample: the first draw of its generator (shared by both paths)."""
    return int(torch.randint(len(views), (1,), generator=g))


def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """A geometric view of (..., H, W) images: flips along W/H, or the transpose (H ↔ W)."""
    if view == "orig":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    if view == "transpose":
        return x.transpose(-2, -1)
    raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")


def resize_image(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """H×W×3 uint8 (or 3×H×W float in [0,1]) → 3×size×size float in [0, 1] (bilinear, antialiased)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean_t) / std_t


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


class TrainTransform:
    """H×W×3 uint8 → normalised 3×S×S float tensor, given the sample's generator.

    ``views``: geometry is a uniform choice among these (frozen backbone); None: flips by probability.
    ``photometric``: random resized crop, colour jitter and grayscale from ``augment`` (off when the
    tokens come from the cache, since a cached token cannot be re-coloured).
    """

    def __init__(self, augment: AugmentConfig, img_size: int, mean: Sequence[float], std: Sequence[float],
                 views: Sequence[str] | None = None, photometric: bool = True):
        self.augment = augment
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.views = list(views) if views is not None else None
        self.photometric = photometric

    def __call__(self, image: np.ndarray, g: torch.Generator) -> torch.Tensor:
        a = self.augment
        if self.views is not None:
            geometry = [self.views[pick_view(self.views, g)]]
        else:
            draws = torch.rand(3, generator=g)
            geometry = [v for v, p, d in zip(("hflip", "vflip", "transpose"), (a.hflip, a.vflip, a.transpose), draws)
                        if float(d) < p]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        if self.photometric and a.scale_min < 1.0:
            x = self._random_crop(x, g)
        x = resize_image(x, self.img_size)
        for view in geometry:
            x = apply_view(x, view)
        if self.photometric:
            x = self._color(x, g)
        return normalize(x, self.mean, self.std)

    def _random_crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision's RandomResizedCrop box: area fraction in [scale_min, 1], aspect ratio in [3/4, 4/3]."""
        _, h, w = x.shape
        area = _uniform(g, self.augment.scale_min, 1.0) * h * w
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        ch = min(h, max(1, round(math.sqrt(area / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * ratio))))
        top = int(torch.randint(h - ch + 1, (1,), generator=g))
        left = int(torch.randint(w - cw + 1, (1,), generator=g))
        return x[:, top:top + ch, left:left + cw]

    def _color(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s = self.augment.color_jitter
        if s > 0:
            low = max(0.0, 1.0 - s)
            x = x * _uniform(g, low, 1.0 + s)  # brightness
            x = (x - x.mean()) * _uniform(g, low, 1.0 + s) + x.mean()  # contrast
            gray = _gray(x)
            x = (x - gray) * _uniform(g, low, 1.0 + s) + gray  # saturation
            x = x.clamp(0.0, 1.0)
        if self.augment.grayscale > 0 and float(torch.rand((), generator=g)) < self.augment.grayscale:
            x = _gray(x).expand(3, -1, -1).clone()
        return x
