"""`cpcx export`: the ONNX file run by onnxruntime and the TorchScript file, each on a real VOC image at two
sizes (dynamic height/width), against the torch segmenter of the same checkpoint."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from smoke_segmenter import REPO, SMOKE, train_smoke_segmenter

from cpcx.errors import CpcxError
from cpcx.export import export_segmenter
from cpcx.recipe import load_recipe
from cpcx.segment.networks import load_segnet

RELATIVE = 1e-3  # max |Δ logit| / max |logit|


@pytest.fixture(scope="module")
def segmenter(voc_root, tmp_path_factory) -> list[str]:
    return train_smoke_segmenter(tmp_path_factory.mktemp("runs"), voc_root)


@pytest.fixture(scope="module")
def voc_batches(voc_root) -> list[np.ndarray]:
    """Two real val images at two different sizes, neither a multiple of the stride: 1×3×H×W float in [0, 1]."""
    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    first = np.asarray(Image.open(voc_root / "JPEGImages" / f"{ids[0]}.jpg").convert("RGB"))
    second = np.asarray(Image.open(voc_root / "JPEGImages" / f"{ids[1]}.jpg").convert("RGB").resize((301, 227)))
    assert first.shape[:2] != second.shape[:2]
    return [np.ascontiguousarray(im.transpose(2, 0, 1)[None], dtype=np.float32) / 255 for im in (first, second)]


def torch_logits(segmenter_overrides: list[str], batch: np.ndarray) -> np.ndarray:
    recipe = load_recipe(SMOKE, segmenter_overrides)
    model, _ = load_segnet(recipe.run_dir("segment") / "weights" / "best.pt")
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    difference = float(np.abs(got - want).max())
    assert difference <= RELATIVE * float(np.abs(want).max()), difference
    # and the decisions agree (ties aside)
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.999
    return difference


def export(overrides: list[str], fmt: str, out: Path) -> str:
    console = Console(file=io.StringIO(), width=300)
    path, parity = export_segmenter(load_recipe(SMOKE, overrides, check_inputs=False), fmt, out=out, console=console)
    assert path == out and out.is_file() and not list(out.parent.glob("*.tmp"))
    assert parity.worst_relative <= RELATIVE and len(parity.sizes) == 2
    return console.file.getvalue()


def test_onnx_runs_in_onnxruntime_at_two_sizes_like_torch(segmenter, voc_batches, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "seg.onnx"
    output = export(segmenter, "onnx", out)
    assert "parity with torch on voc val image" in output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and image.shape == ["batch", 3, "height", "width"]
    for batch in voc_batches:
        assert_close(session.run(["logits"], {"image": batch})[0], torch_logits(segmenter, batch))
    both = np.concatenate([voc_batches[0], voc_batches[0][..., ::-1].copy()])  # batch of 2
    assert session.run(["logits"], {"image": both})[0].shape[0] == 2
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"])[:2] == ["background", "aeroplane"] and "[0, 1]" in meta["input"]


def test_torchscript_runs_at_two_sizes_like_torch(segmenter, voc_batches, tmp_path):
    out = tmp_path / "seg.torchscript.pt"
    export(segmenter, "torchscript", out)
    extra = {"cpcx.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["cpcx.json"])["classes"][-1] == "tvmonitor"
    for batch in voc_batches:
        with torch.no_grad():
            got = module(torch.from_numpy(batch)).numpy()
        assert_close(got, torch_logits(segmenter, batch))


def test_cli_prints_parity_and_needs_no_data_set(segmenter, tmp_path):
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": str(REPO)}
    out = tmp_path / "x.onnx"
    result = subprocess.run([sys.executable, "-m", "cpcx", "export", "-r", str(SMOKE), *segmenter,
                             "dataset.root=/nonexistent", "--format", "onnx", "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"✔ exported {out} (onnx, ")
    assert lines[-1].startswith("✔ parity with torch on a synthetic 400×300 image (the recipe's data set is not "
                                "here): max |logit difference| 300×400: ")
    assert "225×301: " in lines[-1]


def test_bad_format_and_missing_checkpoint_are_usage_errors(segmenter, tmp_path):
    recipe = load_recipe(SMOKE, segmenter, check_inputs=False)
    with pytest.raises(CpcxError, match="--format: 'tflite' is not an export format; use onnx or torchscript") as c:
        export_segmenter(recipe, "tflite", console=Console(file=io.StringIO()))
    assert c.value.code == 2
    empty = load_recipe(SMOKE, [f"runs_dir={tmp_path}"], check_inputs=False)
    with pytest.raises(CpcxError, match="no segment checkpoint") as c:
        export_segmenter(empty, "onnx", console=Console(file=io.StringIO()))
    assert c.value.code == 2


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3", "deeplabv3plus"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_arch_exports_with_dynamic_size(arch, fmt, tmp_path):
    """A tiny timm encoder under each head: the parity check (two sizes, one odd) passes for every arch."""
    from cpcx import atomic
    from cpcx.recipe import SegmentConfig
    from cpcx.segment.networks import build_segnet, segnet_meta

    torch.manual_seed(0)
    cfg = SegmentConfig(arch=arch, encoder="tu-test_efficientnet", encoder_weights=None)
    classes = ("background", "cat", "dog")
    model = build_segnet(cfg, len(classes))
    checkpoint = tmp_path / "best.pt"
    atomic.save_torch(checkpoint, {"model": model.net.state_dict(), "meta": segnet_meta(cfg, classes), "epoch": 1})
    recipe = load_recipe(SMOKE, [f"runs_dir={tmp_path}"], check_inputs=False)
    out, parity = export_segmenter(recipe, fmt, weights=checkpoint, console=Console(file=io.StringIO()))
    assert out == tmp_path / "smoke" / "export" / f"segmenter{'.onnx' if fmt == 'onnx' else '.torchscript.pt'}"
    assert parity.worst_relative <= RELATIVE and parity.sizes[0] != parity.sizes[1]
