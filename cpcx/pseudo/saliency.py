"""``pseudo.saliency``: a class-agnostic salient-object network places the object/background boundary.

The pseudo-labels' largest error is where object ends and background begins (docs/results.md 8j, 8k): the maps
rank the patches well, but on a 24×24 grid the boundary lands up to a patch off, and the dense CRF's colours do not
move it to where the masks put it. A salient-object network trained for pixel-accurate foreground (ISNet of DIS,
Qin et al. ECCV 2022; ``cpcx weights import isnet``) sees the image at 1024² and draws that boundary sharply, but it
knows nothing of classes and misses objects that are not the main subject. So it is mixed in, not obeyed: at each
pixel, with saliency s and weight w,

    background ← background^(1−w) · (1−s)^w,    object class c ← p_c^(1−w) · s^w,

renormalised over the image's classes. Two object classes keep their order at every pixel (their ratio is only
flattened, as by a temperature), so the class still comes from the network; what moves is how much is object. Where one object class is present the saliency is the
right prior (``weight``); where several are, the less salient ones are its misses, so it weighs less
(``weight_multi``).

The maps are computed once per image by ``pseudo.workers`` single-threaded processes, before the labelling, and kept
as 8-bit PNGs at the image's size in a folder named by the network, its input size and the data set
(``saliency_folder``): a
killed stage resumes without computing them again, and another run over the same images can share them
(``pseudo.saliency.cache_dir``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cpcx.errors import CpcxError

#: Saliency is clipped to [EPS, 1 − EPS] before it is mixed in: a map of exact zeros must not erase a class.
EPS = 1e-4
#: Per process: the ONNX sessions loaded so far, by path (a worker labels many images with one network).
_SESSIONS: dict[str, object] = {}


def fuse(full: torch.Tensor, classes: np.ndarray, saliency: np.ndarray, weight: float) -> torch.Tensor:
    """The upsampled maps of one image (k, H, W) over its ``classes`` (0 = background, when present) with the
    saliency (H, W, in [0, 1]) mixed in at ``weight`` (module docstring); a distribution over the classes again."""
    if weight <= 0 or 0 not in classes:  # no background among the classes: nothing for the saliency to decide
        return full
    s = torch.from_numpy(np.clip(saliency, EPS, 1 - EPS)).to(full.device, torch.float32)
    out = full.float().clamp_min(1e-12).pow(1 - weight)
    is_background = torch.as_tensor(np.asarray(classes) == 0, device=full.device)
    prior = torch.where(is_background[:, None, None], (1 - s)[None], s[None]).pow(weight)
    out = out * prior
    return (out / out.sum(0, keepdim=True)).to(full.dtype)


def _session(path: str):
    if path not in _SESSIONS:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CpcxError("pseudo.saliency runs its network with onnxruntime, which is not installed; "
                            "pip install 'cpcx[weights]' (or onnxruntime)") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # one process per core (pseudo.workers)
        try:
            _SESSIONS[path] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a graph
            raise CpcxError(f"{path}: not a saliency network onnxruntime can load ({exc}); build it with "
                            "`cpcx weights import isnet --out <file>`") from None
    return _SESSIONS[path]


def predict(path: str, image: np.ndarray, size: int) -> np.ndarray:
    """Saliency (H, W) float32 in [0, 1] of an (H, W, 3) uint8 image: the network at ``size``² (bilinear), its first
    output resized back to the image. Input as ISNet's browser and node builds feed it: (x − 128) / 256."""
    from PIL import Image

    session = _session(path)
    declared = session.get_inputs()[0].shape[-2:]
    if any(isinstance(d, int) and d != size for d in declared):
        raise CpcxError(f"{path}: the saliency network takes {declared[0]}×{declared[1]} inputs, not {size}×{size}; "
                        f"set pseudo.saliency.size: {declared[-1]}")
    x = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)
    x = ((x - 128.0) / 256.0).transpose(2, 0, 1)[None]
    out = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0], np.float32)
    if out.size != size * size:
        raise CpcxError(f"{path}: the saliency network returned shape {list(out.shape)}, not one {size}×{size} map; "
                        "pseudo.saliency.size must be the network's input size")
    out = out.reshape(size, size).clip(0, 1)
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(out).resize((width, height), Image.BILINEAR), np.float32).clip(0, 1)


