"""Transfer tasks for the paper's transfer protocol: synthetic Copy and multi-query Associative
recall, emitted in the SRCD batch format so the same model and trainer run them.

Both are pure retrieval: every binding is novel to the sequence (keys from the non-recurring part
of the SRCD vocabulary, values drawn per sequence), so the question is how much attention a model
whose semantic memory and router were trained on SRCD spends on them compared with one trained
from scratch. Gaps are Pareto-distributed as in SRCD; there is no dynamics target.

* copy: ``n_items`` symbols are written at consecutive positions (key = slot id), then read back
  in order by queries carrying the slot ids.
* recall (multi-query associative recall): ``n_items`` random (key, value) pairs are written,
  then ``n_items`` queries ask for them in random order, with observation filler in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from .generator import (IGNORE_INDEX, KEY_WRITE, OBSERVATION, QUERY, SRCDConfig, collate)

TASKS = ("copy", "recall")


@dataclass(frozen=True)
class TransferConfig:
    task: str = "recall"
    n_items: int = 16
    source: SRCDConfig = SRCDConfig.cpu()   # vocabulary sizes and sequence length come from here

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown transfer task {self.task!r}; expected one of {TASKS}")
        if 2 * self.n_items > self.source.seq_len:
            raise ValueError("2 * n_items must fit in the sequence")
        if self.n_items > self.source.n_keys - self.source.n_patterns:
            raise ValueError("n_items exceeds the number of novel keys")


def generate_transfer_sequence(config: TransferConfig, seed: int, index: int
                               ) -> Dict[str, np.ndarray]:
    src = config.source
    rng = np.random.default_rng([seed, index, TASKS.index(config.task)])
    n, m = src.seq_len, config.n_items
    token_type = np.full(n, OBSERVATION, dtype=np.int64)
    keys = rng.choice(np.arange(src.n_patterns, src.n_keys), size=m, replace=False)
    values = rng.integers(0, src.n_values, size=m)
    if config.task == "copy":
        write_positions = np.arange(m)
        query_positions = np.arange(n - m, n)
        query_order = np.arange(m)
    else:
        write_positions = np.sort(rng.choice(np.arange(n // 2), size=m, replace=False))
        query_positions = np.sort(rng.choice(np.arange(n // 2, n), size=m, replace=False))
        query_order = rng.permutation(m)
    token_type[write_positions] = KEY_WRITE
    token_type[query_positions] = QUERY

    key = np.full(n, src.n_keys, dtype=np.int64)
    value = np.full(n, src.n_values, dtype=np.int64)
    target_class = np.full(n, IGNORE_INDEX, dtype=np.int64)
    key[write_positions], value[write_positions] = keys, values
    key[query_positions] = keys[query_order]
    target_class[query_positions] = values[query_order]
    gap = np.clip(src.min_gap * (1.0 + rng.pareto(src.pareto_alpha, size=n)),
                  src.min_gap, src.max_gap)
    zeros = np.zeros(n, dtype=np.float32)
    return {
        "gap": gap.astype(np.float32), "last_value": zeros, "token_type": token_type,
        "key": key, "value": value, "target_value": zeros,
        "dynamics_mask": np.zeros(n, dtype=bool), "oracle_value": zeros,
        "target_class": target_class, "pattern": np.full(n, -1, dtype=np.int64),
    }


def transfer_batch_at(config: TransferConfig, seed: int, step: int, batch_size: int,
                      rank: int = 0, world_size: int = 1) -> Dict[str, torch.Tensor]:
    """Same indexing contract as `generator.batch_at`."""
    first = step * batch_size * world_size
    indices = range(first + rank, first + batch_size * world_size, world_size)
    return collate([generate_transfer_sequence(config, seed, i) for i in indices])
