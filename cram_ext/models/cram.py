"""CRAM: a hybrid layer whose per-token router chooses between a time-gap-aware selective scan
(working memory, always on), causal attention over the prefix (episodic memory, run only for the
tokens routed to it) and a low-rank adapter trained to reproduce attention's output (semantic
memory). `CRAMModel` also builds every baseline of the paper from `LayerSpec`s.

Loss (B3-B5), with every sum normalised to a mean so the weights do not depend on batch size,
sequence length or depth:

    L = L_task + λ_E·mean(π_E) − λ_S·mean(π_S · sg(q̂)) + γ·L_cons + L_q̂

* L_task: (Σ cross-entropy over query positions + Σ squared error of the next value over
  observation positions) / (batch · N), a per-position mean like the routing terms. So one
  query's loss weighs the same as one token's routing cost λ_E·π_E: a query keeps attention
  when retrieval lowers its loss by more than λ_E, whatever the query rate or N.
* mean(π_E), mean(π_S·q̂): over all (token, layer) pairs of the layers with a router; π is the
  router's softmax without Gumbel noise. q̂ is detached in the reward: only its regression moves it.
  In training λ_E is 0 for `episodic_cost_start` steps, then ramps up (`episodic_cost_weight`).
* L_cons = mean over the (token, layer) pairs that ran attention in a layer with a semantic path
  of ‖f_sem(x_t) − sg(r^E_t)‖² / d (squared error per feature).
* L_q̂ = mean over the same pairs of (q̂_t − sg(q_t))², q_t = exp(−‖f_sem − r^E‖² / σ²) with
  σ² = σ_q² · Σ_features Var(r^E) over the layer's attention rows of the batch
  (`retrieval_spread`), so q does not depend on the activation scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..srcd.generator import IGNORE_INDEX
from .config import LayerSpec, ModelConfig
from .memory import (CTODEMemory, EpisodicAttention, QualityPredictor, Router, SelectiveScanMemory,
                     SemanticAdapter)


@dataclass
class LayerRecord:
    """What one layer did on a batch; tensors are (batch, L) unless said otherwise."""

    attention_rows: Optional[torch.Tensor] = None   # bool: the rows that ran attention
    probs: Optional[torch.Tensor] = None            # (batch, L, paths) router softmax
    q_hat: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None                # measured where attention ran, else 0
    consolidation_error: Optional[torch.Tensor] = None  # ‖f_sem − sg(r)‖²/d, 0 off attention


class CRAMLayer(nn.Module):
    """One layer: paths per `spec`, then Add&Norm → FFN → Add&Norm.

    Path outputs add to the working-memory output with hard gates (B3):
    out_t = y_t + 1[episodic]·r^E_t + 1[semantic]·f_sem(x_t).
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        d = config.d_model
        if spec.working == "scan":
            self.working = SelectiveScanMemory(d, config.d_state, config.expand)
        elif spec.working == "ctode":
            self.working = CTODEMemory(d, config.ctode_steps)
        self.episodic = EpisodicAttention(d, config.n_heads) if spec.attention else None
        self.semantic = SemanticAdapter(d, config.rank) if spec.semantic else None
        self.q_predictor = QualityPredictor(d) if spec.semantic else None
        self.router = (Router(d, len(spec.paths), spec.router_reads_state, spec.router_reads_q,
                              config.router_episodic_bias) if spec.has_router else None)
        self.q_sigma = config.q_sigma
        self.norm_mix = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, config.ffn_mult * d), nn.GELU(),
                                 nn.Linear(config.ffn_mult * d, d))
        self.norm_ffn = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, gap: torch.Tensor, key_mask: Optional[torch.Tensor],
                temperature: Optional[float], probe_rate: float):
        """`temperature=None` routes by argmax (inference); `probe_rate` > 0 sends that fraction
        of the semantic-routed tokens through attention as well, for measurement only."""
        record = LayerRecord()
        working_out = self.working(x, gap) if self.spec.working else torch.zeros_like(x)
        mixed = working_out
        if self.spec.attention == "dense":
            rows = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mixed = mixed + self.episodic(x, rows, key_mask)
            record.attention_rows = rows
        elif self.spec.attention == "routed":
            q_hat = self.q_predictor(x) if self.q_predictor is not None else None
            probs, gates = self.router(x, gap, working_out,
                                       q_hat if q_hat is not None else x.new_zeros(x.shape[:2]),
                                       temperature)
            episodic_gate = gates[..., 1]
            rows = episodic_gate.detach() > 0.5
            if self.semantic is not None:
                semantic_gate = gates[..., 2]
                semantic_rows = semantic_gate.detach() > 0.5
                if probe_rate > 0:
                    probes = semantic_rows & (torch.rand(rows.shape, device=x.device) < probe_rate)
                    rows = rows | probes
            retrieved = self.episodic(x, rows, key_mask)
            # Probe rows are not episodic-routed: their gate is 0 in value, so they only
            # measure q and feed L_cons (and give the router the straight-through gradient).
            mixed = mixed + episodic_gate[..., None] * retrieved
            if self.semantic is not None:
                recalled = self.semantic(x)
                mixed = mixed + semantic_gate[..., None] * recalled
                target = retrieved.detach()
                squared_error = (recalled - target).pow(2).sum(-1)
                ran = rows.to(x.dtype)
                record.consolidation_error = squared_error / x.shape[-1] * ran
                record.q = torch.exp(-squared_error.detach()
                                     / (self.q_sigma ** 2 * retrieval_spread(target, rows))) * ran
                record.q_hat = q_hat
            record.probs, record.attention_rows = probs, rows
        h = self.norm_mix(x + mixed)
        return self.norm_ffn(h + self.ffn(h)), record


