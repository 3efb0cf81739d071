"""Pure-PyTorch reference implementations: the mathematical spec of every kernel.

Short and readable on purpose. The tests compare the C++/CUDA kernels against these functions
(in float64 where gradients are checked). Nothing here is used on a fast path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def scan_discretisation_step(delta, delta_bias=None, delta_softplus=False, dt_scale=None):
    """Δ_t per (batch, dim, L): softplus(delta + bias) · dt_scale, computed in float32 or wider.

    `dt_scale` (batch, L) multiplies the step so an irregular time gap enters the discretisation
    the way it would for a continuous-time linear ODE sampled at those gaps.
    """
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    step = delta.to(dtype)
    if delta_bias is not None:
        step = step + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        step = F.softplus(step)
    if dt_scale is not None:
        step = step * dt_scale.to(dtype)[:, None, :]
    return step


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       dt_scale=None, return_last_state=False):
    """Mamba's S6 selective scan with a per-token time-gap multiplier.

    u, delta: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, groups, N, L);
    D: (dim,); z: (batch, dim, L); delta_bias: (dim,); dt_scale: (batch, L).

        Δ_t = softplus(delta_t + delta_bias) · dt_scale_t
        h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
        y_t = C_t · h_t + D u_t,     out = y · silu(z)  (when z is given)

    The state h is kept in float32 (float64 for float64 inputs). Returns out in u's dtype, and
    (out, last_state) when `return_last_state`.
    """
    dtype_in = u.dtype
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    step = scan_discretisation_step(delta, delta_bias, delta_softplus, dt_scale)
    u, A = u.to(acc), A.to(acc)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]
    B = B.to(acc).repeat_interleave(dim // groups, dim=1)  # (batch, dim, N, L)
    C = C.to(acc).repeat_interleave(dim // groups, dim=1)
    decay = torch.exp(step[..., None] * A[None, :, None, :])         # (batch, dim, L, N)
    drive = (step * u)[..., None] * B.transpose(-1, -2)              # (batch, dim, L, N)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def routed_attention_ref(q, k, v, route=None, *, is_causal=True, scale=None, key_mask=None):
    """Softmax attention computed only for routed query rows.

    q: (batch, heads, Lq, d); k, v: (batch, kv_heads, Lk, d), kv_heads dividing heads (GQA).
    route: bool (batch, Lq) or (batch, heads, Lq), True where a query row attends (None: all).
    key_mask: bool (batch, Lk), the keys that exist. `is_causal` follows
    `scaled_dot_product_attention`: query i sees keys j <= i (top-left aligned when Lq != Lk).

    Rows not routed output exactly 0; a routed row with no visible key outputs 0. With every row
    routed and no key_mask this is `scaled_dot_product_attention(q, k, v, is_causal=...)`.
    A row never reads the keys and values it cannot see, so NaN/Inf there does not reach it in
    the kernels; this dense formulation multiplies them by a zero weight (NaN for Inf values),
    so compare the two only where non-finite values sit at visible positions.
    """
    batch, heads, Lq, d = q.shape
    kv_heads, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * scale
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()
    visible = visible.expand(batch, 1, Lq, Lk)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row with no visible key would be softmax over all -inf (NaN): define it as zero output.
    any_visible = visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1) * any_visible
    out = torch.einsum("bhij,bhjd->bhid", probs, v.to(acc))
    if route is not None:
        route = route[:, None, :] if route.dim() == 2 else route
        out = torch.where(route[..., None], out, torch.zeros((), dtype=acc, device=q.device))
    return out.to(q.dtype)
