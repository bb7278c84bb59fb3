"""The cluster token of eq. 1: F_c = uᵀG, one learnable H-vector per cluster, summed over the image's clusters."""
from __future__ import annotations

import torch
from torch import nn


class ClusterToken(nn.Module):
    """Maps the cluster vector u (B, L), u_i ∈ {0, 1}, to the cluster token F_c (B, H) = u G."""

    def __init__(self, num_clusters: int, dim: int):
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"a cluster token needs at least one cluster, got {num_clusters}")
        self.num_clusters = num_clusters
        self.dim = dim
        self.G = nn.Parameter(torch.empty(num_clusters, dim))
        # Same scale as timm's learned token embeddings (cls/pos): small, so the ViT tokens dominate at first.
        nn.init.trunc_normal_(self.G, std=0.02)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 2 or u.shape[1] != self.num_clusters:
            raise ValueError(f"u must be (B, {self.num_clusters}), got {tuple(u.shape)}")
        return u.to(self.G.dtype) @ self.G

    def extra_repr(self) -> str:
        return f"L={self.num_clusters}, H={self.dim}"
