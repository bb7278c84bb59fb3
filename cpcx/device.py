"""Choosing the device and the autocast precision, with clear errors instead of CUDA tracebacks."""
from __future__ import annotations

import os

import torch

from cpcx.errors import CpcxError


def resolve_device(spec: str, field: str = "device") -> torch.device:
    """``auto`` → the local CUDA device under torchrun (LOCAL_RANK), else cuda:0 if present, else cpu."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CpcxError(f"{field}: '{spec}' asked for a GPU but CUDA is not available here; set {field}=cpu or auto")
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise CpcxError(f"{field}: '{spec}' is not a device; use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CpcxError(f"{field}: {spec} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    raise CpcxError(f"{field}: '{spec}' is not a device; use auto, cpu, cuda or cuda:N")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); None where unreadable."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return None
    return set(flags.split(":", 1)[-1].split())


def cpu_bf16_native() -> bool | None:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX on x86, read from /proc/cpuinfo);
    None where that cannot be told (not Linux). Without it PyTorch emulates bf16 and autocast runs slower
    than fp32."""
    words = _cpu_flags()
    return None if words is None else bool(words & {"avx512_bf16", "amx_bf16", "bf16"})  # "bf16": ARM's name


def cpu_int8_dot() -> bool | None:
    """Whether this CPU has 8-bit integer dot products (AVX-512 VNNI, AVX-VNNI or AMX on x86, dot products on ARM),
    which make an int8 network (``pseudo.saliency.precision: int8``) about 3× faster than float; None where that
    cannot be told."""
    words = _cpu_flags()
    return None if words is None else bool(words & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def slow_bf16_warning(device: torch.device, precision: str, field: str) -> str | None:
    """One line when ``precision: bf16`` asks for bf16 on a CPU that only emulates it, else None."""
    if device.type != "cpu" or precision != "bf16" or cpu_bf16_native() is not False:
        return None
    return (f"{field}: bf16 on a CPU without AVX-512 BF16/AMX is emulated and slower than fp32 here; "
            f"set {field}=fp32 (or auto)")


def report_slow_bf16(device: torch.device, precision: str, field: str, say) -> None:
    """``say`` the :func:`slow_bf16_warning` line of a stage (marked as a warning), if there is one."""
    line = slow_bf16_warning(device, precision, field)
    if line:
        say(f"[yellow]![/] {line}")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto`` means bf16 on CUDA and fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, precision: str):
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
