"""The ``pseudo.saliency`` and ``segment.saliency`` sections of the recipe: a salient-object network mixed into a
stage's maps (``cpcx.saliency``). Both name the network the same way; each stage has its own switch and weights."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationInfo, model_validator

from cpcx.recipe_types import RecipePath, Section

_FIX = "build it with `cpcx weights import isnet --out weights/isnet.onnx` (or `make weights-saliency`)"


class SaliencyNetworkConfig(Section):
    """What both sections share: the switch, the network and where its maps are kept."""

    enabled: bool = Field(False, description="Mix a salient-object network's foreground into the maps at the "
                          "image's own resolution (docs/results.md 8n, 8o); needs its ONNX file (`cpcx weights "
                          "import isnet --out weights/isnet.onnx`).")
    weights: Optional[RecipePath] = Field(None, description="The saliency network's ONNX file (input 1×3×size×size, "
                                          "first output the foreground probability).")
    size: int = Field(1024, ge=32, le=4096, description="The network's input size (ISNet: built at 1024; cpcx rebuilds "
                      "it for any multiple of 64, e.g. 512 at a quarter of the time: docs/results.md 8p).")
    cache_dir: Optional[Path] = Field(None, description="Folder for the maps (default: the stage's; relative to the "
                                      "working directory, as runs_dir): runs over the same images can share one.")

    @model_validator(mode="after")
    def _weights_exist_when_enabled(self, info: ValidationInfo) -> "SaliencyNetworkConfig":
        if not self.enabled or not (info.context or {}).get("check_inputs", True):
            return self
        if self.weights is None:
            raise ValueError(f"enabled without weights; name the saliency network's ONNX file, and {_FIX}")
        if not self.weights.is_file():
            what = "is a folder, not a file" if self.weights.is_dir() else "does not exist"
            raise ValueError(f"weights {self.weights} {what}; {_FIX}")
        return self


class SaliencyConfig(SaliencyNetworkConfig):
    """``pseudo.saliency``: mixed into the training images' maps before the CRF (``cpcx.pseudo.saliency``)."""

    weight: float = Field(0.5, ge=0, le=1, description="Weight of the saliency on images with one object class.")
    weight_multi: float = Field(0.2, ge=0, le=1, description="Weight on images with several object classes (the less "
                                "salient objects are the network's misses).")
    multi_mode: Literal["mix", "add"] = Field(
        "mix", description="On images with several object classes: mix (the saliency moves object and background "
        "both ways) or add (it may make a pixel more object, never less: the less salient objects stay).")
    passes_multi: int = Field(
        1, ge=1, le=3, description="Passes of the network on images with several object classes: each pass after the "
        "first sees the image with what the earlier ones found painted over, and the maps' maximum is mixed in, so a "
        "second, less salient object counts (docs/results.md 8p). Its maps are kept beside the first pass's.")
    size_later: int = Field(512, ge=32, le=4096, description="Input size of the passes after the first (ISNet is "
                            "rebuilt for it, in multiples of 64): 512 found the less salient objects better than 1024, "
                            "for a quarter of the time (docs/results.md 8p).")
    precision: Literal["float", "int8"] = Field(
        "float", description="int8: the network quantized once per data set and size (activations calibrated on its "
        "first 8 images, kept beside the maps): about 3× faster on a CPU with 8-bit dot products (AVX-512 VNNI), maps "
        "within 0.003 of the float network's on average, the pseudo-labels within 0.1 (docs/results.md 8q).")
    paste_loss: float = Field(
        0.0, ge=0, description="With pseudo.context_paste: weight of a second loss that teaches its pasted network "
        "the maps' object/background call (docs/results.md 8r): BCE between each patch's object share 1 - Z^bg and "
        "the map averaged over the patch, on every patch of the single-class images, on the multi-class ones only "
        "where the map is above 0.5 (an object the network misses is not pushed to background), the pasted cells "
        "as object. 0: off; without pseudo.context_paste it has no network to act on.")


class SegmentSaliencyConfig(SaliencyNetworkConfig):
    """``segment.saliency``: mixed into the segmenter's probabilities, for the val predictions of ``cpcx segment``
    and for ``cpcx predict`` (before ``segment.crf``)."""

    weight: float = Field(0.2, ge=0, le=1, description="Weight of the saliency on every image (a new image's classes "
                          "are unknown, so there is no weight by scene).")
    workers: int = Field(2, ge=1, description="Processes that compute the val images' maps, one thread each "
                         "(segment.workers is the DataLoader's, 0 in voc-mini).")
