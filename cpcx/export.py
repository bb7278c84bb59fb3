"""``cpcx export``: the trained segmenter as one ONNX or TorchScript file, for use without cpcx.

The exported graph's input convention, the same for both formats:

* input ``image``: float32, N×3×H×W, RGB in [0, 1] (uint8 pixels divided by 255), any N, H and W;
* output ``logits``: float32, N×C×H×W at the input's size; the argmax over C gives the class index, in the
  order of the file's ``classes`` metadata (ONNX ``metadata_props``, TorchScript extra file ``cpcx.json``).

The normalisation with the encoder's mean/std and the padding to the network's output stride are inside the
graph, so a caller only converts pixels to [0, 1]. Test-time scales, flip, the CRF and ``segment.saliency`` are
not: they are loops around the network or other networks (``cpcx predict`` does them). After writing (atomically), the file is run on a real image
of the recipe's data set when its root is there (else a synthetic one) at two sizes and compared with torch.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from cpcx import atomic
from cpcx.errors import CpcxError

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17
#: Parity tolerance: max |Δ logit| relative to the largest |logit| (fp32 kernels differ in summation order).
RELATIVE_TOLERANCE = 1e-3


class ExportableSegNet(nn.Module):
    """``SegNet`` with its padding written for tracing: the pad amounts are always computed (they may be 0),
    never chosen by a Python ``if`` on the traced example's size, which would fix them for every size."""

    def __init__(self, segnet: nn.Module):
        super().__init__()
        self.net = segnet.net.to(memory_format=torch.contiguous_format)
        self.multiple = int(segnet.multiple)
        self.register_buffer("mean", segnet.mean.detach().clone().float())
        self.register_buffer("std", segnet.std.detach().clone().float())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2], image.shape[-1]
        x = (image - self.mean) / self.std
        # Zero after normalisation = the mean colour, as SegNet pads.
        x = F.pad(x, (0, (self.multiple - width % self.multiple) % self.multiple,
                      0, (self.multiple - height % self.multiple) % self.multiple))
        return self.net(x)[..., :height, :width]


@dataclass
class Parity:
    where: str  # what image, e.g. "VOC val 2007_000033" or "synthetic"
    sizes: list[tuple[int, int]]
    max_abs: list[float]
    max_logit: list[float]

    @property
    def worst_relative(self) -> float:
        return max(d / max(m, 1e-12) for d, m in zip(self.max_abs, self.max_logit))


def default_out(recipe, fmt: str) -> Path:
    return recipe.run_dir("export") / f"segmenter{SUFFIX[fmt]}"


def export_segmenter(recipe, fmt: str, out: Path | None = None, weights: Path | None = None,
                     console: Console | None = None) -> tuple[Path, Parity]:
    """Write the segment checkpoint as ``fmt`` (onnx | torchscript) → (file, parity measured on it)."""
    from cpcx.predict import find_checkpoint, open_segmenter

    console = console or Console()
    if fmt not in FORMATS:
        raise CpcxError(f"--format: '{fmt}' is not an export format; use onnx or torchscript", code=2)
    checkpoint = find_checkpoint(recipe, weights)
    segnet, meta = open_segmenter(recipe, weights)
    if fmt == "onnx" and meta["arch"] == "dpt":
        # timm's ViT resamples its position grid to each input's size with antialiased bicubic interpolation
        # (aten::_upsample_bicubic2d_aa), which torch cannot export to ONNX opset 17; the trace keeps it.
        raise CpcxError("--format onnx: a dpt segmenter does not export to ONNX (its ViT resizes the position grid "
                        "per image with an op ONNX lacks); use --format torchscript", code=2)
    segnet = segnet.float().eval()
    # A grid segmenter (cpcx.segment.grid) resizes every input to its fixed size itself: nothing to pad.
    model = ExportableSegNet(segnet).eval() if hasattr(segnet, "multiple") else segnet
    out = Path(out) if out is not None else default_out(recipe, fmt)
    info = {"classes": list(meta["classes"]), "arch": meta["arch"], "encoder": meta["encoder"],
            "checkpoint": str(checkpoint), "epoch": meta.get("epoch"),
            "input": "image: float32 N×3×H×W RGB in [0, 1], any size; normalised inside",
            "output": "logits: float32 N×C×H×W; argmax over C = index into classes"}
    multiple = getattr(model, "multiple", 16)
    example = torch.rand(1, 3, 2 * multiple + 5, 3 * multiple + 3, generator=torch.Generator().manual_seed(0))
    from cpcx.segment.grid import GridSegNet, fixed_position_embeddings

    fixed = fixed_position_embeddings() if isinstance(segnet, GridSegNet) else contextlib.nullcontext()
    with torch.no_grad(), warnings.catch_warnings(), fixed:
        # Tracer notes about Python ints from shapes: the pads are built from them on purpose (see above).
        warnings.simplefilter("ignore")
        if isinstance(segnet, GridSegNet):
            model(example)  # computes the constant position tables outside the trace (see fixed_position_embeddings)
        data = _onnx_bytes(model, example, info) if fmt == "onnx" else _torchscript_bytes(model, example, info)
    atomic.write_bytes(out, data)
    console.print(f"[green]✔[/] exported {out} ({fmt}, {len(data) / 1e6:.1f} MB) · input image: float32 N×3×H×W RGB "
                  f"in [0, 1], any H×W, normalised inside · output logits N×{len(info['classes'])}×H×W",
                  soft_wrap=True, highlight=False)
    parity = check_parity(segnet, out, fmt, recipe)
    shown = "; ".join(f"{h}×{w}: {d:.2e} (max |logit| {m:.1f})"
                      for (h, w), d, m in zip(parity.sizes, parity.max_abs, parity.max_logit))
    good = parity.worst_relative <= RELATIVE_TOLERANCE
    console.print(f"{'[green]✔[/]' if good else '[bold red]✘[/]'} parity with torch on {parity.where}: "
                  f"max |logit difference| {shown}", soft_wrap=True, highlight=False)
    if not good:
        raise CpcxError(f"{out}: the exported model differs from torch by {parity.worst_relative:.1e} of the "
                        f"largest logit (tolerance {RELATIVE_TOLERANCE:g}); report it with the line above")
    return out, parity


