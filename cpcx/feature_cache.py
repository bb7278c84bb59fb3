"""Frozen-backbone feature cache: the ViT's patch tokens, computed once per image and per view, on disk.

While the backbone is frozen (the whole run with ``train.unfreeze_blocks: 0``, or the warm-up epochs) the
ViT gives the same tokens for the same input every epoch, so they are computed once for every image and
every geometric view in ``train.views`` (the ViT runs on each view: it is not flip-equivariant) and stored
as float16 in one memory-mapped ``.npy`` of shape (N, V, h, w, e). Epochs then skip the ViT entirely.

Consequence: **no photometric augmentation** (crop, colour jitter, grayscale) in cached epochs: only the
choice of view varies. Set ``train.feature_cache: false`` to have them (at the cost of the ViT each step).

A *trunk* cache (``train.trunk_cache`` with ``train.unfreeze_blocks: n``) stops before the last n blocks and
stores every token the next block reads, class and register tokens included, as (N, V, prefix + h·w, e):
the first blocks never train, so every epoch (warm-up and fine-tuning alike) runs only the last n blocks on
the stored tokens. Its key hashes only the weights it depends on (``trunk_blocks`` in the key), so training
the last blocks does not invalidate it and the pseudo-label stage can reuse it.

Layout: ``runs/<name>/train/features/<key>/{tokens.npy, meta.json}``. The key hashes the backbone name,
the backbone weights (their bytes), img_size, views, normalisation and the data set ids, so any change
builds a new cache (and the old one is removed). Building writes ``tokens.partial.npy`` plus a ``done.npy``
flag per image, so an interrupted build resumes; the finished file is renamed into place atomically.
With several processes each one extracts its share of the images into the same file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cpcx import atomic, distributed
from cpcx.augment import apply_view, normalize, resize_image
from cpcx.data.views import ImageLabelDataset
from cpcx.device import autocast, autocast_dtype
from cpcx.model.backbone import ViTBackbone
from cpcx.progress import PlainProgress

FORMAT = 1


def weights_digest(module: torch.nn.Module, skip: Callable[[str], bool] = lambda name: False) -> str:
    """Hash of a module's parameters and buffers (names, dtypes, shapes, bytes), leaving out ``skip``'s names."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if skip(name):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_digest(backbone: ViTBackbone, depth: int | None) -> str:
    """Digest of the weights a cache of ``depth`` blocks depends on (None: the whole ViT, final tokens)."""
    return weights_digest(backbone, backbone.outside_trunk(backbone.num_blocks if depth is None else depth))


def trunk_depth(backbone: ViTBackbone, unfreeze_blocks: int) -> int:
    """The blocks a trunk cache computes: all but the ``unfreeze_blocks`` trained ones."""
    return max(0, backbone.num_blocks - unfreeze_blocks)


def autocast_tag(device: torch.device, precision: str) -> str | None:
    """"bf16" when extraction runs under bf16 autocast (then the tokens differ from fp32's), else None."""
    return None if autocast_dtype(device, precision) is None else "bf16"


def cache_key(backbone_name: str, backbone: ViTBackbone, img_size: int, views: Sequence[str],
              ids: Sequence[str], depth: int | None = None, autocast: str | None = None) -> dict:
    """``depth`` None (or the ViT's depth): final patch tokens; fewer: a trunk cache of that many blocks.
    ``autocast``: :func:`autocast_tag` of the extraction (bf16 tokens are not fp32 tokens)."""
    trunk = depth is not None and depth < backbone.num_blocks
    key = {
        "format": FORMAT,
        "backbone": backbone_name,
        "weights": cache_digest(backbone, depth if trunk else None),
        "img_size": img_size,
        "views": list(views),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "num_images": len(ids),
    }
    if getattr(backbone, "grid_tag", None):  # a CNN grid: which maps, how combined (absent for ViTs: old keys hold)
        key["grid"] = backbone.grid_tag
    if autocast:  # absent for fp32: keys (and folders) of the fp32 caches built before hold
        key["autocast"] = autocast
    if trunk:  # absent for full-depth caches: keys (and folders) of caches built before trunks existed hold
        key["trunk_blocks"] = depth
    return key


