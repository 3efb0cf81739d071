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


# The group of `all_gather` and `all_reduce_sums`: not the one DistributedDataParallel uses, so
# that destroy_process_group really tears it down (see `shutdown`), and gloo whatever DDP uses:
# what it carries (metric sums, routing decisions, RNG states) lives on the CPU. None: the
# default group.
_group = None


def init_distributed(device: torch.device) -> None:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): nccl bound to this
    process's GPU for training on CUDA, gloo on the CPU."""
    global _group
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        _group = dist.new_group(backend="gloo")


def all_gather(value: Any) -> List[Any]:
    """Every rank's `value` (any picklable object), in rank order."""
    _, size = world()
    if size == 1:
        return [value]
    gathered: List[Any] = [None] * size
    dist.all_gather_object(gathered, value, group=_group)
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
    dist.all_reduce(values, group=_group)
    return dict(zip(keys, values.tolist()))


def shutdown() -> None:
    """Leaves the process group once every rank is done with it.

    A gloo worker thread lets go of a finished collective, and of the tensors it gathered, only
    after the caller has moved on; letting go of a tensor that Python has seen takes the GIL.
    If the interpreter is finalizing by then, Python ends the thread inside that destructor and
    the process aborts ("terminate called without an active exception"): rank 1, which goes
    straight from its last all-gather to exit while rank 0 writes the checkpoint, did so now
    and then. destroy_process_group joins a backend's worker threads, so that they let go while
    the interpreter is alive, but only of a group nothing else holds, and DistributedDataParallel
    keeps the default group's backend alive past it. Our own collectives therefore run on a group
    of their own, which is torn down here after a barrier; what DDP communicates while training
    (its gradient buckets) are tensors Python never sees.
    """
    global _group
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_group)
        _group = None
        dist.destroy_process_group()
