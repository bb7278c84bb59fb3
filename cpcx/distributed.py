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
import logging
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
                  timeout: datetime.timedelta | None = None, join_alone: bool = False) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device. ``timeout``: how long a
    collective may wait for the slowest rank (torch's default, 30 minutes for gloo and nccl, when None).
    ``join_alone``: join under torchrun even as its only process (DDP itself needs a group; cpcx's stages skip it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, field)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    group = world > 1 or (join_alone and "LOCAL_RANK" in os.environ)
    if group and not faulthandler.is_enabled():
        # A rank that dies in C++ (gloo/nccl teardown: "terminate called…", SIGABRT; a segfault) otherwise leaves
        # one line and torchrun's "exitcode -6"; this prints where each of its Python threads was (no locals).
        faulthandler.enable()
    if group and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
        created = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, created_group=created)


_left_a_group = False  # this process joined and left a process group: see ``end_rank``


def cleanup(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group if ``init_from_env`` joined it (a caller's own group is left alone).

    ``finished``: this rank got to the end of its work, so it first waits for the others and all leave together
    (no rank tears its connections down while another still works). After an error there is no barrier: the others
    may never come, and torchrun stops them anyway."""
    global _left_a_group
    if info.created_group and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        _left_a_group = True


def end_rank(code: int | str | None) -> None:
    """End this process now if it left a process group (else return), with the status ``sys.exit(code)`` gives
    (None → 0, a message → printed, 1): stdio and logs flushed, the interpreter's and C++'s teardown skipped.

    On a loaded machine a gloo rank aborted in that teardown, after its work was done, its outputs written and its
    group destroyed: "terminate called without an active exception", SIGABRT, faulthandler showing no Python frame
    (most often a std::thread destroyed while still running; which one is not known). torchrun then reports the run
    failed and stops the others. Seen in 3 of 12 loaded runs of the sharded pseudo test, in 1 of 6 of the sharded
    predict test even with the ranks leaving together, and once in benchmarks/gpu_check.py's DDP part (which now
    ends this way too). Every output is written atomically and every pool shut down before this point, so skipping
    the teardown loses nothing."""
    if not _left_a_group:
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


@contextlib.contextmanager
def joined(device_spec: str, field: str = "train.device", timeout: datetime.timedelta | None = None,
           join_alone: bool = False) -> Iterator[DistInfo]:
    """``init_from_env`` for the body; on leaving, ``cleanup`` (together with the other ranks when it finished)."""
    info = init_from_env(device_spec, field, timeout, join_alone)
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

