"""``pseudo.saliency``: ISNet's foreground mixed into the training images' upsampled maps before the CRF
(``cpcx.saliency`` has the network, the maps and the mix), with a weight chosen by the image's scene.

Where one object class is present the saliency is the right prior (``weight``, 0.5); where several are, the less
salient objects are the network's misses, so it weighs less (``weight_multi``, 0.2): on seed 0's 200 choose ids the
multi-class images lose at any one weight above 0.2 (docs/results.md 8n).
"""
from __future__ import annotations

import numpy as np
import torch

from cpcx.saliency import SaliencyMaps, fuse


class SaliencyMix(SaliencyMaps):
    """``pseudo.saliency`` inside the labelling: ``mix(i, full, classes)`` → the maps with image i's saliency mixed
    in, the weight chosen by its scene (one object class or several)."""

    def __init__(self, cfg, dataset, folder):
        from cpcx.pseudo.context_paste import multi_class

        super().__init__(cfg, dataset, folder, "pseudo.saliency", "pseudo.workers")
        self.multi = multi_class(dataset.labels)

    def __call__(self, i: int, full: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
        if self.multi[i]:
            return fuse(full, classes, self.map(i, full.shape[1:]), self.cfg.weight_multi,
                        add_only=self.cfg.multi_mode == "add")
        return fuse(full, classes, self.map(i, full.shape[1:]), self.cfg.weight)
