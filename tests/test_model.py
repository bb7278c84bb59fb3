"""The CPC network and its losses on small tensors: shapes, eq. 1–7 by hand, freezing, weights, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpcx.errors import CpcxError
from cpcx.model import build_model, checkpoint_meta, cluster_vectors, load_checkpoint
from cpcx.model.backbone import ViTBackbone
from cpcx.model.heads import resolve_topk, topk_pool
from cpcx.model.hv_bilstm import HVBiLSTM
from cpcx.model.losses import mce_loss, pce_loss, total_loss
from cpcx.recipe import LossConfig, ModelConfig

TINY = "vit_tiny_patch16_224"  # e = 192, patch 16: 64 px → a 4×4 grid


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": TINY, "pretrained": False, "img_size": 64, "cluster_dim": 16, **kw})


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(tiny_cfg(), num_classes=5, num_clusters=3).eval()


def test_shapes_any_input_size(net):
    u = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    for h, w in [(64, 64), (64, 96), (112, 80)]:  # not the timm default 224: position embeddings interpolated
        out = net(torch.randn(2, 3, h, w), u)
        grid = (h // 16, w // 16)
        assert out["probs"].shape == (2, 5, *grid)
        assert out["features"].shape == (2, 192 + 16, *grid)  # e + H; HV-BiLSTM hidden (e+H)/4 per direction
        assert out["image_probs"].shape == (2, 5)
        torch.testing.assert_close(out["probs"].sum(1), torch.ones(2, *grid))
    assert net.mean == (0.5, 0.5, 0.5) and net.std == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg


def test_tokens_path_equals_image_path(net):
    images, u = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    with torch.no_grad():
        tokens = net.backbone(images)
        assert tokens.shape == (2, 4, 4, 192)  # prefix (class) token dropped, grid restored
        a, b = net(images, u), net(tokens=tokens, u=u)
    for key in ("probs", "features", "image_probs"):
        torch.testing.assert_close(a[key], b[key])


def test_trunk_then_remaining_blocks_equals_the_whole_vit(net):
    """forward_from(forward_trunk(x, d), d) is the ViT for every split point d, and the net's trunk path
    (what a trunk cache feeds training) gives the same outputs as the image path."""
    images, u = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    backbone = net.backbone
    with torch.no_grad():
        whole = backbone(images)
        reference = backbone.vit.forward_features(images)[:, 1:].reshape(2, 4, 4, 192)  # timm's own pass
        torch.testing.assert_close(whole, reference)
        for depth in (0, 5, backbone.num_blocks - 1, backbone.num_blocks):
            trunk = backbone.forward_trunk(images, depth)
            assert trunk.shape == (2, 1 + 16, 192)  # the class token stays: the later blocks attend to it
            torch.testing.assert_close(backbone.forward_from(trunk, depth, (4, 4)), whole)
        a = net(images, u)
        b = net(tokens=backbone.forward_trunk(images, 10), u=u, trunk=10)
    for key in ("probs", "features", "image_probs"):
        torch.testing.assert_close(a[key], b[key])


def test_outside_trunk_names_the_later_blocks_and_the_norm(net):
    names = list(net.backbone.state_dict())
    later = [n for n in names if net.backbone.outside_trunk(10)(n)]
    assert later and all(n.startswith(("vit.blocks.10.", "vit.blocks.11.", "vit.norm.")) for n in later)
    assert any(n.startswith("vit.norm.") for n in later) and not any(n.startswith("vit.blocks.1.") for n in later)
    assert not any(net.backbone.outside_trunk(net.backbone.num_blocks)(n) for n in names)


def test_without_cluster_token_width_is_e():
    model = build_model(tiny_cfg(cluster_token=False, hv_bilstm=False), num_classes=3, num_clusters=4).eval()
    assert model.cluster_token is None and model.num_clusters == 0
    out = model(torch.randn(1, 3, 64, 64), None)
    assert out["features"].shape[1] == 192


def test_cluster_token_is_u_times_g(net):
    u = torch.tensor([[1.0, 0, 1]])
    torch.testing.assert_close(net.cluster_token(u), (net.cluster_token.G[0] + net.cluster_token.G[2])[None])


def test_cluster_vectors_follow_the_contract():
    labels = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32)  # background + 3 classes
    matrix = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)  # class 1 → cluster 0; 2, 3 → cluster 1
    np.testing.assert_array_equal(cluster_vectors(labels, matrix), [[1, 0], [0, 1], [0, 0]])  # clipped to 1
    with pytest.raises(CpcxError, match="re-run `cpcx clusters`"):
        cluster_vectors(labels, matrix[:2])


def test_hv_bilstm_reads_rows_and_columns():
    torch.manual_seed(0)
    lstm = HVBiLSTM(dim=8, dropout=0.0).eval()
    assert lstm.out_dim == 8  # 4 × (8/4)
    x = torch.randn(1, 5, 6, 8)
    y = x.clone()
    y[0, 2, 3] += 1.0  # change one patch: only its row and its column may change
    with torch.no_grad():
        changed = (lstm(x) - lstm(y)).abs().amax(-1)[0] > 1e-7
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[2, :] = True
    expected[:, 3] = True
    assert torch.equal(changed, expected)


def test_topk_count_or_fraction():
    assert resolve_topk(6, 1024) == 6 and resolve_topk(6, 4) == 4
    assert resolve_topk(0.01, 1024) == 10 and resolve_topk(0.001, 100) == 1
    probs = torch.tensor([[[[0.9, 0.1], [0.5, 0.7]]]])  # (1, 1, 2, 2)
    torch.testing.assert_close(topk_pool(probs, 2), torch.tensor([[0.8]]))
    torch.testing.assert_close(topk_pool(probs, 1), torch.tensor([[0.9]]))


def test_mce_forces_the_background_label():
    p = torch.tensor([[0.5, 0.2, 0.9]])
    y = torch.tensor([[0.0, 1.0, 0.0]])  # background given as 0: must count as 1
    expected = -(math.log(0.5) + math.log(0.2) + math.log(0.1)) / 3
    assert mce_loss(p, y).item() == pytest.approx(expected, rel=1e-5)
    smoothed = -((0.9 * math.log(0.5) + 0.1 * math.log(0.5)) + (0.9 * math.log(0.2) + 0.1 * math.log(0.8))
                 + (0.1 * math.log(0.9) + 0.9 * math.log(0.1))) / 3
    assert mce_loss(p, y, label_smoothing=0.2).item() == pytest.approx(smoothed, rel=1e-5)


def _four_patches():
    """2 classes, 4 patches in a 2×2 grid. Class 1: Z = .9, .95 (high), .1 (low), .5 (neither)."""
    z1 = torch.tensor([0.9, 0.95, 0.1, 0.5])
    probs = torch.stack([1 - z1, z1]).reshape(1, 2, 2, 2)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.3, 0.3]])  # patch features (D = 2)
    return f.T.reshape(1, 2, 2, 2).clone(), probs


def test_pce_hand_computed_four_patches():
    features, probs = _four_patches()
    # class 1: high {0, 1}, low {2}. S̄(0,1) = (1+0)/2 = .5 → high–high mean of 1-S̄ over (0,1),(1,0) = .5;
    #          high–low S̄(0,2) = 0, S̄(1,2) = .5 → mean .25. L¹ = .75.
    # background: Z⁰ = .1, .05, .9, .5 → high {2} (no pair: 0), low {0, 1}: S̄(2,0) = 0, S̄(2,1) = .5 → .25.
    both = pce_loss(features, probs, torch.tensor([[1.0, 1.0]]), threshold=0.85)
    assert both.item() == pytest.approx(1.0, abs=1e-6)
    only_background = pce_loss(features, probs, torch.tensor([[1.0, 0.0]]), threshold=0.85)  # class 1 absent
    assert only_background.item() == pytest.approx(0.25, abs=1e-6)


def test_pce_matches_the_pairwise_definition():
    """The vectorised PCE equals eq. 6 written as loops over patch pairs, on random data."""
    torch.manual_seed(0)
    features, probs = torch.randn(3, 5, 4, 4), (torch.randn(3, 4, 4, 4) * 4).softmax(1)
    labels = torch.tensor([[1.0, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]])
    expected = 0.0
    for b in range(3):
        f = torch.nn.functional.normalize(features[b].flatten(1).T, dim=-1)
        sim, z = (1 + f @ f.T) / 2, probs[b].flatten(1)
        for c in [0] + [c for c in range(1, 4) if labels[b, c]]:  # background is always present
            high, low = (z[c] > 0.85).nonzero().flatten().tolist(), (z[c] < 0.15).nonzero().flatten().tolist()
            pos = [1 - sim[i, j] for i in high for j in high if i != j]
            neg = [sim[i, j] for i in high for j in low]
            expected += (sum(pos) / len(pos) if pos else 0) + (sum(neg) / len(neg) if neg else 0)
    assert expected > 0
    assert pce_loss(features, probs, labels, 0.85).item() == pytest.approx(float(expected) / 3, rel=1e-5)


def test_pce_empty_sets_give_zero_and_finite_gradients():
    features = torch.randn(2, 4, 3, 3, requires_grad=True)
    probs = torch.full((2, 3, 3, 3), 1 / 3)  # nothing above .85, nothing below .15
    loss = pce_loss(features, probs, torch.ones(2, 3), threshold=0.85)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_gradient_reaches_g_and_only_the_unfrozen_blocks(net):
    model = build_model(tiny_cfg(dropout=0.0), num_classes=5, num_clusters=3)
    model.backbone.set_trainable_blocks(1)
    labels = torch.tensor([[1.0, 1, 0, 0, 1], [1.0, 0, 1, 0, 0]])
    out = model(torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    total_loss(out, labels, LossConfig(classifier_l2=0.01), model.classifier.weight)["loss"].backward()
    g = model.cluster_token.G.grad
    assert g is not None and g[:2].abs().sum() > 0  # clusters 0, 1, 2 are used by the two images
    assert model.backbone.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.vit.norm.weight.grad is not None
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad is None
    assert model.backbone.vit.patch_embed.proj.weight.grad is None
    model.backbone.set_trainable_blocks(0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.vit.training  # a frozen ViT stays in eval mode


def test_local_weights_load_resample_and_reject(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model(TINY, pretrained=False, num_classes=0, dynamic_img_size=True)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "tiny.pth")  # a wrapped torch state dict
    backbone = ViTBackbone(TINY, weights=tmp_path / "tiny.pth")
    with torch.no_grad():  # the same network: the same tokens, at a size other than 224
        x = torch.randn(1, 3, 48, 64)
        torch.testing.assert_close(backbone(x).reshape(1, 12, 192), source.forward_features(x)[:, 1:])

    other_grid = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=32)  # 2×2 position grid
    save_file({k: v.contiguous() for k, v in other_grid.state_dict().items()}, str(tmp_path / "grid.safetensors"))
    backbone = ViTBackbone(TINY, weights=tmp_path / "grid.safetensors")
    assert backbone.vit.pos_embed.shape == (1, 197, 192)  # resampled from 2×2 to 14×14, as timm does
    torch.testing.assert_close(backbone.vit.blocks[3].mlp.fc1.weight, other_grid.blocks[3].mlp.fc1.weight)

    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CpcxError, match=r"does not fit model.backbone 'vit_tiny_patch16_224'.*\(1, 197, 384\)"):
        ViTBackbone(TINY, weights=tmp_path / "small.pth")


def test_backbone_errors_are_one_clear_line(monkeypatch):
    import timm

    with pytest.raises(CpcxError, match="'vit_nope' is not a timm model"):
        ViTBackbone("vit_nope")
    with pytest.raises(CpcxError, match="'resnet18' is not a ViT"):
        ViTBackbone("resnet18")

    def offline(*args, **kwargs):  # what the hub client raises without a network (an OSError subclass)
        raise ConnectionError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CpcxError, match="model.pretrained: could not download the weights of vit_tiny_patch16_224"):
        ViTBackbone(TINY, pretrained=True)


def test_checkpoint_rebuilds_the_network_alone(tmp_path, net):
    matrix = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    state = {"model": net.state_dict(), "meta": checkpoint_meta(net, ("background", "a", "b", "c", "d"), matrix),
             "epoch": 3, "loss": 0.5}
    torch.save(state, tmp_path / "best.pt")
    rebuilt, meta = load_checkpoint(tmp_path / "best.pt")
    assert meta["classes"][0] == "background" and meta["epoch"] == 3 and meta["cluster_matrix"] == matrix.tolist()
    images, u = torch.randn(1, 3, 80, 64), torch.tensor([[0.0, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, u)["probs"], net(images, u)["probs"])
    with pytest.raises(CpcxError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_constant_background_is_one_shared_learnable_logit():
    from cpcx.model.heads import PatchClassifier

    head = PatchClassifier(8, 5, background="constant")
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    logits = head(x)
    assert logits.shape == (2, 3, 4, 5) and head.weight.shape == (4, 8)
    assert torch.all(logits[..., 0] == head.background_logit)  # the same for every patch, whatever its features
    logits.softmax(-1)[..., 0].sum().backward()
    assert head.background_logit.grad is not None and head.background_logit.grad.abs() > 0
    learned = PatchClassifier(8, 5)
    assert learned.weight.shape == (5, 8) and learned.background_logit is None


def test_background_has_its_own_topk():
    from cpcx.model import build_model

    torch.manual_seed(0)
    tokens = torch.randn(2, 4, 4, 192)  # (B, h, w, e) of the tiny ViT: 16 patches
    common = {"topk": 2, "background": "constant", "hv_bilstm": False, "cluster_token": False}
    paper = build_model(tiny_cfg(**common), 5, 0, load_weights=False).eval()
    wide = build_model(tiny_cfg(**common, background_topk=0.5), 5, 0, load_weights=False).eval()
    wide.load_state_dict(paper.state_dict())
    with torch.no_grad():
        a, b = paper.forward_tokens(tokens), wide.forward_tokens(tokens)
    torch.testing.assert_close(a["probs"], b["probs"])
    torch.testing.assert_close(b["image_probs"][:, 1:], a["image_probs"][:, 1:])  # the classes keep k = 2
    torch.testing.assert_close(b["image_probs"][:, 0], topk_pool(a["probs"][:, :1], 8)[:, 0])  # 0.5 of 16 patches
    assert (b["image_probs"][:, 0] < a["image_probs"][:, 0]).all()
    with pytest.raises(ValueError, match="fraction"):
        tiny_cfg(background_topk=1.5)