def retrieval_spread(retrieved: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ_features Var(r^E) over the rows that ran attention: the scale of q's σ².

    Normalising by the spread of the attention outputs, not by their norm, makes q measure
    whether f_sem predicts what is specific to a token's retrieval: the part all retrievals
    share (type and position features) is easy to predict and would make q high everywhere.
    A semantic memory that only predicts the mean retrieval gets q ≈ exp(−1/σ_q²).
    """
    selected = retrieved[rows]
    if selected.shape[0] < 2:
        return retrieved.new_ones(())
    return selected.var(0, unbiased=False).sum().clamp_min(1e-8)


class InputEncoder(nn.Module):
    """Embeds an SRCD position: token type, key id, value id, and the continuous inputs
    [log(1+Δτ), sin/cos(ω Δτ) for ω in `gap_frequencies`, last observed value]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.frequencies = torch.tensor(config.gap_frequencies, dtype=torch.float32)
        self.type_embedding = nn.Embedding(3, d)
        self.key_embedding = nn.Embedding(config.n_keys + 1, d)      # id n_keys: no key
        self.value_embedding = nn.Embedding(config.n_values + 1, d)  # id n_values: no value
        self.continuous = nn.Linear(2 + 2 * len(config.gap_frequencies), d)
        self.positional = config.positional_embedding

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        gap = batch["gap"]
        phase = gap[..., None] * self.frequencies.to(gap.device)
        continuous = torch.cat([torch.log1p(gap)[..., None], phase.sin(), phase.cos(),
                                batch["last_value"][..., None]], dim=-1)
        x = (self.type_embedding(batch["token_type"]) + self.key_embedding(batch["key"])
             + self.value_embedding(batch["value"]) + self.continuous(continuous))
        if self.positional:
            x = x + sinusoidal_positions(gap.shape[1], x.shape[-1], x.device)
        return x


def sinusoidal_positions(length: int, d_model: int, device) -> torch.Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, device=device)
                         / d_model)
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


@dataclass
class ModelOutput:
    value_logits: torch.Tensor       # (batch, L, n_values)
    next_value: torch.Tensor         # (batch, L)
    layers: List[LayerRecord]


