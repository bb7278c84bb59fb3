"""``segment.arch: dpt``: smp's DPT on a timm ViT whose patch-14 weights file is resampled to 16-px patches.

A tiny random ViT (timm's ``test_vit`` made with 14-px patches, saved as safetensors) stands in for DINOv2's
ViT-S/14: the same file loading, kernel and position resampling, at a size these CPUs train in seconds.
One 1-epoch ``cpcx segment`` run on 2 real VOC images (their masks as pseudo-labels) is then reloaded, resumed,
predicted with and exported.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from cpcx.data import build_dataset, load_label_png, save_label_png
from cpcx.errors import CpcxError
from cpcx.recipe import Recipe, SegmentConfig, load_recipe
from cpcx.segment import run_segment
from cpcx.segment.networks import build_segnet, load_segnet

ENCODER = "tu-test_vit"  # timm's 6-block, 64-wide test ViT: ~0.4 M encoder parameters


@pytest.fixture(scope="module")
def vit14(tmp_path_factory):
    """(file, state): a random patch-14 ViT at 56² (a 4×4 position grid), saved as timm saves it."""
    import timm

    torch.manual_seed(7)
    state = timm.create_model("test_vit", patch_size=14, img_size=56, num_classes=0).state_dict()
    path = tmp_path_factory.mktemp("vit") / "vit14.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def dpt_cfg(path, **kw) -> SegmentConfig:
    return SegmentConfig(**{"arch": "dpt", "encoder": ENCODER, "encoder_weights": None, "encoder_file": path,
                            "crop_size": 96, **kw})


def voc_image(voc_root, size: tuple[int, int]) -> torch.Tensor:
    path = sorted((voc_root / "JPEGImages").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def test_patch14_file_is_resampled_to_16_and_runs_on_a_voc_image(vit14, voc_root):
    from timm.layers import resample_patch_embed

    from cpcx.weights import resample_pos_embed

    path, state = vit14
    torch.manual_seed(0)
    model = build_segnet(dpt_cfg(path, freeze_encoder=True), num_classes=21)
    vit = model.encoder.model
    assert model.multiple == 32 and tuple(vit.patch_embed.patch_size) == (16, 16)
    # the kernel as timm resamples it when loading into another patch size; the 4×4 grid bicubically to 96/16 = 6
    kernel = resample_patch_embed(state["patch_embed.proj.weight"], [16, 16])
    torch.testing.assert_close(vit.patch_embed.proj.weight, kernel)
    assert vit.pos_embed.shape == (1, 1 + 6 * 6, 64)
    torch.testing.assert_close(vit.pos_embed, resample_pos_embed(state["pos_embed"], (6, 6)))
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items() if k.startswith(("blocks", "cls", "norm")))

    image = voc_image(voc_root, (75, 101))  # no multiple of 32: SegNet pads to 96×128 and crops back
    model.train()
    assert not model.encoder.training and model.net.decoder.training  # frozen: no dropout, no statistics
    logits = model(torch.cat([image, image.flip(-1)]))
    assert logits.shape == (2, 21, 75, 101) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.net.decoder.parameters())


def test_unfrozen_encoder_trains_and_a_wrong_file_is_one_error(vit14, tmp_path):
    path, state = vit14
    model = build_segnet(dpt_cfg(path, crop_size=64), num_classes=3)
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    assert model.encoder.model.patch_embed.proj.weight.grad is not None
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("blocks.5.")}, str(bad))
    with pytest.raises(CpcxError, match=r"^segment.encoder_file: .*bad.safetensors does not fit .*missing"):
        build_segnet(dpt_cfg(bad), num_classes=3)


def test_offline_download_names_the_import_for_the_dinov2_vit():
    import os

    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("only meaningful offline (HF_HUB_OFFLINE=1, as the test suite sets by default)")
    with pytest.raises(CpcxError) as info:
        build_segnet(SegmentConfig(arch="dpt", encoder="tu-vit_small_patch14_dinov2", crop_size=64), 21)
    assert str(info.value).startswith("segment.encoder_weights:")
    assert "`cpcx weights import dinov2-vits14 --out <file>` gives one for tu-vit_small_patch14_dinov2" in str(info.value)


CROP_LINE = "segment.crop_size: arch dpt takes crops that are a multiple of 32, e.g. segment.crop_size=320"


@pytest.mark.parametrize("segment, line", [
    ({"crop_size": 321}, CROP_LINE),
    ({"crop_size": 336}, CROP_LINE),  # a multiple of 16 is not enough: an odd 21×21 patch grid
    ({"encoder": "resnet50", "crop_size": 384},
     "segment.encoder: arch dpt takes a timm ViT, tu-<timm name> (e.g. tu-vit_small_patch14_dinov2), not resnet50"),
])
def test_what_dpt_cannot_take_is_refused_at_validation(voc_root, tmp_path, segment, line):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "dataset": {"kind": "voc", "root": str(voc_root)},
        "llm": {"provider": "static", "clusters": {"animal": ["cat", "dog"]}},
        "segment": {"arch": "dpt", "encoder": "tu-vit_small_patch14_dinov2", **segment}}))
    with pytest.raises(CpcxError) as info:
        load_recipe(path)
    assert info.value.lines == [f"{path}: {line}"] and info.value.code == 2
    load_recipe(path, ["segment.crop_size=384", "segment.encoder=tu-vit_small_patch14_dinov2"])  # the fix works


# -------------------------------------------------------------------------------- the stage, end to end
@pytest.fixture(scope="module")
def trained(vit14, voc_root, tmp_path_factory):
    """One epoch of `cpcx segment` with a frozen encoder on 2 VOC images: (recipe, console output)."""
    path, _ = vit14
    recipe = Recipe.model_validate({
        "name": "dpt", "runs_dir": str(tmp_path_factory.mktemp("runs")), "seed": 0,
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": 2},
        "llm": {"provider": "static", "clusters": {"a": ["cat"]}},
        "segment": {"arch": "dpt", "encoder": ENCODER, "encoder_weights": None, "encoder_file": str(path),
                    "freeze_encoder": True, "epochs": 1, "batch_size": 2, "crop_size": 64, "scale_range": (0.5, 1.0),
                    "scales": [0.5], "flip": False, "workers": 0, "device": "cpu", "optimizer": "adamw", "lr": 1e-3},
    })
    train = build_dataset(recipe.dataset, "train")
    for i, image_id in enumerate(train.ids):
        save_label_png(recipe.run_dir("pseudo") / "labels" / f"{image_id}.png", train.load_mask(i))
    console = Console(file=io.StringIO(), width=160)
    run_segment(recipe, console=console)
    return recipe, console.file.getvalue()


def test_one_epoch_checkpoint_keeps_the_frozen_encoder_and_reloads(trained, vit14):
    recipe, output = trained
    folder = recipe.run_dir("segment")
    assert "segment: dpt · tu-test_vit (frozen) on 2 images" in output
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["arch"] == "dpt" and metrics["images"] == 2 and 0 <= metrics["miou"] <= 1

    checkpoint = torch.load(folder / "weights" / "last.pt", weights_only=True)
    assert checkpoint["meta"]["img_size"] == 64 and checkpoint["meta"]["freeze_encoder"] is True
    fresh = build_segnet(recipe.segment, num_classes=21)  # the file's weights, the decoder at its seed-0 init
    fresh_state = fresh.net.state_dict()
    encoder = [k for k in fresh_state if k.startswith("encoder.")]
    assert encoder and all(torch.equal(checkpoint["model"][k], fresh_state[k]) for k in encoder)
    head = checkpoint["model"]["segmentation_head.head.4.weight"]
    assert not torch.equal(head, fresh_state["segmentation_head.head.4.weight"])  # the decoder did train

    model, meta = load_segnet(folder / "weights" / "last.pt")
    assert meta["arch"] == "dpt" and model.multiple == 32 and not model.training
    reference = fresh.eval()
    reference.net.load_state_dict(checkpoint["model"])
    images = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


def test_resume_refuses_another_freeze_setting(trained):
    recipe, _ = trained
    console = Console(file=io.StringIO())
    run_segment(recipe, resume=True, console=console)
    assert "training already finished (1 epochs)" in console.file.getvalue()
    unfrozen = recipe.model_copy(update={"segment": recipe.segment.model_copy(update={"freeze_encoder": False})})
    with pytest.raises(CpcxError, match="was trained with freeze_encoder=True but the recipe says False"):
        run_segment(unfrozen, resume=True, console=console)


def test_predict_one_image_and_export(trained, voc_root, tmp_path):
    from cpcx.export import RELATIVE_TOLERANCE, export_segmenter
    from cpcx.predict import run_predict

    recipe, _ = trained
    image = sorted((voc_root / "JPEGImages").glob("*.jpg"))[0]
    summary = run_predict(recipe, [str(image)], out=tmp_path / "predict", console=Console(file=io.StringIO()))
    assert (summary.done, summary.failed) == (1, 0)
    labels = load_label_png(tmp_path / "predict" / "labels" / f"{image.stem}.png")
    assert labels.shape == Image.open(image).size[::-1] and labels.max() < 21

    quiet = Console(file=io.StringIO())
    out, parity = export_segmenter(recipe, "torchscript", out=tmp_path / "dpt.pt", console=quiet)
    assert out.is_file() and parity.worst_relative <= RELATIVE_TOLERANCE and parity.sizes[0] != parity.sizes[1]
    with pytest.raises(CpcxError, match="^--format onnx: a dpt segmenter does not export to ONNX") as info:
        export_segmenter(recipe, "onnx", out=tmp_path / "dpt.onnx", console=quiet)
    assert info.value.code == 2 and not (tmp_path / "dpt.onnx").exists()
