"""The pseudo-label stage (``cpcx pseudo``), one concern per module:

- ``stage``: the command: checks, the run folder, the passes, the scores (``run_pseudo``, ``find_checkpoint``);
- ``infer``: the network's label-conditioned patch maps, from images or the training token cache (``PatchPredictor``);
- ``labelling``: maps → upsampled → dense CRF in worker processes → label PNGs, resumable (``label_images``);
- ``no_crf``: the mIoU before the CRF, counted in the same pass;
- ``class_probe``: ``pseudo.class_probe``, the object class re-decided by a probe trained on single-class images;
- ``self_training``: ``pseudo.self_training``, a cross-validated self-training round (two passes);
- ``context_paste``: ``pseudo.context_paste``, a second network trained with pasted objects labels the multi-class
  images;
- ``routing``: which network labels which image, in each pass;
- ``saliency``: ``pseudo.saliency``, ISNet's foreground mixed into the maps by scene (the network and the mix are
  ``cpcx.saliency``, shared with ``segment.saliency``);
- ``figures``: heat maps and overlays of a fixed sample.
"""
from cpcx.pseudo.labelling import label_images
from cpcx.pseudo.stage import find_checkpoint, run_pseudo

__all__ = ["find_checkpoint", "label_images", "run_pseudo"]
