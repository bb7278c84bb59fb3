"""smp's DPT on a timm ViT (``segment.arch: dpt``), its patch embedding resampled to 16 pixels.

Why 16: smp 0.6.0's ``DPTDecoder`` turns the encoder stride into integer resampling factors
(``stride / 2 ** (i + 2)``, then ``int()`` kernels and strides in ``ReassembleBlock``). A patch-14 ViT such as
DINOv2's gives 3.5, 1.75, 0.875, 0.4375: the four reassembled maps miss 1/4 … 1/32 of the input and the fusion
blocks cannot add them, at every input size. At stride 16 the factors are 4, 2, 1 and 1/2 and it runs.

Why a multiple of 32: the 1/32 map is made by a stride-2 convolution of the 1/16 patch grid and upsampled ×2
before it is added to the 1/16 map, so the patch grid must be even (measured: 64×64, 96×64, 128×96 run; 80×64
and 48×48 fail). :data:`MULTIPLE` is what ``SegNet`` pads to and what ``segment.crop_size`` is validated against.

Weights (``segment.encoder_file``, e.g. ``weights/dinov2_vits14.safetensors``): the 14×14 patch kernel is resampled
to 16×16 with timm's ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize, what timm does when it loads a
checkpoint into a model of another patch size): a 16-px patch of the image scaled by 16/14 then gives about the
token the 14-px patch gave, so the pretrained features survive, at a 16/14 coarser grid. The position grid is
resampled to the grid of ``segment.crop_size`` (bicubic, no antialias, as DINOv2 does: cpcx.weights), so training
crops need no resampling per step; timm's ``dynamic_img_size`` resamples it per input for whole images and
test-time scales. ``img_size`` (the crop size) goes into the checkpoint meta: the position table's shape
depends on it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

PATCH = 16
MULTIPLE = 2 * PATCH
ARCH = "dpt"


def build_dpt(encoder: str, num_classes: int, img_size: int, encoder_weights=None) -> nn.Module:
    """smp.DPT on ``encoder`` (``tu-<timm ViT>``) with 16-px patches, position grid for ``img_size``² inputs."""
    import segmentation_models_pytorch as smp

    if not encoder.startswith("tu-"):  # also refused at recipe validation; load_segnet may see an edited meta
        raise ValueError(f"dpt takes a timm ViT encoder, tu-<name>, not {encoder}")
    try:
        return smp.DPT(encoder_name=encoder, encoder_weights=encoder_weights, classes=num_classes,
                       # timm.create_model kwargs: 16-px patches (see above); any input size; no classifier head
                       # (the weights file has none, and load_encoder_file wants every encoder tensor filled).
                       patch_size=PATCH, img_size=int(img_size), dynamic_img_size=True, num_classes=0)
    except TypeError as exc:  # a timm model that takes no patch_size / dynamic_img_size: not a ViT
        raise ValueError(f"{encoder} is not a timm ViT that takes patch_size and dynamic_img_size ({exc})") from None


def is_dpt(net: nn.Module) -> bool:
    from segmentation_models_pytorch import DPT

    return isinstance(net, DPT)


def fit_vit_state(source: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (plain keys or smp's ``model.`` ones) reshaped for ``encoder`` (smp's TimmViTEncoder):
    patch kernel resampled to the encoder's patch size, position grid to its grid. Other tensors untouched;
    what still does not fit is reported by ``load_encoder_file``."""
    from timm.layers import resample_patch_embed

    from cpcx.weights import resample_pos_embed

    vit = encoder.model
    kernel = tuple(vit.patch_embed.proj.weight.shape[-2:])
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    grid = tuple(vit.patch_embed.grid_size)
    out = dict(source)
    for key, value in source.items():
        bare = key[len("model."):] if key.startswith("model.") else key
        if bare == "patch_embed.proj.weight" and value.ndim == 4 and tuple(value.shape[-2:]) != kernel:
            out[key] = resample_patch_embed(value.float(), list(kernel)).to(value.dtype)
        elif bare == "pos_embed" and value.ndim == 3 and vit.pos_embed is not None \
                and value.shape[1] != vit.pos_embed.shape[1] and value.shape[-1] == vit.pos_embed.shape[-1] \
                and math.isqrt(value.shape[1] - prefix) ** 2 == value.shape[1] - prefix:
            out[key] = resample_pos_embed(value, grid, num_prefix=prefix)  # a non-square table stays: reported
    return out
