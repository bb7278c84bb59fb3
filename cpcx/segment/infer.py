"""Inference of the segmentation network: single-scale (validation during training) or multi-scale + flip.

Multi-scale follows the usual protocol (mmseg's ``aug_test``, DeepLab's MSC): the image is resized to each
scale, the softmax of each pass is resized back to the image, and the probabilities are averaged over
scales and flips. An optional dense CRF (``segment.crf``, with the recipe's ``crf`` parameters) refines them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpcx.device import autocast
from cpcx.metrics import ConfusionMatrix


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float in [0, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float().div_(255)


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Class probabilities C×H×W (float32, on ``device``) averaged over ``scales`` and, with ``flip``, mirrors."""
    device = torch.device(device)
    x = image_tensor(image, device)
    height, width = x.shape[-2:]
    total: torch.Tensor | None = None
    passes = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        xs = x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs  # both views in one forward pass
        with autocast(device, precision):
            logits = model(batch)
        probs = logits.float().softmax(1)
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)
        if size != (height, width):
            probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
        passes += 2 if flip else 1
    return total[0] / passes


def predict_label(
    model: torch.nn.Module,
    image: np.ndarray,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    crf_params=None,
) -> np.ndarray:
    """H×W uint8 class indices: argmax of :func:`predict_probs`, after a dense CRF when ``crf_params`` is given."""
    return refine_labels(image, predict_probs(model, image, scales, flip, device, precision), crf_params)


def refine_labels(image: np.ndarray, probs: torch.Tensor, crf_params=None) -> np.ndarray:
    """H×W uint8 class indices from C×H×W probabilities: their argmax, or a dense CRF's with ``crf_params``."""
    if crf_params is None:
        return probs.argmax(0).to(torch.uint8).cpu().numpy()
    from cpcx.crf import crf_labels

    # The CRF runs over the classes that the network gives some pixel; others cannot win anyway.
    present = torch.unique(probs.argmax(0)).cpu().numpy()
    chosen = probs[torch.as_tensor(present, device=probs.device).long()].cpu().numpy()
    chosen /= np.maximum(chosen.sum(0, keepdims=True), 1e-12)
    return crf_labels(image, chosen, present.astype(np.uint8), crf_params)


def confusion_on(
    model: torch.nn.Module,
    dataset,
    indices: Iterable[int],
    device: torch.device,
    precision: str,
    on_image: Callable[[], None] | None = None,
) -> ConfusionMatrix:
    """Single-scale predictions of ``dataset[indices]`` scored against their masks (the fast val mIoU)."""
    confusion = ConfusionMatrix(dataset.num_classes)
    was_training = model.training
    model.eval()
    try:
        for index in indices:
            label = predict_label(model, dataset.load_image(index), device=device, precision=precision)
            confusion.update(dataset.load_mask(index), label)
            if on_image is not None:
                on_image()
    finally:
        model.train(was_training)
    return confusion


def write_predictions(
    model: torch.nn.Module,
    dataset,
    folder: Path,
    indices: Iterable[int],
    scales: Sequence[float],
    flip: bool,
    device: torch.device,
    precision: str,
    crf_params=None,
    on_image: Callable[[], None] | None = None,
    mix: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Write ``folder/<id>.png`` for ``dataset[indices]``, skipping files that exist (resumable); → written.
    ``mix(index, probs)``: what the probabilities become before the argmax or CRF (``segment.saliency``)."""
    from cpcx.data.palette import save_label_png

    folder = Path(folder)
    written = 0
    model.eval()
    for index in indices:
        path = folder / f"{dataset.ids[index]}.png"
        if not path.is_file():
            image = dataset.load_image(index)
            probs = predict_probs(model, image, scales, flip, device, precision)
            label = refine_labels(image, probs if mix is None else mix(index, probs), crf_params)
            save_label_png(path, label)  # atomic: a kill never leaves a torn PNG to be skipped next time
            written += 1
        if on_image is not None:
            on_image()
    return written


def write_val_predictions(recipe, model: torch.nn.Module, meta: dict, val_set, folder: Path, indices: Iterable[int],
                          device: torch.device, crf_params=None, on_image: Callable[[], None] | None = None,
                          log=print, mix: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> int:
    """``cpcx segment``'s val predictions for either kind of segmenter (a grid one from its cached tokens, an image
    one at the recipe's scales and flip) into ``folder``, resumable; → written."""
    from cpcx.segment.grid import GRID_ENCODER

    if meta["encoder"] == GRID_ENCODER:
        from cpcx.segment.grid_train import write_grid_predictions

        return write_grid_predictions(recipe, model, val_set, folder, indices, device, crf_params, on_image=on_image,
                                      log=log, mix=mix)
    cfg = recipe.segment
    return write_predictions(model, val_set, folder, indices, cfg.scales, cfg.flip, device, cfg.precision, crf_params,
                             on_image=on_image, mix=mix)


def val_saliency(recipe, val_set, indices: Sequence[int],
                 console) -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    """``segment.saliency`` for the val predictions: the maps of ``indices`` computed (or found) in
    ``<cache_dir or the segment folder>/saliency/…`` → ``mix(index, probs)``; None when the switch is off."""
    cfg = recipe.segment.saliency
    if not cfg.enabled:
        return None
    from cpcx.saliency import SaliencyMaps, mix_prediction, saliency_folder

    # the network is checked (and loaded) only when a map is missing: SaliencyMaps.ensure, before any worker starts
    maps = SaliencyMaps(cfg, val_set, saliency_folder(cfg, recipe.run_dir("segment"), val_set), "segment.saliency",
                        "segment.saliency.workers")
    maps.ensure(indices, cfg.workers, console, label="saliency (val)")
    return lambda index, probs: mix_prediction(probs, maps.map(index, tuple(probs.shape[1:])), cfg.weight)
