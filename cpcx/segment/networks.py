"""The segmentation network trained on the pseudo-labels: smp DeepLabV3/V3+, the paper's DeepLab v2, or smp's
DPT on a timm ViT (cpcx.segment.dpt).

``build_segnet(cfg, num_classes)`` returns a :class:`SegNet`: it takes RGB in [0, 1] of *any* size,
normalises with the encoder's own mean/std, pads to the encoder's output stride and crops the logits back,
so training crops (e.g. DeepLab's 321) and whole val images go through the same call.

Encoder weights come from ``segment.encoder_weights: imagenet`` (smp/timm download) or, offline, from
``segment.encoder_file``: a timm (or smp) state dict mapped onto the encoder and loaded strictly, except the
classification head the features-only encoder does not have (e.g. ``conv_head``/``bn2``/``classifier``).
``segment.freeze_encoder`` keeps those weights fixed: only the decoder trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpcx.errors import CpcxError
from cpcx.recipe import SegmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEEPLABV2_RATES = (6, 12, 18, 24)


# ------------------------------------------------------------------------------------------ DeepLab v2
class ASPPv2(nn.Module):
    """DeepLab v2's ASPP: parallel dilated 3×3 convolutions straight to class scores, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = DEEPLABV2_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True) for rate in rates
        )
        for conv in self.branches:  # the reference initialisation (deeplab-pytorch / caffe): N(0, 0.01)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


class DeepLabV2(nn.Module):
    """An smp encoder at output stride 8 (dilated last stages) + :class:`ASPPv2`, upsampled to the input."""

    output_stride = 8

    def __init__(self, encoder_name: str, num_classes: int, encoder_weights: Any = None):
        super().__init__()
        from segmentation_models_pytorch.encoders import get_encoder

        self.encoder = get_encoder(encoder_name, in_channels=3, depth=5, weights=encoder_weights, output_stride=8)
        self.aspp = ASPPv2(self.encoder.out_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.aspp(self.encoder(x)[-1])
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------- the wrapper
class SegNet(nn.Module):
    """Normalise, pad to a multiple of the output stride, run the network, crop the logits back.

    Weights and activations are channels-last: oneDNN's CPU convolutions (and cuDNN's bf16 ones) are
    faster in that layout (a DeepLabV3+/EfficientNet-Lite0 training step on 2 CPU cores: about 1.4× faster).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], multiple: int,
                 frozen_encoder: bool = False):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)
        self.multiple = int(multiple)
        self.frozen_encoder = bool(frozen_encoder)
        # Not persistent: the checkpoint meta carries mean/std; the state dict stays the network's own.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def train(self, mode: bool = True) -> "SegNet":
        super().train(mode)
        if self.frozen_encoder:  # a frozen encoder also keeps its BatchNorm statistics and drops no path/token
            self.net.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: B×3×H×W RGB in [0, 1] → B×C×H×W logits."""
        height, width = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:  # zero after normalisation = the mean colour, as the training crops are padded
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x.contiguous(memory_format=torch.channels_last))[..., :height, :width]


def _smp_weights(encoder: str, weights: str | None) -> Any:
    """smp wants True/None for ``tu-`` encoders (the timm tag picks the variant) and a name otherwise."""
    if weights is None:
        return None
    return True if encoder.startswith("tu-") else weights


