"""A segmenter on the CPC network's own frozen patch grid: smp's DeepLabV3 decoder (ASPP) on cached tokens.

``segment.encoder: grid`` (with ``segment.arch: deeplabv3``). Why: the grid the pseudo-labels come from (the
recipe's ``model.backbone`` and ``model.fuse`` at ``model.img_size``) already tells objects from background
and names classes; an image encoder learning the same from a few hundred noisy pseudo-labels in a few CPU
epochs keeps far less of them (voc-mini: DeepLabV3+ EfficientNet-Lite0 kept 24.2 val mIoU of pseudo-labels at
54.5; docs/results.md). The backbone is taken from the train stage's checkpoint (no weight file is needed),
stays frozen, and its tokens are computed once (the train stage's cache when size and views match): an epoch
then costs seconds.

The head: per-channel standardisation (the training tokens' mean and std), a 1×1 projection to ``segment.head_channels`` (the grid is up to ~800
channels wide; ASPP on it directly would cost ~10× more), smp's ``DeepLabV3Decoder`` with depthwise-separable ASPP at rates
``segment.aspp_rates`` in grid cells (smp's 12/24/36 are pixel rates of a stride-8 map; a 24 × 24 grid needs
2/4/6), dropout, a 1×1 classifier. Logits are upsampled bilinearly to the image.

:class:`GridSegNet` is the whole network for images (``cpcx predict``, ``cpcx export``): RGB in [0, 1] of any
size → resized to ``img_size``² as the train stage reads images → backbone → head → logits at the input size.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

GRID_ENCODER = "grid"


class GridHead(nn.Module):
    """(B, h, w, E) tokens → (B, C, h, w) logits."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, rates: Sequence[int] = (2, 4, 6),
                 dropout: float = 0.1):
        super().__init__()
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder

        # The grid's channels differ in scale (raw ViT tokens beside per-map LayerNormed CNN maps): standardised
        # first with the training tokens' statistics (set_standardization; saved with the head), else one part
        # dominates the projection.
        self.register_buffer("token_mean", torch.zeros(embed_dim))
        self.register_buffer("token_std", torch.ones(embed_dim))
        self.project = nn.Sequential(nn.Conv2d(embed_dim, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                     nn.ReLU())
        self.decoder = DeepLabV3Decoder(channels, channels, tuple(int(r) for r in rates), aspp_separable=True,
                                        aspp_dropout=0.5)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.token_mean.copy_(mean)
        self.token_std.copy_(std.clamp_min(1e-6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = ((tokens.float() - self.token_mean) / self.token_std).permute(0, 3, 1, 2)
        return self.classifier(self.dropout(self.decoder([self.project(x)])))


class GridSegNet(nn.Module):
    """Frozen backbone grid + :class:`GridHead`; ``forward(images)`` has :class:`SegNet`'s contract."""

    def __init__(self, backbone: nn.Module, head: GridHead, img_size: int):
        super().__init__()
        self.backbone, self.head, self.img_size = backbone, head, int(img_size)
        self.backbone.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def train(self, mode: bool = True) -> "GridSegNet":
        super().train(mode)
        self.backbone.eval()  # frozen: the same tokens as in the cache (BatchNorm statistics, no dropout)
        return self

    def head_from_tokens(self, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.head(tokens)
        if size is not None:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: B×3×H×W RGB in [0, 1] → B×C×H×W logits."""
        height, width = images.shape[-2], images.shape[-1]
        x = resize_antialiased(images.float(), self.img_size).clamp(0.0, 1.0)  # as the token cache reads images
        x = (x - self.mean) / self.std
        return self.head_from_tokens(self.backbone(x), (height, width))


def grid_meta(backbone_cfg: dict, img_size: int, channels: int, rates: Sequence[int]) -> dict:
    """What a checkpoint needs to rebuild a :class:`GridSegNet` (the backbone's weights are in its state)."""
    return {"model_cfg": backbone_cfg, "img_size": int(img_size), "head_channels": int(channels),
            "aspp_rates": [int(r) for r in rates]}


def build_grid_segnet(meta: dict, num_classes: int) -> GridSegNet:
    """An untrained :class:`GridSegNet` shaped as ``meta`` says, without reading any weight file."""
    from cpcx.model.backbone import build_backbone
    from cpcx.recipe import ModelConfig

    grid = meta["grid"]
    cfg = ModelConfig.model_validate({**grid["model_cfg"], "pretrained": False, "weights": None})
    fuse = None if cfg.fuse is None else cfg.fuse.model_copy(update={"weights": None, "pretrained": False})
    backbone = build_backbone(cfg.backbone, pretrained=False, weights=None, feature_strides=cfg.feature_strides,
                              fuse=fuse)
    head = GridHead(backbone.embed_dim, num_classes, grid["head_channels"], grid["aspp_rates"])
    return GridSegNet(backbone, head, grid["img_size"])


def _resize_weights(size_in, size_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(size_out, size_in) weights of an antialiased bilinear resize along one axis (torch's ``antialias=True``:
    a triangle filter widened by the scale when shrinking, each row normalised). Built from tensor ops on the
    input size, so a traced or exported graph keeps that size dynamic."""
    size_in = torch.as_tensor(size_in)
    scale = size_in.to(torch.float64) / size_out
    support = torch.clamp(scale, min=1.0)
    centers = (torch.arange(size_out, dtype=torch.float64) + 0.5) * scale
    source = torch.arange(size_in, dtype=torch.float64) + 0.5
    weights = torch.clamp(1.0 - (source[None, :] - centers[:, None]).abs() / support, min=0.0)
    return (weights / weights.sum(1, keepdim=True)).to(dtype)


def resize_antialiased(images: torch.Tensor, size: int) -> torch.Tensor:
    """B×C×H×W → B×C×size×size as ``F.interpolate(..., mode="bilinear", antialias=True)`` computes it, written
    as two matrix products: ONNX has no antialiased resize the exporter can emit (opset ≤ 20)."""
    rows = _resize_weights(images.shape[-2], size, images.dtype)
    cols = _resize_weights(images.shape[-1], size, images.dtype)
    return torch.matmul(torch.matmul(rows, images), cols.transpose(0, 1))


@contextlib.contextmanager
def fixed_position_embeddings() -> Iterator[None]:
    """While exporting a :class:`GridSegNet`: timm ViTs (built with ``dynamic_img_size``) resample their position
    embeddings at every call, with an antialiased bicubic resize that ONNX cannot express. The backbone only
    ever sees ``img_size``², so the resampled table is a constant: computed once (by timm itself) and returned
    as such while the graph is traced. Call the model once inside the context before tracing: the first call
    computes the tables eagerly; a table first computed inside the trace would put the resize back in the graph."""
    import timm.models.vision_transformer as vision_transformer

    real = vision_transformer.resample_abs_pos_embed
    tables: dict = {}

    def constant(posemb, new_size, old_size=None, num_prefix_tokens=1, **kwargs):
        key = (id(posemb), tuple(int(s) for s in new_size))
        if key not in tables:
            tables[key] = real(posemb, [int(s) for s in new_size], None if old_size is None else
                               [int(s) for s in old_size], num_prefix_tokens, **kwargs).detach().clone()
        return tables[key]

    vision_transformer.resample_abs_pos_embed = constant
    try:
        yield
    finally:
        vision_transformer.resample_abs_pos_embed = real
