"""Labelling over several processes and machines: ``cpcx pseudo`` and ``cpcx predict`` under torchrun.

    torchrun --standalone --nproc-per-node 4 -m cpcx pseudo -r R
    torchrun --nnodes 2 --node-rank K --master-addr HOST --master-port 29500 --nproc-per-node 4 -m cpcx pseudo -r R

Each process (rank) labels a disjoint shard of the images and writes its own label files; the run folder
must be on a file system every machine sees. Rank 0 alone writes the shared files (stage.json, the resolved
recipe, metrics.json, confusion.csv, figures) and sums the ranks' integer confusion matrices, so the merged
metrics are exactly those of one process. Without torchrun's variables everything here is one process.
"""
from __future__ import annotations

import datetime
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from cpcx import distributed
from cpcx.distributed import DistInfo

T = TypeVar("T")

#: How long a rank may wait for the others at a collective. Rank 0 trains the class probe (minutes to hours at
#: COCO scale) while the others wait, and ranks finish their shards at different times; torch's 30-minute default
#: would kill a healthy run. A rank that dies does not leave the others waiting: torchrun stops them all.
LABELLING_TIMEOUT = datetime.timedelta(hours=12)


def joined(device_spec: str, field: str):
    """``with shard.joined(...) as ranks``: this process's rank, world size and device (one process without
    torchrun) for the body; the ranks that finish leave the group together (``distributed.cleanup``)."""
    return distributed.joined(device_spec, field, timeout=LABELLING_TIMEOUT)


def shard_blocks(items: Sequence[T], rank: int, world: int, block: int = 1) -> list[T]:
    """Rank ``rank``'s share: blocks ``rank, rank + world, …`` of ``block`` consecutive items.

    Whole blocks, not single items, so that with ``block`` = the inference batch size every rank runs exactly the
    batches one process would run (same images batched together): the labels stay bit-identical to a
    single-process run, where batching different images together could move float rounding.
    """
    if world < 1 or not 0 <= rank < world or block < 1:
        raise ValueError(f"rank {rank} of {world} with blocks of {block}")
    return [item for start in range(rank * block, len(items), world * block)
            for item in items[start:start + block]]


def sum_over_ranks(values: np.ndarray, info: DistInfo) -> np.ndarray:
    """The element-wise sum of ``values`` over all ranks (an int64 array stays exact); a copy on one process."""
    tensor = torch.from_numpy(np.array(values, copy=True))
    if not info.enabled:
        return tensor.numpy()
    # nccl reduces CUDA tensors only; gloo CPU ones.
    return distributed.all_reduce_sum(tensor.to(info.device)).cpu().numpy()


def main_first(info: DistInfo, work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 while the others wait, then let every rank go on (rank 0 gets its result)."""
    result = work() if info.is_main else None
    distributed.barrier()
    return result


def describe(info: DistInfo) -> str:
    """`` · rank 0 of 4`` in a sharded run, else nothing (for the stage's opening line)."""
    return f" · rank {info.rank} of {info.world_size}" if info.enabled else ""
