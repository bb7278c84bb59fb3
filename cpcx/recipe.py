"""The recipe: one YAML file, validated once at the edge into typed objects.

Every model forbids unknown keys, every field has a type, a default where the paper gives one, and a
one-line description (``cpcx show`` prints the resolved recipe; the descriptions are the reference).
Loading (``load_recipe``) does, in order: ``yaml.safe_load`` → ``${VAR}``/``${VAR:-default}`` interpolation
→ ``key=value`` overrides → pydantic validation, where relative paths are resolved against the recipe's
folder. Every problem becomes one line ``<file>: <dotted.field>: <what is wrong and the fix>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from cpcx.recipe_types import (  # the path types, number guards and base section of the schema
    Device, ExistingDir, Precision, RecipePath, Section, WeightsFile, must_be_file, resolve_path,
)
from cpcx.recipe_saliency import SaliencyConfig
from cpcx.recipe_segment import SegmentConfig  # noqa: F401  (re-exported: cpcx.recipe is the schema's one door)

#: The editable prompt templates that ship with cpcx (top-level ``prompts/`` of the project).
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


# --------------------------------------------------------------------------------------------- dataset
class _DatasetBase(Section):
    root: ExistingDir = Field(description="Data set root folder (must exist).")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N images of each split (smoke tests).")


class VOCDatasetConfig(_DatasetBase):
    kind: Literal["voc"] = Field("voc", description="PASCAL VOC in the VOCdevkit layout.")
    train_split: str = Field("train", description="Split list ImageSets/Segmentation/<name>.txt (or train_aug).")
    val_split: str = Field("val", description="Split list used for evaluation of the segmentation network.")


class COCODatasetConfig(_DatasetBase):
    kind: Literal["coco"] = Field("coco", description="MS COCO with instances JSON annotations.")
    train_images: str = Field("train2017", description="Folder of training images, relative to root.")
    val_images: str = Field("val2017", description="Folder of validation images, relative to root.")
    train_annotations: str = Field("annotations/instances_train2017.json", description="Training instances JSON.")
    val_annotations: str = Field("annotations/instances_val2017.json", description="Validation instances JSON.")


class FolderDatasetConfig(_DatasetBase):
    kind: Literal["folder"] = Field("folder", description="Plain folder: images/ + labels.csv (+ optional masks/).")
    images: str = Field("images", description="Image folder, relative to root.")
    labels: str = Field("labels.csv", description="CSV with columns image,labels[,split]; labels separated by ';'.")
    masks: Optional[str] = Field(None, description="Optional folder of PNG class-index masks named like the images.")
    classes: Optional[list[str]] = Field(None, description="Foreground class names in order (default: sorted from CSV).")


DatasetConfig = Annotated[
    Union[VOCDatasetConfig, COCODatasetConfig, FolderDatasetConfig], Field(discriminator="kind")
]


# ------------------------------------------------------------------------------------------------- llm
CacheMode = Literal["use", "refresh", "readonly", "off"]


class _LLMBase(Section):
    model: str = Field(description="Model name as the provider knows it.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature (the paper uses T=0).")
    seed: int = Field(0, description="Sampling seed sent to the provider where it accepts one.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds before one HTTP request is abandoned.")
    max_retries: int = Field(3, ge=0, description="Retries with exponential back-off on transport errors.")
    max_tokens: int = Field(2048, ge=16, description="Cap on the answer length, in tokens.")
    cache_dir: RecipePath = Field(Path("~/.cache/cpcx"), description="Folder of the SQLite answer cache.")
    cache_mode: CacheMode = Field("use", description="use | refresh | readonly (a miss is an error) | off.")


class OpenAIConfig(_LLMBase):
    provider: Literal["openai"] = Field("openai", description="OpenAI or any OpenAI-compatible server.")
    model: str = Field("gpt-4o", description="Model name, e.g. gpt-4o.")
    base_url: Optional[str] = Field(None, description="Server URL for OpenAI-compatible servers (vLLM, llama.cpp).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key.")
    json_schema: bool = Field(True, description="Constrain answers with response_format json_schema.")
    schema_style: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="How the schema is sent: json_schema (OpenAI, vLLM) or json_object+schema "
        "(llama-cpp-python's server)."
    )


class OllamaConfig(_LLMBase):
    provider: Literal["ollama"] = Field("ollama", description="A local model served by Ollama.")
    model: str = Field("qwen2.5:7b-instruct", description="Model tag, as `ollama pull` knows it.")
    base_url: str = Field("http://127.0.0.1:11434", description="Ollama server URL.")
    json_schema: bool = Field(True, description="Constrain answers with format=<JSON schema>.")


class StaticConfig(Section):
    provider: Literal["static"] = Field("static", description="Clusters written in the recipe; no LLM call.")
    clusters: dict[str, list[str]] = Field(description="Cluster name → member class names (each class once).")


LLMConfig = Annotated[Union[OpenAIConfig, OllamaConfig, StaticConfig], Field(discriminator="provider")]


# --------------------------------------------------------------------------------------------- prompts
def _confine_prompt(value: Path, info: ValidationInfo) -> Path:
    """Prompt templates may live in the recipe's folder or the project's prompts/ folder, nowhere else."""
    base = Path((info.context or {}).get("base_dir", ".")).resolve()
    allowed = (base, PROMPTS_DIR)
    if not any(value.resolve().is_relative_to(root) for root in allowed):
        raise ValueError(f"prompt {value} is outside the recipe folder and {PROMPTS_DIR}; move it into one of them")
    return value


PromptPath = Annotated[Path, AfterValidator(resolve_path), AfterValidator(_confine_prompt), AfterValidator(must_be_file)]


class PromptsConfig(Section):
    generate: PromptPath = Field(PROMPTS_DIR / "cluster_generate.md", description="p_gen template (Algorithm 1).")
    refine: PromptPath = Field(PROMPTS_DIR / "cluster_refine.md", description="p_refine template (Algorithm 1).")


class ClusteringConfig(Section):
    queries: int = Field(10, ge=1, description="R, independent LLM queries that vote for z0 (paper: 10).")
    vote: Literal["partition", "pairs"] = Field(
        "partition", description="partition: z0 = the most frequent partition (paper); pairs: z0 = the consensus "
        "of the R answers pair by pair (co-association), for sampled answers that never repeat whole.")
    refine: bool = Field(True, description="Run the self-refine loop after the vote (Table 4 ablation).")
    max_refine_iters: int = Field(10, ge=1, description="Stop refining after this many iterations.")
    max_retries: int = Field(2, ge=0, description="Re-asks with the validation error when an answer is invalid.")
    answer_shape: Literal["mapping", "list"] = Field(
        "mapping", description="mapping: {class: cluster}; list: [{name, members}]."
    )


# ----------------------------------------------------------------------------------------------- model
class FuseConfig(Section):
    backbone: str = Field(description="timm model whose patch grid is concatenated to model.backbone's.")
    feature_strides: Optional[list[Literal[4, 8, 16, 32]]] = Field(
        None, min_length=1, description="For a CNN: the strides of its maps (as model.feature_strides).")
    pretrained: bool = Field(False, description="Download timm's pretrained weights (needs internet).")
    weights: Optional[WeightsFile] = Field(None, description="Local weights of this backbone.")


class ModelConfig(Section):
    backbone: str = Field(
        "vit_base_patch16_384", description="timm model name: a ViT (paper: vit_base_patch16_384), or a CNN "
        "together with feature_strides.")
    feature_strides: Optional[list[Literal[4, 8, 16, 32]]] = Field(
        None, min_length=1, description="CNN backbones: the strides of the feature maps that form the patch grid "
        "(e.g. [16, 32]: the stride-32 map upsampled onto the stride-16 grid and concatenated); unset for a ViT.")
    fuse: Optional[FuseConfig] = Field(
        None, description="A second backbone whose grid is concatenated to this one's, cell by cell (e.g. the "
        "saliency ViT's objectness beside EfficientNet-Lite's classes); it stays frozen. Unset: one backbone.")
    pretrained: bool = Field(True, description="Download timm's pretrained weights (needs internet).")
    weights: Optional[WeightsFile] = Field(None, description="Local backbone weights (safetensors or state dict).")
    img_size: int = Field(384, ge=32, le=4096, description="Training input size (square), paper: 384.")
    cluster_token: bool = Field(True, description="Concatenate the cluster token F_c = u^T G (eq. 1).")
    cluster_dim: int = Field(128, ge=1, description="H, the width of the cluster token.")
    hv_bilstm: bool = Field(True, description="Refine tokens with the HV-BiLSTM of ViT-PCM.")
    lstm_hidden: Optional[int] = Field(None, ge=1, description="Hidden size per direction (default (e+H)/4).")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the HV-BiLSTM and the classifier (ViT-PCM: 0.2).")
    background: Literal["learned", "constant"] = Field(
        "learned", description="learned: class 0 is a classifier row (paper); constant: one shared learnable logit."
    )
    topk: Union[int, float] = Field(
        6, description="k of top-k pooling (eq. 3): a count (paper: 6) or a fraction of the patches, e.g. 0.01."
    )

    background_topk: Optional[Union[int, float]] = Field(
        None, description="k of the background's top-k pooling (count or fraction); None: model.topk (paper). "
        "A large fraction (e.g. 0.5) says the background covers much of the image, against the collapse where "
        "the classes take the context and the background the object.",
    )

    @field_validator("topk", "background_topk")
    @classmethod
    def _topk_count_or_fraction(cls, value: Union[int, float, None]) -> Union[int, float, None]:
        if value is None:
            return value
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError("a float is a fraction of the patches and must be in (0, 1); write an integer for a count")
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (a count) or a fraction in (0, 1)")
        return value


class LossConfig(Section):
    pce_weight: float = Field(0.01, ge=0.0, description="λ_PCE of eq. 8 (0 disables the contrastive loss).")
    pce_threshold: float = Field(0.85, gt=0.5, lt=1.0, description="ε of eq. 6: high > ε, low < 1-ε.")
    classifier_l2: float = Field(
        0.0, ge=0.0, description="L2 penalty c·ΣW² on the patch classifier (paper: 0; ViT-PCM: 0.01) against over-confidence."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Image-label targets become s/2 and 1-s/2 in the MCE (paper: 0)."
    )




class AugmentConfig(Section):
    scale_min: float = Field(0.9, gt=0, description="Random resized-crop minimum area fraction.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    vflip: float = Field(0.0, ge=0, le=1, description="Probability of a vertical flip.")
    transpose: float = Field(0.0, ge=0, le=1, description="Probability of a transpose (ViT-PCM).")
    color_jitter: float = Field(0.3, ge=0, description="Strength of brightness/contrast/saturation jitter.")
    grayscale: float = Field(0.1, ge=0, le=1, description="Probability of converting to grayscale.")


class TrainConfig(Section):
    epochs: int = Field(50, ge=1, description="Training epochs (paper: 50).")
    batch_size: int = Field(16, ge=1, description="Images per step, over all devices (paper: 16).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate during the warm-up (paper: 1e-3).")
    lr_after_warmup: float = Field(1e-4, gt=0, description="Adam learning rate after the warm-up (paper: 1e-4).")
    warmup_epochs: int = Field(2, ge=0, description="Epochs with the backbone frozen at the higher rate.")
    unfreeze_blocks: int = Field(4, ge=0, description="Last ViT blocks trained after the warm-up (0: frozen).")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N.")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32.")
    workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    feature_cache: bool = Field(
        True, description="Cache frozen-backbone patch tokens on disk (fp16, mmap); no photometric augmentation then."
    )
    trunk_cache: bool = Field(
        False, description="With unfreeze_blocks n > 0: cache the tokens entering the last n blocks and train from "
        "them in every epoch (ViT fine-tuning at frozen-ViT cost; views only, no photometric augmentation).",
    )
    backbone_lr: Optional[float] = Field(
        None, gt=0, description="Adam rate of the trained ViT blocks (default: the head's rate of the epoch).",
    )
    feature_cache_dir: Optional[Path] = Field(
        None, description="Folder of the token caches (default runs/<name>/train/features); recipes that point "
        "at one shared folder extract the tokens once (each cache is keyed by images, size, views and weights).",
    )
    views: list[Literal["orig", "hflip", "vflip", "transpose"]] = Field(
        ["orig", "hflip"], min_length=1,
        description="While the backbone is frozen each image takes one of these views per epoch.",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentations (uncached mode).")
    log_every: int = Field(10, ge=1, description="Steps between log lines when not on a terminal.")


class ClassProbeConfig(Section):
    """``pseudo.class_probe``: the object class re-decided by a linear head trained on single-class images."""

    enabled: bool = Field(False, description="Re-decide which present object a patch belongs to with a linear head "
                          "on the patch tokens, trained on the images labelled with one object class.")
    min_images: int = Field(5, ge=1, description="Classes with fewer single-class images keep the network's choice.")
    object_threshold: float = Field(0.5, ge=0, lt=1, description="A patch of a single-class image trains the probe "
                                    "when this share of its score goes to the object.")
    multi_confidence: Optional[float] = Field(
        0.8, gt=0, lt=1, description="A class with fewer than min_images single-class images also learns from the "
        "patches of multi-object images where it takes more than this share of the object score (null: "
        "single-class images only).")
    mix: float = Field(0.5, ge=0, le=1, description="Weight of the probe against the network among present objects.")
    epochs: int = Field(20, ge=1, description="Training epochs of the probe (seconds on a CPU).")
    max_patches: int = Field(200_000, ge=1, description="At most this many training patches (drawn with the seed).")


class SelfTrainingConfig(Section):
    """``pseudo.self_training``: each image relabelled by grid heads trained on the other images' first-pass labels."""

    enabled: bool = Field(False, description="A cross-validated self-training round (docs/results.md 8h): grid heads "
                          "trained k-fold on the first pass's pseudo-labels relabel the images they never saw; needs the "
                          "frozen backbone's token cache (train.feature_cache: true).")
    folds: int = Field(5, ge=2, description="Folds: each head trains on the other folds' images.")
    epochs: int = Field(16, ge=1, description="Epochs of each head (3 folds of 8 kept almost none of the gain).")
    mix: float = Field(0.5, gt=0, le=1, description="The heads' share of the decoded maps.")
    head_channels: int = Field(128, ge=8, le=4096, description="Channels of each DeepLabV3 head (as segment.head_channels).")
    aspp_rates: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [2, 4, 6], min_length=3, max_length=3, description="The three ASPP dilation rates, in grid cells.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (poly schedule).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(16, ge=1, description="Images per step.")
    first_pass_crf: bool = Field(True, description="The heads learn from the first pass's CRF labels; false: from "
                                 "its maps' argmax, one CRF pass fewer (VOC slice, 3 folds: 55.2 against 55.5 with 5 "
                                 "folds on CRF labels; docs/results.md 8h).")


