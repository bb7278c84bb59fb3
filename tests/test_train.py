"""Training on 16 real VOC images on CPU with a tiny random ViT: runs, resume, cache, DDP.

Every run goes through ``run_train`` with a temporary runs folder and a ``static`` cluster recipe, so the
whole stage (clusters.json, checkpoints, metrics.csv, feature cache) is exercised as a user runs it.
"""
from __future__ import annotations

import csv
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cpcx import feature_cache
from cpcx.errors import CpcxError
from cpcx.model import build_model, load_checkpoint

STATIC_CLUSTERS = {
    "vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
    "animal": ["bird", "cat", "cow", "dog", "horse", "sheep"],
    "person": ["person"],
    "indoor": ["bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"],
}
NO_PHOTOMETRIC = {"scale_min": 1.0, "color_jitter": 0.0, "grayscale": 0.0}


def make_recipe(tmp: Path, voc_root: Path, name: str = "t", clusters: bool = True, **sections):
    """A 16-image VOC recipe with a tiny ViT (4×4 patches at 64 px); ``sections`` update the defaults."""
    from cpcx.clusters import run_clusters
    from cpcx.recipe import load_recipe

    data = {
        "name": name, "seed": 0, "runs_dir": str(tmp / "runs"),
        "dataset": {"kind": "voc", "root": str(voc_root), "limit": 16},
        "llm": {"provider": "static", "clusters": STATIC_CLUSTERS},
        "model": {"backbone": "vit_tiny_patch16_224", "pretrained": False, "img_size": 64, "cluster_dim": 16,
                  "topk": 2},
        "train": {"epochs": 2, "batch_size": 4, "warmup_epochs": 1, "unfreeze_blocks": 1, "device": "cpu",
                  "workers": 0, "log_every": 2, "views": ["orig", "hflip"]},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path, [])
    if clusters and not (recipe.run_dir("clusters") / "clusters.json").is_file():
        run_clusters(recipe)
    return recipe


