"""The segmentation stage: a network trained on the pseudo-labels, scored on the val split.

- ``stage``: ``cpcx segment`` (training loop, checkpoints, val predictions and metrics)
- ``networks``: image segmenters from smp (DeepLabV3/V3+, the paper's DeepLab v2) and checkpoint loading
- ``grid``: a DeepLabV3 (ASPP) head on the CPC network's frozen patch grid, trained on cached tokens
- ``data``: training labels (pseudo-labels or, as an oracle reference, the ground truth) and crops
- ``infer``: multi-scale / flip inference and the optional CRF
"""
from cpcx.segment.stage import run_segment

__all__ = ["run_segment"]
