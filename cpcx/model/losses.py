"""MCE (eq. 7) and PCE (eqs. 4–6), and their sum (eq. 8). Computed in float32 even under autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpcx.recipe import LossConfig

_EPS = 1e-6  # probabilities are clamped to [eps, 1-eps] before the log: finite loss and gradient at saturation


def with_background(labels: torch.Tensor) -> torch.Tensor:
    """Image labels (B, C) with the background column set to 1: every image has some background."""
    labels = labels.float().clone()
    labels[:, 0] = 1.0
    return labels


def mce_loss(image_probs: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 7: BCE between the top-k pooled p_c and the image labels, averaged over classes and images.

    The background label is always 1. ``label_smoothing`` s moves the targets to s/2 and 1-s/2 (paper: 0).
    """
    p = image_probs.float().clamp(_EPS, 1.0 - _EPS)
    y = with_background(labels)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return -(y * p.log() + (1.0 - y) * (1.0 - p).log()).mean()


def pce_loss(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eqs. 4–6, summed over the classes present in each image (background included), averaged over images.

    For class c of image b: high = patches with Z^c > ε, low = patches with Z^c < 1-ε (a hard selection, no
    gradient through Z); S̄ = (1 + cos)/2. The loss is the mean of (1 - S̄) over ordered high–high pairs
    i ≠ j plus the mean of S̄ over high–low pairs. A term whose pair set is empty contributes 0.

    features: (B, D, h, w) F_out; probs: (B, C, h, w) Z; labels: (B, C) multi-hot.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, D), unit rows
        z = probs.detach().float().flatten(2)  # (B, C, N)
        high = (z > threshold).float()
        low = (z < 1.0 - threshold).float()
        present = with_background(labels) > 0.5  # (B, C)
        # S̄_ij = (1 + f_i·f_j)/2 is linear in f_i·f_j, so sums over pair sets need only the per-set sums of f:
        # Σ_{i∈A, j∈B} S̄_ij = (|A||B| + (Σ_A f)·(Σ_B f))/2: O(B·C·N·D), no N×N similarity matrix.
        sum_high, sum_low = high @ f, low @ f  # (B, C, D)
        n_high, n_low = high.sum(-1), low.sum(-1)
        self_pairs = (n_high + (high @ f.pow(2).sum(-1, keepdim=True)).squeeze(-1)) / 2.0  # the i = j terms
        high_high = (n_high * n_high + sum_high.pow(2).sum(-1)) / 2.0 - self_pairs  # Σ_{i≠j} S̄_ij
        high_low = (n_high * n_low + (sum_high * sum_low).sum(-1)) / 2.0
        pos_pairs, neg_pairs = n_high * (n_high - 1.0), n_high * n_low
        pos = torch.where(pos_pairs > 0, (pos_pairs - high_high) / pos_pairs.clamp_min(1.0), torch.zeros_like(n_high))
        neg = torch.where(neg_pairs > 0, high_low / neg_pairs.clamp_min(1.0), torch.zeros_like(n_high))
        return ((pos + neg) * present).sum(-1).mean()


def saliency_loss(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BCE between each patch's object share 1 - Z^bg and a salient-object network's foreground ``target`` (B, h, w)
    in [0, 1], weighted per patch by ``weight`` (B, h, w) and averaged over the weighted patches (0 without any)
    (``pseudo.saliency.paste_loss``)."""
    with torch.autocast(device_type=probs.device.type, enabled=False):
        obj = (1.0 - probs[:, 0].float()).clamp(_EPS, 1.0 - _EPS)
        target, weight = target.float(), weight.float()
        bce = -(target * obj.log() + (1.0 - target) * (1.0 - obj).log())
        return (bce * weight).sum() / weight.sum().clamp_min(1.0)


def total_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: LossConfig,
               classifier_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 8 (+ the optional classifier L2 of ViT-PCM). Returns loss, mce, pce, l2 (scalars)."""
    mce = mce_loss(out["image_probs"], labels, cfg.label_smoothing)
    zero = mce.new_zeros(())
    pce = pce_loss(out["features"], out["probs"], labels, cfg.pce_threshold) if cfg.pce_weight > 0 else zero
    l2 = classifier_weight.float().pow(2).sum() if cfg.classifier_l2 > 0 and classifier_weight is not None else zero
    loss = mce + cfg.pce_weight * pce + cfg.classifier_l2 * l2
    return {"loss": loss, "mce": mce, "pce": pce, "l2": l2}