def cache_name(key: dict) -> str:
    """The folder name of the cache of ``key`` under its root."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class _Resized(Dataset):
    """Normalised, resized images (views are applied on the batch) for extraction."""

    def __init__(self, images: ImageLabelDataset, indices: Sequence[int], size: int, mean, std):
        self.images, self.indices, self.size, self.mean, self.std = images, list(indices), size, mean, std

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        return i, normalize(resize_image(self.images[i]["image"], self.size), self.mean, self.std)


class FeatureCache:
    """A finished cache: ``tokens`` is a read-only float16 memmap (N, V, h, w, e), or (N, V, prefix + h·w, e)
    for a trunk cache, whose ``depth`` is then the number of blocks it holds (else None)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.views: list[str] = self.meta["key"]["views"]
        self.depth: int | None = self.meta["key"].get("trunk_blocks")
        self.tokens = np.load(self.folder / "tokens.npy", mmap_mode="r", allow_pickle=False)

    def __getstate__(self) -> dict:
        # DataLoader workers get the folder, not the array: pickling a memmap would copy all of it.
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def get(self, index: int, view: int) -> torch.Tensor:
        """Tokens (h, w, e) or (T, e) float16 of one image and view (a copy, safe to hand to a DataLoader)."""
        return torch.from_numpy(np.array(self.tokens[index, view]))

    def get_all(self, index: int) -> torch.Tensor:
        """Tokens (V, h, w, e) float16 of one image in every view of the cache."""
        return torch.from_numpy(np.array(self.tokens[index]))

    @classmethod
    def build(cls, root: Path, backbone_name: str, backbone: ViTBackbone, images: ImageLabelDataset,
              img_size: int, views: Sequence[str], device: torch.device, precision: str, batch_size: int,
              workers: int, log: Callable[[str], None] = print, prune: bool = True,
              depth: int | None = None) -> "FeatureCache":
        """Open the cache for this key, building (or finishing) it first; every process must call this.

        ``prune`` drops the caches of other keys under ``root`` (a run's own folder holds one cache; a shared
        ``train.feature_cache_dir`` keeps every key, other recipes may still read them). ``depth`` < the ViT's
        depth builds a trunk cache (the tokens after that many blocks).
        """
        key = cache_key(backbone_name, backbone, img_size, views, images.ids, depth,
                        autocast_tag(device, precision))
        depth = key.get("trunk_blocks")
        name = cache_name(key)
        folder = Path(root) / name
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if rank == 0 and (folder / "meta.json").is_file():
            problem = check_finished(folder, key, _shape(key, backbone, img_size, len(views), depth))
            if problem:  # a torn or foreign file is never read as tokens: it goes, and is built again
                log(f"feature cache {folder}: {problem}; removed, rebuilding it")
                shutil.rmtree(folder, ignore_errors=True)
        distributed.barrier()
        if not (folder / "meta.json").is_file():  # meta.json is written last: it marks a finished cache
            if not (folder / "tokens.npy").is_file():
                if rank == 0:
                    for stale in Path(root).glob("*") if prune else ():
                        if stale.is_dir() and stale.name != name:
                            shutil.rmtree(stale, ignore_errors=True)
                    _prepare(folder, key, backbone, img_size, len(views), depth)
                distributed.barrier()
                _extract(folder, backbone, images, img_size, views, device, precision, batch_size, workers,
                         rank, world, log, depth)
                distributed.barrier()
            if rank == 0:
                _finish(folder, key)
            distributed.barrier()
        return cls(folder)


def _grid(backbone: ViTBackbone, img_size: int) -> tuple[int, int]:
    return backbone.grid_size(img_size, img_size)


def _shape(key: dict, backbone: ViTBackbone, img_size: int, num_views: int, depth: int | None) -> tuple:
    h, w = _grid(backbone, img_size)
    grid = (h, w) if depth is None else (backbone.vit.num_prefix_tokens + h * w,)
    return (key["num_images"], num_views, *grid, backbone.embed_dim)