def _onnx_bytes(model: nn.Module, example: torch.Tensor, info: dict) -> bytes:
    import onnx

    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (example,), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": axes, "logits": axes}, opset_version=OPSET, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue())
    for key, value in info.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if not isinstance(value, str) else value
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, info: dict) -> bytes:
    traced = torch.jit.trace(model, example, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"cpcx.json": json.dumps(info)})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- parity
def parity_image(recipe) -> tuple[np.ndarray, str]:
    """A val (else train) image of the recipe's data set, or a synthetic one when the data set is not here."""
    try:
        from cpcx.data import build_dataset

        for split in ("val", "train"):
            dataset = build_dataset(recipe.dataset, split)
            if len(dataset):
                return dataset.load_image(0), f"{recipe.dataset.kind} {split} image {dataset.ids[0]}"
    except Exception:  # noqa: BLE001 - no data set here (export needs none): fall back to a synthetic image
        pass
    rng = np.random.default_rng(0)
    # Smooth colour blobs rather than white noise: closer to what the network was trained on.
    small = rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
    from PIL import Image

    image = np.asarray(Image.fromarray(small).resize((400, 300), Image.Resampling.BICUBIC))
    return image, "a synthetic 400×300 image (the recipe's data set is not here)"


def run_exported(path: Path, fmt: str, batch: np.ndarray) -> np.ndarray:
    """Logits of the exported file on ``batch`` (N×3×H×W float32 in [0, 1])."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"image": batch})[0]
    with warnings.catch_warnings():  # torch 2.9+ calls TorchScript deprecated; the file format still loads
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(batch)).numpy()


def check_parity(segnet: nn.Module, path: Path, fmt: str, recipe) -> Parity:
    """Max |Δ logit| between torch and the exported file at the image's size and at a second, odd size
    (0.75×, not a multiple of the stride): a graph with a size baked in would fail the second."""
    image, where = parity_image(recipe)
    full = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float().div(255)
    height, width = full.shape[-2:]
    second = (int(height * 0.75) | 1, int(width * 0.75) | 1)
    inputs = [full, F.interpolate(full, size=second, mode="bilinear", align_corners=False)]
    parity = Parity(where, [], [], [])
    for x in inputs:
        with torch.no_grad():
            reference = segnet(x).float().numpy()
        got = run_exported(path, fmt, x.numpy())
        if got.shape != reference.shape:
            raise CpcxError(f"{path}: gives logits of shape {got.shape} for input {tuple(x.shape)} (torch: "
                            f"{reference.shape}); the export is broken, report it")
        parity.sizes.append(tuple(x.shape[-2:]))
        parity.max_abs.append(float(np.abs(got - reference).max()))
        parity.max_logit.append(float(np.abs(reference).max()))
    return parity