class ContextPasteConfig(Section):
    """``pseudo.context_paste``: a second network, trained with single-class objects pasted into the training grids,
    labels the images that hold several object classes."""

    enabled: bool = Field(False, description="Context decoupling on the cached token grids (CDA, docs/results.md 8i): "
                          "the images with one object class are labelled first; their objects are pasted into the "
                          "grids of a second training of the network, which labels the images with several classes. "
                          "Needs the frozen backbone's token cache (train.feature_cache: true).")
    probability: float = Field(0.5, gt=0, le=1, description="Share of the training samples that get a pasted object.")
    min_patches: int = Field(4, ge=1, description="A single-class image donates its object when its label covers more "
                             "than half of at least this many patches.")
    shift: float = Field(0.25, ge=0, lt=1, description="Pasted objects move by up to this share of the grid on each "
                         "axis (cells moved past an edge are dropped, not wrapped).")
    epochs: Optional[int] = Field(None, ge=1, description="null: the second network trains from scratch on the run's "
                                  "schedule (train.*); N: it starts from the run's network and trains N epochs with "
                                  "the pastes at train.lr_after_warmup.")
    networks: int = Field(1, ge=1, le=8, description="Pasted networks trained (seeds seed, seed + 1000, …; folders "
                          "pseudo/paste/, paste-2/, …), their maps averaged on the multi-class images, each "
                          "re-decided by its own class probe: 2 gave 60.0 and 3 gave 60.4 against 59.8 over seeds "
                          "0-2 on the VOC slice (docs/results.md 8s); each one more costs a training of the network.")


