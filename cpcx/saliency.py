"""A class-agnostic salient-object network that places the object/background boundary at the image's resolution.

The maps of cpcx's networks are decided on a patch grid (24×24 for voc-mini), and the dense CRF's colours do not move
their boundary to where the masks put it (docs/results.md 8j, 8k). A salient-object network trained for
pixel-accurate foreground (ISNet of DIS, Qin et al. ECCV 2022; ``cpcx weights import isnet``) sees the image at 1024²
and draws that boundary sharply, but it knows nothing of classes and misses objects that are not the main subject. So
it is mixed in, not obeyed: at each pixel, with saliency s and weight w,

    background ← background^(1−w) · (1−s)^w,    object class c ← p_c^(1−w) · s^w,

renormalised over the classes. Two object classes keep their order at every pixel (their ratio is only flattened, as
by a temperature), so the class still comes from the network; what moves is how much is object.

Two stages use it: ``pseudo.saliency`` on the training images' maps before the CRF (``cpcx.pseudo.saliency``, with a
weight by scene) and ``segment.saliency`` on the segmenter's probabilities, for the val predictions of
``cpcx segment`` and for ``cpcx predict`` (one weight: a new image has no labels). The maps of a data set are computed
once, by single-threaded processes, and kept as 8-bit PNGs at the image's size in a folder named by the network, its
input size and the data set (``saliency_folder``): a killed stage resumes without computing them again, and runs over
the same images share them (``cache_dir``).
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
#: Per process: the ONNX sessions loaded so far, by (path, threads) (a worker labels many images with one network).
_SESSIONS: dict[tuple[str, int], object] = {}


def fuse(full: torch.Tensor, classes: np.ndarray, saliency: np.ndarray, weight: float,
         add_only: bool = False) -> torch.Tensor:
    """Maps (k, H, W) over ``classes`` (0 = background, when present) with the saliency (H, W, in [0, 1]) mixed in at
    ``weight`` (module docstring); a distribution over the classes again. ``add_only``: the saliency may make a pixel
    more object, never less (s is raised to the maps' own object probability where they call more object than it)."""
    if weight <= 0 or 0 not in classes:  # no background among the classes: nothing for the saliency to decide
        return full
    is_background = torch.as_tensor(np.asarray(classes) == 0, device=full.device)
    s = torch.from_numpy(np.asarray(saliency, np.float32)).to(full.device, torch.float32)
    if add_only:
        s = torch.maximum(s, 1 - full[is_background].float().sum(0))
    s = s.clamp(EPS, 1 - EPS)
    out = full.float().clamp_min(1e-12).pow(1 - weight)
    prior = torch.where(is_background[:, None, None], (1 - s)[None], s[None]).pow(weight)
    out = out * prior
    return (out / out.sum(0, keepdim=True)).to(full.dtype)


def mix_prediction(probs: torch.Tensor, saliency: np.ndarray, weight: float) -> torch.Tensor:
    """``segment.saliency``: a segmenter's probabilities (C, H, W) over every class, background first, with the
    saliency mixed in at ``weight``."""
    return fuse(probs, np.arange(probs.shape[0]), saliency, weight)


def _session(path: str, threads: int):
    if (path, threads) not in _SESSIONS:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CpcxError("the saliency network runs with onnxruntime, which is not installed; "
                            "pip install 'cpcx[weights]' (or onnxruntime)") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 1 in the map workers: one process per core
        options.inter_op_num_threads = 1
        try:
            _SESSIONS[path, threads] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a graph
            raise CpcxError(f"{path}: not a saliency network onnxruntime can load ({exc}); build it with "
                            "`cpcx weights import isnet --out <file>`") from None
    return _SESSIONS[path, threads]


def check_network(path, size: int, section: str, threads: int = 1):
    """The network's session, its input size checked (called first, so that a wrong file fails before any output
    is written)."""
    session = _session(str(path), threads)
    declared = session.get_inputs()[0].shape[-2:]
    if any(isinstance(d, int) and d != size for d in declared):
        raise CpcxError(f"{path}: the saliency network takes {declared[0]}×{declared[1]} inputs, not {size}×{size}; "
                        f"set {section}.size: {declared[-1]}")
    return session


def predict(path: str, image: np.ndarray, size: int, section: str = "pseudo.saliency", threads: int = 1) -> np.ndarray:
    """Saliency (H, W) float32 in [0, 1] of an (H, W, 3) uint8 image: the network at ``size``² (bilinear), its first
    output resized back to the image. Input as ISNet's browser and node builds feed it: (x − 128) / 256. ``section``
    names the recipe section in messages."""
    from PIL import Image

    session = check_network(path, size, section, threads)
    x = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)
    x = ((x - 128.0) / 256.0).transpose(2, 0, 1)[None]
    out = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0], np.float32)
    if out.size != size * size:
        raise CpcxError(f"{path}: the saliency network returned shape {list(out.shape)}, not one {size}×{size} map; "
                        f"{section}.size must be the network's input size")
    out = out.reshape(size, size).clip(0, 1)
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(out).resize((width, height), Image.BILINEAR), np.float32).clip(0, 1)


def _compute(path: str, size: int, image: np.ndarray, out: Path, section: str) -> str:
    """Worker task: one image's saliency written atomically as an 8-bit PNG."""
    from PIL import Image

    from cpcx import atomic

    saliency = np.round(predict(path, image, size, section) * 255).astype(np.uint8)
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


class SaliencyMaps:
    """The saliency maps of a data set's images in ``folder``: computed by ``ensure`` (processes, progress, resumable)
    and read back by ``map``. ``section`` (``pseudo.saliency`` or ``segment.saliency``) names the recipe section whose
    network (``cfg.weights``, ``cfg.size``) they come from, and ``workers_field`` the setting of their processes."""

    def __init__(self, cfg, dataset, folder: Path, section: str = "pseudo.saliency",
                 workers_field: str = "pseudo.workers"):
        self.cfg, self.dataset, self.folder = cfg, dataset, folder
        self.section, self.workers_field = section, workers_field

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
        workers = max(1, workers)
        console.print(f"saliency: {len(todo)} maps at {self.cfg.size}² by {self.cfg.weights.name} "
                      f"({workers} process(es)) → {self.folder}")

        def work(advance) -> None:
            pool = crf_pool(workers)
            try:
                futures = []
                for i in todo:  # images are read here; a bounded queue keeps memory flat
                    futures.append(pool.submit(_compute, str(self.cfg.weights), self.cfg.size,
                                               self.dataset.load_image(i), self.path(i), self.section))
                    if len(futures) >= 2 * workers:
                        futures.pop(0).result()
                        advance(1)
                for future in futures:
                    future.result()
                    advance(1)
            except BrokenProcessPool:
                raise broken_pool_error(pool, self.section, "the finished maps are kept", self.workers_field,
                                        kind="saliency") from None
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        with_progress(console, len(todo), work, label=label or "saliency")

    def map(self, i: int, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Image i's saliency (H, W) in [0, 1], read back (or computed here, once, when missing: another rank's
        share, or a map removed since); checked against the ``shape`` of the maps it will be mixed into."""
        path = self.path(i)
        if not path.is_file():
            _compute(str(self.cfg.weights), self.cfg.size, self.dataset.load_image(i), path, self.section)
        saliency = load_map(path)
        if shape is not None and saliency.shape != tuple(shape):
            raise CpcxError(f"{path}: saliency map of {saliency.shape[1]}×{saliency.shape[0]} for an image of "
                            f"{shape[1]}×{shape[0]}; delete the folder {self.folder} and re-run")
        return saliency
