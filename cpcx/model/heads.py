"""Patch classifier (eq. 2) and top-k pooling (eq. 3). Class 0 is the background."""
from __future__ import annotations

import torch
from torch import nn


class PatchClassifier(nn.Module):
    """Dropout + Linear(D → C) without bias on every patch; softmax over the classes is taken by the caller.

    ViT-PCM's patch classifier: a weight matrix only (eq. 2 writes W ∈ R^{(e+H)×C}), normal(0, 0.05) init,
    and the same dropout as before the HV-BiLSTM.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, background: str = "learned"):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.background = background
        # background "constant": class 0 gets one learnable logit shared by every patch instead of a weight row.
        # It cannot latch onto salient features, so the object classes must claim the discriminative patches
        # and the patches that no class claims fall to the background (the threshold of CAM-style methods).
        out = num_classes - 1 if background == "constant" else num_classes
        self.linear = nn.Linear(dim, out, bias=False)
        nn.init.normal_(self.linear.weight, std=0.05)
        self.background_logit = nn.Parameter(torch.zeros(1)) if background == "constant" else None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) → logits (B, h, w, C)."""
        logits = self.linear(self.drop(x))
        if self.background_logit is None:
            return logits
        background = self.background_logit.to(logits.dtype).expand(*logits.shape[:-1], 1)
        return torch.cat([background, logits], dim=-1)


def resolve_topk(topk: int | float, num_patches: int) -> int:
    """k for a patch count: an int is k itself, a float in (0, 1) is a fraction of the patches (at least 1)."""
    k = max(1, round(topk * num_patches)) if isinstance(topk, float) else int(topk)
    return max(1, min(k, num_patches))


def topk_pool(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 3: p_c = mean of the k largest Z^c over the patches. (B, C, h, w) → (B, C)."""
    flat = probs.flatten(2)
    k = max(1, min(k, flat.shape[-1]))
    return flat.topk(k, dim=-1).values.mean(dim=-1)