def _compute(path: str, size: int, image: np.ndarray, out: Path) -> str:
    """Worker task: one image's saliency written atomically as an 8-bit PNG."""
    from PIL import Image

    from cpcx import atomic

    saliency = np.round(predict(path, image, size) * 255).astype(np.uint8)
    atomic.write_with(out, lambda handle: Image.fromarray(saliency).save(handle, format="PNG"))
    return out.name


def load_map(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, np.float32) / 255.0


def saliency_folder(cfg, stage_dir: Path, dataset) -> Path:
    """Where one network at one input size keeps the maps of one data set's images: ``<cache_dir or the stage
    folder>/saliency/<network hash>-<size>-<data set hash>`` (maps are named by image id, which two data sets can
    share)."""
    from cpcx import atomic

    root = cfg.cache_dir if cfg.cache_dir is not None else stage_dir
    source = hashlib.sha256(str(dataset.source).encode()).hexdigest()[:8]
    return Path(root) / "saliency" / f"{atomic.file_sha256(cfg.weights)[:12]}-{cfg.size}-{source}"


class SaliencyMix:
    """``pseudo.saliency`` inside the labelling: ``mix(i, full, classes)`` → the maps with image i's saliency mixed
    in, the weight chosen by its scene (one object class or several)."""

    def __init__(self, cfg, dataset, folder: Path):
        from cpcx.pseudo.context_paste import multi_class

        self.cfg, self.dataset, self.folder = cfg, dataset, folder
        self.multi = multi_class(dataset.labels)

    def path(self, i: int) -> Path:
        return self.folder / f"{self.dataset.ids[i]}.png"

    def ensure(self, indices: Sequence[int], workers: int, console, label=None) -> None:
        """Compute the maps of ``indices`` that are not on disk yet (``workers`` processes, with progress)."""
        from concurrent.futures.process import BrokenProcessPool

        from cpcx import atomic
        from cpcx.crf import broken_pool_error, crf_pool
        from cpcx.pseudo.labelling import remove_torn_files, with_progress
        from cpcx.runs import output_written

        atomic.ensure_dir(self.folder)
        remove_torn_files(self.folder)
        todo = [i for i in indices if not output_written(self.path(i))]
        if not todo:
            return
        console.print(f"saliency: {len(todo)} maps at {self.cfg.size}² by {self.cfg.weights.name} "
                      f"({workers} process(es)) → {self.folder}")

        def work(advance) -> None:
            pool = crf_pool(workers)
            try:
                futures = []
                for i in todo:  # images are read here; a bounded queue keeps memory flat
                    futures.append(pool.submit(_compute, str(self.cfg.weights), self.cfg.size,
                                               self.dataset.load_image(i), self.path(i)))
                    if len(futures) >= 2 * workers:
                        futures.pop(0).result()
                        advance(1)
                for future in futures:
                    future.result()
                    advance(1)
            except BrokenProcessPool:
                raise broken_pool_error(pool, "pseudo.saliency", "the finished maps are kept", "pseudo.workers",
                                        kind="saliency") from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        with_progress(console, len(todo), work, label=label or "saliency")

    def map(self, i: int) -> np.ndarray:
        """Image i's saliency (H, W) in [0, 1], read back (or computed here, once, when missing: another rank's
        share, or a map removed since)."""
        path = self.path(i)
        if not path.is_file():
            _compute(str(self.cfg.weights), self.cfg.size, self.dataset.load_image(i), path)
        return load_map(path)

    def __call__(self, i: int, full: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        path, saliency = self.path(i), self.map(i)
        if saliency.shape != tuple(full.shape[1:]):
            raise CpcxError(f"{path}: saliency map of {saliency.shape[1]}×{saliency.shape[0]} for an image of "
                            f"{full.shape[2]}×{full.shape[1]}; delete the folder {self.folder} and re-run")
        weight = self.cfg.weight_multi if self.multi[i] else self.cfg.weight
        return fuse(full, classes, saliency, weight)