def losses(recipe) -> list[float]:
    with open(recipe.run_dir("train") / "metrics.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def weights(recipe, which: str = "last") -> dict[str, torch.Tensor]:
    return torch.load(recipe.run_dir("train") / "weights" / f"{which}.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, voc_root):
    """2 epochs: a cached warm-up with the ViT frozen, then the last block trains on augmented images."""
    from cpcx.train import run_train

    recipe = make_recipe(tmp_path_factory.mktemp("ref"), voc_root, train={"augment": {"color_jitter": 0.3}})
    best = run_train(recipe)
    return recipe, best


def test_two_epochs_on_real_images(reference):
    from cpcx.device import seed_everything

    recipe, best = reference
    folder = recipe.run_dir("train")
    with open(folder / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [float(r["lr"]) for r in rows] == [1e-3, 1e-4]
    assert all(np.isfinite(float(r["loss"])) and 0 <= float(r["f1"]) <= 1 for r in rows)
    assert best == folder / "weights" / "best.pt" and (folder / "weights" / "last.pt").is_file()
    assert (folder / "recipe.resolved.yaml").is_file() and len(list((folder / "features").iterdir())) == 1
    assert (folder / "figures" / "curves.png").stat().st_size > 1000  # loss and P/R/F1 per epoch, drawn each epoch

    net, meta = load_checkpoint(best)
    assert meta["classes"][0] == "background" and len(meta["classes"]) == 21 and net.num_clusters == 4
    assert np.array(meta["cluster_matrix"]).shape == (20, 4)
    seed_everything(recipe.seed)  # the initial weights of the run
    initial = build_model(recipe.model, 21, 4).state_dict()
    trained = weights(recipe)
    assert torch.equal(trained["backbone.vit.blocks.0.attn.qkv.weight"], initial["backbone.vit.blocks.0.attn.qkv.weight"])
    assert not torch.equal(trained["backbone.vit.blocks.11.attn.qkv.weight"], initial["backbone.vit.blocks.11.attn.qkv.weight"])
    assert not torch.equal(trained["cluster_token.G"], initial["cluster_token.G"])


def test_kill_and_resume_equals_uninterrupted(reference, tmp_path, voc_root, monkeypatch):
    import cpcx.train as train

    ref_recipe, _ = reference
    recipe = make_recipe(tmp_path, voc_root, train={"augment": {"color_jitter": 0.3}})
    calls = {"n": 0}
    original = train.forward_loss

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 steps per epoch: the 2nd step of epoch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "forward_loss", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(recipe)
    monkeypatch.setattr(train, "forward_loss", original)
    assert len(losses(recipe)) == 1
    train.run_train(recipe, resume=True)
    assert losses(recipe) == losses(ref_recipe)
    ours, theirs = weights(recipe), weights(ref_recipe)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_refuses_a_changed_recipe(reference, tmp_path):
    from cpcx.recipe import load_recipe
    from cpcx.train import run_train

    recipe, best = reference
    path = tmp_path / "changed.yaml"
    data = yaml.safe_load((recipe.run_dir("train") / "recipe.resolved.yaml").read_text())
    path.write_text(yaml.safe_dump(data))
    resolved = (recipe.run_dir("train") / "recipe.resolved.yaml").read_text()
    with pytest.raises(CpcxError, match=r"changed since this checkpoint in loss.pce_weight, model.topk;"):
        run_train(load_recipe(path, ["model.topk=3", "loss.pce_weight=0.5", "train.workers=1"]), resume=True)
    assert (recipe.run_dir("train") / "recipe.resolved.yaml").read_text() == resolved  # a refusal changes nothing
    before = (recipe.run_dir("train") / "weights" / "last.pt").stat().st_mtime_ns
    assert run_train(load_recipe(path, ["train.log_every=1"]), resume=True) == best  # whitelisted; nothing to do
    assert (recipe.run_dir("train") / "weights" / "last.pt").stat().st_mtime_ns == before


def test_cached_and_uncached_give_the_same_loss_curve(tmp_path, voc_root):
    from cpcx.train import run_train

    common = {"unfreeze_blocks": 0, "views": ["orig", "hflip", "transpose"], "augment": NO_PHOTOMETRIC}
    cached = make_recipe(tmp_path, voc_root, "cached", train={**common, "feature_cache": True})
    uncached = make_recipe(tmp_path, voc_root, "uncached", train={**common, "feature_cache": False})
    run_train(cached)
    run_train(uncached)
    assert (cached.run_dir("train") / "features").is_dir() and not (uncached.run_dir("train") / "features").exists()
    np.testing.assert_allclose(losses(cached), losses(uncached), rtol=5e-4)  # fp16 tokens vs fp32 (other views differ by ~7e-3)


def test_feature_cache_holds_each_view_and_resumes(tmp_path, voc_root, monkeypatch):
    from cpcx.augment import apply_view, normalize, resize_image
    from cpcx.data import ImageLabelDataset, build_dataset
    from cpcx.recipe import VOCDatasetConfig

    torch.manual_seed(0)
    backbone = build_model(make_recipe(tmp_path, voc_root, clusters=False).model, 21, 4).backbone
    images = ImageLabelDataset(build_dataset(VOCDatasetConfig(root=voc_root, limit=6), "train"))
    views = ["orig", "hflip", "vflip", "transpose"]
    args = (tmp_path / "features", "tiny", backbone, images, 64, views, torch.device("cpu"), "fp32", 2, 0)

    calls = {"n": 0}
    original = feature_cache.apply_view

    def dies_in_batch_two(x, view):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(x, view)

    monkeypatch.setattr(feature_cache, "apply_view", dies_in_batch_two)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.FeatureCache.build(*args)
    monkeypatch.setattr(feature_cache, "apply_view", original)
    (folder,) = (tmp_path / "features").iterdir()
    assert not (folder / "tokens.npy").exists() and int(np.load(folder / "done.npy").sum()) == 2
    cache = feature_cache.FeatureCache.build(*args)
    assert cache.tokens.shape == (6, 4, 4, 4, 192) and cache.tokens.dtype == np.float16
    with torch.no_grad():
        x = normalize(resize_image(images[5]["image"], 64), backbone.mean, backbone.std)[None]
        for v, view in enumerate(views):  # the ViT ran on each view (it is not flip-equivariant)
            torch.testing.assert_close(cache.get(5, v).float(), backbone(apply_view(x, view))[0], atol=2e-2, rtol=1e-2)
        assert (cache.get(5, 1).float() - apply_view(cache.get(5, 0).float().permute(2, 0, 1), "hflip")
                .permute(1, 2, 0)).abs().max() > 1e-2
    # another key (other views): a new cache, the stale one removed
    feature_cache.FeatureCache.build(*args[:5], ["orig"], *args[6:])
    assert len(list((tmp_path / "features").iterdir())) == 1 and not folder.exists()
    # a shared folder (train.feature_cache_dir) keeps every key: other recipes may still read them
    feature_cache.FeatureCache.build(*args[:5], ["orig", "hflip"], *args[6:], prune=False)
    assert len(list((tmp_path / "features").iterdir())) == 2


def test_recipes_sharing_a_feature_cache_dir_extract_once(tmp_path, voc_root):
    from cpcx.train import run_train

    shared = tmp_path / "shared-features"
    # same seed: the tiny ViT is randomly initialised, so the seed decides its weights and the cache key
    train = {"epochs": 1, "unfreeze_blocks": 0, "feature_cache_dir": str(shared)}
    first = make_recipe(tmp_path, voc_root, name="first", train=train)
    second = make_recipe(tmp_path, voc_root, name="second", train=train)
    run_train(first)
    (folder,) = shared.iterdir()
    stamp = (folder / "tokens.npy").stat().st_mtime_ns
    run_train(second)
    assert [p.name for p in shared.iterdir()] == [folder.name] and (folder / "tokens.npy").stat().st_mtime_ns == stamp
    assert not (second.run_dir("train") / "features").exists() and (second.run_dir("train") / "weights" / "best.pt").is_file()


def test_trunk_cache_trains_the_last_block_from_stored_tokens(tmp_path, voc_root):
    """train.trunk_cache: every epoch reads the tokens after block 11 and runs only block 12; the warm-up
    matches a plain cached run, the first blocks never change (so the cache stays valid for pseudo-labels)
    and the trained block gets its own rate (train.backbone_lr)."""
    from cpcx.data import build_dataset
    from cpcx.device import seed_everything
    from cpcx.model import cluster_vectors
    from cpcx.pseudo.infer import PatchPredictor, open_token_cache
    from cpcx.train import run_train

    common = {"views": ["orig", "hflip"], "augment": NO_PHOTOMETRIC}
    trunk = make_recipe(tmp_path, voc_root, "trunk",
                        train={**common, "trunk_cache": True, "backbone_lr": 3e-4})
    plain = make_recipe(tmp_path, voc_root, "plain", train={**common, "unfreeze_blocks": 0})
    run_train(trunk)
    run_train(plain)
    (folder,) = (trunk.run_dir("train") / "features").iterdir()
    cache = feature_cache.FeatureCache(folder)
    assert cache.depth == 11 and cache.tokens.shape == (16, 2, 1 + 16, 192)  # class token + 4×4 patches
    np.testing.assert_allclose(losses(trunk)[0], losses(plain)[0], rtol=5e-4)  # warm-up: same network, same data
    assert losses(trunk)[1] != pytest.approx(losses(plain)[1], rel=1e-4)  # then block 12 trains

    seed_everything(trunk.seed)
    initial = build_model(trunk.model, 21, 4).state_dict()
    trained = weights(trunk)
    for name in ("backbone.vit.blocks.10.mlp.fc2.weight", "backbone.vit.patch_embed.proj.weight"):
        assert torch.equal(trained[name], initial[name])
    assert not torch.equal(trained["backbone.vit.blocks.11.mlp.fc2.weight"], initial["backbone.vit.blocks.11.mlp.fc2.weight"])
    ckpt = torch.load(trunk.run_dir("train") / "weights" / "last.pt", weights_only=True)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-4, 3e-4]  # head: lr_after_warmup

    # the pseudo-label stage finds the trunk cache (its blocks are untouched) and runs only block 12
    net, meta = load_checkpoint(trunk.run_dir("train") / "weights" / "last.pt")
    dataset = build_dataset(trunk.dataset, "train")
    found = open_token_cache(trunk, net, dataset, 64, True)
    assert found is not None and found.trunk == 11
    predictor = PatchPredictor(net, torch.device("cpu"), "fp32", 64, flip=True, class_max_norm=True)
    u = cluster_vectors(dataset.labels, meta["cluster_matrix"])
    images = [dataset.load_image(i) for i in range(3)]
    tokens = np.asarray(found.tokens[[0, 1, 2]])[:, found.views]
    torch.testing.assert_close(predictor(images, dataset.labels[:3], u[:3], tokens, found.trunk),
                               predictor(images, dataset.labels[:3], u[:3]), atol=2e-3, rtol=0)
    # a frozen run sharing the folder: its untouched backbone matches the trunk cache too, but it reads the
    # full-depth cache as soon as one is there
    frozen = make_recipe(tmp_path, voc_root, "frozen", train={**common, "unfreeze_blocks": 0,
                                                              "feature_cache_dir": str(folder.parent)})
    run_train(frozen)
    frozen_net, _ = load_checkpoint(frozen.run_dir("train") / "weights" / "last.pt")
    assert len(list(folder.parent.iterdir())) == 2
    assert open_token_cache(frozen, frozen_net, dataset, 64, True).trunk is None
    with torch.no_grad():
        net.backbone.vit.blocks[3].mlp.fc2.bias.add_(0.1)  # a block inside the trunk changed: not usable
    assert open_token_cache(trunk, net, dataset, 64, True) is None


def test_missing_clusters_is_a_clear_error(tmp_path, voc_root):
    from cpcx.train import run_train

    with pytest.raises(CpcxError, match=r"clusters.json: no clusters yet; run `cpcx clusters -r <recipe>` first"):
        run_train(make_recipe(tmp_path, voc_root, "noclusters", clusters=False))


# --------------------------------------------------------------------------------------------- DDP
def _gradients(voc_root: Path, world: int, rank: int) -> dict[str, torch.Tensor]:
    """One training step on images 0..3 (this process's share of them) → the gradients after backward."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from cpcx.augment import TrainTransform
    from cpcx.data import ImageLabelDataset, build_dataset
    from cpcx.model import cluster_vectors
    from cpcx.recipe import AugmentConfig, LossConfig, ModelConfig, VOCDatasetConfig
    from cpcx.train import EpochSampler, TrainingItems, forward_loss

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", pretrained=False, img_size=64, cluster_dim=16, dropout=0.0)
    net = build_model(cfg, 21, 4)
    net.backbone.set_trainable_blocks(1)
    images = ImageLabelDataset(build_dataset(VOCDatasetConfig(root=voc_root, limit=4), "train"))
    matrix = np.eye(4)[np.arange(20) % 4]
    u = torch.from_numpy(cluster_vectors(images.labels.numpy(), matrix))
    transform = TrainTransform(AugmentConfig(), 64, net.mean, net.std, views=["orig", "hflip"])
    items = TrainingItems(images.labels, u, 0, images=images, transform=transform)
    batch = next(iter(DataLoader(items, batch_size=4 // world, sampler=EpochSampler(4, 0, 0, world, rank))))
    model = DistributedDataParallel(net) if world > 1 else net
    forward_loss(model, net, batch, LossConfig(), torch.device("cpu"), "fp32", cached=False)["loss"].backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, voc_root: str, out: str) -> None:
    from cpcx import distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.joined("cpu") as info:  # as cpcx train joins and leaves
        assert info.created_group and torch.distributed.get_backend() == "gloo"
        grads = _gradients(Path(voc_root), world, rank)
        torch.save(grads, Path(out) / f"grads{rank}.pt")
    distributed.end_rank(0)  # as `cpcx`'s main ends a rank: no interpreter teardown, where gloo can abort


def test_two_process_ddp_step_equals_one_process(tmp_path, voc_root):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(voc_root), str(tmp_path)), nprocs=2, join=True)
    single = _gradients(voc_root, 1, 0)
    assert "backbone.vit.blocks.11.mlp.fc2.weight" in single and "cluster_token.G" in single
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert set(ddp) == set(single)
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_extraction_gets_its_own_cache_key():
    """Tokens extracted under bf16 autocast differ from fp32 ones: another key, so neither is read as the other;
    fp32 keys carry no tag (the folders of caches built before stay valid)."""
    from cpcx.feature_cache import autocast_tag, cache_key
    from cpcx.model.backbone import build_backbone

    vit = build_backbone("test_vit", pretrained=False)
    cpu = torch.device("cpu")
    fp32 = cache_key("test_vit", vit, 64, ["orig"], ["a"], autocast=autocast_tag(cpu, "fp32"))
    auto = cache_key("test_vit", vit, 64, ["orig"], ["a"], autocast=autocast_tag(cpu, "auto"))
    bf16 = cache_key("test_vit", vit, 64, ["orig"], ["a"], autocast=autocast_tag(cpu, "bf16"))
    assert fp32 == auto == cache_key("test_vit", vit, 64, ["orig"], ["a"]) and "autocast" not in fp32
    assert bf16["autocast"] == "bf16" and bf16 != fp32
    assert autocast_tag(torch.device("cuda"), "auto") == "bf16"  # auto is bf16 on a GPU
