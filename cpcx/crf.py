"""Dense CRF refinement of pseudo-labels (Krähenbühl & Koltun 2011) with pydensecrf.

Conventions follow ViT-PCM's post-processing (itself the DeepLab one): the unary is the negative log of the
class probabilities clipped at 1e-5, a Gaussian (position only) kernel and a bilateral (position + RGB)
kernel with Potts compatibilities, 10 mean-field iterations, then argmax. Two differences, both for speed
and neither changing the optimum:

* the CRF runs over the classes present in the image only (``classes``): an absent class has probability 0,
  so its unary (-log 1e-5 = 11.5) never lets it win, while the lattice filtering cost grows with the
  number of labels, so 21 → 3 labels is about 7× less work;
* ``unary_temperature`` T flattens (T > 1) or sharpens (T < 1) the probabilities, p^(1/T) renormalised,
  before the unary: an over-confident classifier (most patches at p > 0.99) leaves the pairwise terms
  nothing to do, or lets them erase thin objects when they win anyway.

This module imports neither torch nor the model, so the CRF worker processes start quickly and light.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpcx.errors import CpcxError

#: Probabilities are clipped here before the log (pydensecrf's ``unary_from_softmax`` default).
UNARY_CLIP = 1e-5

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS")


@dataclass(frozen=True)
class CRFParams:
    """The recipe's ``crf`` section as a plain, picklable value (sent to every worker process)."""

    iterations: int = 10
    pos_xy: float = 1.0
    pos_w: float = 3.0
    bi_xy: float = 67.0
    bi_rgb: float = 3.0
    bi_w: float = 4.0
    unary_temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> "CRFParams":
        return cls(
            iterations=cfg.iterations, pos_xy=cfg.pos_xy, pos_w=cfg.pos_w, bi_xy=cfg.bi_xy,
            bi_rgb=cfg.bi_rgb, bi_w=cfg.bi_w, unary_temperature=cfg.unary_temperature,
        )


def unary_from_probs(probs: np.ndarray, temperature: float = 1.0, clip: float = UNARY_CLIP) -> np.ndarray:
    """(C, H, W) probabilities → (C, H·W) float32 unary energies ``-log(max(p^(1/T) / Σ p^(1/T), clip))``."""
    probs = np.asarray(probs, dtype=np.float32)
    num_classes = probs.shape[0]
    if temperature != 1.0:
        tempered = np.power(np.maximum(probs, 0.0, dtype=np.float64), 1.0 / temperature)
        total = tempered.sum(axis=0, keepdims=True)
        probs = np.divide(tempered, total, out=np.full_like(tempered, 1.0 / num_classes), where=total > 0)
    unary = -np.log(np.clip(probs, clip, 1.0)).astype(np.float32, copy=False)
    return np.ascontiguousarray(unary.reshape(num_classes, -1))


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field posterior (C, H, W) float32 of a dense CRF over ``probs`` (C, H, W) on ``image`` (H×W×3 uint8)."""
    import pydensecrf.densecrf as dcrf

    num_classes, height, width = probs.shape
    if image.shape[:2] != (height, width) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape} (need H×W×3)")
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary_from_probs(probs, params.unary_temperature))
    if params.pos_w > 0:
        crf.addPairwiseGaussian(sxy=params.pos_xy, compat=params.pos_w)
    if params.bi_w > 0:
        rgb = np.ascontiguousarray(image, dtype=np.uint8)
        crf.addPairwiseBilateral(sxy=params.bi_xy, srgb=params.bi_rgb, rgbim=rgb, compat=params.bi_w)
    posterior = crf.inference(params.iterations)
    return np.asarray(posterior, dtype=np.float32).reshape(num_classes, height, width)


def crf_labels(
    image: np.ndarray, probs: np.ndarray, classes: Sequence[int], params: CRFParams = CRFParams()
) -> np.ndarray:
    """H×W uint8 class indices: argmax of the CRF posterior, where channel j of ``probs`` is class ``classes[j]``."""
    classes = np.asarray(classes, dtype=np.uint8)
    if len(classes) != probs.shape[0]:
        raise ValueError(f"{len(classes)} class indices for {probs.shape[0]} probability channels")
    if len(classes) == 1:  # one label (background only): nothing to decide
        return np.full(probs.shape[1:], classes[0], dtype=np.uint8)
    return classes[dense_crf(image, probs, params).argmax(axis=0)]


# ------------------------------------------------------------------------------------ worker processes
def init_worker(parent: int | None = None) -> None:
    """Process-pool initializer: one thread per CRF worker, so N workers use N cores and no more.

    pydensecrf itself is single-threaded; this guards the numeric libraries a worker may load later and
    torch when the parent's main module pulled it in (spawned children re-import it). Ctrl-C is left to
    the parent, which lets the running CRFs finish their (atomic) writes and cancels the queued ones.
    """
    import signal
    import sys

    for name in _THREAD_VARS:
        os.environ[name] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM back to its default (a forked worker inherits the parent's handler, which raises KeyboardInterrupt
    # in `cpcx`): pools stop their workers with it (Pool.terminate, a broken executor), and one sent to the whole
    # process group ends a worker mid-CRF harmlessly (its write is atomic).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(parent)

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def watch_parent(parent: int | None = None, every: float = 1.0) -> None:
    """Exit when the parent process (pid ``parent``, default: ours now) is gone (killed with SIGKILL, crashed).

    A pool worker waits for tasks on a pipe behind a semaphore; when the parent dies without shutting the
    pool down, only one worker sees the closed pipe and the others wait on the semaphore forever: orphans that
    hold a core each. Polled from a daemon thread (PR_SET_PDEATHSIG is Linux-only and fires when the parent's
    *thread* exits, not its process). ``parent`` comes from the pool's creator: a worker still starting when
    the parent dies is already an orphan by the time it could ask for its parent's pid.
    """
    import threading
    import time

    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="cpcx-watch-parent", daemon=True).start()


def crf_pool(workers: int):
    """A process pool of ``workers`` CRF workers, started now (in parallel with whatever the caller does next).

    spawn, not fork: forking a process that holds torch threads (or a CUDA context) is unsafe. Shut it down
    in a ``finally`` (``shutdown(wait=True, cancel_futures=True)``): a worker ignores Ctrl-C, so the running CRFs
    finish their atomic writes and the queued ones are dropped; a worker whose parent dies without that exits by
    itself (:func:`watch_parent`).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                               initargs=(os.getpid(),))
    for _ in range(workers):
        pool.submit(warm_up)
    return pool