class PseudoConfig(Section):
    img_size: int = Field(960, ge=32, le=8192, description="Inference input size (paper: 960).")
    split: Literal["train", "val"] = Field("train", description="Which split gets pseudo-labels.")
    flip: bool = Field(True, description="Average the probabilities of the image and its horizontal flip.")
    scales: list[Annotated[float, Field(gt=0)]] = Field(
        [1.0], min_length=1, description="Multi-scale inference: factors of img_size whose maps are averaged "
        "(e.g. [0.75, 1.0, 1.5]); each factor other than 1 costs a ViT pass (the token cache holds size 1 only).",
    )
    class_max_norm: bool = Field(True, description="Divide each class map by its maximum (ViT-PCM).")
    class_probe: ClassProbeConfig = Field(default_factory=ClassProbeConfig,
                                          description="Object class from a probe trained on single-class images.")
    self_training: SelfTrainingConfig = Field(default_factory=SelfTrainingConfig,
                                              description="A cross-validated self-training round (two passes).")
    context_paste: ContextPasteConfig = Field(default_factory=ContextPasteConfig,
                                              description="A second network trained with pasted objects labels the "
                                              "multi-class images.")
    saliency: SaliencyConfig = Field(default_factory=SaliencyConfig,
                                     description="A salient-object network places the object/background boundary.")
    batch_size: int = Field(4, ge=1, description="Images per forward pass.")
    workers: int = Field(2, ge=1, description="CRF worker processes (one thread each).")
    figures: int = Field(8, ge=0, description="Images drawn as heat maps and overlays.")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N.")
    precision: Precision = Field("auto", description="auto | bf16 | fp32.")


