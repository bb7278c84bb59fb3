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
