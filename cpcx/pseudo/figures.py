"""The pseudo stage's figures: heat maps of the label-conditioned maps and label overlays for a fixed sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cpcx.metrics import ConfusionMatrix
from cpcx.pseudo.infer import channel_argmax, upsample
from cpcx.pseudo.labelling import Labeller, class_maps


def draw_figures(first: Labeller, dataset, labels_dir: Path, folder: Path, count: int, heads=None,
                 second: Labeller | None = None, saliency=None) -> None:
    """Heat maps of Z and label overlays for an evenly spaced, fixed sample of the split: the maps the labels were
    decoded from, by the ``first`` network (re-decided by its class probe and mixed with the self-training ``heads``
    when there are), the multi-class images by the ``second`` (context paste) when it is given, with the
    ``saliency`` (``pseudo.saliency``'s ``SaliencyMix``) mixed in when it is on."""
    from cpcx import viz
    from cpcx.data.palette import load_label_png
    from cpcx.pseudo.context_paste import multi_class

    for sub in ("heatmaps", "overlays"):  # a smaller pseudo.figures must not leave old images behind
        for old in (folder / sub).glob("*.png"):
            old.unlink()
    names = dataset.classes
    for i in viz.sample_indices(len(dataset), count):
        image_id, image = dataset.ids[i], dataset.load_image(i)
        classes = np.flatnonzero(dataset.labels[i] > 0).astype(np.uint8)
        net = second if second is not None and multi_class(dataset.labels[i:i + 1])[0] else first
        probs = class_maps(net.predictor, net.probe, [image], dataset.labels[i:i + 1],
                           None if net.u is None else net.u[i:i + 1])
        if heads is not None:
            probs = heads(probs, [i], dataset.labels[i:i + 1])
        full = upsample(probs[0], classes, image.shape[:2])
        if saliency is not None:
            full = saliency(i, full, classes)
        argmax = classes[channel_argmax(full)]
        viz.class_heatmaps(folder / "heatmaps" / f"{image_id}.png", image, full.cpu().numpy(), classes, names,
                           title=image_id)
        panels = {}
        mask = dataset.load_mask(i) if dataset.has_masks else None
        if mask is not None:
            panels["ground truth"] = mask
        final = load_label_png(labels_dir / f"{image_id}.png")
        for name, label_map in (("no CRF", argmax), ("pseudo-label", final)):
            if mask is not None:
                one = ConfusionMatrix(dataset.num_classes)
                one.update(mask, label_map)
                name = f"{name} · mIoU {100 * one.result().miou:.1f}"
            panels[name] = label_map
        viz.label_overlays(folder / "overlays" / f"{image_id}.png", image, panels, names, title=image_id)