class CRAMModel(nn.Module):
    """A stack of `CRAMLayer`s over the SRCD input encoding, with a value-classification head
    (queries) and a next-value regression head (observations)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = InputEncoder(config)
        self.layers = nn.ModuleList(CRAMLayer(config, spec) for spec in config.layers)
        self.value_head = nn.Linear(config.d_model, config.n_values)
        self.dynamics_head = nn.Linear(config.d_model, 1)

    def key_mask(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The episodic buffer: every prefix token ("prefix"), or the entries written to memory,
        the tokens that carry a (key, value) binding. A query carries its key but no value; were
        it a key, it would match itself best and retrieve nothing."""
        if self.config.episodic_keys == "prefix":
            return None
        written = batch["value"] != self.config.n_values
        most = int(written.sum(-1).max()) if written.numel() else 0
        if most > self.config.memory_size:
            raise ValueError(f"a sequence writes {most} entries, more than the episodic buffer "
                             f"holds (memory_size={self.config.memory_size}); one routed-attention "
                             "call per layer cannot evict, so raise memory_size")
        return written

    def forward(self, batch: Dict[str, torch.Tensor], step: int = 0) -> ModelOutput:
        """Training mode samples the routers (Gumbel, temperature and probe rate of `step`);
        eval mode routes by argmax with no probes."""
        temperature = self.config.temperature(step) if self.training else None
        probe_rate = self.config.probe_rate(step) if self.training else 0.0
        key_mask = self.key_mask(batch)
        x = self.encoder(batch)
        records = []
        for layer in self.layers:
            x, record = layer(x, batch["gap"], key_mask, temperature, probe_rate)
            records.append(record)
        return ModelOutput(self.value_head(x), self.dynamics_head(x).squeeze(-1), records)

    def losses(self, batch: Dict[str, torch.Tensor], output: ModelOutput,
               step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The loss terms of the module docstring and their weighted sum, "total". λ_E follows
        its warm-up at `step` (None: the full λ_E)."""
        cfg = self.config
        queries = batch["target_class"] != IGNORE_INDEX
        zero = output.next_value.new_zeros(())
        positions = queries.numel()
        retrieval = (F.cross_entropy(output.value_logits[queries], batch["target_class"][queries],
                                     reduction="sum") / positions if queries.any() else zero)
        observed = batch["dynamics_mask"]
        dynamics = (F.mse_loss(output.next_value[observed], batch["target_value"][observed],
                               reduction="sum") / positions if observed.any() else zero)
        routed = [r for r in output.layers if r.probs is not None]
        episodic_cost = (torch.stack([r.probs[..., 1].mean() for r in routed]).mean()
                         if routed else zero)
        semantic = [r for r in routed if r.q_hat is not None]
        semantic_reward = (torch.stack([(r.probs[..., 2] * r.q_hat.detach()).mean()
                                        for r in semantic]).mean()
                           if semantic and cfg.use_q_reward else zero)
        n_measured = sum(r.attention_rows.sum() for r in semantic) if semantic else 0
        if semantic and n_measured > 0:
            consolidation = sum(r.consolidation_error.sum() for r in semantic) / n_measured
            q_regression = sum(((r.q_hat - r.q).pow(2) * r.attention_rows).sum()
                               for r in semantic) / n_measured
        else:
            consolidation = q_regression = zero
        lambda_episodic = (cfg.lambda_episodic if step is None
                           else cfg.episodic_cost_weight(step))
        total = (retrieval + dynamics + lambda_episodic * episodic_cost
                 - cfg.lambda_semantic * semantic_reward
                 + cfg.gamma_consolidation * consolidation + q_regression)
        return {"total": total, "retrieval": retrieval, "dynamics": dynamics,
                "episodic_cost": episodic_cost, "semantic_reward": semantic_reward,
                "consolidation": consolidation, "q_regression": q_regression}

    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """AdamW groups: the semantic adapters at `semantic_lr_mult`·lr (the paper's
        consolidation lr), everything else at lr; no weight decay on norms, biases, embeddings
        and the scan's A_log, D, Δ bias."""
        semantic, decay, no_decay = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if ".semantic." in name:
                semantic.append(param)
            elif param.dim() < 2 or "embedding" in name or name.endswith(("A_log", "dt_bias")):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        if semantic:
            groups.append({"params": semantic, "lr": lr * self.config.semantic_lr_mult,
                           "weight_decay": weight_decay})
        return groups
