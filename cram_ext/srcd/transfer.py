"""Transfer tasks for the paper's transfer protocol: synthetic Copy and multi-query Associative
recall, emitted in the SRCD batch format so the same model and trainer run them.

Copy and recall are pure retrieval: every binding is novel to the sequence (keys from the
non-recurring part of the SRCD vocabulary, values drawn per sequence), so nothing consolidated on
SRCD can stand in for attention there. `recurring_recall` is recall whose keys are a fraction
`recurring_fraction` of SRCD's recurring patterns, bound to their SRCD values: what a model
consolidated on SRCD can answer without attention. The question is how much attention a model
whose semantic memory and router were trained on SRCD spends on them compared with one trained
from scratch. Gaps are Pareto-distributed as in SRCD; there is no dynamics target.

* copy: ``n_items`` symbols are written at consecutive positions (key = slot id), then read back
  in order by queries carrying the slot ids.
* recall (multi-query associative recall): ``n_items`` random (key, value) pairs are written,
  then ``n_items`` queries ask for them in random order, with observation filler in between.
* recurring_recall: recall where ``round(recurring_fraction · n_items)`` of the pairs are
  recurring patterns (drawn uniformly, ``pattern`` set at their writes and queries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from .generator import (IGNORE_INDEX, KEY_WRITE, OBSERVATION, QUERY, SRCDConfig, collate,
                        pattern_values)

TASKS = ("copy", "recall", "recurring_recall")


@dataclass(frozen=True)
class TransferConfig:
    task: str = "recall"
    n_items: int = 16
    source: SRCDConfig = SRCDConfig.cpu()   # vocabulary, sequence length, recurring bindings
    recurring_fraction: float = 0.5         # recurring_recall only

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown transfer task {self.task!r}; expected one of {TASKS}")
        if 2 * self.n_items > self.source.seq_len:
            raise ValueError("2 * n_items must fit in the sequence")
        if self.n_items > self.source.n_keys - self.source.n_patterns:
            raise ValueError("n_items exceeds the number of novel keys")
        if not 0.0 <= self.recurring_fraction <= 1.0:
            raise ValueError(f"recurring_fraction must be in [0, 1], got {self.recurring_fraction}")
        if round(self.recurring_fraction * self.n_items) > self.source.n_patterns:
            raise ValueError("more recurring items than the source has recurring patterns")


def generate_transfer_sequence(config: TransferConfig, seed: int, index: int
                               ) -> Dict[str, np.ndarray]:
    src = config.source
    rng = np.random.default_rng([seed, index, TASKS.index(config.task)])
    n, m = src.seq_len, config.n_items
    token_type = np.full(n, OBSERVATION, dtype=np.int64)
    keys = rng.choice(np.arange(src.n_patterns, src.n_keys), size=m, replace=False)
    values = rng.integers(0, src.n_values, size=m)
    pattern_of_item = np.full(m, -1, dtype=np.int64)
    if config.task == "recurring_recall":
        n_recurring = round(config.recurring_fraction * m)
        chosen = rng.choice(src.n_patterns, size=n_recurring, replace=False)
        keys[:n_recurring], values[:n_recurring] = chosen, pattern_values(src)[chosen]
        pattern_of_item[:n_recurring] = chosen
        order = rng.permutation(m)      # recurring items anywhere in the sequence
        keys, values, pattern_of_item = keys[order], values[order], pattern_of_item[order]
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
    pattern = np.full(n, -1, dtype=np.int64)
    pattern[write_positions], pattern[query_positions] = pattern_of_item, pattern_of_item[query_order]
    gap = np.clip(src.min_gap * (1.0 + rng.pareto(src.pareto_alpha, size=n)),
                  src.min_gap, src.max_gap)
    zeros = np.zeros(n, dtype=np.float32)
    return {
        "gap": gap.astype(np.float32), "last_value": zeros, "token_type": token_type,
        "key": key, "value": value, "target_value": zeros,
        "dynamics_mask": np.zeros(n, dtype=bool), "oracle_value": zeros,
        "target_class": target_class, "pattern": pattern,
    }


def transfer_batch_at(config: TransferConfig, seed: int, step: int, batch_size: int,
                      rank: int = 0, world_size: int = 1) -> Dict[str, torch.Tensor]:
    """Same indexing contract as `generator.batch_at`."""
    first = step * batch_size * world_size
    indices = range(first + rank, first + batch_size * world_size, world_size)
    return collate([generate_transfer_sequence(config, seed, i) for i in indices])
