"""CRAM: a hybrid layer whose per-token router chooses between a time-gap-aware selective scan
(working memory, always on), causal attention over the prefix (episodic memory, run only for the
tokens routed to it) and a low-rank adapter trained to reproduce attention's output (semantic
memory). `CRAMModel` also builds every baseline of the paper from `LayerSpec`s.

Loss (B3-B5), with every sum normalised so the weights do not depend on batch size, sequence
length or depth:

    L = L_task + L_route + γ·L_cons + L_q̂

* L_task: (Σ cross-entropy over query positions + Σ squared error of the next value over
  observation positions) / (batch · N).
* L_route: Σ over routed layers and tokens of (the router's predicted loss for the path taken −
  the token's own task loss)² / (batch · N): how the router learns what each path is worth
  (`router.routing_loss`). The paper's cost terms λ_E·π_E and −λ_S·π_S·q̂ are the prices the
  router adds to those predictions when it chooses (`router.Router.forward`): attention is taken
  where it lowers the token's loss by more than λ_E nats. In training every token attends for
  `episodic_cost_start` steps, then λ_E ramps up (`episodic_cost_weight`). With
  `counterfactual_probes` the same regression also runs on the loss tokens that attended
  would have had on another path (`counterfactual_routing_loss`).
* L_cons = mean over the (token, layer) pairs that ran attention in a layer with a semantic path
  of ‖f_sem(x_t) − sg(r^E_t)‖² / d (squared error per feature).
* L_q̂ = mean over the same pairs of (q̂_t − sg(q_t))², q_t = exp(−‖f_sem − r^E‖² / σ²) with
  σ² = σ_q² · Σ_features Var(r^E) over the layer's attention rows of the batch
  (`retrieval_spread`), so q does not depend on the activation scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..srcd.generator import IGNORE_INDEX
from .config import LayerSpec, ModelConfig
from . import memory
from .memory import (CTODEMemory, EpisodicAttention, QualityPredictor, SelectiveScanMemory,
                     SemanticAdapter)
from .router import Path, Router, RoutingDecision, routing_loss
from .streaming import LayerState, StreamState


@dataclass
class LayerRecord:
    """What one layer did on a batch; tensors are (batch, L) unless said otherwise."""

    attention_rows: Optional[torch.Tensor] = None   # bool: the rows that ran attention
    routing: Optional[RoutingDecision] = None       # the router's policy and choice
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
        self.router = (Router(d, spec.paths, spec.router_reads_state, spec.router_reads_q,
                              config.router_episodic_bias, config.router_width,
                              config.router_average_steps)
                       if spec.has_router else None)
        self.q_sigma = config.q_sigma
        self.norm_mix = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, config.ffn_mult * d), nn.GELU(),
                                 nn.Linear(config.ffn_mult * d, d))
        self.norm_ffn = nn.LayerNorm(d)
        self.fused = (config.fused and spec.working == "scan" and spec.attention == "routed"
                      and spec.router_reads_state)

    def forward(self, x: torch.Tensor, gap: torch.Tensor, key_mask: Optional[torch.Tensor],
                prices: "RoutingPrices", state: Optional[LayerState] = None,
                path: Optional[torch.Tensor] = None):
        """Routes by `prices` (see `Router.forward`); `prices.explore_rate` > 0 only in
        training; `path` (batch, L), if given, overrides the router's choice. With `state` the
        tokens continue a stream (`CRAMModel.prefill`): the memories start from it and update
        it, and `key_mask` is the new tokens' written flags; one token (`CRAMModel.step`) comes
        without the length dimension, x (batch, d_model) and gap (batch,), and so does its
        record."""
        if self.fused and not self.training and path is None and (state is None or x.dim() == 2):
            mixed, record = (self.fused_paths(x, gap, key_mask, prices) if state is None
                             else self.fused_step(x, gap, key_mask, prices, state))
            h = self.norm_mix(x + mixed)
            return self.norm_ffn(h + self.ffn(h)), record
        record = LayerRecord()
        working_out = self._working(x, gap, state) if self.spec.working else torch.zeros_like(x)
        mixed = working_out
        if self.spec.attention == "dense":
            rows = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
            mixed = mixed + self._episodic(x, rows, key_mask, state)
            record.attention_rows = rows
        elif self.spec.attention == "routed":
            q_hat = self.q_predictor(x) if self.q_predictor is not None else None
            routing = self.router(x, gap, working_out,
                                  q_hat if q_hat is not None else x.new_zeros(x.shape[:-1]),
                                  prices.episodic, prices.semantic if self.spec.router_reads_q
                                  else 0.0, prices.explore_rate, prices.attend_all, path)
            rows = routing.choice == Path.EPISODIC
            # Exactly 0, with zero gradient, on the rows that did not attend (`routed_attention`).
            retrieved = self._episodic(x, rows, key_mask, state)
            mixed = mixed + retrieved
            if self.semantic is not None:
                recalled = self.semantic(x)
                mixed = mixed + torch.where((routing.choice == Path.SEMANTIC)[..., None], recalled, 0.0)
                self._record_consolidation(record, recalled[rows], retrieved.detach()[rows], rows)
                record.q_hat = q_hat
            record.routing, record.attention_rows = routing, rows
        h = self.norm_mix(x + mixed)
        return self.norm_ffn(h + self.ffn(h)), record

    def _working(self, x, gap, state: Optional[LayerState]):
        return self.working(x, gap) if state is None else self.working.step(x, gap, state.working)

    def _episodic(self, x, rows, key_mask, state: Optional[LayerState]):
        if state is None:
            return self.episodic(x, rows, key_mask)
        return self.episodic.step(x, rows, key_mask, state.attention)

    def init_state(self, batch_size: int, capacity: int, memory_size: Optional[int],
                   device=None) -> LayerState:
        return LayerState(
            self.working.init_state(batch_size, device) if self.spec.working else None,
            self.episodic.init_state(batch_size, capacity, memory_size, device)
            if self.episodic is not None else None)

    def _record_consolidation(self, record: LayerRecord, recalled: Optional[torch.Tensor],
                              target: Optional[torch.Tensor], rows: torch.Tensor):
        """The record's L_cons and q terms (module docstring) from f_sem and the detached
        attention output on the rows that ran attention, (n, d) each (None: no row); 0 on the
        other tokens of `rows` (batch, L)."""
        zeros = torch.zeros(rows.shape, dtype=self.norm_mix.weight.dtype, device=rows.device)
        if recalled is None or recalled.shape[0] == 0:  # no row attended: all 0
            record.consolidation_error, record.q = zeros, torch.zeros_like(zeros)
            return
        squared_error = (recalled - target).pow(2).sum(-1)
        q = torch.exp(-squared_error.detach() / (self.q_sigma ** 2 * retrieval_spread(target)))
        record.consolidation_error = zeros.masked_scatter(rows, squared_error / recalled.shape[-1])
        record.q = zeros.masked_scatter(rows, q)

    def fused_paths(self, x: torch.Tensor, gap: torch.Tensor, key_mask: Optional[torch.Tensor],
                    prices: "RoutingPrices"):
        """The paths of a routed scan layer as one `cram_forward` call, in evaluation (no
        exploration, no warm-up): the same routing, mixed output and record as the composed
        ops."""
        q_hat = self.q_predictor(x) if self.q_predictor is not None else None
        result = memory.fused_layer_op(x, gap.to(x.dtype), *self._fused_weights(),
                                       **self._fused_options(prices, q_hat), key_mask=key_mask)
        return result.out, self._fused_record(x, result, q_hat)

    def fused_step(self, x: torch.Tensor, gap: torch.Tensor, written: Optional[torch.Tensor],
                   prices: "RoutingPrices", state: LayerState):
        """`fused_paths` for one token per stream (`CRAMModel.step`; x (batch, d_model)) as one
        `cram_step` call, which advances the scan state and appends every stream's key and value
        to the cache; the cache's bookkeeping (which entries it keeps, eviction) is the composed
        step's."""
        cache = state.attention
        q_hat = self.q_predictor(x) if self.q_predictor is not None else None
        result = memory.fused_step_op(
            x, gap.to(x.dtype), state.working, cache.keys, cache.values, cache.lengths,
            *self._fused_weights(), **self._fused_options(prices, q_hat),
            key_mask=memory.step_key_mask(cache, written))
        memory.advance_cache(cache, written)
        return result.out, self._fused_record(x, result, q_hat)

    def _fused_weights(self):
        """The layer's weights in the order `cram_forward` and `cram_step` take them (read on
        every decoding step, so each module is looked up once)."""
        working, attention, semantic = self.working, self.episodic, self.semantic
        adapter = ((semantic.down.weight, semantic.down.bias, semantic.up.weight, semantic.up.bias)
                   if semantic is not None else (None,) * 4)
        first, _, last = self.router.deciding_predictor
        return (working.in_proj.weight, working.x_proj.weight, working.dt_proj.weight,
                -torch.exp(working.A_log), working.D, working.dt_bias, working.out_proj.weight,
                first.weight, first.bias, last.weight, last.bias, attention.qkv.weight,
                attention.out_proj.weight, *adapter)

    def _fused_options(self, prices: "RoutingPrices", q_hat: Optional[torch.Tensor]):
        return dict(n_heads=self.episodic.n_heads, episodic_price=prices.episodic,
                    semantic_reward=prices.semantic if self.spec.router_reads_q else 0.0,
                    q_hat=q_hat if self.router.reads_q else None)

    def _fused_record(self, x: torch.Tensor, result, q_hat: Optional[torch.Tensor]) -> LayerRecord:
        """The composed layer's record from a fused op's result."""
        rows = result.path == Path.EPISODIC
        record = LayerRecord(attention_rows=rows, routing=RoutingDecision(
            result.path, result.predicted_loss, result.scores))
        if self.semantic is not None:
            if bool(rows.any()):
                target = self.episodic.out_proj(result.attention_out[rows]).detach()
                self._record_consolidation(record, self.semantic(x[rows]), target, rows)
            else:  # as in most decoding steps: nothing to measure q on, no row to gather
                self._record_consolidation(record, None, None, rows)
            record.q_hat = q_hat
        return record


