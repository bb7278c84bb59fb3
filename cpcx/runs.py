"""Run folders: ``runs/<recipe name>/<stage>/`` with the resolved recipe, the environment and the stage state.

Each stage folder holds ``stage.json``: the stage's *fingerprint* (a hash of the recipe sections that the
stage and every stage upstream of it read) and its status (``running`` or ``done``). ``cpcx run`` skips a
stage whose fingerprint matches and whose status is ``done``; a stage run alone with a changed recipe drops
the outputs that came from the old recipe before it writes new ones (see ``STALE_OUTPUTS``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from cpcx import atomic
from cpcx.recipe import Recipe, dump_recipe

_PACKAGES = (
    "cpcx", "torch", "torchvision", "timm", "segmentation-models-pytorch", "pydensecrf2", "numpy", "pydantic",
    "langchain-core", "langchain-openai", "langchain-ollama", "ollama", "openai",
)

#: Pipeline order and the recipe sections each stage reads (upstream sections count too).
STAGES: dict[str, tuple[str, ...]] = {
    "clusters": ("dataset", "llm", "prompts", "clustering"),
    "train": ("seed", "model", "loss", "train"),
    "pseudo": ("pseudo", "crf"),
    "segment": ("segment",),
}
#: Keys that change how fast a stage runs, not what it produces: they never make a stage stale.
_NEUTRAL_KEYS = {"workers", "device", "log_every", "figures", "cache_mode", "cache_dir", "feature_cache_dir", "timeout_s",
                 "max_retries"}
#: Options added to the recipe after runs existed, with the value that reproduces the older behaviour exactly:
#: left out of the fingerprint while they hold that value, so a new knob that a recipe does not use leaves its
#: finished stages current (otherwise every release that adds an option would redo every run).
_ADDED_DEFAULTS: dict[str, Any] = {
    "clustering.vote": "partition",
    "model.feature_strides": None,
    "model.fuse": None,
    "train.trunk_cache": False,
    "train.backbone_lr": None,
    "pseudo.scales": [1.0],
    "segment.head_channels": 256,
    "segment.aspp_rates": [2, 4, 6],
    "segment.labels": "pseudo",
    "segment.optimizer": "sgd",
    "segment.freeze_encoder": False,
    "pseudo.class_probe": {"enabled": False, "min_images": 5, "object_threshold": 0.5, "multi_confidence": 0.8,
                           "mix": 0.5, "epochs": 20, "max_patches": 200_000},
    # a key added inside a section added earlier: dropped first (deeper paths go first), so the section's
    # dict then equals its own added default again
    "pseudo.self_training.first_pass_crf": True,
    "pseudo.self_training": {"enabled": False, "folds": 5, "epochs": 16, "mix": 0.5, "head_channels": 128,
                             "aspp_rates": [2, 4, 6], "lr": 1e-3, "weight_decay": 0.01, "batch_size": 16},
    "pseudo.context_paste.networks": 1,
    "pseudo.context_paste": {"enabled": False, "probability": 0.5, "min_patches": 4, "shift": 0.25, "epochs": None},
    "pseudo.saliency.multi_mode": "mix",
    "pseudo.saliency.passes_multi": 1,
    "pseudo.saliency.size_later": 512,
    "pseudo.saliency.precision": "float",
    "pseudo.saliency.paste_loss": 0.0,
    "pseudo.saliency": {"enabled": False, "weights": None, "size": 1024, "weight": 0.5, "weight_multi": 0.2,
                        "cache_dir": None},
    "segment.saliency": {"enabled": False, "weights": None, "size": 1024, "weight": 0.2, "cache_dir": None,
                         "workers": 2},
}
#: Sub-folders derived from a stage's inputs that must go when the inputs change (resumable outputs that
#: would otherwise be "skipped as finished" although they came from an older recipe).
STALE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "clusters": ("clusters.json",),
    "pseudo": ("labels", "figures", "metrics.json", "confusion.csv", "no_crf.json", "no_crf.part-*.json",
               "class_probe.pt", "labels_first", "self_training.pt", "paste", "paste-*"),
    "segment": ("predictions", "metrics.json", "confusion.csv"),
}


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: str | None = None) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": git_sha(),
        "device": device,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    torch = sys.modules.get("torch")  # report CUDA only where torch is loaded anyway (importing it costs ~2 s)
    if torch is not None:
        info["cuda"] = {"available": torch.cuda.is_available(), "count": torch.cuda.device_count()}
        if torch.cuda.is_available():
            info["cuda"]["names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# ------------------------------------------------------------------------------------- fingerprints
def _strip_neutral(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_neutral(v) for k, v in node.items() if k not in _NEUTRAL_KEYS}
    if isinstance(node, list):
        return [_strip_neutral(v) for v in node]
    return node


def fingerprint(recipe: Recipe, stage: str) -> str:
    """Hash of the sections read by ``stage`` and every stage before it (neutral keys left out)."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    dumped = recipe.model_dump(mode="json")
    sections: list[str] = []
    for name, own in STAGES.items():
        sections.extend(own)
        if name == stage:
            break
    for path, value in sorted(_ADDED_DEFAULTS.items(), key=lambda item: -item[0].count(".")):
        *parents, key = path.split(".")
        node: Any = dumped
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        # neutral keys compared out: a section left at its added default stays out whatever its cache_dir or workers
        if isinstance(node, dict) and _strip_neutral(node.get(key, value)) == _strip_neutral(value):
            node.pop(key, None)
    payload = {s: _strip_neutral(dumped[s]) for s in sections}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_stage_state(recipe: Recipe, stage: str) -> dict | None:
    path = recipe.run_dir(stage) / "stage.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None  # a list or a number is no record: the stage is redone


