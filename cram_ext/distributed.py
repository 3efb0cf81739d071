"""Data-parallel helpers for training under torchrun; in a single process each is a no-op."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist


def world() -> Tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def all_gather(value: Any) -> List[Any]:
    """Every rank's `value` (any picklable object), in rank order."""
    _, size = world()
    if size == 1:
        return [value]
    gathered: List[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sums(sums: Dict[str, float]) -> Dict[str, float]:
    """The sum over ranks of each entry; every rank must hold the same keys."""
    _, size = world()
    if size == 1:
        return sums
    keys = sorted(sums)
    if any(k != keys for k in all_gather(keys)):
        raise RuntimeError("ranks produced different metric keys")
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def shutdown() -> None:
    """Leaves the process group once every rank is done with it: a barrier, then
    destroy_process_group.

    A gloo worker thread lets go of a finished collective (and of the tensors it gathered) only
    after the caller has moved on, and letting go of tensors takes the GIL. A rank that went
    straight from its last all-gather to interpreter shutdown (rank 1, which does not write the
    checkpoint) could have that worker ask for the GIL while the interpreter finalizes; Python
    ends such a thread, the unwinding hits the destructor it was in, and the process aborts with
    "terminate called without an active exception". The barrier, which gathers no tensors, is
    the last collective instead: the caller waits in it without the GIL until every rank (rank 0
    with its checkpoint written) arrives, which lets the workers finish with the earlier ones.
    destroy_process_group alone would not do: DistributedDataParallel keeps the gloo backend and
    its threads alive past it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