def check_finished(folder: Path, key: dict, shape: tuple) -> str | None:
    """What is wrong with a finished cache (None: nothing): meta.json must hold ``key`` and tokens.npy be a
    float16 array of ``shape`` whose bytes are all there. Read with ``allow_pickle=False``: an object array
    (a pickle) is refused, never unpickled."""
    try:
        if json.loads((folder / "meta.json").read_text()).get("key") != key:
            return "meta.json does not hold this cache's key"
    except (OSError, ValueError, AttributeError):
        return "meta.json is unreadable"
    path = folder / "tokens.npy"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                return f"tokens.npy is unreadable (.npy format {version}, which cpcx never writes)"
            found, _, dtype = readers[version](handle)  # the header only: nothing is unpickled
            offset = handle.tell()
    except (OSError, ValueError, EOFError) as exc:
        return f"tokens.npy is unreadable ({type(exc).__name__})"
    if dtype != np.float16 or tuple(found) != tuple(shape):
        return f"tokens.npy holds {dtype} {tuple(found)}, not float16 {tuple(shape)}"
    expected = offset + int(np.prod(shape)) * 2
    if path.stat().st_size < expected:
        return f"tokens.npy is truncated ({path.stat().st_size} of {expected} bytes)"
    return None


def _prepare(folder: Path, key: dict, backbone: ViTBackbone, img_size: int, num_views: int,
             depth: int | None) -> None:
    """Create (or keep, when resuming) the partial token file and the per-image done flags."""
    atomic.ensure_dir(folder)
    shape = _shape(key, backbone, img_size, num_views, depth)
    partial, done = folder / "tokens.partial.npy", folder / "done.npy"
    if partial.is_file() and done.is_file():
        try:
            tokens = np.load(partial, mmap_mode="r", allow_pickle=False)
            flags = np.load(done, mmap_mode="r", allow_pickle=False)
            if tokens.shape == shape and tokens.dtype == np.float16 and flags.shape == shape[:1]:
                return  # resume the interrupted build
        except (ValueError, OSError, EOFError):  # a torn header or file: start over
            pass
    np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape).flush()
    np.lib.format.open_memmap(done, mode="w+", dtype=np.uint8, shape=shape[:1]).flush()


@torch.inference_mode()
def _extract(folder: Path, backbone: ViTBackbone, images: ImageLabelDataset, img_size: int,
             views: Sequence[str], device: torch.device, precision: str, batch_size: int, workers: int,
             rank: int, world: int, log: Callable[[str], None], depth: int | None = None) -> None:
    tokens = np.load(folder / "tokens.partial.npy", mmap_mode="r+")
    done = np.load(folder / "done.npy", mmap_mode="r+")
    remaining = np.flatnonzero(done == 0).tolist()
    distributed.barrier()  # every process has read the flags before any writes new ones
    todo = remaining[rank::world]
    if not todo:
        return
    if rank == 0:
        what = "" if depth is None else f" (trunk: the first {depth} blocks)"
        log(f"feature cache: extracting {len(views)} view(s) of {len(remaining)} image(s){what} into {folder}")
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(_Resized(images, todo, img_size, backbone.mean, backbone.std), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    report = PlainProgress("feature cache", len(todo), log if rank == 0 else (lambda text: None))
    for indices, batch in loader:
        batch = batch.to(device)
        stacked = torch.cat([apply_view(batch, v) for v in views])  # (V·b, 3, S, S)
        with autocast(device, precision):
            out = backbone(stacked) if depth is None else backbone.forward_trunk(stacked, depth)
        out = out.float().reshape(len(views), len(indices), *out.shape[1:]).transpose(0, 1)
        idx = indices.numpy()
        tokens[idx] = out.cpu().numpy().astype(np.float16)
        tokens.flush()  # the tokens reach the file before the flag that says they are there
        done[idx] = 1
        done.flush()
        report(len(idx))
    backbone.train(was_training)


def _finish(folder: Path, key: dict) -> None:
    if (folder / "tokens.partial.npy").is_file():
        done = np.load(folder / "done.npy", mmap_mode="r")
        if not bool(done.all()):
            raise RuntimeError(f"feature cache {folder}: {int((done == 0).sum())} image(s) missing after extraction")
        with open(folder / "tokens.partial.npy", "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(folder / "tokens.partial.npy", folder / "tokens.npy")
        (folder / "done.npy").unlink()
    atomic.write_json(folder / "meta.json", {"key": key})
