"""A CNN's feature maps as the CPC patch grid (model.feature_strides): shapes, fusion, real weights, freezing,
recipe errors, and train + pseudo end to end on real VOC images through the token cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cpcx.errors import CpcxError
from cpcx.model import build_model
from cpcx.model.backbone import ViTBackbone, build_backbone
from cpcx.model.cnn_backbone import CNNBackbone
from cpcx.recipe import ModelConfig

REPO = Path(__file__).resolve().parents[1]
LITE0 = REPO / "weights" / "efficientnet_lite0.safetensors"


def test_grid_fuses_the_chosen_strides_onto_the_finest():
    torch.manual_seed(0)
    net = CNNBackbone("tf_efficientnet_lite0", [32, 16]).eval()
    assert net.strides == (16, 32) and net.patch_size == 16 and net.embed_dim == 112 + 320
    x = torch.randn(2, 3, 96, 160)
    grid = net(x)
    assert grid.shape == (2, 6, 10, 432) and net.grid_size(96, 160) == (6, 10)
    s16, s32 = net.cnn(x)
    ln = lambda m: F.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2])  # noqa: E731
    assert torch.allclose(grid[..., :112], ln(s16), atol=1e-5)
    up = F.interpolate(s32, size=(6, 10), mode="bilinear", align_corners=False)
    assert torch.allclose(grid[..., 112:], ln(up), atol=1e-5)
    assert torch.allclose(grid[..., 112:].std(-1, unbiased=False), torch.ones(2, 6, 10), atol=1e-3)
    assert net(torch.randn(1, 3, 100, 75)).shape[1:3] == net.grid_size(100, 75) == (7, 5)  # odd sizes: ceil


def test_build_backbone_picks_vit_or_cnn():
    assert isinstance(build_backbone("vit_tiny_patch16_224"), ViTBackbone)
    assert isinstance(build_backbone("resnet18", feature_strides=[16]), CNNBackbone)


@pytest.mark.skipif(not LITE0.is_file(), reason="run `make weights` first")
def test_real_weights_give_the_classifier_s_own_feature_maps():
    """The features_only model holds exactly the ImageNet classifier's stages: its stride-32 map equals the
    whole model's last block output on a real-looking input."""
    import timm

    from cpcx.weights import load_state_dict_file

    net = CNNBackbone("tf_efficientnet_lite0", [32], weights=LITE0).eval()
    full = timm.create_model("tf_efficientnet_lite0").eval()
    full.load_state_dict(load_state_dict_file(LITE0))
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        h = full.bn1(full.conv_stem(x))
        for block in full.blocks:
            h = block(h)
        assert torch.allclose(net(x), F.layer_norm(h.permute(0, 2, 3, 1), h.shape[1:2]), atol=1e-4)


def test_foreign_weights_fail_in_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    with pytest.raises(CpcxError, match=r"model.weights: .* does not fit model.backbone 'tf_efficientnet_lite0'"):
        CNNBackbone("tf_efficientnet_lite0", [16], weights=path)


def test_unavailable_stride_and_unknown_name_are_clear():
    with pytest.raises(CpcxError, match=r"model.feature_strides: resnet18 has feature maps at strides 2, 4, 8, 16, 32"):
        CNNBackbone("resnet18", [64])
    with pytest.raises(CpcxError, match="is not a timm model"):
        CNNBackbone("no_such_cnn", [16])


def test_only_the_last_stages_train_and_batchnorm_stays_frozen():
    net = CNNBackbone("tf_efficientnet_lite0", [16, 32])
    net.set_trainable_blocks(2)
    net.train()
    assert not net.cnn.training and all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("cnn.blocks.5.", "cnn.blocks.6.")) for n in trained)
    assert {id(p) for p in net.trainable_parameters(2)} == {id(p) for p in net.parameters() if p.requires_grad}
    net(torch.randn(1, 3, 64, 64)).sum().backward()
    assert net.cnn.conv_stem.weight.grad is None and net.cnn.blocks[6][0].conv_pwl.weight.grad is not None


def test_cpc_network_on_a_cnn_grid():
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", feature_strides=[16, 32], pretrained=False, img_size=128,
                      cluster_dim=8, topk=2)
    net = build_model(cfg, num_classes=4, num_clusters=2).eval()
    out = net(torch.randn(2, 3, 128, 128), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out["probs"].shape == (2, 4, 8, 8) and out["image_probs"].shape == (2, 4)
    assert net.patch_size == 16 and net.mean == (0.5, 0.5, 0.5)


def test_recipe_refuses_a_trunk_cache_on_a_cnn(data_root, voc_root):
    from cpcx.recipe_io import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="train.trunk_cache: only a single ViT backbone"):
        load_recipe(REPO / "recipes" / "smoke.yaml", ["model.backbone=tf_efficientnet_lite0",
                                                      "model.feature_strides=[16]", "train.trunk_cache=true"],
                    env={"CPCX_DATA": str(data_root)})


