"""``cpcx doctor``: is this machine ready to run a recipe? Each check is one ✔/✘ line with the fix."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from cpcx.errors import CpcxError


@dataclass
class Check:
    ok: bool
    name: str
    detail: str
    fix: str = ""
    required: bool = True  # a failed optional check is a warning (!), not a failure


def _torch() -> list[Check]:
    import torch

    from cpcx.device import cpu_bf16_native

    checks = [Check(True, "torch", f"{torch.__version__} (threads {torch.get_num_threads()})")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        checks.append(Check(True, "CUDA", f"{torch.cuda.device_count()} device(s): {names}; bf16 "
                                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        checks.append(Check(False, "CUDA", "no GPU visible: training and inference run on the CPU",
                            "fine for the VOC slice (device: auto picks the CPU); for a GPU check nvidia-smi and the driver", required=False))
    native = cpu_bf16_native()
    if native is not None:
        checks.append(Check(native, "CPU bf16", "in hardware: precision bf16 speeds CPU stages up" if native else
                            "emulated: bf16 would be slower than fp32 on this CPU",
                            "set train/pseudo/segment.precision: fp32 (or auto) in the recipe", required=False))
    if sys.platform.startswith("linux") and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        checks.append(Check(False, "OMP_WAIT_POLICY", "not PASSIVE: busy-waiting threads can slow CPU runs a lot",
                            "export OMP_WAIT_POLICY=PASSIVE", required=False))
    return checks


def _module(name: str, label: str, fix: str) -> Check:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # any import failure (missing, broken build) is the same answer for the user
        return Check(False, label, f"cannot import {name}: {type(exc).__name__}", fix)
    version = getattr(module, "__version__", "")
    return Check(True, label, f"{name} {version}".strip())


def _crf() -> Check:
    try:
        import numpy as np
        import pydensecrf.densecrf as dcrf

        crf = dcrf.DenseCRF2D(4, 4, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(np.ones((2, 16), dtype=np.float32)))
        crf.inference(1)
    except Exception as exc:  # a broken C extension raises all sorts of things
        return Check(False, "dense CRF", f"pydensecrf unusable: {type(exc).__name__}: {exc}",
                     "pip install pydensecrf2==1.1 (builds from source; needs gcc and Python headers)")
    return Check(True, "dense CRF", "pydensecrf (pydensecrf2) works")


def _recipe_checks(recipe) -> list[Check]:
    from cpcx.data import build_dataset

    checks: list[Check] = []
    for split in ("train", "val"):
        try:
            dataset = build_dataset(recipe.dataset, split)
            masks = "with masks" if dataset.has_masks else "no masks"
            checks.append(Check(True, f"data ({split})", f"{len(dataset)} images, {dataset.num_classes} classes, "
                                                        f"{masks} at {recipe.dataset.root}"))
        except CpcxError as exc:
            checks.append(Check(False, f"data ({split})", str(exc), "fix dataset.root / the split names"))
    for label, path in (("backbone weights", recipe.model.weights), ("encoder weights", recipe.segment.encoder_file)):
        if path is not None:
            checks.append(Check(True, label, str(path)))
        elif label == "backbone weights" and recipe.model.pretrained:
            checks.append(Check(True, label, f"timm download of {recipe.model.backbone} (needs internet once)",
                                required=False))
    for section, cfg in (("pseudo.saliency", recipe.pseudo.saliency), ("segment.saliency", recipe.segment.saliency)):
        if cfg.enabled:  # the recipe already checked the file; the runtime is checked here
            runtime = _module("onnxruntime", f"saliency ({section})", "pip install 'cpcx[weights]' (onnxruntime)")
            checks.append(Check(True, runtime.name, f"{cfg.weights} with {runtime.detail}") if runtime.ok else runtime)
    if recipe.pseudo.saliency.enabled and recipe.pseudo.saliency.precision == "int8":
        from cpcx.device import cpu_int8_dot

        if cpu_int8_dot() is False:
            checks.append(Check(False, "CPU int8", "no 8-bit dot products (VNNI): the int8 saliency network may be no "
                                "faster than the float one here", "set pseudo.saliency.precision: float",
                                required=False))
    checks.append(_llm_check(recipe))
    return checks


def _llm_check(recipe) -> Check:
    llm = recipe.llm
    if llm.provider == "static":
        return Check(True, "LLM", f"static clusters in the recipe ({len(llm.clusters)} clusters), no server needed")
    try:
        from cpcx.llm import check_llm
    except ImportError as exc:
        return Check(False, "LLM", f"LLM layer unavailable: {exc}", "reinstall cpcx")
    ok, message = check_llm(llm, timeout=2.0)
    return Check(ok, f"LLM ({llm.provider})", message, "" if ok else "see the message; cached answers still replay")


def run_doctor(recipe_path: Optional[Path], console: Console, overrides: list[str] | None = None) -> bool:
    """Print one line per check; return True when no required check failed."""
    checks: list[Check] = [Check(True, "python", sys.version.split()[0])]
    steps: list[Callable[[], list[Check] | Check]] = [
        _torch,
        lambda: _module("timm", "timm", "pip install timm"),
        lambda: _module("segmentation_models_pytorch", "smp", "pip install segmentation-models-pytorch"),
        _crf,
        lambda: _module("langchain_openai", "langchain-openai", "pip install langchain-openai"),
        lambda: _module("langchain_ollama", "langchain-ollama", "pip install langchain-ollama"),
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    if recipe_path is not None:
        from cpcx.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(recipe_path, overrides or [])
        except RecipeError as exc:
            checks.extend(Check(False, "recipe", line, "") for line in exc.lines)
        else:
            checks.append(Check(True, "recipe", f"{recipe_path} is valid"))
            checks.extend(_recipe_checks(recipe))
    failed = False
    for check in checks:
        if check.ok:
            mark = "[green]✔[/]"
        elif check.required:
            mark, failed = "[red]✘[/]", True
        else:
            mark = "[yellow]![/]"
        fix = f"  [dim]→ {check.fix}[/]" if (check.fix and not check.ok) else ""
        console.print(f"{mark} {check.name}: {check.detail}{fix}")
    return not failed
