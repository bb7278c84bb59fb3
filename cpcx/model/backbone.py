"""The ViT encoder: any timm ViT by name, returning the patch tokens as a grid (B, h, w, e).

The model is created with ``dynamic_img_size=True`` so one network takes any input size (the position
embeddings are interpolated to the patch grid at each call: train at 384/448, infer at 960). Prefix tokens
(class, registers) are dropped. Weights come from timm (``pretrained``, a download) or a local file
(``weights``: safetensors or a torch state dict, read with ``weights_only=True``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cpcx.errors import CpcxError


class ViTBackbone(nn.Module):
    """A timm ViT that maps normalised images (B, 3, H, W) to patch tokens (B, H/p, W/p, e)."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | Path | None = None):
        super().__init__()
        import timm

        # Local weights win over a download: a recipe that names a file must work offline.
        download = pretrained and weights is None
        try:
            self.vit = timm.create_model(name, pretrained=download, num_classes=0, dynamic_img_size=True)
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            if "Unknown model" in str(exc):
                raise CpcxError(
                    f"model.backbone: '{name}' is not a timm model; see timm.list_models('vit_*')") from None
            raise
        except TypeError:  # a non-ViT architecture rejects dynamic_img_size
            raise CpcxError(
                f"model.backbone: '{name}' is not a ViT (no dynamic_img_size); pick a vit_* model, or set "
                "model.feature_strides (e.g. [16, 32]) to use a CNN's feature maps as the patch grid") from None
        except OSError as exc:  # hub download failures (offline machine) surface as OSError subclasses
            if not download:
                raise
            raise CpcxError(
                f"model.pretrained: could not download the weights of {name} ({type(exc).__name__}); "
                "set model.weights to a local file (`cpcx weights import ...`) or model.pretrained: false"
            ) from None
        if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
            raise CpcxError(f"model.backbone: '{name}' is not a ViT (it has no patch_embed/blocks); pick a vit_* model, "
                            "or set model.feature_strides (e.g. [16, 32]) to use a CNN's feature maps as the patch grid")
        if weights is not None:
            load_backbone_weights(self.vit, weights, name)
        cfg = self.vit.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, float, float] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        self.num_blocks: int = len(self.vit.blocks)
        self.trainable_blocks = 0
        self.set_trainable_blocks(0)

    # ------------------------------------------------------------------ freezing
    def set_trainable_blocks(self, n: int) -> None:
        """Freeze everything, then make the last ``n`` blocks and the final norm trainable (ViT-PCM's scheme)."""
        n = max(0, min(int(n), self.num_blocks))
        for p in self.vit.parameters():
            p.requires_grad_(False)
        if n:
            for block in self.vit.blocks[self.num_blocks - n:]:
                block.requires_grad_(True)
            self.vit.norm.requires_grad_(True)
        self.trainable_blocks = n
        self.train(self.training)

    @property
    def frozen(self) -> bool:
        return self.trainable_blocks == 0

    def train(self, mode: bool = True) -> "ViTBackbone":
        # A frozen ViT stays in eval mode so any stochastic layer (drop-path in some timm configs) is off and
        # its tokens are exactly what the feature cache stores.
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def trainable_parameters(self, n: int) -> list[nn.Parameter]:
        """The parameters that ``set_trainable_blocks(n)`` would train (for the optimizer, built once)."""
        if n <= 0:
            return []
        params = [p for block in self.vit.blocks[self.num_blocks - n:] for p in block.parameters()]
        return params + list(self.vit.norm.parameters())

    # ------------------------------------------------------------------ forward
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.dynamic_feat_size((height, width)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        return self.forward_from(self.forward_trunk(images, self.num_blocks), self.num_blocks, grid)

    def forward_trunk(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """All tokens (B, prefix + h·w, e) after the patch embedding and the first ``depth`` blocks: what a
        trunk feature cache stores, so that epochs which train only the last blocks start from there."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:depth]:
            x = block(x)
        return x

    def forward_from(self, tokens: torch.Tensor, start: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Blocks ``start..`` and the final norm on ``forward_trunk``'s output → patch tokens (B, h, w, e);
        without ``grid`` the patches are taken to form a square (as in every token cache)."""
        if grid is None:
            side = math.isqrt(tokens.shape[1] - self.vit.num_prefix_tokens)
            grid = (side, side)
        x = tokens
        for block in self.vit.blocks[start:]:
            x = block(x)
        x = self.vit.norm(x)[:, self.vit.num_prefix_tokens:]
        return x.reshape(x.shape[0], grid[0], grid[1], self.embed_dim)

    def outside_trunk(self, depth: int):
        """A predicate on ``state_dict`` names (``vit.*``): true for the tensors after block ``depth`` (the later
        blocks and the final norm), the ones a trunk cache of that depth does not depend on."""
        if depth >= self.num_blocks:
            return lambda name: False
        later = tuple(f"vit.blocks.{i}." for i in range(depth, self.num_blocks)) + ("vit.norm.", "vit.head", "vit.fc_norm")
        return lambda name: name.startswith(later)


def build_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None,
                   feature_strides: Sequence[int] | None = None, fuse=None) -> nn.Module:
    """The patch-grid extractor of ``model.backbone``: a ViT's patch tokens, or (``feature_strides`` set) a CNN's
    feature maps at those strides (:class:`cpcx.model.cnn_backbone.CNNBackbone`). Both give (B, h, w, e).
    ``fuse`` (a ``model.fuse`` section) puts a second such grid beside it (:mod:`cpcx.model.fused_backbone`)."""
    if fuse is not None:
        from cpcx.model.fused_backbone import FusedBackbone

        first = build_backbone(name, pretrained, weights, feature_strides)
        return FusedBackbone(first, build_backbone(fuse.backbone, fuse.pretrained, fuse.weights, fuse.feature_strides))
    if feature_strides:
        from cpcx.model.cnn_backbone import CNNBackbone

        return CNNBackbone(name, feature_strides, pretrained=pretrained, weights=weights)
    return ViTBackbone(name, pretrained=pretrained, weights=weights)


# ---------------------------------------------------------------------------------------------- weights
def load_backbone_weights(vit: nn.Module, path: str | Path, name: str) -> None:
    """Load a local state dict strictly; position embeddings of another grid are resampled (as timm does)."""
    from cpcx.weights import load_state_dict_file  # safetensors or torch (weights_only), with clear errors

    path = Path(path)
    state = load_state_dict_file(path)
    # A classifier head in the file is not part of this backbone (num_classes=0).
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], own["pos_embed"], vit)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape))
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = [f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:3]]
        details += [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        total = len(missing) + len(unexpected) + len(mismatched)
        raise CpcxError(
            f"model.weights: {path} does not fit model.backbone '{name}' ({total} tensor(s) differ: "
            f"{'; '.join(details)}); use the weights of that backbone or change model.backbone"
        )
    vit.load_state_dict(state, strict=True)


def _resample_pos_embed(theirs: torch.Tensor, ours: torch.Tensor, vit: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    grid = vit.patch_embed.grid_size
    if theirs.shape[-1] != ours.shape[-1]:
        return theirs  # a width mismatch is a wrong backbone: reported by the caller
    return resample_abs_pos_embed(theirs, new_size=list(grid), num_prefix_tokens=prefix)
