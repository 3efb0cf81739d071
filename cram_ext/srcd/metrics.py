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
    sums: Dict[str, float] = {}
    queries = batch["target_class"] != IGNORE_INDEX
    correct = (output.value_logits.argmax(-1) == batch["target_class"]) & queries
    recurring = queries & (batch["pattern"] >= 0)
    novel = queries & (batch["pattern"] < 0)
    sums["queries"] = float(queries.sum())
    sums["correct"] = float(correct.sum())
    sums["recurring_queries"] = float(recurring.sum())
    sums["recurring_correct"] = float((correct & recurring).sum())
    sums["novel_queries"] = float(novel.sum())
    sums["novel_correct"] = float((correct & novel).sum())
    observed = batch["dynamics_mask"]
    sums["observations"] = float(observed.sum())
    sums["dynamics_se"] = float((output.next_value.detach() - batch["target_value"])
                                .pow(2)[observed].sum())
    sums["oracle_se"] = float((batch["oracle_value"] - batch["target_value"]).pow(2)[observed].sum())
    tokens = float(batch["gap"].numel())
    sums["tokens"] = tokens
    sums["token_layers"] = tokens * n_layers
    for index, record in enumerate(output.layers):
        if record.attention_rows is None:
            continue
        sums[f"attention_rows/{index}"] = float(record.attention_rows.sum())
        sums[f"attention_tokens/{index}"] = tokens
        if record.q is not None:
            sums["q_sum"] = sums.get("q_sum", 0.0) + float(record.q.sum())
            sums["q_count"] = sums.get("q_count", 0.0) + float(record.attention_rows.sum())
            sums["q_hat_sum"] = sums.get("q_hat_sum", 0.0) + float(record.q_hat[queries].sum())
            sums["q_hat_count"] = sums.get("q_hat_count", 0.0) + float(queries.sum())
            for kind, mask in (("recurring", recurring), ("novel", novel)):
                measured = mask & record.attention_rows
                add = {f"q_{kind}_sum": float(record.q[measured].sum()),
                       f"q_{kind}_count": float(measured.sum()),
                       f"q_hat_{kind}_sum": float(record.q_hat[mask].sum()),
                       f"q_hat_{kind}_count": float(mask.sum())}
                for key, value in add.items():
                    sums[key] = sums.get(key, 0.0) + value
        if record.routing is not None:
            for kind, mask in token_kinds(batch).items():
                add = {f"tokens/{index}/{kind}": float(mask.sum()),
                       f"attention/{index}/{kind}": float((record.attention_rows & mask).sum()),
                       f"semantic/{index}/{kind}":
                           float(((record.routing.choice == Path.SEMANTIC) & mask).sum())}
                for key, value in add.items():
                    sums[key] = sums.get(key, 0.0) + value
    return sums


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
