"""The public ops, on top of the kernels in `torch.ops.cram_ext` (csrc/bindings.cpp).

Each op is defined in C++ (`TORCH_LIBRARY(cram_ext, ...)`: schema, input checks, CPU and CUDA
kernels). Here it gets a fake implementation (so `torch.compile` can trace it without running
it) and an autograd formula that calls the matching backward kernel.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _C  # loads the kernels and registers torch.ops.cram_ext

_ops = torch.ops.cram_ext

# The forward checkpoints the scan state every this many steps (the kernels' constant, read from
# the extension); the backward recomputes the states inside a chunk from its checkpoint.
SCAN_CHUNK_SIZE = _C.SCAN_CHECKPOINT_CHUNK
# The attention kernels' largest head_dim (read from the extension).
ATTENTION_MAX_HEAD_DIM = _C.ATTENTION_MAX_HEAD_DIM


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   dt_scale=None, return_last_state=False, initial_state=None):
    """Mamba's selective scan (`mamba_ssm.selective_scan_fn`), with a per-token time gap.

    Same argument names, shapes and meaning as `selective_scan_fn`, plus `dt_scale`:

    Args:
        u, delta: (batch, dim, L), float32/float64/float16/bfloat16.
        A: (dim, N), real, float32 (float64 when u is float64).
        B, C: (batch, N, L) or (batch, groups, N, L), u's dtype; groups divides dim.
        D: optional (dim,), float32 (float64 with float64 u): skip connection `D * u`.
        z: optional (batch, dim, L), u's dtype: the output is multiplied by `silu(z)`.
        delta_bias: optional (dim,), added to delta before the softplus.
        delta_softplus: apply softplus to `delta + delta_bias`.
        dt_scale: optional (batch, L), float32 (float64 with float64 u): multiplies the step,
            `Δ = softplus(delta + delta_bias) · dt_scale`, so irregular time gaps enter the
            discretisation exactly as for a continuous-time linear ODE.
        return_last_state: also return the final state (batch, dim, N), float32. As in
            mamba_ssm it carries no gradient.
        initial_state: optional (batch, dim, N), float32 (float64 with float64 u): the state
            before the first step (0 when None), differentiable. With `return_last_state` this
            is chunked prefill: scanning [0, t) and then [t, L) from the returned state equals
            scanning [0, L).

    The state is kept in float32 (float64 for float64 inputs). Sequence tensors whose last
    dimension is not contiguous are copied; other strides are used as they are. NaN and Inf
    propagate as in the reference, with one exception in the backward: where dt_scale, B or C
    holds an Inf, the gradients of B, C and dt_scale can be NaN where the reference's are finite
    or infinite (on the CPU when a group's channel count is not a multiple of the SIMD width,
    whose unused lanes meet the Inf; the per-step gradients of delta and dt_scale at an Inf in u,
    delta or dt_scale are NaN where the reference's are ±inf).
    Reference: `cram_ext.reference.selective_scan_ref`.
    """
    out, chunk_states = _ops.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, dt_scale,
                                                 bool(delta_softplus), initial_state)
    if return_last_state:
        return out, chunk_states[:, :, -1].detach()
    return out


@torch.library.register_fake("cram_ext::selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, dt_scale, delta_softplus, initial_state=None):
    batch, dim, L = u.shape
    n_chunks = max(1, -(-L // SCAN_CHUNK_SIZE))
    return (u.new_empty(u.shape),
            u.new_empty(batch, dim, n_chunks, A.shape[1], dtype=_accumulation_dtype(u.dtype)))


@torch.library.register_fake("cram_ext::selective_scan_bwd")
def _(dout, u, delta, A, B, C, D, z, delta_bias, dt_scale, chunk_states, delta_softplus,
      initial_state=None):
    acc = _accumulation_dtype(u.dtype)

    def like(t, dtype=None):  # an optional input's gradient: same shape, or absent
        return None if t is None else t.new_empty(t.shape, dtype=dtype or t.dtype)

    return (like(u), like(delta), like(A), like(B), like(C), like(D, acc), like(z),
            like(delta_bias, acc), like(dt_scale, acc), like(initial_state))


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, dt_scale, delta_softplus, *rest = inputs
    initial_state = rest[0] if rest else None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dt_scale, output[1], initial_state)
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, grad_out, _grad_chunk_states):
    u, delta, A, B, C, D, z, delta_bias, dt_scale, chunk_states, initial_state = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, ddt_scale, dinitial_state = \
        _ops.selective_scan_bwd(grad_out, u, delta, A, B, C, D, z, delta_bias, dt_scale,
                                chunk_states, ctx.delta_softplus, initial_state)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, ddt_scale, None, dinitial_state


torch.library.register_autograd("cram_ext::selective_scan_fwd", _scan_backward,
                                setup_context=_scan_setup_context)


# ---------------------------------------------------------------------------------------------
# Routed attention
# ---------------------------------------------------------------------------------------------

def routed_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                     scale=None, enable_gqa=False, *, route=None, key_mask=None):
    """`F.scaled_dot_product_attention` computed only for the routed query rows.

    The arguments before `route` are SDPA's, with its defaults and meaning; with `route=None`
    and no `key_mask` the result is SDPA's.

    Args:
        query: (*batch, heads, L, E); float32/float64/float16/bfloat16. Any number of leading
            batch dimensions, broadcast against key's and value's as in SDPA.
        key, value: (*batch, kv_heads, S, E) and (*batch, kv_heads, S, Ev), query's dtype,
            broadcast against each other but in the last dimension. kv_heads equals heads, or
            is 1 (broadcast), or with `enable_gqa` divides heads (query head h reads key/value
            head h // (heads // kv_heads)).
        attn_mask: bool (True: the key takes part, SDPA's convention) or additive float
            (float32 or query's dtype), broadcastable to (*batch, heads, L, S). Only the rows
            of routed queries are read. Unlike SDPA it may be combined with `is_causal`: a key
            must pass both.
        dropout_p: must be 0.0; dropout is not implemented (ValueError otherwise).
        is_causal: query i sees keys j <= i (top-left aligned when L != S), as in SDPA.
        scale: score scale; default 1/sqrt(E).
        enable_gqa: allow kv_heads < heads (grouped-query attention), as in SDPA.
        route: bool (*batch, L), shared by the heads, or (*batch, heads, L): True where the
            query row attends; size-1 dimensions broadcast. None routes every row.
        key_mask: bool (*batch, S), the keys that exist (an episodic buffer); size-1
            dimensions broadcast.

    Rows not routed output exactly 0 and get zero gradient. A routed row that sees no key (all
    hidden by `is_causal`, `key_mask`, False or -inf in `attn_mask`) outputs 0, as SDPA does for
    fully masked rows. NaN or Inf in a value row a query cannot see can still reach its output
    through a zero weight, as in SDPA, except on the CPU with a `key_mask` that keeps at most
    half of the keys: then the other key and value rows are never read. Without `attn_mask`
    the CPU/CUDA kernels run (E = Ev in [1, ATTENTION_MAX_HEAD_DIM = 256], a finite scale),
    and the cost scales with the routed rows times the keys each can see: causally, the
    positions before it, or on the CPU, with a `key_mask` that keeps at most half of the keys,
    the kept keys before it. With `attn_mask`, or for the calls the kernels do not take, the
    result is a PyTorch composite (gather the routed rows and their mask rows, softmax in
    float32 or float64, scatter back), differentiable also in a float mask, whose cost scales
    with batch · kv_heads · the most routed rows of one (batch, kv head) · S. Tensors whose
    last dimension is not contiguous are copied; other strides are used as they are.
    Reference: `cram_ext.reference.routed_attention_ref`.
    """
    if dropout_p != 0.0:
        raise ValueError(f"routed_attention does not implement dropout: dropout_p must be 0.0, "
                         f"got {dropout_p}")
    ndim = max(query.dim(), key.dim(), value.dim())
    # Every tensor in the (*batch, heads, L, E) form: leading size-1 dimensions where one has
    # fewer (a 2-D call is one head of one batch).
    rank = max(ndim, 3)
    q, k, v = (t if t.dim() == rank else t.reshape((1,) * (rank - t.dim()) + t.shape)
               for t in (query, key, value))
    heads, L, head_dim = q.shape[-3:]
    if k.shape[-1] != head_dim:
        raise RuntimeError(f"routed_attention: key's last dimension must be query's (E = "
                           f"{head_dim}), got key {tuple(key.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        # Key and value broadcast against each other in their batch and head dimensions, as in
        # SDPA; their length must agree.
        try:
            lead = torch.broadcast_shapes(k.shape[:-2], v.shape[:-2])
        except RuntimeError:
            lead = None
        if lead is None or k.shape[-2] != v.shape[-2]:
            raise RuntimeError(f"routed_attention: key {tuple(key.shape)} and value "
                               f"{tuple(value.shape)} must have the same length S and broadcast "
                               f"in their other dimensions but the last")
        k, v = k.expand(*lead, *k.shape[-2:]), v.expand(*lead, *v.shape[-2:])
    kv_heads, S = k.shape[-3:-1]
    if kv_heads == 0 and heads != 0:
        raise RuntimeError(f"routed_attention: query has {heads} heads and key/value none")
    if enable_gqa and kv_heads:
        if heads % kv_heads:
            raise RuntimeError(f"routed_attention: the number of key/value heads ({kv_heads}) must "
                               f"divide the number of query heads ({heads})")
    elif kv_heads != heads and kv_heads != 1:
        if heads != 1:
            raise RuntimeError(f"routed_attention: query has {heads} heads and key/value "
                               f"{kv_heads}; grouped-query attention needs enable_gqa=True, as "
                               f"in scaled_dot_product_attention")
        heads = kv_heads  # one query head broadcast over the key/value heads
    batch_shape = q.shape[:-3]
    if not k.shape[:-3] == v.shape[:-3] == batch_shape:  # broadcast_shapes costs 20 us per call
        try:
            batch_shape = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        except RuntimeError:
            raise RuntimeError(f"routed_attention: the batch dimensions of query "
                               f"{tuple(query.shape)}, key {tuple(key.shape)} and value "
                               f"{tuple(value.shape)} do not broadcast") from None
    q = _merge_batch(q, batch_shape, (heads, L, head_dim))
    k, v = (_merge_batch(t, batch_shape, t.shape[-3:]) for t in (k, v))
    if route is None:
        route = torch.ones(q.shape[0], L, dtype=torch.bool, device=q.device)
    else:
        per_head = route.dim() == len(batch_shape) + 2
        route = _flatten_batch(route, batch_shape, (heads, L) if per_head else (L,), "route",
                               "(*batch, L) or (*batch, heads, L)")
    if key_mask is not None:
        key_mask = _flatten_batch(key_mask, batch_shape, (S,), "key_mask", "(*batch, S)")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0  # SDPA's for head_dim 0: 1
    # What the kernels take; the rest (value's head_dim not query's, none, more than
    # ATTENTION_MAX_HEAD_DIM, a scale that is not finite, no head) is SDPA's all the same.
    kernels_take = (1 <= head_dim <= ATTENTION_MAX_HEAD_DIM and v.shape[-1] == head_dim
                    and math.isfinite(scale) and heads > 0)
    if attn_mask is None and kernels_take:
        out, _lse = _ops.routed_attention_fwd(q, k, v, route, key_mask, bool(is_causal),
                                              float(scale))
    else:
        if attn_mask is not None:
            attn_mask = _broadcast_attn_mask(attn_mask, (*batch_shape, heads, L, S), query.dtype)
        out = _composite_routed_attention(q, k, v, route, key_mask, attn_mask, batch_shape,
                                          bool(is_causal), float(scale))
    full_shape = (*batch_shape, heads, L, out.shape[-1])
    return out if out.shape == full_shape else out.view(full_shape[len(full_shape) - ndim:])


def _merge_batch(t, batch_shape, inner_shape):
    """`t` broadcast to (*batch_shape, *inner_shape), its batch dimensions merged into one (a
    view unless broadcast dimensions cannot be merged)."""
    shape = (*batch_shape, *inner_shape)
    if t.shape != shape:
        t = t.expand(shape)
    return t if len(batch_shape) == 1 else t.reshape(math.prod(batch_shape), *inner_shape)


def _flatten_batch(t, batch_shape, row_shape, name, layout):
    """A bool `t` of shape (*batch_shape, *row_shape), size-1 dimensions broadcast, with its
    batch dimensions merged into one."""
    shape = (*batch_shape, *row_shape)
    if t.dtype != torch.bool:
        raise RuntimeError(f"routed_attention: {name} must be a bool tensor, got {t.dtype}")
    if t.dim() != len(shape) or any(n not in (1, want) for n, want in zip(t.shape, shape)):
        raise RuntimeError(f"routed_attention: {name} must have shape {layout} = {shape} "
                           f"(size-1 dimensions broadcast), got {tuple(t.shape)}")
    return _merge_batch(t, batch_shape, row_shape)


def _broadcast_attn_mask(attn_mask, shape, query_dtype):
    """`attn_mask` checked as SDPA checks it and expanded (a view) to `shape`."""
    if attn_mask.dtype not in (torch.bool, torch.float32, query_dtype):
        raise RuntimeError(f"routed_attention: attn_mask must be bool, float32 or query's dtype "
                           f"({query_dtype}), got {attn_mask.dtype}")
    if attn_mask.dim() > len(shape) or any(
            n not in (1, want) for n, want in zip(reversed(attn_mask.shape), reversed(shape))):
        raise RuntimeError(f"routed_attention: attn_mask must be broadcastable to "
                           f"(*batch, heads, L, S) = {shape}, got {tuple(attn_mask.shape)}")
    return attn_mask.expand(shape)


def _composite_routed_attention(q, k, v, route, key_mask, attn_mask, batch_shape, is_causal, scale):
    """routed_attention as a composite of PyTorch ops: the attn_mask case (the kernels take no
    mask) and the shapes and scales the kernels do not take.

    q: (batch, heads, L, E); k, v: (batch, kv_heads, S, ·); route: bool (batch, L) or
    (batch, heads, L); key_mask: bool (batch, S) or None; attn_mask: None or (*batch_shape,
    heads, L, S), an expanded view, so only the routed rows' mask entries are read.

    The routed rows of each (batch, kv head) are packed into one zero-padded block so that the
    scores are a batched matmul against that head's keys, without copying keys per row.
    """
    batch, heads, L, head_dim = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    acc = _accumulation_dtype(q.dtype)
    if heads == 0:
        return q.new_zeros(batch, 0, L, v.shape[-1])
    if route.dim() == 2:
        route = route[:, None, :].expand(batch, heads, L)
    b, h, i = route.nonzero(as_tuple=True)  # sorted by (b, h, i), so by (b, kv head) too
    kv_h = h // (heads // kv_heads)
    block = b * kv_heads + kv_h
    rows_per_block = torch.bincount(block, minlength=batch * kv_heads)
    slot = torch.arange(block.numel(), device=q.device) - (rows_per_block.cumsum(0) -
                                                           rows_per_block)[block]
    width = int(rows_per_block.max()) if block.numel() else 0

    q_rows = q[b, h, i].to(acc)
    packed_q = q_rows.new_zeros(batch, kv_heads, width, head_dim).index_put((b, kv_h, slot), q_rows)
    scores = (packed_q @ k.to(acc).transpose(-1, -2))[b, kv_h, slot] * scale  # (rows, S)

    visible = torch.ones_like(scores, dtype=torch.bool)
    if is_causal:
        visible = torch.arange(S, device=q.device) <= i[:, None]
    if key_mask is not None:
        visible = visible & key_mask[b]
    if attn_mask is not None:
        mask_rows = attn_mask[(*torch.unravel_index(b, batch_shape), h, i)]
        if mask_rows.dtype == torch.bool:
            visible = visible & mask_rows
        else:
            visible = visible & (mask_rows != float("-inf"))
            scores = scores + mask_rows.to(acc)
    # A row that sees no key would be a softmax over nothing (NaN): it outputs 0 instead.
    sees_none = ~visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(sees_none, 0.0),
                          dim=-1).masked_fill(sees_none, 0.0)

    packed_p = probs.new_zeros(batch, kv_heads, width, S).index_put((b, kv_h, slot), probs)
    out_rows = (packed_p @ v.to(acc))[b, kv_h, slot]
    out = q.new_zeros(batch, heads, L, v.shape[-1])
    return out.index_put((b, h, i), out_rows.to(q.dtype))


@torch.library.register_fake("cram_ext::routed_attention_fwd")
def _(q, k, v, route, key_mask, is_causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))


@torch.library.register_fake("cram_ext::routed_attention_bwd")
def _(dout, q, k, v, out, lse, route, key_mask, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, route, key_mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, route, key_mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, route, key_mask = ctx.saved_tensors
    dq, dk, dv = _ops.routed_attention_bwd(grad_out, q, k, v, out, lse, route, key_mask,
                                           ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("cram_ext::routed_attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


# ---------------------------------------------------------------------------------------------
# Streaming: one scan step, routed attention against a key/value cache
# ---------------------------------------------------------------------------------------------

def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           dt_scale=None):
    """One step of `selective_scan` (mamba_ssm's `selective_state_update`), plus `dt_scale`.

    Args:
        state: (batch, dim, N), float32 (float64 with float64 x), contiguous in N: the scan
            state, updated in place.
        x, dt: (batch, dim), float32/float64/float16/bfloat16: the step's u and delta.
        A: (dim, N), float32 (float64 with float64 x).
        B, C: (batch, N) or (batch, groups, N), x's dtype; groups divides dim.
        D: optional (dim,): skip connection `D * x`. z: optional (batch, dim): output gate
            `silu(z)`. dt_bias: optional (dim,), added to dt before the softplus.
        dt_softplus: apply softplus to `dt + dt_bias`.
        dt_scale: optional (batch,), the step's time gap multiplier (`selective_scan`'s
            dt_scale at this position).

    Returns y (batch, dim) in x's dtype: exactly what `selective_scan` outputs at this position
    given the state before it. Forward only (no autograd). Reference:
    `cram_ext.reference.selective_state_update_ref`.
    """
    return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_scale,
                                       bool(dt_softplus))


@torch.library.register_fake("cram_ext::selective_state_update")
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_scale, dt_softplus):
    return x.new_empty(x.shape)


def routed_attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, *,
                                  route=None, key_mask=None, scale=None):
    """Routed attention for new query rows against a key/value cache (decoding), after
    flash-attn's `flash_attn_with_kvcache`, in our head-major layout.

    Args:
        q: (batch, heads, n_new, d), float32/float64/float16/bfloat16: one or a few new
            positions per sequence.
        k_cache, v_cache: (batch, kv_heads, capacity, d), q's dtype, contiguous in d; kv_heads
            divides heads (grouped-query attention: query head h reads kv head
            h // (heads // kv_heads)).
        k, v: optional (batch, kv_heads, n_new, d): the new entries, written in place into the
            caches at slots [cache_seqlens[b], cache_seqlens[b] + n_new).
        cache_seqlens: int32 tensor (batch,) or int: the entries each cache holds before this
            call; None means every cache is full (capacity). As with FlashAttention the caller
            advances it after the call. It is an error (RuntimeError) when the new entries do
            not fit, cache_seqlens[b] + n_new > capacity. On a GPU that check does not read the
            lengths back: it is a device-side assertion, which fails the CUDA context.
        route: bool (batch, n_new), shared by the heads, or (batch, heads, n_new): the rows that
            attend; None routes every row. Rows not routed output 0 and cost only the append.
        key_mask: bool (batch, capacity): the cache slots that take part (an episodic buffer
            of written entries); the new entries' slots included.
        scale: score scale; default 1/sqrt(d).

    With new entries, row i (position cache_seqlens[b] + i) sees slots [0, cache_seqlens[b] + i]:
    the cache and the new entries causally. Without, the rows are the cache's last n_new
    positions and row i sees slots [0, cache_seqlens[b] - n_new + i] (FlashAttention's causal
    alignment). A routed row that sees no key outputs 0. Forward only (no autograd). Returns
    out (batch, heads, n_new, d). Reference: `cram_ext.reference.routed_attention_with_kvcache_ref`.
    """
    batch, n_new, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if cache_seqlens is None:
        cache_seqlens = k_cache.shape[2] if k_cache.dim() == 4 else 0
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if route is None:
        route = torch.ones(batch, n_new, dtype=torch.bool, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return _ops.routed_attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, route,
                                         key_mask, float(scale))


@torch.library.register_fake("cram_ext::routed_attention_kvcache")
def _(q, k_cache, v_cache, k, v, cache_seqlens, route, key_mask, scale):
    return q.new_empty(q.shape)


# Fused CRAM forward
# ---------------------------------------------------------------------------------------------

class CramForwardOutput(NamedTuple):
    """What `cram_forward` returns; tensors are (batch, L) unless said otherwise."""

    out: torch.Tensor             # (batch, L, d_model): working_out + the taken path's output
    path: torch.Tensor            # int64 `Path` per token (WORKING=0, EPISODIC=1, SEMANTIC=2)
    attention_rows: torch.Tensor  # 0-dim int64: the tokens that ran attention
    predicted_loss: torch.Tensor  # (batch, L, paths): the router's loss prediction per path
    scores: torch.Tensor          # (batch, L, paths): predicted loss + price; the lowest is taken
    attention_out: torch.Tensor   # (batch, L, d_model): attention before its out-projection
                                  # (heads concatenated), 0 on the rows that did not attend


def cram_forward(x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                 out_proj_weight, router_w1, router_b1, router_w2, router_b2, qkv_weight,
                 attn_out_weight, semantic_down_weight=None, semantic_down_bias=None,
                 semantic_up_weight=None, semantic_up_bias=None, *, n_heads, episodic_price,
                 semantic_reward=0.0, q_hat=None, key_mask=None, forced_path=None):
    """One CRAM layer's paths in one op: selective scan, routing decision, attention for the
    episodic rows only, the semantic adapter for the semantic rows only, mixed.

        u, z = split(W_in x);  (dt, B, C) = split(W_x u);  δ = W_dt dt
        y = selective_scan(u, δ, A, B, C, D, z, dt_bias, softplus, dt_scale=log(1 + gap))
        w = W_out y                                              (the working-memory output)
        predicted = W2 ReLU(W1 [x, log(1 + gap), ‖w‖/√d_model, q̂] + b1) + b2
        path = argmin(predicted + [0, episodic_price, −semantic_reward·q̂]), or forced_path
        out = w + 1[episodic]·W_o attention(q, k, v) + 1[semantic]·f_sem(x)

    attention is causal multi-head attention over the keys in `key_mask` (q, k, v from
    `qkv_weight`, n_heads query heads; fewer key/value heads when qkv_weight has fewer rows:
    grouped-query attention); f_sem(x) = W_up ReLU(W_down x + b_down) + b_up.

    Args:
        x: (batch, L, d_model), float32/float64/float16/bfloat16; every weight in x's dtype
            except A, D, dt_bias (float32, float64 with float64 x), as the scan takes them.
        gap: (batch, L) time gaps Δτ ≥ 0, x's dtype.
        in_proj_weight (2·d_inner, d_model), x_proj_weight (dt_rank + 2N, d_inner),
            dt_proj_weight (d_inner, dt_rank), A (d_inner, N), D, dt_bias (d_inner,),
            out_proj_weight (d_model, d_inner): the scan working memory
            (`cram_ext.models.memory.SelectiveScanMemory`).
        router_w1 (hidden, d_model + 3), router_b1 (hidden,), router_w2 (paths, hidden),
            router_b2 (paths,): the router's loss predictor; 3 paths need the semantic adapter.
        qkv_weight (d_model + 2·kv_heads·head_dim, d_model), attn_out_weight (d_model, d_model).
        semantic_*: the low-rank adapter, (rank, d_model), (rank,), (d_model, rank), (d_model,).
        n_heads: query heads; head_dim = d_model / n_heads.
        episodic_price, semantic_reward: the router's prices (`RoutingPrices`).
        q_hat: optional (batch, L), x's dtype: the predicted quality q̂ (None: 0).
        key_mask: optional bool (batch, L): the tokens that are keys.
        forced_path: optional int64 (batch, L): a path per token that overrides the router's
            choice, -1 where it does not (training's exploration, drawn by the caller, so the
            op stays deterministic). Other values are an error on the CPU; on a CUDA device,
            where checking them would synchronise, they read as -1.

    Returns a `CramForwardOutput`. No step synchronises with the host on a CUDA device. The
    routing is a hard gate: gradients reach the taken path only, the router's inputs get none.
    Reference: `cram_ext.reference.cram_forward_ref`.
    """
    (out, path, attention_rows, predicted, scores, _scan_out, _chunk_states, attention_out,
     _lse, _route) = _ops.cram_forward_fwd(
        x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias, out_proj_weight,
        router_w1, router_b1, router_w2, router_b2, qkv_weight, attn_out_weight,
        semantic_down_weight, semantic_down_bias, semantic_up_weight, semantic_up_bias, q_hat,
        key_mask, forced_path, int(n_heads), float(episodic_price), float(semantic_reward))
    return CramForwardOutput(out, path, attention_rows, predicted, scores, attention_out)


@torch.library.register_fake("cram_ext::cram_forward_fwd")
def _(x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias, out_proj_weight,
      router_w1, router_b1, router_w2, router_b2, qkv_weight, attn_out_weight,
      semantic_down_weight, semantic_down_bias, semantic_up_weight, semantic_up_bias, q_hat,
      key_mask, forced_path, n_heads, episodic_price, semantic_reward):
    batch, L, d = x.shape
    d_inner, paths = out_proj_weight.shape[1], router_w2.shape[0]
    acc = _accumulation_dtype(x.dtype)
    n_chunks = max(1, -(-L // SCAN_CHUNK_SIZE))
    return (x.new_empty(batch, L, d), x.new_empty(batch, L, dtype=torch.long),
            x.new_empty((), dtype=torch.long), x.new_empty(batch, L, paths),
            x.new_empty(batch, L, paths), x.new_empty(d_inner, batch, L).permute(1, 0, 2),
            x.new_empty(batch, d_inner, n_chunks, A.shape[1], dtype=acc),
            x.new_empty(batch, L, d), x.new_empty(batch, n_heads, L, dtype=acc),
            x.new_empty(batch, L, dtype=torch.bool))


def _cram_forward_setup_context(ctx, inputs, output):
    (x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias, out_proj_weight,
     _w1, _b1, _w2, _b2, qkv_weight, attn_out_weight, semantic_down_weight, semantic_down_bias,
     semantic_up_weight, semantic_up_bias, _q_hat, key_mask, _forced, n_heads, _ep, _sr) = inputs
    _out, path, _rows, _pred, _scores, scan_out, chunk_states, attention_out, lse, route = output
    ctx.save_for_backward(x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                          out_proj_weight, qkv_weight, attn_out_weight, semantic_down_weight,
                          semantic_down_bias, semantic_up_weight, semantic_up_bias, key_mask,
                          path, scan_out, chunk_states, attention_out, lse, route)
    ctx.n_heads = n_heads


def _cram_forward_backward(ctx, grad_out, *_grad_rest):
    """The gradient of `out` through the taken paths, from the scan's and routed attention's
    backward kernels; the GEMMs' inputs are recomputed from x (cheaper than keeping them)."""
    (x, gap, W_in, W_x, W_dt, A, D, dt_bias, W_out, W_qkv, W_o, W_down, b_down, W_up, b_up,
     key_mask, path, scan_out, chunk_states, attention_out, lse, route) = ctx.saved_tensors
    batch, L, d = x.shape
    d_inner, dt_rank, N = W_out.shape[1], W_dt.shape[1], A.shape[1]
    g = grad_out.contiguous()
    x_flat = x.reshape(batch * L, d)

    # Working memory: out = W_out · scan(...), the scan's inputs from x by three GEMMs, in the
    # forward's channel-major layout: (channels, batch·L) read as (batch, channels, L).
    def as_sequence(channels_by_tokens):
        return channels_by_tokens.view(-1, batch, L).permute(1, 0, 2)

    def as_channels(sequence):
        return sequence.permute(1, 0, 2).reshape(-1, batch * L)

    xz = W_in @ x_flat.t()
    u, z = xz[:d_inner], xz[d_inner:]
    x_dbl = W_x @ u
    dt_low, B, C = x_dbl.split([dt_rank, N, N], dim=0)
    delta = W_dt @ dt_low
    g_flat = g.view(batch * L, d)
    dW_out = g_flat.t() @ as_channels(scan_out).t()
    dy = W_out.t() @ g_flat.t()
    du, ddelta, dA, dB, dC, dD, dz, ddt_bias, _, _ = _ops.selective_scan_bwd(
        as_sequence(dy), as_sequence(u), as_sequence(delta), A, as_sequence(B), as_sequence(C),
        D, as_sequence(z), dt_bias, torch.log1p(gap).to(chunk_states.dtype), chunk_states, True)
    du, ddelta, dB, dC, dz = (as_channels(t) for t in (du, ddelta, dB, dC, dz))
    dW_dt = ddelta @ dt_low.t()
    dx_dbl = torch.cat([W_dt.t() @ ddelta, dB, dC], dim=0)
    dW_x = dx_dbl @ u.t()
    dxz = torch.cat([du + W_x.t() @ dx_dbl, dz], dim=0)
    dW_in = dxz @ x_flat
    dx = (dxz.t() @ W_in).view(batch, L, d)

    # Episodic path, on the routed rows only (route is a hard 0/1 gate).
    heads = ctx.n_heads
    head_dim = d // heads
    kv_dim = (W_qkv.shape[0] - d) // 2
    g_episodic = (g * route[..., None].to(g.dtype)).view(batch * L, d)
    dW_o = g_episodic.t() @ attention_out.view(batch * L, d)
    qkv = x @ W_qkv.t()
    q, k, v = (t.reshape(batch, L, -1, head_dim).transpose(1, 2)
               for t in qkv.split([d, kv_dim, kv_dim], dim=-1))
    d_attention = (g_episodic @ W_o).view(batch, L, heads, head_dim).transpose(1, 2)
    dq, dk, dv = _ops.routed_attention_bwd(
        d_attention, q, k, v, attention_out.view(batch, L, heads, head_dim).transpose(1, 2), lse,
        route, key_mask, True, 1.0 / math.sqrt(head_dim))
    dqkv = torch.cat([t.transpose(1, 2).reshape(batch, L, -1) for t in (dq, dk, dv)], dim=-1)
    dW_qkv = dqkv.view(batch * L, -1).t() @ x_flat
    dx = dx + dqkv @ W_qkv

    dW_down = db_down = dW_up = db_up = None
    if W_down is not None:
        g_semantic = (g * (path == 2)[..., None].to(g.dtype)).view(batch * L, d)
        pre = torch.addmm(b_down, x_flat, W_down.t())
        h = torch.relu(pre)
        dW_up, db_up = g_semantic.t() @ h, g_semantic.sum(0)
        dh = torch.where(h <= 0, 0.0, g_semantic @ W_up)  # as relu's backward: NaN passes
        dW_down, db_down = dh.t() @ x_flat, dh.sum(0)
        dx = dx + (dh @ W_down).view(batch, L, d)
    return (dx, None, dW_in, dW_x, dW_dt, dA, dD, ddt_bias, dW_out, None, None, None, None,
            dW_qkv, dW_o, dW_down, db_down, dW_up, db_up, None, None, None, None, None, None)


torch.library.register_autograd("cram_ext::cram_forward_fwd", _cram_forward_backward,
                                setup_context=_cram_forward_setup_context)


class CramStepOutput(NamedTuple):
    """What `cram_step` returns: `CramForwardOutput` for one token per stream, without the
    length dimension (out and attention_out (batch, d_model), path (batch,), predicted_loss and
    scores (batch, paths))."""

    out: torch.Tensor
    path: torch.Tensor
    predicted_loss: torch.Tensor
    scores: torch.Tensor
    attention_out: torch.Tensor


def cram_step(x, gap, state, k_cache, v_cache, cache_seqlens, in_proj_weight, x_proj_weight,
              dt_proj_weight, A, D, dt_bias, out_proj_weight, router_w1, router_b1, router_w2,
              router_b2, qkv_weight, attn_out_weight, semantic_down_weight=None,
              semantic_down_bias=None, semantic_up_weight=None, semantic_up_bias=None, *, n_heads,
              episodic_price, semantic_reward=0.0, q_hat=None, key_mask=None):
    """`cram_forward` for the next token of each stream, continuing from a state: the decoding
    step of a CRAM layer in one op (streaming inference; no autograd).

    The scan advances `state` (batch, d_inner, N) in place, as `selective_state_update` does;
    every stream's new key and value are written into `k_cache`, `v_cache` (batch, kv_heads,
    capacity, head_dim) at slot `cache_seqlens` (int32 (batch,)), and the rows the router sends
    to attention attend over the cache's slots up to there, the new entry included, where
    `key_mask` (bool (batch, capacity)) allows, as `routed_attention_with_kvcache` does. As
    with FlashAttention's cache the caller advances `cache_seqlens` (and its key_mask).

    x: (batch, d_model) the token of each stream; gap, q_hat: (batch,); the weights and prices
    as for `cram_forward`. Returns a `CramStepOutput`. On the CPU the step is one kernel, in
    which attention and the q projection run only for the routed rows; on a CUDA device it is
    the separate ops' kernels, and no step synchronises with the host. Reference:
    `cram_ext.reference.cram_step_ref`.
    """
    return CramStepOutput(*_ops.cram_step(
        x, gap, state, k_cache, v_cache, cache_seqlens, in_proj_weight, x_proj_weight,
        dt_proj_weight, A, D, dt_bias, out_proj_weight, router_w1, router_b1, router_w2,
        router_b2, qkv_weight, attn_out_weight, semantic_down_weight, semantic_down_bias,
        semantic_up_weight, semantic_up_bias, q_hat, key_mask, int(n_heads),
        float(episodic_price), float(semantic_reward)))


@torch.library.register_fake("cram_ext::cram_step")
def _(x, gap, state, k_cache, v_cache, cache_seqlens, in_proj_weight, x_proj_weight,
      dt_proj_weight, A, D, dt_bias, out_proj_weight, router_w1, router_b1, router_w2, router_b2,
      qkv_weight, attn_out_weight, semantic_down_weight, semantic_down_bias, semantic_up_weight,
      semantic_up_bias, q_hat, key_mask, n_heads, episodic_price, semantic_reward):
    batch, d = x.shape
    paths = router_w2.shape[0]
    return (x.new_empty(batch, d), x.new_empty(batch, dtype=torch.long),
            x.new_empty(batch, paths), x.new_empty(batch, paths), x.new_empty(batch, d))
