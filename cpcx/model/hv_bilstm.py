"""HV-BiLSTM of ViT-PCM: the patch grid read as sequences, once along the rows and once along the columns.

Dropout on the tokens, a bidirectional LSTM over each row (left↔right) and another over each column
(top↔bottom), each with ``hidden`` units per direction; the two outputs are concatenated, so the width is
4·hidden, which is e+H with ViT-PCM's hidden = (e+H)/4. This lets each patch see its row and column
context, which the classifier alone (a per-patch linear map) cannot.
"""
from __future__ import annotations

import torch
from torch import nn


class HVBiLSTM(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.2):
        super().__init__()
        hidden = hidden or max(1, round(dim / 4))
        self.drop = nn.Dropout(dropout)
        self.rows = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.cols = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 4 * hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) → (B, h, w, 4·hidden)."""
        b, h, w, d = x.shape
        x = self.drop(x)
        rows, _ = self.rows(x.reshape(b * h, w, d))
        cols, _ = self.cols(x.transpose(1, 2).reshape(b * w, h, d))
        rows = rows.reshape(b, h, w, -1)
        cols = cols.reshape(b, w, h, -1).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)