def normalization(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The encoder's pretraining mean/std: timm's pretrained cfg for ``tu-`` encoders, else ImageNet's.

    (smp's own ``get_preprocessing_params`` downloads a config from the hub; this never touches the network.)
    """
    if encoder.startswith("tu-"):
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(encoder[3:].split(".")[0])
        except Exception:  # noqa: BLE001 - an unknown model fails later, at construction, with a clear error
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def build_network(arch: str, encoder: str, num_classes: int, encoder_weights: Any = None,
                  img_size: int | None = None) -> nn.Module:
    """The bare network (normalised input, size a multiple of its stride); ``img_size``: dpt's position grid."""
    import segmentation_models_pytorch as smp

    if arch == "dpt":
        from cpcx.segment.dpt import build_dpt

        return build_dpt(encoder, num_classes, img_size or 512, encoder_weights)
    if arch == "deeplabv2":
        return DeepLabV2(encoder, num_classes, encoder_weights)
    if arch == "deeplabv3plus":
        return smp.DeepLabV3Plus(encoder_name=encoder, encoder_weights=encoder_weights, classes=num_classes)
    if arch == "deeplabv3":
        return smp.DeepLabV3(encoder_name=encoder, encoder_weights=encoder_weights, classes=num_classes)
    raise CpcxError(f"segment.arch: '{arch}' is not a network; use deeplabv2, deeplabv3, deeplabv3plus or dpt",
                     code=2)


def build_segnet(cfg: SegmentConfig, num_classes: int, load_weights: bool = True) -> SegNet:
    """The network of ``cfg`` with its encoder weights (``load_weights=False``: random, to load a checkpoint).

    A local ``encoder_file`` takes precedence over ``encoder_weights`` (nothing is downloaded then).
    """
    download = cfg.encoder_weights if (load_weights and cfg.encoder_file is None) else None
    try:
        net = build_network(cfg.arch, cfg.encoder, num_classes, _smp_weights(cfg.encoder, download), cfg.crop_size)
    except CpcxError:
        raise
    except (KeyError, RuntimeError, ValueError, OSError) as exc:  # hub errors (offline) are OSErrors
        if download is not None and (isinstance(exc, OSError) or _looks_like_network_error(exc)):
            raise CpcxError(
                f"segment.encoder_weights: cannot download the {download} weights of {cfg.encoder} ({_short(exc)}); "
                "offline, set segment.encoder_weights=null and segment.encoder_file=<local file> "
                f"({_import_hint(cfg.encoder)})"
            ) from None
        raise CpcxError(
            f"segment.encoder: cannot build '{cfg.encoder}' for {cfg.arch} ({_short(exc)}); use an smp encoder name "
            "(e.g. resnet101) or tu-<timm model name> (e.g. tu-tf_efficientnet_lite0; for dpt a timm ViT, e.g. "
            "tu-vit_small_patch14_dinov2)", code=2
        ) from None
    if load_weights and cfg.encoder_file is not None:
        from cpcx.segment.dpt import fit_vit_state

        load_encoder_file(net.encoder, cfg.encoder_file, cfg.encoder, fit_vit_state if cfg.arch == "dpt" else None)
    if cfg.freeze_encoder:
        net.encoder.requires_grad_(False)  # make_optimizer leaves it out, and autograd does not go through it
    mean, std = normalization(cfg.encoder)
    return SegNet(net, mean, std, multiple=input_multiple(net), frozen_encoder=cfg.freeze_encoder)


def input_multiple(net: nn.Module) -> int:
    """What the input height/width must be a multiple of: the network's effective output stride."""
    if isinstance(net, DeepLabV2):
        return DeepLabV2.output_stride
    from cpcx.segment.dpt import MULTIPLE, is_dpt

    if is_dpt(net):  # twice its stride: its decoder halves the patch grid once more (cpcx.segment.dpt)
        return MULTIPLE
    return int(getattr(net.encoder, "output_stride", 32))


def _import_hint(encoder: str) -> str:
    """The `cpcx weights import` line for ``encoder`` when it makes one (else the Lite0 example)."""
    from cpcx.weights import TIMM_NAME

    name = next((n for n, timm_name in TIMM_NAME.items() if encoder == f"tu-{timm_name}"), "efficientnet-lite0")
    return f"`cpcx weights import {name} --out <file>` gives one for tu-{TIMM_NAME[name]}"


def _looks_like_network_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("connect", "hub", "offline", "download", "resolve", "http", "internet"))


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------- local encoder weights
def _norm_key(key: str) -> str:
    # timm's FeatureListNet flattens module paths ("stages.0" → "stages_0"); compare modulo that.
    return key.replace("_", ".")


def load_encoder_file(encoder: nn.Module, path: Path, encoder_name: str, adapt: Callable | None = None) -> None:
    """Load a timm/smp state dict into ``encoder``: every encoder tensor must be in the file with its shape.

    File keys may be plain timm keys (``conv_stem.weight``) or the encoder's own (``model.conv_stem.weight``
    for ``tu-`` encoders). Tensors of modules the features-only encoder lacks (the classifier head) are dropped;
    anything else that does not fit is an error naming the file. ``adapt(state, encoder) → state`` reshapes
    tensors first (dpt: the ViT's patch kernel and position grid, cpcx.segment.dpt.fit_vit_state).
    """
    from cpcx.weights import load_state_dict_file

    path = Path(path)
    source = load_state_dict_file(path)  # safetensors or torch; clear CpcxError when unreadable
    for prefix in ("module.", "encoder.", "backbone."):  # common wrappers around a saved state dict
        if source and all(k.startswith(prefix) for k in source):
            source = {k[len(prefix):]: v for k, v in source.items()}
    if adapt is not None:
        source = adapt(source, encoder)

    target = encoder.state_dict()
    by_norm = {_norm_key(k): k for k in target}
    # Try the file keys as they are and under the ``model.`` wrapper of smp's timm-universal encoder.
    best: dict[str, str] = {}
    for prefix in ("", "model."):
        mapping = {k: by_norm[_norm_key(prefix + k)] for k in source if _norm_key(prefix + k) in by_norm}
        if len(mapping) > len(best):
            best = mapping
    if not best:
        raise CpcxError(
            f"segment.encoder_file: {path} holds no tensor of encoder {encoder_name} (first key "
            f"'{next(iter(source), '')}', expected e.g. '{next(iter(target), '')}'); is it the file for this "
            "encoder? (`cpcx weights import efficientnet-lite0` is for tu-tf_efficientnet_lite0)"
        )

    encoder_modules = {name.split(".")[0] for name, _ in encoder.named_modules() if name}
    encoder_modules |= {name.split(".")[1] for name, _ in encoder.named_modules() if name.startswith("model.")}
    wrong_shape = [
        f"{k}: file {tuple(source[k].shape)} vs encoder {tuple(target[t].shape)}"
        for k, t in best.items() if source[k].shape != target[t].shape
    ]
    missing = [t for t in target if t not in best.values() and not t.endswith("num_batches_tracked")]
    # Unmapped file tensors are fine only when their top module is absent from the encoder (the head).
    stray = [k for k in source if k not in best and k.split(".")[0] in encoder_modules]
    problems = []
    if missing:
        problems.append(f"{len(missing)} encoder tensors missing (e.g. {missing[0]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape (e.g. {wrong_shape[0]})")
    if stray:
        problems.append(f"{len(stray)} file tensors that fit nowhere (e.g. {stray[0]})")
    if problems:
        raise CpcxError(
            f"segment.encoder_file: {path} does not fit encoder {encoder_name}: {'; '.join(problems)}; "
            "use the weights file made for this encoder"
        )
    state = {t: source[k].to(target[t].dtype) for k, t in best.items()}
    for key, value in target.items():  # BN counters are bookkeeping; keep the encoder's own if absent
        state.setdefault(key, value)
    encoder.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------- checkpoints
def segnet_meta(cfg: SegmentConfig, classes: tuple[str, ...] | list[str]) -> dict:
    """What a checkpoint needs to rebuild its network without the recipe."""
    mean, std = normalization(cfg.encoder)
    meta = {"arch": cfg.arch, "encoder": cfg.encoder, "num_classes": len(classes), "classes": list(classes),
            "mean": list(mean), "std": list(std), "freeze_encoder": cfg.freeze_encoder}
    if cfg.arch == "dpt":  # its position table has the crop's grid: the checkpoint's shapes depend on it
        meta["img_size"] = cfg.crop_size
    return meta


def load_segnet(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[SegNet, dict]:
    """Rebuild a :class:`SegNet` from ``weights/{last,best}.pt`` alone → (network in eval mode, meta).

    ``meta`` is the checkpoint's (arch, encoder, classes, mean, std) plus its ``epoch`` and ``val_miou``.
    """
    from cpcx.torchload import load_torch_file

    path = Path(path)
    fix = "delete it and train again with `cpcx segment -r <recipe>`"
    ckpt = load_torch_file(path, "`cpcx segment` checkpoint", fix, map_location)
    try:
        ckpt["meta"]["arch"], ckpt["model"]
    except Exception:  # noqa: BLE001 - a torch file, but not a segmentation checkpoint
        raise CpcxError(f"{path}: not a `cpcx segment` checkpoint (no meta/model); {fix}") from None
    meta = {**ckpt["meta"], "epoch": ckpt.get("epoch"), "val_miou": ckpt.get("val_miou")}
    if meta["encoder"] == "grid":  # the CPC backbone's grid + ASPP head (cpcx.segment.grid), backbone inside
        from cpcx.segment.grid import build_grid_segnet

        try:
            grid = build_grid_segnet(meta, int(meta["num_classes"]))
            grid.load_state_dict(ckpt["model"], strict=True)
        except Exception as exc:  # noqa: BLE001 - an edited or foreign checkpoint: meta and weights disagree
            raise CpcxError(f"{path}: its grid segmenter cannot be rebuilt ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); {fix}") from None
        return grid.eval(), meta
    net = build_network(meta["arch"], meta["encoder"], int(meta["num_classes"]), None, meta.get("img_size"))
    net.load_state_dict(ckpt["model"], strict=True)
    model = SegNet(net, tuple(meta["mean"]), tuple(meta["std"]), multiple=input_multiple(net))
    return model.eval(), meta
