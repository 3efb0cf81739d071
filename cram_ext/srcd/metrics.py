"""SRCD metrics, accumulated as sums so they add up exactly over batches and ranks.

`batch_sums(batch, output, n_layers)` turns one forward pass into a dict of counts and sums;
`add_sums` accumulates them; `summarize` divides them into the reported metrics:

* accuracy (and its recurring / novel split): retrieval accuracy on query positions;
* dynamics_mse, oracle_mse: next-value MSE on observation positions, and the MSE of the Bayes
  predictor E[v_t | past] (the reachable floor; the noise floor σ_ε² is the generator's config);
* attention_fraction (B6): (token, layer) pairs that ran attention / (tokens × layers with
  attention), overall and per layer; attention_ops: the same pairs / (tokens × all layers), the
  paper's "attention ops vs a dense Transformer of the same depth";
* mean_q: q over the pairs that ran attention in layers with a semantic path; mean_q_hat: q̂ over
  query positions in those layers; both also split by recurring / novel query keys;
* routing by token kind (`TOKEN_KINDS`: recurring query, novel query, every other token), per
  layer with a router: ``attention/<layer>/<kind>``, the fraction of that kind's tokens that ran
  attention (P(attention | kind); in training this includes probes), and
  ``semantic/<layer>/<kind>``, the fraction the router sent to semantic memory.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..models.router import Path
from .generator import IGNORE_INDEX

TOKEN_KINDS = ("recurring", "novel", "other")


def token_kinds(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Boolean (batch, L) masks of the recurring queries, the novel queries and the rest."""
    queries = batch["target_class"] != IGNORE_INDEX
    recurring = queries & (batch["pattern"] >= 0)
    novel = queries & (batch["pattern"] < 0)
    return {"recurring": recurring, "novel": novel, "other": ~queries}


def routed_layers(metrics: Dict) -> List[int]:
    """The layers with a router in `metrics` (or in rows aggregated from them): those with
    ``attention/<layer>/<kind>`` entries."""
    return sorted({int(key.split("/")[1]) for key in metrics if key.startswith("attention/")
                   and key.count("/") == 2})


@torch.no_grad()
def batch_sums(batch: Dict[str, torch.Tensor], output, n_layers: int) -> Dict[str, float]:
    # Added on the device in float64, in the order Python would add the floats, and read back
    # in one copy: on a GPU one wait per batch instead of one per entry (the masked float sums
    # keep boolean indexing, which waits too, so that they round as they always have).
    sums: Dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        value = value.double()
        sums[key] = sums[key] + value if key in sums else value

    queries = batch["target_class"] != IGNORE_INDEX
    correct = (output.value_logits.argmax(-1) == batch["target_class"]) & queries
    recurring = queries & (batch["pattern"] >= 0)
    novel = queries & (batch["pattern"] < 0)
    add("queries", queries.sum())
    add("correct", correct.sum())
    add("recurring_queries", recurring.sum())
    add("recurring_correct", (correct & recurring).sum())
    add("novel_queries", novel.sum())
    add("novel_correct", (correct & novel).sum())
    observed = batch["dynamics_mask"]
    add("observations", observed.sum())
    add("dynamics_se", (output.next_value.detach() - batch["target_value"]).pow(2)[observed].sum())
    add("oracle_se", (batch["oracle_value"] - batch["target_value"]).pow(2)[observed].sum())
    tokens = float(batch["gap"].numel())
    counts = {"tokens": tokens, "token_layers": tokens * n_layers}
    for index, record in enumerate(output.layers):
        if record.attention_rows is None:
            continue
        add(f"attention_rows/{index}", record.attention_rows.sum())
        counts[f"attention_tokens/{index}"] = tokens
        if record.q is not None:
            add("q_sum", record.q.sum())
            add("q_count", record.attention_rows.sum())
            add("q_hat_sum", record.q_hat[queries].sum())
            add("q_hat_count", queries.sum())
            for kind, mask in (("recurring", recurring), ("novel", novel)):
                measured = mask & record.attention_rows
                add(f"q_{kind}_sum", record.q[measured].sum())
                add(f"q_{kind}_count", measured.sum())
                add(f"q_hat_{kind}_sum", record.q_hat[mask].sum())
                add(f"q_hat_{kind}_count", mask.sum())
        if record.routing is not None:
            for kind, mask in token_kinds(batch).items():
                add(f"tokens/{index}/{kind}", mask.sum())
                add(f"attention/{index}/{kind}", (record.attention_rows & mask).sum())
                add(f"semantic/{index}/{kind}",
                    ((record.routing.choice == Path.SEMANTIC) & mask).sum())
    values = torch.stack(list(sums.values())).tolist()
    return {**dict(zip(sums, values)), **counts}


def add_sums(total: Dict[str, float], sums: Dict[str, float]) -> Dict[str, float]:
    for key, value in sums.items():
        total[key] = total.get(key, 0.0) + value
    return total


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def summarize(sums: Dict[str, float]) -> Dict[str, float]:
    metrics = {
        "accuracy": _ratio(sums.get("correct", 0.0), sums.get("queries", 0.0)),
        "accuracy_recurring": _ratio(sums.get("recurring_correct", 0.0),
                                     sums.get("recurring_queries", 0.0)),
        "accuracy_novel": _ratio(sums.get("novel_correct", 0.0), sums.get("novel_queries", 0.0)),
        "dynamics_mse": _ratio(sums.get("dynamics_se", 0.0), sums.get("observations", 0.0)),
        "oracle_mse": _ratio(sums.get("oracle_se", 0.0), sums.get("observations", 0.0)),
        "mean_q": _ratio(sums.get("q_sum", 0.0), sums.get("q_count", 0.0)),
        "mean_q_hat": _ratio(sums.get("q_hat_sum", 0.0), sums.get("q_hat_count", 0.0)),
    }
    for kind in ("recurring", "novel"):
        for name in ("q", "q_hat"):
            if f"{name}_{kind}_count" in sums:
                metrics[f"mean_{name}_{kind}"] = _ratio(sums[f"{name}_{kind}_sum"],
                                                        sums[f"{name}_{kind}_count"])
    layer_ids = sorted(int(k.split("/")[1]) for k in sums if k.startswith("attention_rows/"))
    rows = sum(sums[f"attention_rows/{i}"] for i in layer_ids)
    possible = sum(sums[f"attention_tokens/{i}"] for i in layer_ids)
    metrics["attention_fraction"] = _ratio(rows, possible) if layer_ids else 0.0
    metrics["attention_ops"] = _ratio(rows, sums.get("token_layers", 0.0)) if layer_ids else 0.0
    for i in layer_ids:
        metrics[f"attention_fraction/{i}"] = _ratio(sums[f"attention_rows/{i}"],
                                                    sums[f"attention_tokens/{i}"])
    for key in sums:
        if key.startswith(("attention/", "semantic/")):
            _, layer, kind = key.split("/")
            metrics[key] = _ratio(sums[key], sums[f"tokens/{layer}/{kind}"])
    return metrics
