"""The CPC network: ViT patch tokens ⊕ cluster token → HV-BiLSTM → patch classifier → softmax → top-k."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpcx.errors import CpcxError
from cpcx.model.backbone import build_backbone
from cpcx.model.cluster_token import ClusterToken
from cpcx.model.heads import PatchClassifier, resolve_topk, topk_pool
from cpcx.model.hv_bilstm import HVBiLSTM
from cpcx.recipe import ModelConfig

CHECKPOINT_FORMAT = 1


class CPCNet(nn.Module):
    """``net(images, u)`` → ``probs`` (B, C, h, w) patch softmax Z, ``features`` (B, D, h, w) F_out,
    ``image_probs`` (B, C) top-k pooled p, ``logits`` (B, C, h, w).

    ``images`` are normalised with ``net.mean``/``net.std`` (the backbone's pretrained_cfg); ``u`` (B, L) is
    the 0/1 cluster vector (ignored, may be None, without a cluster token). ``net(tokens=..., u=...)`` or
    ``net.forward_tokens`` takes precomputed patch tokens (B, h, w, e) and skips the ViT (feature cache);
    ``net(tokens=..., u=..., trunk=d)`` takes a trunk cache's tokens (B, prefix + h·w, e), the output of the
    first d blocks of a square image, and runs only the ViT's remaining blocks.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, num_clusters: int, load_weights: bool = True):
        super().__init__()
        if num_classes < 2:
            raise CpcxError(f"dataset: {num_classes} class(es); CPC needs background plus at least one class")
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_clusters = num_clusters if cfg.cluster_token else 0
        self.backbone = build_backbone(
            cfg.backbone, pretrained=cfg.pretrained and load_weights, weights=cfg.weights if load_weights else None,
            feature_strides=cfg.feature_strides, fuse=cfg.fuse if load_weights or cfg.fuse is None else
            cfg.fuse.model_copy(update={"weights": None, "pretrained": False}),
        )
        width = self.backbone.embed_dim
        self.cluster_token: ClusterToken | None = None
        if cfg.cluster_token:
            if num_clusters < 1:
                raise CpcxError("clusters.json: no clusters; run `cpcx clusters` or set model.cluster_token: false")
            self.cluster_token = ClusterToken(num_clusters, cfg.cluster_dim)
            width += cfg.cluster_dim
        if cfg.hv_bilstm:
            self.refine: nn.Module = HVBiLSTM(width, cfg.lstm_hidden, cfg.dropout)
            width = self.refine.out_dim
        else:
            self.refine = nn.Dropout(cfg.dropout)
        self.feature_dim = width
        self.classifier = PatchClassifier(width, num_classes, cfg.dropout, background=cfg.background)

    # ------------------------------------------------------------------ properties
    @property
    def mean(self) -> tuple[float, float, float]:
        return self.backbone.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.backbone.std

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything outside the ViT: cluster token G, HV-BiLSTM, classifier (trained in every epoch)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor | None = None, u: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, trunk: int | None = None) -> dict[str, torch.Tensor]:
        if tokens is None:
            if images is None:
                raise ValueError("pass images (B, 3, H, W) or tokens (B, h, w, e)")
            tokens = self.backbone(images)
        elif trunk is not None:
            tokens = self.backbone.forward_from(tokens, trunk)
        return self.forward_tokens(tokens, u)

    def forward_tokens(self, tokens: torch.Tensor, u: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b, h, w, _ = tokens.shape
        x = tokens
        if self.cluster_token is not None:
            if u is None:
                raise ValueError("this network has a cluster token: pass u (B, L)")
            f_c = self.cluster_token(u).to(x.dtype)  # eq. 1
            x = torch.cat([x, f_c[:, None, None, :].expand(b, h, w, -1)], dim=-1)
        f_out = self.refine(x)
        logits = self.classifier(f_out).permute(0, 3, 1, 2).float()  # (B, C, h, w)
        probs = logits.softmax(dim=1)  # eq. 2, per patch over the classes
        image_probs = topk_pool(probs, resolve_topk(self.cfg.topk, h * w))  # eq. 3
        if self.cfg.background_topk is not None:  # the background pooled over its own (larger) k
            background = topk_pool(probs[:, :1], resolve_topk(self.cfg.background_topk, h * w))
            image_probs = torch.cat([background, image_probs[:, 1:]], dim=1)
        return {"probs": probs, "features": f_out.permute(0, 3, 1, 2), "image_probs": image_probs, "logits": logits}


def build_model(model_cfg: ModelConfig, num_classes: int, num_clusters: int, load_weights: bool = True) -> CPCNet:
    """The CPC network of a recipe's ``model`` section; ``load_weights=False`` skips download/weights file."""
    return CPCNet(model_cfg, num_classes, num_clusters, load_weights=load_weights)


def cluster_vectors(labels: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """u = clip(labels[:, 1:] @ matrix, 0, 1) for (N, C) labels and an (n_foreground, L) matrix; (N, 0) if None."""
    labels = np.asarray(labels, dtype=np.float32)
    if matrix is None:
        return np.zeros((labels.shape[0], 0), dtype=np.float32)
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.shape[0] != labels.shape[1] - 1:
        raise CpcxError(
            f"clusters.json: the cluster matrix has {matrix.shape[0]} classes but the data set has "
            f"{labels.shape[1] - 1} foreground classes; re-run `cpcx clusters`"
        )
    return np.clip(labels[:, 1:] @ matrix, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_meta(net: CPCNet, classes: tuple[str, ...] | list[str], cluster_matrix: np.ndarray | None) -> dict:
    """What a checkpoint needs to rebuild the network alone (plain types only: loadable with weights_only)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_cfg": net.cfg.model_dump(mode="json"),
        "num_classes": net.num_classes,
        "num_clusters": net.num_clusters,
        "classes": list(classes),
        "cluster_matrix": None if cluster_matrix is None else np.asarray(cluster_matrix).astype(int).tolist(),
        "mean": list(net.mean),
        "std": list(net.std),
        "patch_size": net.patch_size,
    }


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[CPCNet, dict]:
    """Rebuild the network from a ``weights/*.pt`` file alone → (net in eval mode, meta).

    ``meta`` holds classes, cluster_matrix (n_foreground × L or None), num_classes, num_clusters, model_cfg,
    mean/std, patch_size, the number of finished epochs and the mean training loss of the last one.
    """
    from cpcx.torchload import load_torch_file

    path = Path(path)
    if not path.exists():  # nothing to delete: say what makes it
        raise CpcxError(f"{path}: no checkpoint; run `cpcx train -r <recipe>` first")
    fix = "delete it and re-run `cpcx train -r <recipe>`"
    ckpt = load_torch_file(path, "cpcx training checkpoint", fix, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("meta"), dict):
        raise CpcxError(f"{path}: not a cpcx training checkpoint (no model/meta); {fix}")
    meta = ckpt["meta"]
    try:
        # The backbone weights are in the state dict: neither the download nor the original file is needed.
        model_cfg = {**meta["model_cfg"], "pretrained": False, "weights": None}
        if model_cfg.get("fuse"):  # the second backbone's weights are in the state dict too
            model_cfg["fuse"] = {**model_cfg["fuse"], "pretrained": False, "weights": None}
        cfg = ModelConfig.model_validate(model_cfg)
        net = build_model(cfg, meta["num_classes"], meta["num_clusters"], load_weights=False)
        net.load_state_dict(ckpt["model"])
    except CpcxError:
        raise
    except Exception as exc:  # noqa: BLE001 - a foreign or edited checkpoint: its meta and weights disagree
        raise CpcxError(f"{path}: its network cannot be rebuilt ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); {fix}") from None
    net.eval()
    return net, {**meta, "epoch": ckpt.get("epoch"), "loss": ckpt.get("loss")}