def stage_is_current(recipe: Recipe, stage: str) -> bool:
    state = read_stage_state(recipe, stage)
    return bool(state and state.get("status") == "done" and state.get("fingerprint") == fingerprint(recipe, stage))


def output_written(path: Path) -> bool:
    """An output to keep (resume) or trust (skip): a file with bytes. Atomic writes never leave an empty one;
    a hand copy or a tool outside cpcx can, and it is no label."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def drop_stale_outputs(recipe: Recipe, stage: str) -> list[str]:
    folder = recipe.run_dir(stage)
    dropped = []
    for name in STALE_OUTPUTS.get(stage, ()):
        for path in sorted(folder.glob(name)) if "*" in name else [folder / name]:  # a pattern: each rank's file
            if path.is_dir():
                shutil.rmtree(path)
                dropped.append(path.name)
            elif path.exists():
                path.unlink()
                dropped.append(path.name)
    return dropped


def prepare_stage_dir(recipe: Recipe, stage: str, device: str | None = None) -> Path:
    """Create ``runs/<name>/<stage>/``; write ``recipe.resolved.yaml``, ``env.json`` and ``stage.json``.

    If the folder holds outputs of a different recipe (another fingerprint), the derived outputs listed in
    ``STALE_OUTPUTS`` are removed first, so a resumable stage never keeps labels made by an older model.
    """
    folder = recipe.run_dir(stage)
    atomic.ensure_dir(folder)
    current = fingerprint(recipe, stage) if stage in STAGES else None
    previous = read_stage_state(recipe, stage)
    if current and previous and previous.get("fingerprint") != current:
        drop_stale_outputs(recipe, stage)
    atomic.write_text(folder / "recipe.resolved.yaml", dump_recipe(recipe))
    atomic.write_json(folder / "env.json", environment(device))
    if current:
        atomic.write_json(folder / "stage.json", {"stage": stage, "fingerprint": current, "status": "running"})
    return folder


def mark_stage_done(recipe: Recipe, stage: str, **info: Any) -> None:
    """Record that ``stage`` finished for the current recipe (``cpcx run`` will skip it next time)."""
    state = {"stage": stage, "fingerprint": fingerprint(recipe, stage), "status": "done", **info}
    atomic.write_json(recipe.run_dir(stage) / "stage.json", state)
