"""Several processes with torchrun/DDP: launching, joining the process group, and small collectives.

``cpcx train --gpus N`` re-runs the same command under ``torchrun --standalone --nproc-per-node N``; plain
``torchrun --nproc-per-node N -m cpcx train ...`` works the same. Each process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment torchrun sets; nccl is used on CUDA, gloo on CPU. Without those variables
everything here is a no-op on one process.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from cpcx.device import resolve_device
from cpcx.errors import CpcxError


def relaunch_with_torchrun(gpus: int) -> int:
    """Run this very command again under torchrun with ``gpus`` processes; returns torchrun's exit code."""
    if not torch.cuda.is_available():
        raise CpcxError(
            f"--gpus {gpus}: CUDA is not available here; drop --gpus (or test DDP on CPU with "
            f"`torchrun --nproc-per-node {gpus} -m cpcx ...` and train.device=cpu)"
        )
    if gpus > torch.cuda.device_count():
        raise CpcxError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} GPU(s); use --gpus <= that")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               "-m", "cpcx", *sys.argv[1:]]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:  # torchrun forwards the signal to the workers; wait for them to stop
        return 130


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool = False  # this call joined the group, so this caller should leave it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_spec: str, field: str = "train.device",
                  timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device. ``timeout``: how long a
    collective may wait for the slowest rank (torch's default, 30 minutes for gloo and nccl, when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, field)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not faulthandler.is_enabled():
        # A rank that dies in C++ (gloo/nccl teardown: "terminate called…", SIGABRT; a segfault) otherwise leaves
        # one line and torchrun's "exitcode -6"; this prints where each of its Python threads was (no locals).
        faulthandler.enable()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
        created = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, created_group=created)


def cleanup(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group if ``init_from_env`` joined it (a caller's own group is left alone).

    ``finished``: this rank got to the end of its work, so it first waits for the others and all leave together.
    A rank that tore its gloo connections down and exited while rank 0 was still at its own last steps aborted at
    exit in C++ ("terminate called without an active exception", SIGABRT, after its outputs were written) in 3 of
    12 runs of the sharded pseudo test on a loaded machine, and in none of 28 with this barrier. After an error there is no barrier: the others may
    never come, and torchrun stops them anyway."""
    if info.created_group and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(device_spec: str, field: str = "train.device",
           timeout: datetime.timedelta | None = None) -> Iterator[DistInfo]:
    """``init_from_env`` for the body; on leaving, ``cleanup`` (together with the other ranks when it finished)."""
    info = init_from_env(device_spec, field, timeout)
    finished = False
    try:
        yield info
        finished = True
    finally:
        cleanup(info, finished)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the processes (in place; returned for chaining). Identity on one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values

