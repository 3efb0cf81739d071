"""The public ops, on top of the kernels in `torch.ops.cram_ext` (csrc/bindings.cpp).

Each op is defined in C++ (`TORCH_LIBRARY(cram_ext, ...)`: schema, input checks, CPU and CUDA
kernels). Here it gets a fake implementation (so `torch.compile` can trace it without running
it) and an autograd formula that calls the matching backward kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _C  # loads the kernels and registers torch.ops.cram_ext

_ops = torch.ops.cram_ext

# The forward checkpoints the scan state every this many steps (the kernels' constant, read from
# the extension); the backward recomputes the states inside a chunk from its checkpoint.
SCAN_CHUNK_SIZE = _C.SCAN_CHECKPOINT_CHUNK


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   dt_scale=None, return_last_state=False):
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

    The state is kept in float32 (float64 for float64 inputs). Sequence tensors whose last
    dimension is not contiguous are copied; other strides are used as they are.
    Reference: `cram_ext.reference.selective_scan_ref`.
    """
    out, chunk_states = _ops.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, dt_scale,
                                                 bool(delta_softplus))
    if return_last_state:
        return out, chunk_states[:, :, -1].detach()
    return out


@torch.library.register_fake("cram_ext::selective_scan_fwd")
def _(u, delta, A, B, C, D, z, delta_bias, dt_scale, delta_softplus):
    batch, dim, L = u.shape
    n_chunks = max(1, -(-L // SCAN_CHUNK_SIZE))
    return (u.new_empty(u.shape),
            u.new_empty(batch, dim, n_chunks, A.shape[1], dtype=_accumulation_dtype(u.dtype)))


@torch.library.register_fake("cram_ext::selective_scan_bwd")
def _(dout, u, delta, A, B, C, D, z, delta_bias, dt_scale, chunk_states, delta_softplus):
    acc = _accumulation_dtype(u.dtype)

    def like(t, dtype=None):  # an optional input's gradient: same shape, or absent
        return None if t is None else t.new_empty(t.shape, dtype=dtype or t.dtype)

    return (like(u), like(delta), like(A), like(B), like(C), like(D, acc), like(z),
            like(delta_bias, acc), like(dt_scale, acc))


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, dt_scale, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dt_scale, output[1])
    ctx.delta_softplus = delta_softplus


def _scan_backward(ctx, grad_out, _grad_chunk_states):
    u, delta, A, B, C, D, z, delta_bias, dt_scale, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, ddt_scale = _ops.selective_scan_bwd(
        grad_out, u, delta, A, B, C, D, z, delta_bias, dt_scale, chunk_states, ctx.delta_softplus)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, ddt_scale, None


torch.library.register_autograd("cram_ext::selective_scan_fwd", _scan_backward,
                                setup_context=_scan_setup_context)


# ---------------------------------------------------------------------------------------------
# Routed attention
# ---------------------------------------------------------------------------------------------

def routed_attention(q, k, v, route=None, *, is_causal=True, scale=None, key_mask=None):
    """Softmax attention for the routed query rows only; a drop-in for
    `F.scaled_dot_product_attention(q, k, v, is_causal=...)`.

    Args:
        q: (batch, heads, Lq, head_dim); float32/float64/float16/bfloat16.
        k, v: (batch, kv_heads, Lk, head_dim), q's dtype; kv_heads divides heads (GQA: query
            head h reads key/value head h // (heads // kv_heads)).
        route: bool (batch, Lq) or (batch, heads, Lq), True where the query row attends.
            None routes every row.
        is_causal: query i sees keys j <= i, as in `scaled_dot_product_attention`
            (top-left aligned when Lq != Lk).
        scale: score scale; default 1/sqrt(head_dim).
        key_mask: optional bool (batch, Lk), the keys that exist (an episodic buffer).

    Rows not routed output exactly 0 and get zero gradient; a routed row with no visible key
    outputs 0. The cost scales with the number of routed rows (times the keys each can see).
    Tensors whose last dimension is not contiguous are copied; other strides are used as they
    are. Reference: `cram_ext.reference.routed_attention_ref`.
    """
    if route is None and q.dim() == 4:
        route = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    out, _lse = _ops.routed_attention_fwd(q, k, v, route, key_mask, bool(is_causal), float(scale))
    return out


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
