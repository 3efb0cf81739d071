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