def retrieval_spread(selected: torch.Tensor) -> torch.Tensor:
    """Σ_features Var(r^E) over `selected`, the attention outputs (rows, d) of the rows that
    ran attention: the scale of q's σ².

    Normalising by the spread of the attention outputs, not by their norm, makes q measure
    whether f_sem predicts what is specific to a token's retrieval: the part all retrievals
    share (type and position features) is easy to predict and would make q high everywhere.
    A semantic memory that only predicts the mean retrieval gets q ≈ exp(−1/σ_q²).
    """
    if selected.shape[0] < 2:
        return selected.new_ones(())
    return selected.var(0, unbiased=False).sum().clamp_min(1e-8)


class InputEncoder(nn.Module):
    """Embeds an SRCD position: token type, key id, value id, and the continuous inputs
    [log(1+Δτ), sin/cos(ω Δτ) for ω in `gap_frequencies`, last observed value]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        # A buffer, so that it moves with the model; not in the state dict: the config holds it.
        self.register_buffer("frequencies", torch.tensor(config.gap_frequencies,
                                                         dtype=torch.float32), persistent=False)
        self.type_embedding = nn.Embedding(3, d)
        self.key_embedding = nn.Embedding(config.n_keys + 1, d)      # id n_keys: no key
        self.value_embedding = nn.Embedding(config.n_values + 1, d)  # id n_values: no value
        self.continuous = nn.Linear(2 + 2 * len(config.gap_frequencies), d)
        self.positional = config.positional_embedding

    def forward(self, batch: Dict[str, torch.Tensor], start: int = 0) -> torch.Tensor:
        """`start`: the absolute position of the first token (streaming). The fields are
        (batch, L), or (batch,) for one token (`CRAMModel.step`): x (batch, L, d) or (batch, d)."""
        gap = batch["gap"]
        phase = gap[..., None] * self.frequencies
        continuous = torch.cat([torch.log1p(gap)[..., None], phase.sin(), phase.cos(),
                                batch["last_value"][..., None]], dim=-1)
        x = (self.type_embedding(batch["token_type"]) + self.key_embedding(batch["key"])
             + self.value_embedding(batch["value"]) + self.continuous(continuous))
        if self.positional:
            x = x + sinusoidal_positions(_tokens_per_stream(gap), x.shape[-1], x.device, start)
        return x


def sinusoidal_positions(length: int, d_model: int, device, start: int = 0) -> torch.Tensor:
    position = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, device=device)
                         / d_model)
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


@dataclass(frozen=True)
class RoutingPrices:
    """What the routers charge at one training step (in nats of a token's loss): `episodic` per
    attention call, `semantic` the reward per unit q̂ for semantic memory; the fraction of
    tokens that explore a uniformly drawn path, and whether every other token attends (the
    warm-up)."""

    episodic: float
    semantic: float
    explore_rate: float = 0.0
    attend_all: bool = False


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
        written = self._written(batch)
        if written is None:
            return None
        most = int(written.sum(-1).max()) if written.numel() else 0
        if most > self.config.memory_size:
            raise ValueError(f"a sequence writes {most} entries, more than the episodic buffer "
                             f"holds (memory_size={self.config.memory_size}); one routed-attention "
                             "call per layer cannot evict, so raise memory_size")
        return written

    def forward(self, batch: Dict[str, torch.Tensor], step: int = 0,
                paths: Optional[List[Optional[torch.Tensor]]] = None) -> ModelOutput:
        """Training mode explores (the rate and λ_E warm-up of `step`); eval mode takes every
        router's lowest-priced path. `paths`, one (batch, L) tensor or None per layer, overrides
        the routers' choices (the counterfactual pass of `losses`)."""
        prices = self.routing_prices(step)
        key_mask = self.key_mask(batch)
        x = self.encoder(batch)
        records = []
        for index, layer in enumerate(self.layers):
            x, record = layer(x, batch["gap"], key_mask, prices,
                              path=None if paths is None else paths[index])
            records.append(record)
        return ModelOutput(self.value_head(x), self.dynamics_head(x).squeeze(-1), records)

    def routing_prices(self, step: int = 0) -> RoutingPrices:
        """The routers' prices at `step` in training (warm-up, λ_E ramp, exploration), the full
        prices and no exploration in eval mode."""
        cfg = self.config
        semantic = cfg.lambda_semantic if cfg.use_q_reward else 0.0
        if not self.training:
            return RoutingPrices(cfg.lambda_episodic, semantic)
        return RoutingPrices(cfg.episodic_cost_weight(step), semantic, cfg.explore_rate(step),
                             attend_all=step < cfg.episodic_cost_start)

    def losses(self, batch: Dict[str, torch.Tensor], output: ModelOutput,
               step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The loss terms of the module docstring and their weighted sum, "total". λ_E follows
        its warm-up at `step` (None: the full λ_E)."""
        cfg = self.config
        token_loss = self.token_losses(batch, output)
        positions = token_loss.numel()
        queries = batch["target_class"] != IGNORE_INDEX
        retrieval = token_loss[queries].sum() / positions
        dynamics = token_loss[batch["dynamics_mask"]].sum() / positions
        zero = token_loss.new_zeros(())
        routed = [r.routing for r in output.layers if r.routing is not None]
        routing = (sum(routing_loss(r, token_loss) for r in routed) / positions if routed
                   else zero)
        semantic = [r for r in output.layers if r.q_hat is not None]
        n_measured = sum(r.attention_rows.sum() for r in semantic) if semantic else 0
        if semantic and n_measured > 0:
            consolidation = sum(r.consolidation_error.sum() for r in semantic) / n_measured
            q_regression = sum(((r.q_hat - r.q).pow(2) * r.attention_rows).sum()
                               for r in semantic) / n_measured
        else:
            consolidation = q_regression = zero
        counterfactual = (self.counterfactual_routing_loss(batch, output) / positions
                          if self.training and cfg.counterfactual_probes else zero)
        total = (retrieval + dynamics + routing + counterfactual
                 + cfg.gamma_consolidation * consolidation + q_regression)
        return {"total": total, "retrieval": retrieval, "dynamics": dynamics,
                "routing": routing, "counterfactual": counterfactual,
                "consolidation": consolidation, "q_regression": q_regression}

    def counterfactual_routing_loss(self, batch: Dict[str, torch.Tensor],
                                    output: ModelOutput) -> torch.Tensor:
        """`router.routing_loss` of the counterfactual probes, summed over the routed layers: a
        second forward, without gradient, in which every token that attended takes another path
        (drawn uniformly among the layer's others) in one of the layers where it attended (drawn
        uniformly among them) and keeps its other choices. Without it a router learns what the
        other paths give a query only where it took them (its exploration, a few percent): it
        keeps recurring queries on attention long after semantic memory answers them, and once
        they leave, it carries the low loss they have off attention over to every query, novel
        ones included. One layer per token, so that a query for which one layer's retrieval
        suffices does not teach every layer that it needs attention."""
        total = output.next_value.new_zeros(())
        routed = [index for index, record in enumerate(output.layers) if record.routing is not None]
        if not routed:
            return total
        shape = output.next_value.shape
        # A uniform draw among all routed layers would waste the probes of a token that attends
        # in one layer (most queries, once layer 1 leaves attention) on a layer it skipped.
        attended = torch.stack([output.layers[index].routing.choice == Path.EPISODIC
                                for index in routed])
        layer_drawn = torch.rand(attended.shape, device=attended.device).masked_fill(
            ~attended, -1.0).argmax(0)
        paths, swaps = [None] * len(output.layers), {}
        for k, index in enumerate(routed):
            choice = output.layers[index].routing.choice
            others = torch.tensor([p for p in self.layers[index].router.paths
                                   if p != Path.EPISODIC], device=choice.device)
            drawn = others[torch.randint(len(others), shape, device=choice.device)]
            swapped = (choice == Path.EPISODIC) & (layer_drawn == k)
            paths[index] = torch.where(swapped, drawn, choice)
            swaps[index] = swapped
        if not any(bool(swapped.any()) for swapped in swaps.values()):
            return total
        with torch.no_grad():   # every routed layer forced, so prices and exploration are moot
            counterfactual = self.token_losses(batch, self(batch, paths=paths))
        for index, swapped in swaps.items():
            total = total + routing_loss(output.layers[index].routing, counterfactual,
                                         path=paths[index], rows=swapped)
        return total

    @staticmethod
    def token_losses(batch: Dict[str, torch.Tensor], output: ModelOutput) -> torch.Tensor:
        """(batch, L) task loss of each position: cross-entropy at queries, squared error of
        the next value at observations, 0 elsewhere."""
        queries = batch["target_class"] != IGNORE_INDEX
        cross_entropy = F.cross_entropy(output.value_logits.flatten(0, 1),
                                        batch["target_class"].flatten(), reduction="none",
                                        ignore_index=IGNORE_INDEX).view(queries.shape)
        squared_error = (output.next_value - batch["target_value"]).pow(2)
        return torch.where(queries, cross_entropy,
                           torch.where(batch["dynamics_mask"], squared_error,
                                       torch.zeros_like(squared_error)))

    def update_router_averages(self) -> None:
        """Advances every router's moving average (`Router.update_average`): after each
        optimizer step."""
        for layer in self.layers:
            if layer.router is not None:
                layer.router.update_average()

    def param_groups(self, lr: float, weight_decay: float) -> List[dict]:
        """AdamW groups: the semantic adapters at `semantic_lr_mult`·lr (the paper's
        consolidation lr), the attention projections at `episodic_lr_mult`·lr, the routers at
        `router_lr_mult`·lr without weight decay, everything else at lr; no weight decay on
        norms, biases, embeddings and the scan's A_log, D, Δ bias."""
        semantic, episodic, decay, no_decay, router = [], [], [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if ".semantic." in name:
                semantic.append(param)
            elif ".episodic." in name:
                episodic.append(param)
            elif ".router." in name:
                router.append(param)
            elif param.dim() < 2 or "embedding" in name or name.endswith(("A_log", "dt_bias")):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        if semantic:
            groups.append({"params": semantic, "lr": lr * self.config.semantic_lr_mult,
                           "weight_decay": weight_decay})
        if episodic:
            groups.append({"params": episodic, "lr": lr * self.config.episodic_lr_mult,
                           "weight_decay": weight_decay})
        if router:   # a regression on the other losses, which move as the network learns
            groups.append({"params": router, "lr": lr * self.config.router_lr_mult,
                           "weight_decay": 0.0})
        return groups


    # Streaming: the model reads its input token by token (state: models/streaming.py).

    def init_state(self, batch_size: int, capacity: int) -> StreamState:
        """The state of `batch_size` empty streams for `step` and `prefill`.

        `capacity`: the longest stream the attention layers' key/value caches can hold
        ("prefix" keys and dense layers keep every token). With "written" episodic keys a layer
        keeps only the written entries, at most `memory_size` of them: past that the oldest
        entry is evicted, where the full `forward` refuses the sequence.
        """
        device = self.value_head.weight.device
        memory_size = None if self.config.episodic_keys == "prefix" else self.config.memory_size
        return StreamState([layer.init_state(batch_size, capacity, memory_size, device)
                            for layer in self.layers])

    def prefill(self, batch: Dict[str, torch.Tensor], state: StreamState):
        """Reads the next L tokens of the streams, `batch`'s SRCD fields (batch, L), from
        `state`: each scan runs as one chunk from its state (`selective_scan` with an initial
        state), the routed rows attend over the caches plus the chunk. Returns (ModelOutput for
        these tokens, state), the state updated in place. The routers price as in `forward`, so
        in eval mode `prefill` of [0, t) and then of [t, L) (or `step` per token) gives
        `forward`'s outputs and routes on [0, L).

        Once the written entries overflow the episodic buffer the tokens are read in chunks
        that each end at the token that evicts an entry, so prefill equals `step` token by token
        there too (where `forward` refuses the sequence)."""
        written = self._written(batch)
        caches = [layer.attention for layer in state.layers if layer.attention is not None]
        if written is None or not caches:
            return self._read(batch, written, state)
        outputs = []
        for start, end in _buffer_chunks(written, caches[0].lengths, self.config.memory_size):
            output, state = self._read({name: value[:, start:end] for name, value in batch.items()},
                                       written[:, start:end], state)
            outputs.append(output)
        return _cat_positions(outputs), state

    def _written(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The tokens that carry a binding, which a "written" episodic buffer keeps (shaped
        like the fields; `key_mask`), or None with "prefix" keys."""
        if self.config.episodic_keys == "prefix":
            return None
        return batch["value"] != self.config.n_values

    def _read(self, batch: Dict[str, torch.Tensor], written: Optional[torch.Tensor],
              state: StreamState):
        """`prefill` of one chunk the episodic buffers can take whole, or `step` of one token
        (fields (batch,), no length dimension)."""
        prices = self.routing_prices()
        x = self.encoder(batch, start=state.position)
        records = []
        for layer, layer_state in zip(self.layers, state.layers):
            x, record = layer(x, batch["gap"], written, prices, state=layer_state)
            records.append(record)
        state.position += _tokens_per_stream(batch["gap"])
        return ModelOutput(self.value_head(x), self.dynamics_head(x).squeeze(-1), records), state

    def step(self, inputs: Dict[str, torch.Tensor], state: StreamState):
        """Reads one token per stream: `inputs` holds one position's SRCD fields, each (batch,).
        Returns (that position's ModelOutput without the length dimension: value_logits
        (batch, n_values), next_value (batch,), per-layer records of (batch,) tensors; state),
        the state updated in place. A routed layer runs attention only for the streams whose
        token its router sends there.

        `prefill` of one token without its chunking: a single token never makes a row see
        more than memory_size entries (the buffer's spare slot holds it, `AttentionCache`), so
        the layers read it as it comes, on tensors without the length dimension."""
        return self._read(inputs, self._written(inputs), state)


def _tokens_per_stream(gap: torch.Tensor) -> int:
    """L of a chunk's (batch, L) fields; 1 of a step's (batch,) fields."""
    return gap.shape[1] if gap.dim() == 2 else 1


def _buffer_chunks(written: torch.Tensor, held: torch.Tensor, memory_size: int):
    """[start, end) chunks of positions such that in each, every row sees at most memory_size
    buffer entries (those held before the chunk and those written earlier in it): a chunk ends
    where one more written entry would make a row see one entry more than `step` lets it."""
    written = written.cpu().numpy()
    held = held.cpu().numpy().astype(np.int64)
    chunks, start = [], 0
    inside = np.zeros_like(held)  # entries written in [start, i)
    for i in range(written.shape[1]):
        if i > start and (held + inside > memory_size).any():
            chunks.append((start, i))
            held, inside, start = np.minimum(held + inside, memory_size), np.zeros_like(held), i
        inside += written[:, i]
    chunks.append((start, written.shape[1]))
    return chunks


def _cat_positions(outputs: List[ModelOutput]) -> ModelOutput:
    """ModelOutputs of consecutive chunks joined along the length dimension."""
    if len(outputs) == 1:
        return outputs[0]

    def cat(values):
        if values[0] is None or isinstance(values[0], torch.Tensor):
            return values[0] if values[0] is None else torch.cat(values, 1)
        return type(values[0])(**{f.name: cat([getattr(v, f.name) for v in values])
                                  for f in fields(values[0])})

    return ModelOutput(cat([o.value_logits for o in outputs]), cat([o.next_value for o in outputs]),
                       [cat([o.layers[i] for o in outputs]) for i in range(len(outputs[0].layers))])
