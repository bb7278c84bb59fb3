"""``pseudo.saliency``: ISNet's foreground mixed into the training images' upsampled maps before the CRF
(``cpcx.saliency`` has the network, the maps and the mix), with a weight chosen by the image's scene.

Where one object class is present the saliency is the right prior (``weight``, 0.5); where several are, the less
salient objects are the network's misses, so it weighs less (``weight_multi``, 0.2): on seed 0's 200 choose ids the
multi-class images lose at any one weight above 0.2 (docs/results.md 8n). With ``passes_multi`` 2 the multi-class
images get the maximum of two passes of the network, the second (at ``size_later``², 512) on the image with the first
one's object painted over (``cpcx.saliency.erase``), which finds the second object the first pass leaves out
(docs/results.md 8p).
"""
from __future__ import annotations

import numpy as np
import torch

from cpcx.saliency import SaliencyMaps, fuse


class SaliencyMix:
    """``pseudo.saliency`` inside the labelling: ``mix(i, full, classes)`` → the maps with image i's saliency mixed
    in, the weight chosen by its scene (one object class or several). ``maps`` are the one-pass maps of every image;
    ``multi_maps`` those the multi-class images use: the same, or with ``passes_multi`` > 1 the passes' maximum,
    which starts from ``maps``."""

    def __init__(self, cfg, dataset, folder, multi_folder=None):
        """``multi_folder``: where the multi-class images' maps of ``cfg.passes_multi`` passes are kept (needed when
        that is above 1; ``cpcx.saliency.saliency_folder`` with the passes)."""
        from cpcx.pseudo.context_paste import multi_class

        self.cfg = cfg
        self.multi = multi_class(dataset.labels)
        self.maps = SaliencyMaps(cfg, dataset, folder, "pseudo.saliency", "pseudo.workers")
        self.multi_maps = self.maps
        if cfg.passes_multi > 1:
            self.multi_maps = SaliencyMaps(cfg, dataset, multi_folder, "pseudo.saliency", "pseudo.workers",
                                           passes=cfg.passes_multi, first=self.maps, later_size=cfg.size_later)

    def ensure(self, indices, workers: int, console, label=None) -> None:
        """One pass on every image of ``indices``, then the further passes on the multi-class ones."""
        self.maps.ensure(indices, workers, console, label)
        if self.multi_maps is not self.maps:
            self.multi_maps.ensure([i for i in indices if self.multi[i]], workers, console, label)

    def __call__(self, i: int, full: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        if self.multi[i]:
            return fuse(full, classes, self.multi_maps.map(i, full.shape[1:]), self.cfg.weight_multi,
                        add_only=self.cfg.multi_mode == "add")
        return fuse(full, classes, self.maps.map(i, full.shape[1:]), self.cfg.weight)
