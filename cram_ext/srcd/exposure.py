"""Consolidation statistics gathered during training, beside the per-batch metrics of `metrics`:

* `PatternExposure`: how often each recurring pattern has been queried and whether the router
  sent each query to episodic memory, the data of P(episodic | pattern seen k times);
* `recurring_query_routing`: one batch's recurring queries and their routing decisions;
* `concatenate_routing`: those of several ranks, joined in rank order;
* `q_histogram`: the distribution of the q measured in one forward pass.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

Q_HISTOGRAM_BINS = 10
EXPOSURE_BINS = 24             # log2 bins of "times a pattern was seen"


class PatternExposure:
    """Counts how often each recurring pattern has been queried in training, and whether the
    router (argmax of π, in any routed layer) sent each query to episodic memory: the data of
    P(episodic | pattern seen k times), binned by ⌊log2 k⌋."""

    def __init__(self, n_patterns: int):
        self.seen = np.zeros(n_patterns, dtype=np.int64)
        self.episodic = np.zeros((n_patterns, EXPOSURE_BINS), dtype=np.int64)
        self.total = np.zeros((n_patterns, EXPOSURE_BINS), dtype=np.int64)

    def update(self, patterns: np.ndarray, episodic: np.ndarray) -> None:
        """One step's recurring queries (pattern ids and routing decisions), in stream order."""
        for pattern, went_episodic in zip(patterns, episodic):
            self.seen[pattern] += 1
            k_bin = min(EXPOSURE_BINS - 1, int(math.log2(self.seen[pattern])))
            self.total[pattern, k_bin] += 1
            self.episodic[pattern, k_bin] += int(went_episodic)

    def state_dict(self) -> dict:
        return {"seen": self.seen.copy(), "episodic": self.episodic.copy(),
                "total": self.total.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.episodic, self.total = (np.array(state[k]) for k in
                                                ("seen", "episodic", "total"))


def recurring_query_routing(batch, output) -> Tuple[np.ndarray, np.ndarray]:
    """(pattern ids, episodic decisions) of the batch's recurring queries, in sequence order."""
    queries = batch["pattern"] >= 0
    queries &= batch["target_class"] >= 0
    routed = [r.probs.argmax(-1) == 1 for r in output.layers if r.probs is not None]
    if not routed:
        episodic = torch.zeros_like(queries)
    else:
        episodic = torch.stack(routed).any(0)
    return batch["pattern"][queries].numpy(), episodic[queries].numpy()


def concatenate_routing(per_rank: Sequence[Tuple[np.ndarray, np.ndarray]]
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's (pattern ids, episodic decisions) as one pair, in rank order, so that every
    rank counts the same exposure."""
    if len(per_rank) == 1:
        return per_rank[0]
    return (np.concatenate([r[0] for r in per_rank]), np.concatenate([r[1] for r in per_rank]))


def q_histogram(output) -> List[int]:
    """Histogram (10 bins on [0, 1]) of the q measured in this forward pass."""
    values = [r.q[r.attention_rows] for r in output.layers if r.q is not None]
    if not values:
        return [0] * Q_HISTOGRAM_BINS
    return torch.histc(torch.cat(values).float(), bins=Q_HISTOGRAM_BINS, min=0, max=1
                       ).long().tolist()
