"""The three memories of a CRAM layer (the router that chooses between them: `router.py`).

The kernels are reached through `scan_op`, `attention_op`, `fused_layer_op` and, when
streaming, `state_update_op`, `cached_attention_op` and `fused_step_op` only, so tests can wrap
them (for example to count the rows that really ran attention). Each memory's `step` continues
a stream from its state (`streaming.py`), updating that state in place; it reads a chunk
(batch, L, d_model) or one token without the length dimension, (batch, d_model)
(`CRAMModel.step`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import cram_ext

from .streaming import AttentionCache


def scan_op(u, delta, A, B, C, D, z, delta_bias, dt_scale, initial_state=None,
            return_last_state=False):
    """`cram_ext.selective_scan` with softplus on delta (Mamba's convention)."""
    return cram_ext.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                   delta_softplus=True, dt_scale=dt_scale,
                                   initial_state=initial_state,
                                   return_last_state=return_last_state)


def state_update_op(state, x, dt, A, B, C, D, z, dt_bias, dt_scale):
    """`cram_ext.selective_state_update` with softplus on dt: one step of `scan_op`."""
    return cram_ext.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                           dt_softplus=True, dt_scale=dt_scale)


def cached_attention_op(q, k_cache, v_cache, k, v, cache_seqlens, route, key_mask):
    """`cram_ext.routed_attention_with_kvcache`: rows where `route` is False cost nothing."""
    return cram_ext.routed_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens,
                                                  route=route, key_mask=key_mask)


def attention_op(q, k, v, route, key_mask):
    """`cram_ext.routed_attention`, causal: rows where `route` is False cost nothing, output 0."""
    return cram_ext.routed_attention(q, k, v, is_causal=True, route=route, key_mask=key_mask)


def fused_layer_op(*args, **kwargs):
    """`cram_ext.cram_forward`: a layer's scan, routing, routed attention and adapter in one op."""
    return cram_ext.cram_forward(*args, **kwargs)


def fused_step_op(*args, **kwargs):
    """`cram_ext.cram_step`: `fused_layer_op` for one token per stream, from a scan state and a
    key/value cache."""
    return cram_ext.cram_step(*args, **kwargs)


def gap_scale(gap: torch.Tensor) -> torch.Tensor:
    """g(Δτ) = log(1 + Δτ): the time-gap multiplier of the scan step.

    Monotone and 0 at Δτ = 0 like Δτ itself, but it compresses the Pareto tail (gaps up to 1000)
    so a long gap forgets more without the input drive Δ·B·u blowing up.
    """
    return torch.log1p(gap)


