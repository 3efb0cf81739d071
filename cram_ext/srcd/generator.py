"""SRCD, "Sparse Retrieval in Continuous Dynamics" (spec B7): a streamed, seeded generator.

Each sequence interleaves three token types:

* observation: a scalar process observed at irregular times,
  ``v_t = 0.95 v_{t-1} + β sin(ω Δτ_t) + ε_t``, ``Δτ ~ Pareto(1.5)`` clipped to [0.1, 1000],
  ``ε ~ N(0, σ_ε²)``. The process advances at every position; the model sees the most recently
  *observed* value and must predict ``v_t`` at observation positions (dynamics MSE).
* key-write: a (key, value) binding is shown.
* query: a key is shown and the model must name the value bound to it (retrieval accuracy).

Keys come from a vocabulary of ``n_keys`` ids, values from ``n_values`` classes. The first
``n_patterns`` keys are *recurring patterns*: their value is fixed across the whole dataset (drawn
once from ``binding_seed``), so a parametric memory can learn them. The other keys are *novel*:
re-bound to a random value in every sequence, so only attention over the prefix can answer them.
A fraction ``recurring_fraction`` of the queries ask for a recurring pattern, drawn with Zipf
weights so that patterns are seen at different rates (this spreads the "pattern seen k times"
axis of the consolidation analysis). Every queried key is written exactly once, earlier in the
same sequence. The attention an ideal router needs is ``query_rate · (1 − recurring_fraction)``
of the tokens (1.5% with the paper's defaults).

Sequence ``i`` of a stream is a pure function of ``(seed, i)`` and the binding table a pure
function of ``binding_seed``: a stream can restart at any position (exact resume) and be split
across ranks without files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

OBSERVATION, KEY_WRITE, QUERY = 0, 1, 2
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SRCDConfig:
    """Generator parameters. Defaults are the paper's (N=2048); see `SRCDConfig.cpu()`."""

    seq_len: int = 2048
    query_rate: float = 0.05
    recurring_fraction: float = 0.70
    n_patterns: int = 100
    n_keys: int = 512
    n_values: int = 64
    pattern_zipf: float = 1.0        # P(pattern p) ∝ (p + 1)^-pattern_zipf; 0 gives uniform
    decay: float = 0.95
    beta: float = 0.5
    omega: float = 1.0
    noise_std: float = 0.1
    pareto_alpha: float = 1.5
    min_gap: float = 0.1
    max_gap: float = 1000.0
    binding_seed: int = 0            # fixes the recurring patterns' values for the whole dataset

    def __post_init__(self):
        n_queries = self.n_queries
        if not 0.0 < self.query_rate <= 0.25:
            raise ValueError(f"query_rate must be in (0, 0.25], got {self.query_rate}")
        if n_queries < 1:
            raise ValueError(f"seq_len={self.seq_len} with query_rate={self.query_rate} "
                             "gives no query per sequence")
        if not 0.0 <= self.recurring_fraction <= 1.0:
            raise ValueError(f"recurring_fraction must be in [0, 1], got {self.recurring_fraction}")
        n_recurring = round(self.recurring_fraction * n_queries)
        if n_recurring > self.n_patterns:
            raise ValueError(f"{n_recurring} recurring queries per sequence need at least that "
                             f"many patterns, got n_patterns={self.n_patterns}")
        if n_queries - n_recurring > self.n_keys - self.n_patterns:
            raise ValueError("not enough novel keys: raise n_keys or lower query_rate")
        if self.n_values < 2:
            raise ValueError("n_values must be at least 2")

    @property
    def n_queries(self) -> int:
        return round(self.query_rate * self.seq_len)

    @property
    def ideal_attention_fraction(self) -> float:
        """Fraction of tokens that need attention: queries on novel keys."""
        n_novel = self.n_queries - round(self.recurring_fraction * self.n_queries)
        return n_novel / self.seq_len

    @classmethod
    def paper(cls, **overrides) -> "SRCDConfig":
        return cls(**overrides)

    @classmethod
    def cpu(cls, **overrides) -> "SRCDConfig":
        """The CPU-sized default: N=256 tokens, everything else as in the paper."""
        return dataclasses.replace(cls(seq_len=256), **overrides)


def pattern_values(config: SRCDConfig) -> np.ndarray:
    """The value class bound to each recurring pattern, fixed by `binding_seed`."""
    rng = np.random.default_rng([config.binding_seed, 0x5EC0])
    return rng.integers(0, config.n_values, size=config.n_patterns)


def pattern_probabilities(config: SRCDConfig) -> np.ndarray:
    weights = (np.arange(config.n_patterns) + 1.0) ** -config.pattern_zipf
    return weights / weights.sum()


