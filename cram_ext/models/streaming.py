"""The state a `CRAMModel` carries between calls when it reads a stream token by token
(`CRAMModel.init_state`, `CRAMModel.prefill`, `CRAMModel.step`).

Per layer: the working memory's state (the scan's (batch, d_inner, N) state, or the CT-ODE's
hidden vector) and, for a layer with attention, its key/value cache (`AttentionCache`). The
modules update these tensors in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class AttentionCache:
    """One attention layer's keys and values, (batch, heads, capacity, head_dim), and how many
    entries each sequence holds (`lengths`, int32 (batch,)).

    With `memory_size` set (the "written" episodic buffer) the cache keeps only the entries of
    tokens that wrote a binding, the most recent `memory_size` of them: each call appends every
    new token's entry, masks out those that wrote nothing, and then compacts (a one-token step
    needs no compaction: its entry is simply overwritten next time unless it was written; and
    a step in which no stream writes or attends leaves the cache as it is). One spare slot
    beyond `memory_size` holds the newest entry before the oldest is evicted, so a written
    token attends over the buffer and itself. Once the buffer is full it is a ring: a
    one-token step that writes moves its entry from the spare slot into the oldest entry's
    slot, `start` (int64 (batch,)), and advances `start`, so eviction costs one entry's write,
    not a pass over the buffer (attention does not depend on the order of its keys);
    `in_order` gives the entries oldest first. Without `memory_size` ("prefix" keys, the
    dense layers) every token's entry is kept, up to `capacity`.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    memory_size: Optional[int] = None
    start: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int,
              memory_size: Optional[int], device=None, dtype=torch.float32) -> "AttentionCache":
        slots = capacity if memory_size is None else min(capacity, memory_size) + 1
        keys = torch.zeros(batch, heads, slots, head_dim, device=device, dtype=dtype)
        start = (None if memory_size is None
                 else torch.zeros(batch, dtype=torch.int64, device=device))
        return cls(keys, torch.zeros_like(keys),
                   torch.zeros(batch, dtype=torch.int32, device=device), memory_size, start)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """The slot indices 0..capacity-1 (int64, on the cache's device), made once: the key
        mask of every decoding step compares them with the lengths."""
        return torch.arange(self.capacity, device=self.keys.device)

    def in_order(self):
        """(keys, values) with each sequence's entries oldest first in slots [0, lengths)."""
        if self.start is None:
            return self.keys, self.values
        index = self._oldest_first()
        return self.keys.gather(2, index), self.values.gather(2, index)

    def unroll(self):
        """Puts the entries oldest first in place and `start` at 0: what a chunk of several
        tokens expects (`memory._attend_with_cache` compacts it in order)."""
        if self.start is not None and bool(self.start.any()):
            index = self._oldest_first()
            self.keys.copy_(self.keys.gather(2, index))
            self.values.copy_(self.values.gather(2, index))
            self.start.zero_()

    def _oldest_first(self) -> torch.Tensor:
        """The gather index (batch, heads, slots, head_dim) that rotates each ring of
        memory_size slots to start at its oldest entry (the spare slot stays where it is)."""
        ring = min(self.memory_size, self.capacity - 1)
        slots = self.slots[None, :]
        rotated = torch.where(slots < ring, (slots + self.start[:, None]) % ring, slots)
        return rotated[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.lengths) + (() if self.start is None
                                                             else (self.start,))
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LayerState:
    working: Optional[torch.Tensor] = None     # scan (batch, d_inner, N) or CT-ODE (batch, d)
    attention: Optional[AttentionCache] = None


@dataclass
class StreamState:
    """Everything a `CRAMModel` needs to continue a batch of streams: per-layer states and the
    number of tokens read so far (the absolute position of the next one)."""

    layers: List[LayerState]
    position: int = 0

    def nbytes(self) -> int:
        """Memory held by the state (working-memory states and key/value caches), in bytes."""
        total = 0
        for layer in self.layers:
            if layer.working is not None:
                total += layer.working.numel() * layer.working.element_size()
            if layer.attention is not None:
                total += layer.attention.nbytes()
        return total