@pytest.mark.slow
@pytest.mark.skipif(not LITE0.is_file(), reason="run `make weights` first")
def test_train_and_pseudo_on_real_images_with_a_cnn_grid(tmp_path, data_root, voc_root):
    """The smoke recipe with EfficientNet-Lite0's stride 16 + 32 grid: tokens cached, trained, labelled."""
    runs = tmp_path / "runs"
    args = [f"runs_dir={runs}", "model.backbone=tf_efficientnet_lite0", "model.feature_strides=[16,32]",
            "model.weights=../weights/efficientnet_lite0.safetensors", "model.img_size=256", "pseudo.img_size=256",
            "pseudo.figures=0", "crf.enabled=false"]
    env = {**os.environ, "CPCX_DATA": str(data_root), "COLUMNS": "160"}
    for stage in ("clusters", "train", "pseudo"):
        done = subprocess.run([sys.executable, "-m", "cpcx", stage, "-r", str(REPO / "recipes" / "smoke.yaml"), *args],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    caches = list((runs / "smoke" / "train" / "features").glob("*/tokens.npy"))
    assert len(caches) == 1
    import numpy as np

    assert np.load(caches[0], mmap_mode="r").shape == (16, 2, 16, 16, 432)  # 256 / 16, two views, 112 + 320
    assert len(list((runs / "smoke" / "pseudo" / "labels").glob("*.png"))) == 16
    assert 0 < json.loads((runs / "smoke" / "pseudo" / "metrics.json").read_text())["miou"] <= 1


# ------------------------------------------------------------------------------------------ model.fuse
def _fused_cfg(**kw) -> ModelConfig:
    return ModelConfig(backbone="vit_tiny_patch16_224", pretrained=False, img_size=64, cluster_dim=8, topk=2,
                       fuse={"backbone": "tf_efficientnet_lite0", "feature_strides": [16, 32]}, **kw)


def test_fused_grid_puts_the_second_backbone_cell_by_cell_beside_the_first():
    torch.manual_seed(0)
    net = build_model(_fused_cfg(), num_classes=4, num_clusters=2).eval()
    fused = net.backbone
    assert fused.embed_dim == 192 + 432 and fused.patch_size == 16 and fused.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        grid = fused(x)
        assert grid.shape == (2, 4, 5, 624)
        assert torch.allclose(grid[..., :192], fused.first(x))
        raw = x * torch.tensor(fused.first.std).view(1, 3, 1, 1) + torch.tensor(fused.first.mean).view(1, 3, 1, 1)
        second = (raw - torch.tensor(fused.second.mean).view(1, 3, 1, 1)) / torch.tensor(fused.second.std).view(1, 3, 1, 1)
        assert torch.allclose(grid[..., 192:], fused.second(second), atol=1e-5)  # 64×80 = grid × 16: no resize


def test_fused_second_backbone_never_trains_and_the_checkpoint_rebuilds_both(tmp_path):
    from cpcx.model import checkpoint_meta, load_checkpoint

    torch.manual_seed(0)
    net = build_model(_fused_cfg(), num_classes=4, num_clusters=2)
    net.backbone.set_trainable_blocks(1)
    trained = {n for n, p in net.backbone.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("first.") for n in trained)
    path = tmp_path / "best.pt"
    torch.save({"model": net.state_dict(), "meta": checkpoint_meta(net, ["bg", "a", "b", "c"], [[1, 0], [0, 1], [1, 0]])},
               path)
    again, _ = load_checkpoint(path)
    x, u = torch.randn(1, 3, 64, 64), torch.tensor([[1.0, 0.0]])
    net.eval()
    with torch.no_grad():
        assert torch.allclose(again(x, u)["probs"], net(x, u)["probs"], atol=1e-6)


def test_feature_cache_key_tells_grids_apart():
    from cpcx.feature_cache import cache_key

    vit = build_backbone("vit_tiny_patch16_224")
    cnn16 = CNNBackbone("tf_efficientnet_lite0", [16])
    cnn32 = CNNBackbone("tf_efficientnet_lite0", [16, 32])
    assert "grid" not in cache_key("vit_tiny_patch16_224", vit, 64, ["orig"], ["a"])  # ViT keys as before
    keys = [cache_key("tf_efficientnet_lite0", b, 64, ["orig"], ["a"]) for b in (cnn16, cnn32)]
    assert keys[0]["grid"] != keys[1]["grid"]
