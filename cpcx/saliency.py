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


def _session(path: str, threads: int, size: int | None = None, field: str = "pseudo.saliency.size"):
    """The ONNX session of the network at ``path`` (cached per process); with ``size``, rebuilt for size² inputs when
    its graph declares another fixed size (``_resized_graph``)."""
    key = (path, threads, size)
    if key not in _SESSIONS:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CpcxError("the saliency network runs with onnxruntime, which is not installed; "
                            "pip install 'cpcx[weights]' (or onnxruntime)") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 1 in the map workers: one process per core
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a graph
            raise CpcxError(f"{path}: not a saliency network onnxruntime can load ({exc}); build it with "
                            "`cpcx weights import isnet --out <file>`") from None
        declared = session.get_inputs()[0].shape[-2:]
        if size is not None and any(isinstance(d, int) and d != size for d in declared):
            session = ort.InferenceSession(_resized_graph(path, size, field), options,
                                           providers=["CPUExecutionProvider"])
        _SESSIONS[key] = session
    return _SESSIONS[key]


def _resized_graph(path: str, size: int, field: str) -> bytes:
    """The graph at ``path`` rebuilt for size² inputs, or a CpcxError naming the sizes it can take (and ``field``, the
    recipe setting to change).

    ISNet is fully convolutional, but its export traced every upsampling at 1024²: each Resize takes its target size
    from a Concat of the batch and channel dimensions and a constant (h, w). Scaling those constants (and the declared
    input and output shapes) by size / 1024 gives the same network at another size, exactly when every constant
    scales to a whole number, as do its declared side outputs (ISNet: multiples of 64, where every pooling halves
    exactly). A graph built otherwise is refused rather than guessed at."""
    import math

    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph = model.graph
    declared = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    producers = {out: node for node in graph.node for out in node.output}
    targets = []
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        concat = producers.get(node.input[3]) if len(node.input) > 3 else None
        constant = producers.get(concat.input[-1]) if concat is not None and concat.op_type == "Concat" else None
        if constant is None or constant.op_type != "Constant":
            targets = []
            break
        targets.append(constant.attribute[0].t)
    if not targets or not declared:
        raise CpcxError(f"{path}: the saliency network takes {declared}×{declared} inputs, not {size}×{size}, and is "
                        f"not built the way cpcx can resize (ISNet's upsampling); set {field}: {declared}")
    values = [numpy_helper.to_array(t) for t in targets]
    outputs = [d.dim_value for o in graph.output for d in o.type.tensor_type.shape.dim[2:] if d.HasField("dim_value")]
    step = declared // math.gcd(declared, *[int(v) for a in values for v in a.ravel()], *outputs)
    if size % step:
        raise CpcxError(f"{path}: the saliency network runs at multiples of {step} px (it was built at {declared}), "
                        f"not {size}; set {field}: {max(step, round(size / step) * step)}")
    for tensor, value in zip(targets, values):
        tensor.CopyFrom(numpy_helper.from_array((value * size // declared).astype(value.dtype), tensor.name))
    for value_info in [*graph.input, *graph.output]:
        dims = value_info.type.tensor_type.shape.dim
        for dim in dims[2:]:
            if dim.HasField("dim_value"):
                dim.dim_value = dim.dim_value * size // declared
    del graph.value_info[:]  # the traced intermediate shapes: onnxruntime infers them again
    return model.SerializeToString()


def check_network(path, size: int, section: str, threads: int = 1, field: str | None = None):
    """The network's session at ``size``² (called first, so that a wrong file or size fails before any output is
    written); ``field``, the setting that gave the size (default ``<section>.size``), is named in messages."""
    return _session(str(path), threads, size, field or f"{section}.size")


def predict(path: str, image: np.ndarray, size: int, section: str = "pseudo.saliency", threads: int = 1) -> np.ndarray:
    """Saliency (H, W) float32 in [0, 1] of an (H, W, 3) uint8 image: the network at ``size``² (bilinear), its first
    output resized back to the image. Input as ISNet's browser and node builds feed it: (x − 128) / 256. ``section``
    names the recipe section in messages."""
    from PIL import Image

    session = check_network(path, size, section, threads)
    out = np.asarray(session.run(None, {session.get_inputs()[0].name: network_input(image, size)})[0], np.float32)
    if out.size != size * size:
        raise CpcxError(f"{path}: the saliency network returned shape {list(out.shape)}, not one {size}×{size} map; "
                        f"{section}.size must be the network's input size")
    out = out.reshape(size, size).clip(0, 1)
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(out).resize((width, height), Image.BILINEAR), np.float32).clip(0, 1)


def network_input(image: np.ndarray, size: int) -> np.ndarray:
    """(1, 3, size, size) float32 input of an (H, W, 3) uint8 image, as ISNet's browser and node builds feed it."""
    from PIL import Image

    x = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)
    return ((x - 128.0) / 256.0).transpose(2, 0, 1)[None]


def network_graph(path, size: int, field: str) -> bytes:
    """The network's graph at size² inputs: the file's own, or rebuilt (``_resized_graph``, which refuses a size it
    cannot take with one line naming ``field``)."""
    declared = _session(str(path), 1).get_inputs()[0].shape[-2:]
    if any(isinstance(d, int) and d != size for d in declared):
        return _resized_graph(str(path), size, field)
    return Path(path).read_bytes()


def erase(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 image with its salient part painted over by the mean colour of the rest, in proportion to
    the saliency (H, W): what a further pass of the network sees, so that the next most salient object stands out."""
    x = image.astype(np.float32)
    salient = np.asarray(saliency, np.float32)[..., None]
    rest = 1.0 - salient
    fill = (x * rest).sum((0, 1)) / max(float(rest.sum()), 1e-6)
    return np.round(x * rest + fill * salient).clip(0, 255).astype(np.uint8)


def _compute(path: str, size: int, image: np.ndarray, out: Path, section: str, passes: int = 1,
             first: Path | None = None, later_size: int | None = None, later_path: str | None = None) -> str:
    """Worker task: one image's saliency written atomically as an 8-bit PNG. With ``passes`` > 1 the maximum of the
    passes, each after the first at ``later_size``² (default ``size``; by the network at ``later_path``, default
    ``path``) on the image with the union of the earlier ones erased (``erase``); the first pass is read from
    ``first`` (its 8-bit map, computed by the one-pass maps) when given, not run again."""
    from PIL import Image

    from cpcx import atomic

    saliency = load_map(first) if first is not None else predict(path, image, size, section)
    for _ in range(passes - 1):
        later = predict(later_path or path, erase(image, saliency), later_size or size, section)
        saliency = np.maximum(saliency, later)
    saliency = np.round(saliency * 255).astype(np.uint8)
    atomic.write_with(out, lambda handle: Image.fromarray(saliency).save(handle, format="PNG"))
    return out.name


def load_map(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, np.float32) / 255.0


def saliency_folder(cfg, stage_dir: Path, dataset, passes: int = 1, later_size: int | None = None) -> Path:
    """Where one network at one input size keeps the maps of one data set's images: ``<cache_dir or the stage
    folder>/saliency/<network hash>-<size>[-p<passes>x<later size>]-<data set hash>`` (maps are named by image id,
    which two data sets can share)."""
    from cpcx import atomic

    root = cfg.cache_dir if cfg.cache_dir is not None else stage_dir
    source = _source_tag(dataset)
    passes_tag = f"-p{passes}x{later_size or cfg.size}" if passes > 1 else ""
    int8 = "-int8" if getattr(cfg, "precision", "float") == "int8" else ""
    return Path(root) / "saliency" / f"{atomic.file_sha256(cfg.weights)[:12]}-{cfg.size}{int8}{passes_tag}-{source}"


def _source_tag(dataset) -> str:
    return hashlib.sha256(str(dataset.source).encode()).hexdigest()[:8]


class SaliencyMaps:
    """The saliency maps of a data set's images in ``folder``: computed by ``ensure`` (processes, progress, resumable)
    and read back by ``map``. ``section`` (``pseudo.saliency`` or ``segment.saliency``) names the recipe section whose
    network (``cfg.weights``, ``cfg.size``) they come from, and ``workers_field`` the setting of their processes.
    ``passes`` > 1: the maps of ``erase``'s further passes (at ``later_size``²), which start from the one-pass maps of
    ``first`` (computed there first, and kept for the images that need one pass)."""

    def __init__(self, cfg, dataset, folder: Path, section: str = "pseudo.saliency",
                 workers_field: str = "pseudo.workers", passes: int = 1, first: "SaliencyMaps | None" = None,
                 later_size: int | None = None):
        self.cfg, self.dataset, self.folder = cfg, dataset, folder
        self.section, self.workers_field = section, workers_field
        self.passes, self.first, self.later_size = passes, first, later_size
        self._networks: dict[int, Path] = {}

    def network(self, size: int, console=None) -> Path:
        """The file that maps at size²: the recipe's network, or with ``precision: int8`` that network quantized for
        this data set at this size (``cpcx.saliency_int8``), built here once, on the data set's first images, and
        kept beside the maps."""
        if size not in self._networks:
            path = Path(self.cfg.weights)
            if getattr(self.cfg, "precision", "float") == "int8":
                from cpcx import atomic
                from cpcx.saliency_int8 import CALIBRATION_IMAGES, quantized_network

                field = f"{self.section}.size" if size == self.cfg.size else f"{self.section}.size_later"
                calibration = range(min(CALIBRATION_IMAGES, len(self.dataset.ids)))
                path = quantized_network(
                    lambda: network_graph(self.cfg.weights, size, field),
                    lambda: [network_input(self.dataset.load_image(i), size) for i in calibration],
                    self.folder.parent / f"{atomic.file_sha256(self.cfg.weights)[:12]}-{size}-int8-"
                                         f"{_source_tag(self.dataset)}.onnx", console)
            self._networks[size] = path
        return self._networks[size]

    def _task(self, i: int, image: np.ndarray) -> tuple:
        first = None if self.first is None else self.first.path(i)
        later = str(self.network(self.later_size)) if self.passes > 1 and self.later_size else None
        return (str(self.network(self.cfg.size)), self.cfg.size, image, self.path(i), self.section, self.passes,
                first, self.later_size, later)

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
        if self.first is not None:
            self.first.ensure(indices, workers, console, label)
        todo = [i for i in indices if not output_written(self.path(i))]
        if not todo:
            return
        workers = max(1, workers)
        # the sizes checked here, once: a size the network cannot take fails with one line before any worker starts
        if self.passes == 1 or self.first is None:
            check_network(self.network(self.cfg.size, console), self.cfg.size, self.section)
        if self.passes > 1 and self.later_size:
            check_network(self.network(self.later_size, console), self.later_size, self.section,
                          field=f"{self.section}.size_later")
        passes = f", {self.passes} passes (then {self.later_size or self.cfg.size}²)" if self.passes > 1 else ""
        int8 = " (int8)" if getattr(self.cfg, "precision", "float") == "int8" else ""
        console.print(f"saliency: {len(todo)} maps at {self.cfg.size}²{passes} by {self.cfg.weights.name}{int8} "
                      f"({workers} process(es)) → {self.folder}")

        def work(advance) -> None:
            pool = crf_pool(workers)
            try:
                futures = []
                for i in todo:  # images are read here; a bounded queue keeps memory flat
                    futures.append(pool.submit(_compute, *self._task(i, self.dataset.load_image(i))))
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
            if self.first is not None:
                self.first.map(i, shape)
            _compute(*self._task(i, self.dataset.load_image(i)))
        saliency = load_map(path)
        if shape is not None and saliency.shape != tuple(shape):
            raise CpcxError(f"{path}: saliency map of {saliency.shape[1]}×{saliency.shape[0]} for an image of "
                            f"{shape[1]}×{shape[0]}; delete the folder {self.folder} and re-run")
        return saliency