class CRFConfig(Section):
    enabled: bool = Field(True, description="Refine pseudo-labels with a dense CRF.")
    iterations: int = Field(10, ge=1, description="Mean-field iterations (ViT-PCM: 10).")
    pos_xy: float = Field(1.0, gt=0, description="Gaussian kernel spatial std (ViT-PCM: 1).")
    pos_w: float = Field(3.0, ge=0, description="Gaussian kernel weight (ViT-PCM: 3).")
    bi_xy: float = Field(67.0, gt=0, description="Bilateral kernel spatial std (ViT-PCM: 67).")
    bi_rgb: float = Field(3.0, gt=0, description="Bilateral kernel colour std (ViT-PCM: 3).")
    bi_w: float = Field(4.0, ge=0, description="Bilateral kernel weight (ViT-PCM: 4).")
    unary_temperature: float = Field(1.0, gt=0, description="Probabilities p^(1/T), renormalised, before the unary.")


# ---------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128,  # a folder name: 255 bytes at most
                      description="Run name: runs/<name>/<stage>/.")
    seed: int = Field(0, description="Seed for python, numpy and torch (0 to 2**32-1).")
    runs_dir: Path = Field(Path("runs"), description="Where run folders go (relative to the working directory).")
    dataset: DatasetConfig = Field(description="The data set (kind: voc | coco | folder).")
    llm: LLMConfig = Field(description="The LLM that clusters the class names (provider: openai | ollama | static).")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompt template files.")
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig, description="Algorithm 1 settings.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The CPC network.")
    loss: LossConfig = Field(default_factory=LossConfig, description="MCE + λ·PCE.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training of the CPC network.")
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig, description="Pseudo-label inference.")
    crf: CRFConfig = Field(default_factory=CRFConfig, description="Dense CRF on the pseudo-labels.")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="DeepLab trained on the pseudo-labels.")

    @field_validator("seed")
    @classmethod
    def _seed_fits_numpy(cls, value: int) -> int:
        # numpy's global seed is 32-bit unsigned: a larger or negative seed validated, then training crashed
        if not 0 <= value < 2**32:
            raise ValueError("must be an integer from 0 to 4294967295 (numpy and torch take 32-bit seeds); "
                             "use a smaller seed")
        return value

    @model_validator(mode="after")
    def _context_paste_needs_cached_tokens(self) -> "Recipe":
        if self.pseudo.context_paste.enabled and (self.train.unfreeze_blocks or not self.train.feature_cache):
            raise ValueError("pseudo.context_paste: the objects are pasted into the frozen backbone's cached token "
                             "grids, so the second network needs train.feature_cache: true and "
                             "train.unfreeze_blocks: 0; set those or pseudo.context_paste.enabled: false")
        return self

    @model_validator(mode="after")
    def _trunk_cache_needs_a_vit(self) -> "Recipe":
        if (self.model.feature_strides or self.model.fuse) and self.train.trunk_cache:
            raise ValueError("train.trunk_cache: only a single ViT backbone has a trunk cache; with "
                             "model.feature_strides (a CNN grid) or model.fuse set it false")
        return self

    # ------------------------------------------------------------------ helpers used by every stage
    def run_dir(self, stage: str | None = None) -> Path:
        """``runs/<name>`` or ``runs/<name>/<stage>``."""
        root = Path(self.runs_dir) / self.name
        return root / stage if stage else root

    def feature_cache_root(self) -> Path:
        """Where the frozen-backbone token caches live: ``train.feature_cache_dir`` or the train run folder."""
        return self.train.feature_cache_dir or self.run_dir("train") / "features"



# Loading lives in recipe_io so that this file stays the schema; re-exported for convenience.
from cpcx.recipe_io import RecipeError, dump_recipe, load_recipe  # noqa: E402,F401
