"""Consolidation statistics gathered during training, beside the per-batch metrics of `metrics`:

* `PatternExposure`: how often each recurring pattern has been queried and whether each routed
  layer sent each query to episodic memory, the data of P(episodic | pattern seen k times);
* `recurring_query_routing`: one batch's recurring queries and their routing decisions;
* `concatenate_routing`: those of several ranks, joined in rank order;
* `q_histogram`: the distribution of the q measured in one forward pass.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..models.router import Path
from .metrics import token_kinds

Q_HISTOGRAM_BINS = 10
EXPOSURE_BINS = 24             # log2 bins of "times a pattern was seen"


class PatternExposure:
    """Counts how often each recurring pattern has been queried in training, and whether each
    routed layer's router (its own choice, not an exploration draw) sent each query to episodic
    memory: the data of P(episodic | pattern seen k times) per layer, binned by ⌊log2 k⌋.
    `episodic` is (layers, patterns, bins), `total` (patterns, bins)."""

    def __init__(self, n_patterns: int, n_layers: int):
        self.seen = np.zeros(n_patterns, dtype=np.int64)
        self.episodic = np.zeros((n_layers, n_patterns, EXPOSURE_BINS), dtype=np.int64)
        self.total = np.zeros((n_patterns, EXPOSURE_BINS), dtype=np.int64)

    def update(self, patterns: np.ndarray, episodic: np.ndarray) -> None:
        """One step's recurring queries, in stream order: pattern ids (n,) and the routing
        decisions (layers, n)."""
        for index, pattern in enumerate(patterns):
            self.seen[pattern] += 1
            k_bin = min(EXPOSURE_BINS - 1, int(math.log2(self.seen[pattern])))
            self.total[pattern, k_bin] += 1
            self.episodic[:, pattern, k_bin] += episodic[:, index]

    def state_dict(self) -> dict:
        return {"seen": self.seen.copy(), "episodic": self.episodic.copy(),
                "total": self.total.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.episodic, self.total = (np.array(state[k]) for k in
                                                ("seen", "episodic", "total"))


def recurring_query_routing(batch, output) -> Tuple[np.ndarray, np.ndarray]:
    """(pattern ids (n,), episodic decisions (routed layers, n)) of the batch's recurring
    queries, in sequence order. A decision is the router's lowest-priced path, so exploration
    does not blur the curve."""
    queries = token_kinds(batch)["recurring"]
    routed = [r.routing.scores.argmin(-1) == Path.EPISODIC for r in output.layers
              if r.routing is not None]
    # One copy to the host, selected there: on a GPU one wait instead of four.
    host = torch.stack([queries, batch["pattern"], *routed]).long().cpu().numpy()
    queries = host[0].astype(bool)
    return host[1][queries], host[2:][:, queries]


def concatenate_routing(per_rank: Sequence[Tuple[np.ndarray, np.ndarray]]
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's (pattern ids, episodic decisions) as one pair, in rank order, so that every
    rank counts the same exposure."""
    if len(per_rank) == 1:
        return per_rank[0]
    return (np.concatenate([r[0] for r in per_rank]),
            np.concatenate([r[1] for r in per_rank], axis=1))


def q_histogram(output) -> List[int]:
    """Histogram (10 bins on [0, 1]) of the q measured in this forward pass."""
    values = [r.q[r.attention_rows] for r in output.layers if r.q is not None]
    if not values:
        return [0] * Q_HISTOGRAM_BINS
    return torch.histc(torch.cat(values).float(), bins=Q_HISTOGRAM_BINS, min=0, max=1
                       ).long().tolist()
