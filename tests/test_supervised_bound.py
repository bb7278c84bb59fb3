"""benchmarks/supervised_bound.py: the folds hold every image out once, and the head learns what the masks say."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import supervised_bound as bound  # noqa: E402


def test_every_image_is_held_out_once_and_never_trained_on_then():
    splits = bound.folds_of(23, 5, seed=3)
    held = torch.cat([h for _, h in splits])
    assert sorted(held.tolist()) == list(range(23))
    for train, held_out in splits:
        assert not set(train.tolist()) & set(held_out.tolist())
        assert len(train) + len(held_out) == 23
    assert [h.tolist() for _, h in splits] != [h.tolist() for _, h in bound.folds_of(23, 5, seed=4)]


def test_the_head_learns_a_labelling_of_the_tokens_and_predicts_held_out_images():
    # Each cell's class is the argmax of a fixed linear map of its token; the targets are those labels at 4x
    # the grid, mirrored in the second view as the cached tokens are. Chance is 1/3.
    g = torch.Generator().manual_seed(0)
    n, h, e, c = 48, 6, 16, 3
    tokens = torch.randn(n, 1, h, h, e, generator=g)
    tokens = torch.cat([tokens, tokens.flip(3)], 1)  # the hflip view
    truth = (tokens[:, 0] @ torch.randn(e, c, generator=g)).argmax(-1)  # (n, h, h)
    cells = truth.repeat_interleave(4, 1).repeat_interleave(4, 2)
    targets = torch.stack([cells, cells.flip(-1)], 1).long()
    cfg = SimpleNamespace(head_channels=32, aspp_rates=(1, 2, 3), lr=3e-3, weight_decay=0.0, batch_size=8, epochs=40)
    probs = bound.cross_validated_probs(tokens, targets, cfg, c, folds=4, seed=0, log=lambda *_: None)
    assert probs.shape == (n, c, h, h)
    assert torch.allclose(probs.sum(1), torch.ones(n, h, h), atol=1e-5)
    accuracy = (probs.argmax(1) == truth).float().mean().item()
    assert accuracy > 0.8, accuracy
