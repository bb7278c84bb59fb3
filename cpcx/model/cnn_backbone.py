"""A timm CNN as the patch grid: its feature maps at chosen strides, resized to the finest and concatenated.

The CPC network only needs "a grid of patch features" (B, h, w, e): for a ViT those are the patch tokens, for a
CNN the cells of a stride-16 (or 32, or 8) feature map play the same part. ``model.feature_strides`` picks the
maps (e.g. ``[16, 32]``: the stride-32 map is upsampled bilinearly onto the stride-16 grid and concatenated, so
each cell sees both the finer stage and the more semantic last one). The cluster token, HV-BiLSTM, top-k pooling,
PCE and the token cache work on this grid unchanged. Built with timm's ``features_only`` API, so any timm CNN
with feature info works (``tf_efficientnet_lite0``, ``resnet50``, ``convnext_tiny`` …).

Freezing mirrors :class:`cpcx.model.backbone.ViTBackbone`: the "blocks" are the stages (timm's ``blocks``,
``stages`` or ``layerN`` children) and ``set_trainable_blocks(n)`` trains the last n of them that the chosen maps
depend on. BatchNorm statistics stay frozen (eval mode) whatever is trained: 16-image batches would only add
noise to ImageNet statistics. A trunk cache (``train.trunk_cache``) is a ViT-only feature.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cpcx.errors import CpcxError


class CNNBackbone(nn.Module):
    """Normalised images (B, 3, H, W) → grid features (B, ceil(H/s), ceil(W/s), Σ channels), s = min(strides)."""

    def __init__(self, name: str, strides: Sequence[int] = (16,), pretrained: bool = False,
                 weights: str | Path | None = None):
        super().__init__()
        import timm

        download = pretrained and weights is None
        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise CpcxError(f"model.backbone: '{name}' is not a timm model; see timm.list_models()") from None
            raise
        except (TypeError, AttributeError):
            raise CpcxError(f"model.backbone: '{name}' has no feature maps (timm features_only); pick a CNN") from None
        reductions = list(probe.feature_info.reduction())
        wanted = sorted(set(int(s) for s in strides))
        missing = [s for s in wanted if s not in reductions]
        if missing:
            raise CpcxError(f"model.feature_strides: {name} has feature maps at strides "
                            f"{', '.join(map(str, reductions))}, not {', '.join(map(str, missing))}; pick among those")
        indices = [reductions.index(s) for s in wanted]
        try:
            self.cnn = timm.create_model(name, pretrained=download, features_only=True, out_indices=indices)
        except OSError as exc:
            raise CpcxError(
                f"model.pretrained: could not download the weights of {name} ({type(exc).__name__}); "
                "set model.weights to a local file (`cpcx weights import ...`) or model.pretrained: false"
            ) from None
        if weights is not None:
            load_cnn_weights(self.cnn, weights, name)
        cfg = self.cnn.pretrained_cfg if hasattr(self.cnn, "pretrained_cfg") else probe.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, float, float] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.strides: tuple[int, ...] = tuple(wanted)
        self.embed_dim: int = sum(self.cnn.feature_info.channels())
        self.patch_size: int = wanted[0]  # the grid's cell, in pixels (a ViT's patch)
        self.stages: list[nn.Module] = _stages(self.cnn)
        self.num_blocks: int = len(self.stages)
        self.trainable_blocks = 0
        self.set_trainable_blocks(0)
        # oneDNN's CPU convolutions are faster channels-last (benchmarks/bench_backbone_speed.py: Lite0 at 384 px,
        # 113 → 62 ms per image on 2 cores); the same numbers up to summation order, and weight digests and cache
        # keys read contiguous copies, so caches stay valid.
        self.cnn.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ freezing
    def set_trainable_blocks(self, n: int) -> None:
        """Freeze everything, then make the last ``n`` stages trainable (BatchNorm statistics stay frozen)."""
        n = max(0, min(int(n), self.num_blocks))
        for p in self.cnn.parameters():
            p.requires_grad_(False)
        for stage in self.stages[self.num_blocks - n:] if n else ():
            stage.requires_grad_(True)
        self.trainable_blocks = n
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return self.trainable_blocks == 0

    def train(self, mode: bool = True) -> "CNNBackbone":
        super().train(mode)
        self.cnn.eval()  # BatchNorm statistics are ImageNet's; the cached grid equals a training-time forward
        return self

    def trainable_parameters(self, n: int) -> list[nn.Parameter]:
        if n <= 0:
            return []
        return [p for stage in self.stages[self.num_blocks - n:] for p in stage.parameters()]

    # ------------------------------------------------------------------ forward
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        # 'same'-padded stride-2 convolutions give ceil(H / 2) at every step, so ceil(H / s) overall.
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    @property
    def grid_tag(self) -> dict:
        """What the token cache key must know beyond the weights: the maps and how they are combined."""
        return {"strides": list(self.strides), "norm": "layer-per-map"}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.cnn(images.contiguous(memory_format=torch.channels_last))
        grid = maps[0].shape[-2:]
        cells = []
        for m in maps:
            if m.shape[-2:] != grid:
                m = F.interpolate(m.float(), size=grid, mode="bilinear", align_corners=False).to(m.dtype)
            # Each map normalised per cell over its channels (a LayerNorm without parameters, as a ViT's final
            # norm does for its tokens): raw stage outputs differ in scale between maps (std 5.7 at stride 16
            # against 2.6 at 32 for Lite0) and are far from the unit scale the head's dropout and LSTM expect.
            m = m.permute(0, 2, 3, 1)
            cells.append(F.layer_norm(m.float(), m.shape[-1:]).to(m.dtype))
        return torch.cat(cells, dim=-1).contiguous()

    def forward_trunk(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        raise CpcxError("train.trunk_cache: only ViT backbones have a trunk cache; set it false for a CNN")

    def forward_from(self, tokens: torch.Tensor, start: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        raise CpcxError("train.trunk_cache: only ViT backbones have a trunk cache; set it false for a CNN")

    def outside_trunk(self, depth: int):
        """No trunk caches for a CNN: a cache always depends on every weight of the feature extractor."""
        return lambda name: False


def _stages(cnn: nn.Module) -> list[nn.Module]:
    """The stage modules of a features_only timm CNN, in order (what ``unfreeze_blocks`` counts)."""
    blocks = getattr(cnn, "blocks", None) or getattr(cnn, "stages", None)
    if isinstance(blocks, nn.Sequential) or isinstance(blocks, nn.ModuleList):
        return list(blocks)
    layers = [m for n, m in cnn.named_children() if n.startswith(("layer", "stages_", "blocks_", "stages.", "features"))]
    return layers or [cnn]


def load_cnn_weights(cnn: nn.Module, path: str | Path, name: str) -> None:
    """Load a whole-classifier state dict into the features_only model: every tensor it needs must be there
    with its shape; the parts it dropped (classifier, head convolution) are ignored."""
    from cpcx.weights import load_state_dict_file

    path = Path(path)
    state = load_state_dict_file(path)
    own = cnn.state_dict()
    missing = sorted(k for k in own if k not in state)
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        details = [f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:3]] + [f"missing {k}" for k in missing[:3]]
        raise CpcxError(
            f"model.weights: {path} does not fit model.backbone '{name}' ({len(missing) + len(mismatched)} "
            f"tensor(s) differ: {'; '.join(details)}); use the weights of that backbone or change model.backbone")
    cnn.load_state_dict({k: state[k] for k in own}, strict=True)
