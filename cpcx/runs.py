"""Run folders: ``runs/<recipe name>/<stage>/`` with the resolved recipe and the environment beside outputs."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from cpcx import atomic
from cpcx.recipe import Recipe, dump_recipe

_PACKAGES = (
    "cpcx", "torch", "torchvision", "timm", "segmentation-models-pytorch", "pydensecrf2", "numpy", "pydantic",
    "langchain-core", "langchain-openai", "langchain-ollama", "ollama", "openai",
)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | None = None) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_sha": git_sha(),
        "device": device,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["cuda"] = {"available": torch.cuda.is_available(), "count": torch.cuda.device_count()}
        if torch.cuda.is_available():
            info["cuda"]["names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # torch is a dependency; this only guards a broken install
        pass
    return info


def prepare_stage_dir(recipe: Recipe, stage: str, device: str | None = None) -> Path:
    """Create ``runs/<name>/<stage>/`` and write ``recipe.resolved.yaml`` and ``env.json`` atomically."""
    folder = recipe.run_dir(stage)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "recipe.resolved.yaml", dump_recipe(recipe))
    atomic.write_json(folder / "env.json", environment(device))
    return folder