def generate_sequence(config: SRCDConfig, seed: int, index: int,
                      bindings: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Sequence `index` of the stream `seed`, as a dict of length-N arrays.

    Keys: ``gap`` (Δτ_t), ``last_value`` (most recent observed value before t, 0 before the first
    observation), ``token_type``, ``key`` (``n_keys`` where absent), ``value`` (``n_values``
    where absent), ``target_value`` (v_t, meaningful where ``dynamics_mask``), ``dynamics_mask``
    (observation positions with an earlier observation), ``oracle_value`` (the Bayes predictor
    E[v_t | past observations and gaps], for the reachable MSE), ``target_class`` (the value
    bound to the queried key, ``IGNORE_INDEX`` off queries), ``pattern`` (recurring pattern id
    at writes and queries of recurring keys, -1 elsewhere).
    """
    bindings = pattern_values(config) if bindings is None else bindings
    rng = np.random.default_rng([seed, index])
    n = config.seq_len

    gap = config.min_gap * (1.0 + rng.pareto(config.pareto_alpha, size=n))
    gap = np.clip(gap, config.min_gap, config.max_gap)
    drift = config.beta * np.sin(config.omega * gap)
    noise = rng.normal(0.0, config.noise_std, size=n)
    stationary_std = np.sqrt((config.beta ** 2 / 2 + config.noise_std ** 2)
                             / (1 - config.decay ** 2))
    value_process = np.empty(n)
    previous = rng.normal(0.0, stationary_std)
    for t in range(n):
        previous = config.decay * previous + drift[t] + noise[t]
        value_process[t] = previous

    # Queries in the last 3/4 of the sequence; each one's write uniformly in the free prefix.
    token_type = np.full(n, OBSERVATION, dtype=np.int64)
    n_queries = config.n_queries
    query_positions = np.sort(rng.choice(np.arange(n // 4, n), size=n_queries, replace=False))
    token_type[query_positions] = QUERY
    write_positions = np.empty(n_queries, dtype=np.int64)
    for i, query_position in enumerate(query_positions):
        free = np.flatnonzero(token_type[:query_position] == OBSERVATION)
        write_positions[i] = rng.choice(free)
        token_type[write_positions[i]] = KEY_WRITE

    n_recurring = round(config.recurring_fraction * n_queries)
    patterns = rng.choice(config.n_patterns, size=n_recurring, replace=False,
                          p=pattern_probabilities(config))
    novel_keys = rng.choice(np.arange(config.n_patterns, config.n_keys),
                            size=n_queries - n_recurring, replace=False)
    novel_values = rng.integers(0, config.n_values, size=n_queries - n_recurring)
    query_keys = np.concatenate([patterns, novel_keys])
    query_values = np.concatenate([bindings[patterns], novel_values])
    order = rng.permutation(n_queries)       # which query asks for which binding
    query_keys, query_values = query_keys[order], query_values[order]

    key = np.full(n, config.n_keys, dtype=np.int64)
    value = np.full(n, config.n_values, dtype=np.int64)
    target_class = np.full(n, IGNORE_INDEX, dtype=np.int64)
    pattern = np.full(n, -1, dtype=np.int64)
    key[write_positions] = query_keys
    value[write_positions] = query_values
    key[query_positions] = query_keys
    target_class[query_positions] = query_values
    recurring = query_keys < config.n_patterns
    pattern[write_positions[recurring]] = query_keys[recurring]
    pattern[query_positions[recurring]] = query_keys[recurring]

    # What the model sees of the process, and the best possible prediction of it.
    observed = token_type == OBSERVATION
    last_value = np.zeros(n)
    oracle_value = np.zeros(n)
    dynamics_mask = np.zeros(n, dtype=bool)
    seen_any, last_seen, rolled = False, 0.0, 0.0
    for t in range(n):
        last_value[t] = last_seen
        rolled = config.decay * rolled + drift[t]   # E[v_t | observations before t]
        oracle_value[t] = rolled
        if observed[t]:
            dynamics_mask[t] = seen_any
            seen_any, last_seen, rolled = True, value_process[t], value_process[t]

    return {
        "gap": gap.astype(np.float32),
        "last_value": last_value.astype(np.float32),
        "token_type": token_type,
        "key": key,
        "value": value,
        "target_value": value_process.astype(np.float32),
        "dynamics_mask": dynamics_mask,
        "oracle_value": oracle_value.astype(np.float32),
        "target_class": target_class,
        "pattern": pattern,
    }


def collate(sequences) -> Dict[str, torch.Tensor]:
    """Stack per-sequence arrays into (batch, N) tensors."""
    return {name: torch.from_numpy(np.stack([s[name] for s in sequences]))
            for name in sequences[0]}


class SRCDStream(IterableDataset):
    """An endless stream of SRCD sequences, sequence `start`, `start + 1`, ... of stream `seed`.

    With `world_size > 1`, rank r yields the sequences whose index is r modulo `world_size`, so
    ranks see disjoint data and the union over ranks is the single-process stream.
    """

    def __init__(self, config: SRCDConfig, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.config, self.seed, self.start = config, seed, start
        self.rank, self.world_size = rank, world_size
        self.bindings = pattern_values(config)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        index = self.start + (self.rank - self.start) % self.world_size
        while True:
            yield generate_sequence(self.config, self.seed, index, self.bindings)
            index += self.world_size


def batch_at(config: SRCDConfig, seed: int, step: int, batch_size: int, rank: int = 0,
             world_size: int = 1, bindings: Optional[np.ndarray] = None
             ) -> Dict[str, torch.Tensor]:
    """The batch this rank trains on at `step`: a pure function of its arguments.

    The global batch of a step is sequences ``[step·B·W, (step+1)·B·W)`` of the stream; rank r
    takes every W-th of them. Training resumes at any step by calling this with that step.
    """
    bindings = pattern_values(config) if bindings is None else bindings
    first = step * batch_size * world_size
    indices = range(first + rank, first + batch_size * world_size, world_size)
    return collate([generate_sequence(config, seed, i, bindings) for i in indices])