def broken_pool_error(pool, field: str, kept: str, lower: str, kind: str = "CRF") -> CpcxError:
    """The one message for a pool of worker processes that broke (``worker_death``'s cause): what is kept and the
    fix, re-running alone when the workers were stopped from outside."""
    why, stopped = worker_death(pool, kind)
    fix = ("re-run to resume" if stopped else f"lower {lower} and re-run (calling this from a script? guard the call "
           "with `if __name__ == '__main__':`, worker processes re-import the script)")
    return CpcxError(f"{field}: {why}; {kept}, {fix}")


def worker_death(pool, kind: str = "CRF") -> tuple[str, bool]:
    """Why a CRF pool broke, from its workers' exit codes: (the start of an error message, whether the workers
    were stopped from outside, so that re-running is the whole fix).

    A broken pool terminates its remaining workers (SIGTERM), so a SIGKILL among the codes names the cause: the
    kernel's out-of-memory killer, typically. Only SIGTERMs means the workers were stopped from outside (a
    scheduler's cancel or ``kill`` sent to the whole process group), not that they ran out of memory. Reads the
    executor's private process table; an executor without one gives the generic answer."""
    import signal
    import time

    processes = list((getattr(pool, "_processes", None) or {}).values())
    deadline = time.monotonic() + 5.0  # the pool is terminating and reaping the others in its own thread
    while any(p.exitcode is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    codes = [c for c in (p.exitcode for p in processes) if c is not None and c != 0]
    if -signal.SIGKILL in codes:
        return f"a {kind} worker process was killed (SIGKILL: the out-of-memory killer, typically)", False
    if codes and all(c == -signal.SIGTERM for c in codes):
        return f"the {kind} worker processes were stopped by SIGTERM from outside (sent to the whole process group)", True
    if codes:
        code = next(c for c in codes if c != -signal.SIGTERM)
        how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 and -code in signal.valid_signals() \
            else f"exit code {code}"
        return f"a {kind} worker process died ({how})", False
    return f"a {kind} worker process died", False


def warm_up() -> None:
    """A no-op task that makes the pool start its workers (and load pydensecrf) while the network runs."""
    import pydensecrf.densecrf  # noqa: F401

    from cpcx.data import palette  # noqa: F401


@dataclass
class CRFTask:
    """One image for a worker: the present classes' full-resolution probabilities and where to write."""

    image_id: str
    image: np.ndarray  # H×W×3 uint8
    probs: np.ndarray  # (k, H, W) float16/32, channel j = class classes[j]
    classes: np.ndarray  # (k,) class indices
    out_path: Path


def run_task(task: CRFTask, params: CRFParams) -> tuple[str, np.ndarray]:
    """Worker entry: CRF, argmax, write the palette PNG atomically; return the label map for scoring."""
    from cpcx.data.palette import save_label_png

    labels = crf_labels(task.image, np.asarray(task.probs, dtype=np.float32), task.classes, params)
    save_label_png(task.out_path, labels)
    return task.image_id, labels
