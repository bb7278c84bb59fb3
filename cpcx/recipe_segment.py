"""The ``segment`` section of the recipe: the final segmentation network and how it trains (cpcx.segment)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cpcx.recipe_saliency import SegmentSaliencyConfig
from cpcx.recipe_types import Device, Precision, Section, WeightsFile


class SegmentConfig(Section):
    arch: Literal["deeplabv2", "deeplabv3", "deeplabv3plus", "dpt"] = Field(
        "deeplabv2", description="Segmentation network (dpt: smp's DPT on a timm ViT, patches resampled to 16 px).")
    encoder: str = Field("resnet101", description="smp encoder name (or tu-<timm name>), or grid: the CPC network's "
                         "frozen patch grid (model.backbone + model.fuse from the train checkpoint), tokens cached.")
    encoder_weights: Optional[Literal["imagenet"]] = Field("imagenet", description="imagenet (download) or null.")
    encoder_file: Optional[WeightsFile] = Field(None, description="Local encoder weights (offline).")
    freeze_encoder: bool = Field(False, description="Image segmenters: keep the encoder's weights fixed, train the "
                                 "decoder only (the grid encoder is always frozen).")
    head_channels: int = Field(256, ge=8, le=4096, description="encoder grid: width of the ASPP head.")
    aspp_rates: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [2, 4, 6], min_length=3, max_length=3,
        description="encoder grid: the three ASPP dilation rates (smp's ASPP), in grid cells.")
    labels: Literal["pseudo", "ground_truth"] = Field(
        "pseudo", description="What the segmenter learns from: pseudo (the method) or ground_truth (an oracle "
                              "reference for benchmarks: the true masks of the same training images).")
    epochs: int = Field(30, ge=1, description="Training epochs on the pseudo-labels.")
    batch_size: int = Field(16, ge=1, description="Images per step, over all devices.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (DeepLab's, with momentum) or adamw.")
    lr: float = Field(0.01, gt=0, description="Initial learning rate (poly decay, power 0.9).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (decoupled with adamw).")
    crop_size: int = Field(321, ge=16, le=4096, description="Random crop size for training.")
    scale_range: tuple[float, float] = Field((0.5, 1.5), description="Random rescale range for training.")
    eval_every: int = Field(1, ge=1, description="Epochs between validation mIoU measurements.")
    scales: list[Annotated[float, Field(gt=0)]] = Field(
        [0.5, 0.75, 1.0, 1.25, 1.5], min_length=1, description="Test-time scales.")
    flip: bool = Field(True, description="Test-time horizontal flip.")
    crf: bool = Field(False, description="Dense CRF on the predictions.")
    saliency: SegmentSaliencyConfig = Field(
        default_factory=SegmentSaliencyConfig,
        description="A salient-object network's foreground mixed into the predictions (val and cpcx predict).")
    workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N.")
    precision: Precision = Field("auto", description="auto | bf16 | fp32.")

    @field_validator("encoder")
    @classmethod
    def _dpt_takes_a_vit(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("arch") == "dpt" and not value.startswith("tu-"):  # smp's DPT is built on timm ViTs only
            raise ValueError(f"arch dpt takes a timm ViT, tu-<timm name> (e.g. tu-vit_small_patch14_dinov2), not "
                             f"{value}")
        return value

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_16(cls, value: int, info: ValidationInfo) -> int:
        if value % 16 and value % 16 != 1:  # 321 = 16*20+1 is DeepLab's classic size
            raise ValueError(f"must be a multiple of 16 (or 16n+1), e.g. {value // 16 * 16}")
        if info.data.get("arch") == "dpt" and value % 32:  # its decoder halves the 16-px patch grid once more
            raise ValueError(f"arch dpt takes crops that are a multiple of 32, e.g. segment.crop_size="
                             f"{max(32, value // 32 * 32)}")
        return value

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value

    @model_validator(mode="after")
    def _grid_encoder(self) -> "SegmentConfig":
        if self.encoder != "grid":
            return self
        # One line per contradiction: a grid segmenter reads every image at model.img_size with a frozen backbone.
        if self.arch != "deeplabv3":
            raise ValueError(f"encoder grid takes arch deeplabv3 (an ASPP head on the grid), not {self.arch}")
        if list(self.scales) != [1.0]:
            raise ValueError("encoder grid reads every image at model.img_size, so test-time scales do not apply; "
                             "set segment.scales=[1.0]")
        if self.encoder_file is not None:
            raise ValueError("encoder grid takes its backbone from the train checkpoint; drop segment.encoder_file")
        return self