class SelectiveScanMemory(nn.Module):
    """Working memory (B1): a Mamba-style selective scan whose step is scaled by the time gap,
    Δ_t = softplus(W_Δ u_t + b_Δ) · g(Δτ_t). State carries across tokens.

    Mamba's block without the short convolution: in-projection to (u, z), input-dependent
    (Δ, B, C), the scan with D skip and silu(z) gate, out-projection.
    """

    def __init__(self, d_model: int, d_state: int, expand: int):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = max(1, math.ceil(d_model / 16))
        self.d_state = d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=False)
        # Mamba's initialisation: A = -(1..N) per channel, Δ bias so softplus(b) ∈ [1e-3, 0.1].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)
                                            ).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        dt = torch.exp(torch.empty(d_inner).uniform_(math.log(1e-3), math.log(0.1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        y = scan_op(*self._scan_inputs(x, gap))
        return self.out_proj(y.transpose(1, 2))

    def _scan_inputs(self, x: torch.Tensor, gap: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """`scan_op`'s arguments for the tokens x (batch, L, d_model)."""
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)          # (batch, d_inner, L)
        dt, B, C = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        return (u.contiguous(), delta.contiguous(), -torch.exp(self.A_log),
                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D,
                z.contiguous(), self.dt_bias, gap_scale(gap).to(torch.float32).contiguous())

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        """The scan state before the first token: zeros (batch, d_inner, N), float32."""
        return torch.zeros(batch_size, self.D.shape[0], self.d_state, device=device,
                           dtype=torch.float32)

    def step(self, x: torch.Tensor, gap: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """`forward` for the next tokens of a stream, continuing from `state`, which becomes
        the state after them (in place): a chunk x (batch, L, d_model), gap (batch, L) is the
        scan started from the state; one token, x (batch, d_model) and gap (batch,), is one
        `selective_state_update` on tensors without the length dimension (no transposes)."""
        if x.dim() == 3:
            y, last = scan_op(*self._scan_inputs(x, gap), initial_state=state,
                              return_last_state=True)
            state.copy_(last)
            return self.out_proj(y.transpose(1, 2))
        u, z = self.in_proj(x).chunk(2, dim=-1)                         # (batch, d_inner)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = state_update_op(state, u, self.dt_proj(dt), -torch.exp(self.A_log), B, C, self.D, z,
                            self.dt_bias, gap_scale(gap).to(torch.float32))
        return self.out_proj(y)


class CTODEMemory(nn.Module):
    """The paper's working memory: K Euler steps of a gated continuous-time ODE per token,

        h⁽ᵏ⁺¹⁾ = h⁽ᵏ⁾ + (1/K)·σ(W_τ log(1+Δτ_t)) ⊙ tanh(W1 h⁽ᵏ⁾ + W2 x_t),   f = W_o h⁽ᴷ⁾,

    with the state carried from token to token (h_t⁽⁰⁾ = h_{t−1}⁽ᴷ⁾). A Python loop over tokens:
    kept as the paper's option, not as a fast path. The residual `+ x_t` of the paper is the
    layer's Add&Norm.
    """

    def __init__(self, d_model: int, steps: int):
        super().__init__()
        if steps < 1:
            raise ValueError("ctode_steps must be at least 1")
        self.steps = steps
        self.W1 = nn.Linear(d_model, d_model, bias=False)
        self.W2 = nn.Linear(d_model, d_model)
        self.W_tau = nn.Linear(1, d_model)
        self.W_o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        return self._integrate(x, gap, x.new_zeros(x.shape[0], x.shape[2]))[0]

    def _integrate(self, x, gap, h):
        """Outputs for tokens x (batch, L, d) from the state h (batch, d), and the last state."""
        drive = self.W2(x)                                              # (batch, L, d)
        rate = torch.sigmoid(self.W_tau(torch.log1p(gap)[..., None])) / self.steps
        states = []
        for t in range(x.shape[1]):
            for _ in range(self.steps):
                h = h + rate[:, t] * torch.tanh(self.W1(h) + drive[:, t])
            states.append(h)
        return self.W_o(torch.stack(states, dim=1)), h

    def init_state(self, batch_size: int, device=None) -> torch.Tensor:
        """The hidden state before the first token: zeros (batch, d_model)."""
        return torch.zeros(batch_size, self.W_o.in_features, device=device)

    def step(self, x: torch.Tensor, gap: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """`forward` for the next tokens of a stream from `state` (updated in place): x
        (batch, L, d_model), or one token without the length dimension, x (batch, d_model)."""
        if x.dim() == 2:
            return self.step(x[:, None], gap[:, None], state)[:, 0]
        out, last = self._integrate(x, gap, state)
        state.copy_(last)
        return out


class EpisodicAttention(nn.Module):
    """Episodic memory (B2): causal multi-head attention over the prefix, run only for the query
    rows in `route` (through `routed_attention`); the keys can be limited by `key_mask`."""

    def __init__(self, d_model: int, n_heads: int, qk_init_scale: float = 2.0):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # Start with W_q = W_k, scaled up: a token then attends sharply to the tokens that share
        # its content (a query to the write of the same key), so retrieval is there from the
        # first steps and training only has to learn to read the value out.
        with torch.no_grad():
            self.qkv.weight[:d_model].mul_(qk_init_scale)
            self.qkv.weight[d_model:2 * d_model].copy_(self.qkv.weight[:d_model])

    def forward(self, x: torch.Tensor, route: torch.Tensor,
                key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        out = attention_op(*self._heads(x), route, key_mask)            # 0 on rows not routed
        return self._merge(out)

    def _heads(self, x: torch.Tensor):
        """q, k, v of the tokens x (batch, L, d_model), each (batch, heads, L, head_dim)."""
        batch, length, _ = x.shape
        return (t.view(batch, length, self.n_heads, -1).transpose(1, 2)
                for t in self.qkv(x).chunk(3, dim=-1))

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (batch, heads, L, head_dim) through the out-projection."""
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def init_state(self, batch_size: int, capacity: int, memory_size: Optional[int],
                   device=None) -> AttentionCache:
        """An empty key/value cache for `capacity` tokens; with `memory_size`, a buffer of the
        written entries only (`AttentionCache`)."""
        head_dim = self.qkv.in_features // self.n_heads
        return AttentionCache.empty(batch_size, self.n_heads, capacity, head_dim, memory_size,
                                    device=device, dtype=self.qkv.weight.dtype)

    def step(self, x: torch.Tensor, route: torch.Tensor, written: Optional[torch.Tensor],
             cache: AttentionCache) -> torch.Tensor:
        """`forward` for the next L tokens of a stream, x (batch, L, d_model): their keys and
        values join `cache` and the routed rows attend over it. `written` (batch, L) says which
        tokens enter a "written" buffer (None: every token, prefix keys). Of more than
        `cache.memory_size` written entries the oldest are evicted (the full `forward` instead
        refuses a sequence that writes more). One token comes without the length dimension:
        x (batch, d_model), route and written (batch,); if no stream's token attends or writes,
        the step runs nothing (one read of the flags) and outputs 0."""
        if x.dim() == 3:
            return self._merge(_attend_with_cache(*self._heads(x), route, written, cache))
        if written is not None and not bool((route | written).any()):
            # Most decoding steps: nothing reads the buffer, and an entry not written is not kept.
            return torch.zeros_like(x)
        batch = x.shape[0]
        # (batch, 3·d_model) is q, k, v, each (heads, head_dim): a view as three
        # (batch, heads, 1, head_dim) tensors, no transpose needed for one position.
        q, k, v = self.qkv(x).view(batch, 3, self.n_heads, 1, -1).unbind(1)
        out = _attend_with_cache(q, k, v, route[:, None],
                                 None if written is None else written[:, None], cache)
        return self.out_proj(out.view(batch, -1))


def _attend_with_cache(q, k, v, route, written, cache: AttentionCache) -> torch.Tensor:
    """Appends the new keys/values (batch, heads, n, head_dim) to `cache`, runs the routed rows
    against it, and keeps the cache's invariant (see `AttentionCache`)."""
    n = q.shape[2]
    if n == 1:
        token_writes = None if written is None else written[:, 0]
        out = cached_attention_op(q, cache.keys, cache.values, k, v, cache.lengths, route,
                                  step_key_mask(cache, token_writes))
        advance_cache(cache, token_writes)
        return out
    if written is None:
        out = cached_attention_op(q, cache.keys, cache.values, k, v, cache.lengths, route, None)
        cache.lengths += n
        return out
    # Each row of a chunk sees every entry written before it in the chunk, so the chunk is what
    # `step` would do only while those fit; its last token may overflow the buffer by one (the
    # oldest entry is then evicted, as step does). `CRAMModel.prefill` cuts its chunks so.
    if bool((cache.lengths + written[:, :-1].sum(1, dtype=torch.int32)
             > cache.memory_size).any()):
        raise ValueError(f"the chunk writes more entries than the episodic buffer holds "
                         f"(memory_size={cache.memory_size}) before its last token; read it in "
                         f"shorter chunks (CRAMModel.prefill does)")
    cache.unroll()
    # Room for the whole chunk until it is compacted. Slot j holds an entry if it is below the
    # old length, or a new entry that was written.
    pad = cache.keys.new_zeros(*cache.keys.shape[:2], n, cache.keys.shape[3])
    keys, values = torch.cat([cache.keys, pad], 2), torch.cat([cache.values, pad], 2)
    offset = torch.arange(keys.shape[2], device=q.device) - cache.lengths[:, None].long()
    fresh = (offset >= 0) & (offset < n)
    key_mask = (offset < 0) | (fresh & written.gather(1, offset.clamp(0, n - 1)))
    count = cache.lengths + written.sum(1, dtype=torch.int32)
    out = cached_attention_op(q, keys, values, k, v, cache.lengths, route, key_mask)
    drop = (count - cache.memory_size).clamp_min(0)
    order = torch.argsort((~key_mask).to(torch.int8), dim=1, stable=True)  # entries first
    take = (cache.slots + drop[:, None]).clamp_max(keys.shape[2] - 1)
    index = order.gather(1, take)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    cache.keys.copy_(keys.gather(2, index))
    cache.values.copy_(values.gather(2, index))
    cache.lengths.copy_(count - drop)
    return out


def step_key_mask(cache: AttentionCache, written: Optional[torch.Tensor]):
    """The slots a one-token step's rows see (its new entry goes to slot `cache.lengths`): the
    entries held and, where the token writes (`written` (batch,)), its own; None (every slot up
    to the new entry) with prefix keys."""
    if written is None:
        return None
    return cache.slots < (cache.lengths + written)[:, None]


def advance_cache(cache: AttentionCache, written: Optional[torch.Tensor]):
    """After a one-token step appended each stream's entry at `cache.lengths`: keeps the written
    ones (every one with prefix keys, `written` None), evicting the oldest entry where a full
    buffer took one more. Reads of the (batch,) flags decide whether there is anything to do."""
    if written is None:
        cache.lengths += 1
        return
    if not bool(written.any()):  # most tokens: the slot appended to stays free
        return
    count = cache.lengths + written
    overflow = count > cache.memory_size
    if bool(overflow.any()):
        _evict_into_ring(cache, overflow)
    cache.lengths.copy_(count - overflow.to(count.dtype))  # an entry not written is overwritten


def _evict_into_ring(cache: AttentionCache, overflow: torch.Tensor):
    """After a one-token step: in the sequences where `overflow` (a full buffer took a written
    entry into its spare slot), that entry replaces the oldest one, at `cache.start`, which
    moves on by one; the other sequences' slots stay as they are."""
    size = cache.memory_size
    index = cache.start[:, None, None, None].expand(-1, cache.keys.shape[1], 1,
                                                    cache.keys.shape[3])
    take = overflow[:, None, None, None]
    for slots in (cache.keys, cache.values):
        slots.scatter_(2, index, torch.where(take, slots[:, :, size:size + 1],
                                             slots.gather(2, index)))
    cache.start.copy_(torch.where(overflow, (cache.start + 1) % size, cache.start))


class SemanticAdapter(nn.Module):
    """Semantic memory: f_sem(x) = W_up ReLU(W_down x), rank d/16 by default."""

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank)
        self.up = nn.Linear(rank, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))


class QualityPredictor(nn.Module):
    """q̂_t ∈ (0, 1) from x_t (B4): regressed on the q_t measured wherever attention ran, so the
    router can know how well semantic memory would stand in for attention without running it.
    Reads x_t detached: its regression loss trains the predictor only."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x.detach())).squeeze(-1)
