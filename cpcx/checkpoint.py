"""Training checkpoints: what ``weights/{last,best}.pt`` hold, and the resume check against the recipe.

A checkpoint is a plain dict (loadable with ``torch.load(..., weights_only=True)``):
``model`` (state dict), ``optimizer``, ``meta`` (enough to rebuild the network alone, see
``cpcx.model.checkpoint_meta``), ``epoch`` (the number of finished epochs), ``loss``, ``best_loss``,
``best_epoch``, ``history`` (the metrics.csv rows so far) and ``recipe`` (the full resolved recipe).
The random state needs no saving: every epoch reseeds from (seed, epoch, rank) and every sample's
augmentation from (seed, epoch, index), so epoch e+1 after a resume is epoch e+1 of an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cpcx import atomic
from cpcx.errors import CpcxError
from cpcx.recipe import Recipe

#: Recipe keys that may change between a run and its resume (they change speed or later stages, not training).
RESUME_WHITELIST = ("train.epochs", "train.workers", "train.device", "train.log_every", "pseudo", "crf", "segment")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted recipe keys whose values differ between two dumps, outside the resume whitelist."""
    a, b = _flatten(old), _flatten(new)
    allowed = lambda key: any(key == w or key.startswith(w + ".") for w in RESUME_WHITELIST)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not allowed(k))


def save(path: Path, state: dict) -> None:
    atomic.save_torch(path, state)


def load_for_resume(path: Path, recipe: Recipe, cluster_matrix: list | None) -> dict:
    """The checkpoint to resume from, after checking it belongs to this recipe (else a clear refusal)."""
    from cpcx.torchload import load_torch_file

    if not path.exists():
        raise CpcxError(f"{path}: nothing to resume (no checkpoint); run `cpcx train` without --resume")
    fix = "run `cpcx train` without --resume to start over (it replaces the file)"
    ckpt = load_torch_file(path, "training checkpoint", fix)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("model", "optimizer", "meta", "epoch", "history")):
        raise CpcxError(f"{path}: not a cpcx training checkpoint (keys missing); {fix}")
    changed = changed_keys(ckpt.get("recipe", {}), recipe.model_dump(mode="json"))
    if changed:
        raise CpcxError(
            f"{path}: the recipe changed since this checkpoint in {', '.join(changed)}; only "
            f"{', '.join(RESUME_WHITELIST)} may change on --resume; undo the change or train without --resume"
        )
    if ckpt["meta"].get("cluster_matrix") != cluster_matrix:
        raise CpcxError(f"{path}: clusters.json changed since this checkpoint; train again without --resume")
    return ckpt
