"""Labelling images with a trained CPC network: the label-conditioned maps of each batch (the class probe's
re-decision, the self-training heads' mix), upsampled, through the dense CRF in worker processes, written as PNGs.

``label_images`` runs the network in this process while a pool of ``pseudo.workers`` single-threaded processes runs
the CRFs of the previous batches; a bounded number of images in flight caps memory. Each PNG is written atomically
by the worker that made it, so a killed run resumes where it stopped (finished images are skipped) and loses nothing.
The mIoU without CRF (argmax of the upsampled maps) is counted in the same pass (``cpcx.pseudo.no_crf``).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from rich.console import Console

from cpcx.crf import CRFParams, CRFTask, broken_pool_error, crf_pool, run_task
from cpcx.metrics import ConfusionMatrix
from cpcx.pseudo.infer import PatchPredictor, channel_argmax, upsample
from cpcx.pseudo.no_crf import NoCRFScores


class Labeller(NamedTuple):
    """One network as the labelling uses it: its predictor, its class probe (or None), the token cache it reads (or
    None: the backbone runs) and the images' cluster vectors (or None)."""

    predictor: PatchPredictor
    probe: object = None
    cache: object = None
    u: np.ndarray | None = None


def prefetch(dataset, indices: Sequence[int], batch_size: int, masks: bool, cache=None) -> Iterator[tuple]:
    """Batches of (indices, images, masks, cached tokens or None), the next one read in a thread meanwhile."""
    def load(chunk: list[int]):
        tokens = None if cache is None else np.asarray(cache.tokens[chunk])[:, cache.views]
        return (chunk, [dataset.load_image(i) for i in chunk],
                [dataset.load_mask(i) if masks else None for i in chunk], tokens)

    chunks = [list(indices[k:k + batch_size]) for k in range(0, len(indices), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        future = reader.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            batch = future.result()
            future = reader.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield batch


def label_images(
    predictor: PatchPredictor,
    dataset,
    indices: Sequence[int],
    u: np.ndarray | None,
    labels_dir: Path,
    crf: CRFParams | None,
    workers: int,
    batch_size: int,
    no_crf: NoCRFScores | None,
    progress=None,
    cache=None,
    probe=None,
    heads=None,
    saliency=None,
) -> ConfusionMatrix:
    """Write ``labels_dir/<id>.png`` for ``indices``; return the confusion of these labels (empty without masks).

    ``crf=None`` writes the argmax of the upsampled probabilities. With a CRF, workers write the PNGs and
    return the label maps; at most ``2 (workers + batch_size)`` images are in flight. ``cache`` is
    ``open_token_cache``'s answer: patch tokens read from disk instead of computed by the ViT. ``probe``: a
    ``ClassProbe`` that re-decides the object class of every patch (``pseudo.class_probe``). ``heads``: a
    ``self_training.HeadMix`` mixed into the maps (``pseudo.self_training``'s second pass). ``saliency``: a
    ``saliency.SaliencyMix`` mixed into the upsampled maps, before the CRF and the no-CRF score (``pseudo.saliency``).
    """
    from cpcx.data.palette import save_label_png

    scored = no_crf is not None
    confusion = ConfusionMatrix(dataset.num_classes)
    labels = dataset.labels
    pending: dict[Future, np.ndarray | None] = {}
    max_pending = 2 * (workers + batch_size)
    pool = None
    if crf is not None:
        pool = crf_pool(workers)  # its workers start in parallel with the first network batch

    def finish(futures) -> None:
        for future in futures:
            mask = pending.pop(future)
            try:
                _, label_map = future.result()
            except BrokenProcessPool:
                raise broken_pool_error(pool, "pseudo.workers", "finished labels are kept",
                                        "pseudo.workers or pseudo.batch_size") from None
            if mask is not None:
                confusion.update(mask, label_map)
            if progress is not None:
                progress(1)

    try:
        for chunk, images, masks, tokens in prefetch(dataset, indices, batch_size, scored, cache):
            probs = class_maps(predictor, probe, images, labels[chunk], None if u is None else u[chunk], tokens,
                          None if cache is None else cache.trunk)
            if heads is not None:
                probs = heads(probs, chunk, labels[chunk])
            for b, (i, image, mask) in enumerate(zip(chunk, images, masks)):
                image_id = dataset.ids[i]
                classes = np.flatnonzero(labels[i] > 0).astype(np.uint8)
                full = upsample(probs[b], classes, image.shape[:2])
                if saliency is not None:
                    full = saliency(i, full, classes)
                argmax = classes[channel_argmax(full)]
                if scored:
                    no_crf.add(image_id, mask, argmax)
                if pool is None:
                    save_label_png(labels_dir / f"{image_id}.png", argmax)
                    if scored:
                        confusion.update(mask, argmax)
                    if progress is not None:
                        progress(1)
                    continue
                task = CRFTask(image_id, image, full.cpu().numpy(), classes, labels_dir / f"{image_id}.png")
                pending[pool.submit(run_task, task, crf)] = mask
            finish([f for f in list(pending) if f.done()])
            while len(pending) > max_pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                finish(done)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            finish(done)
    finally:
        if pool is not None:
            # Workers ignore Ctrl-C (crf.crf_pool): the running CRFs finish and write, queued ones drop.
            pool.shutdown(wait=True, cancel_futures=True)
        if no_crf is not None:
            no_crf.save()
    return confusion


def class_maps(predictor: PatchPredictor, probe, images, labels, u, tokens=None, trunk=None):
    """The label-conditioned maps of a batch, the object class re-decided by ``probe`` when there is one."""
    if probe is None:
        return predictor(images, labels, u, tokens, trunk)
    maps, final = predictor(images, labels, u, tokens, trunk, with_tokens=True)
    return probe.redecide(maps, final, labels)


def load_or_fit_class_probe(predictor: PatchPredictor, dataset, u, cache, cfg, seed: int, path: Path,
                            console: Console):
    """``pseudo.class_probe``: the probe saved by an earlier (interrupted) run of this stage, or one trained now on
    the single-class images and saved beside the labels."""
    from cpcx.pseudo.class_probe import ClassProbe, fit_from_batches, probe_images, single_class_images

    if path.is_file():
        return ClassProbe.load(path)
    start = time.perf_counter()
    chosen = probe_images(dataset.labels, cfg.class_probe)
    batches = (
        (*predictor(images, dataset.labels[chunk], None if u is None else u[chunk], tokens,
                    None if cache is None else cache.trunk, with_tokens=True), dataset.labels[chunk])
        for chunk, images, _, tokens in prefetch(dataset, chosen, cfg.batch_size, False, cache)
    )
    probe, patches = fit_from_batches(batches, dataset.labels[chosen], cfg.class_probe, seed)
    probe.save(path)
    console.print(f"[dim]class probe: {len(single_class_images(dataset.labels))} single-class images of "
                  f"{len(chosen)} read, {patches} object patches, "
                  f"{int(probe.known.sum())} of {len(probe.known)} classes with ≥ {cfg.class_probe.min_images} "
                  f"images ({time.perf_counter() - start:.1f} s)[/]")
    return probe


def with_progress(console: Console, total: int, work, label: str = "pseudo", unit: str = "images"):
    """Run ``work(advance)`` under a progress bar, or with plain progress lines when the output is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not console.is_terminal:  # plain logs: a line every 10 % and at least every 30 s, with rate and ETA
        from cpcx.progress import PlainProgress

        return work(PlainProgress(label, total, lambda text: console.print(text, highlight=False), unit=unit))
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        return work(lambda n: bar.advance(task, n))


def remove_torn_files(folder: Path) -> None:
    """Temp files of atomic writes killed mid-way (``.<id>.png.<random>.tmp``); finished PNGs are untouched."""
    for path in folder.glob(".*.png.*.tmp"):
        path.unlink(missing_ok=True)
