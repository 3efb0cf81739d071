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
                       dt_scale=None, return_last_state=False, initial_state=None):
    """Mamba's S6 selective scan with a per-token time-gap multiplier.

    u, delta: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, groups, N, L);
    D: (dim,); z: (batch, dim, L); delta_bias: (dim,); dt_scale: (batch, L).

        Δ_t = softplus(delta_t + delta_bias) · dt_scale_t
        h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
        y_t = C_t · h_t + D u_t,     out = y · silu(z)  (when z is given)

    The state h is kept in float32 (float64 for float64 inputs) and starts from
    `initial_state` (batch, dim, N), 0 when None. Returns out in u's dtype, and
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
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(acc)
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


def routed_attention_ref(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                         scale=None, enable_gqa=False, *, route=None, key_mask=None):
    """`scaled_dot_product_attention` (same arguments and defaults) computed densely, with the
    rows not routed set to 0.

    query: (*batch, heads, L, E); key, value: (*batch, kv_heads, S, E), batch dimensions
    broadcasting, kv_heads dividing heads with `enable_gqa`. attn_mask: bool (True takes part) or
    additive float, broadcastable to (*batch, heads, L, S); it combines with `is_causal` (SDPA
    refuses both). route: bool (*batch, L) or (*batch, heads, L), True where a query row attends
    (None: all). key_mask: bool (*batch, S), the keys that exist. `is_causal`: query i sees keys
    j <= i (top-left aligned when L != S). dropout_p must be 0.

    A routed row that sees no key (causal, key_mask, attn_mask False or -inf) outputs 0, as SDPA
    does for fully masked rows. NaN or Inf in a value a row cannot see reaches it here through a
    zero weight (0 · NaN), and in the kernels wherever they load that value for the row's tile
    (the CPU kernel never loads rows outside a key_mask that keeps at most half of the keys), so
    compare the two only where non-finite values sit at visible positions.
    """
    if dropout_p != 0.0:
        raise ValueError(f"routed_attention_ref does not implement dropout: dropout_p must be 0.0, "
                         f"got {dropout_p}")
    if max(query.dim(), key.dim(), value.dim()) == 2:  # one head of one batch
        return routed_attention_ref(query[None], key[None], value[None], attn_mask, dropout_p,
                                    is_causal, scale, enable_gqa, route=route,
                                    key_mask=key_mask)[0]
    L, S, d = query.shape[-2], key.shape[-2], query.shape[-1]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if enable_gqa:
        if query.shape[-3] % key.shape[-3]:
            raise RuntimeError("routed_attention_ref: the number of key/value heads must divide "
                               "the number of query heads")
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scores = (query.to(acc) @ key.to(acc).transpose(-1, -2)) * scale
    visible = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        visible = visible.tril()
    if key_mask is not None:
        visible = visible & key_mask[..., None, None, :]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        visible = visible & (attn_mask != float("-inf"))
        scores = scores + attn_mask.to(acc)
    # A row with no visible key would be softmax over all -inf (NaN): define it as zero output.
    sees_none = ~visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(sees_none, 0.0),
                          dim=-1).masked_fill(sees_none, 0.0)
    out = probs @ value.to(acc)
    if route is not None:
        route = route[..., None, :] if route.dim() == out.dim() - 2 else route
        out = torch.where(route[..., None], out, torch.zeros((), dtype=acc, device=query.device))
    return out.to(query.dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, dt_scale=None):
    """One step of `selective_scan_ref` (Mamba's `selective_state_update`, plus `dt_scale`).

    state: (batch, dim, N), updated in place; x, dt, z: (batch, dim); B, C: (batch, N) or
    (batch, groups, N); A: (dim, N); D, dt_bias: (dim,); dt_scale: (batch,). Returns y
    (batch, dim) in x's dtype: the scan's output at this position.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    step = scan_discretisation_step(dt[..., None], dt_bias, dt_softplus,
                                    None if dt_scale is None else dt_scale[:, None])[..., 0]
    if B.dim() == 2:
        B, C = B[:, None], C[:, None]
    dim = x.shape[1]
    B = B.to(acc).repeat_interleave(dim // B.shape[1], dim=1)       # (batch, dim, N)
    C = C.to(acc).repeat_interleave(dim // C.shape[1], dim=1)
    u = x.to(acc)
    h = torch.exp(step[..., None] * A.to(acc)) * state.to(acc) + (step * u)[..., None] * B
    state.copy_(h)
    y = (h * C).sum(-1)
    if D is not None:
        y = y + u * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)


def routed_attention_with_kvcache_ref(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, *,
                                      route=None, key_mask=None, scale=None):
    """`routed_attention_with_kvcache` densely, one batch element at a time.

    q: (batch, heads, n_new, d); k_cache, v_cache: (batch, kv_heads, capacity, d); k, v:
    (batch, kv_heads, n_new, d), written in place at slots [cache_seqlens[b], +n_new);
    cache_seqlens: int32 (batch,) or int (None: every cache full). Row i sees the slots
    j <= total_b - n_new + i, total_b = cache_seqlens[b] (+ n_new with k), where key_mask[b, j]
    (batch, capacity). route: bool (batch, n_new) or (batch, heads, n_new); None routes all.
    """
    batch, heads, n_new, _ = q.shape
    capacity = k_cache.shape[2]
    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    outs = []
    for b in range(batch):
        length = int(cache_seqlens[b])
        if k is not None:
            k_cache[b, :, length:length + n_new] = k[b]
            v_cache[b, :, length:length + n_new] = v[b]
            length += n_new
        slots = torch.arange(length, device=q.device)
        visible = slots[None, :] <= (length - n_new + torch.arange(n_new, device=q.device))[:, None]
        if key_mask is not None:
            visible = visible & key_mask[b, :length]
        outs.append(routed_attention_ref(
            q[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
            attn_mask=visible, scale=scale, enable_gqa=True,
            route=None if route is None else route[b:b + 1]))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def cram_forward_ref(x, gap, in_proj_weight, x_proj_weight, dt_proj_weight, A, D, dt_bias,
                     out_proj_weight, router_w1, router_b1, router_w2, router_b2, qkv_weight,
                     attn_out_weight, semantic_down_weight=None, semantic_down_bias=None,
                     semantic_up_weight=None, semantic_up_bias=None, *, n_heads, episodic_price,
                     semantic_reward=0.0, q_hat=None, key_mask=None, forced_path=None):
    """One CRAM layer's paths (`cram_ext.cram_forward`, same arguments), composed of
    `selective_scan_ref`, `routed_attention_ref` and plain PyTorch. Returns
    (out, path, attention_rows, predicted_loss, scores, attention_out) as the op does."""
    batch, L, d = x.shape
    d_inner, dt_rank, N = out_proj_weight.shape[1], dt_proj_weight.shape[1], A.shape[1]
    u, z = (x @ in_proj_weight.t()).transpose(1, 2).split(d_inner, dim=1)
    dt, B, C = (u.transpose(1, 2) @ x_proj_weight.t()).split([dt_rank, N, N], dim=-1)
    delta = (dt @ dt_proj_weight.t()).transpose(1, 2)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = selective_scan_ref(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_bias,
                           delta_softplus=True, dt_scale=torch.log1p(gap).to(acc))
    working_out = y.transpose(1, 2) @ out_proj_weight.t()
    head_dim = d // n_heads
    kv_dim = (qkv_weight.shape[0] - d) // 2
    q, k, v = (t.reshape(batch, L, -1, head_dim).transpose(1, 2)
               for t in (x @ qkv_weight.t()).split([d, kv_dim, kv_dim], dim=-1))

    def attend(route):
        attention = routed_attention_ref(q, k, v, is_causal=True, enable_gqa=True, route=route,
                                         key_mask=key_mask)
        return attention.transpose(1, 2).reshape(batch, L, d)

    out, path, predicted, scores, attention_out = _route_and_mix(
        x, gap, working_out, attend, router_w1, router_b1, router_w2, router_b2, attn_out_weight,
        semantic_down_weight, semantic_down_bias, semantic_up_weight, semantic_up_bias,
        episodic_price, semantic_reward, q_hat, forced_path)
    return out, path, (path == 1).sum(), predicted, scores, attention_out


def cram_step_ref(x, gap, state, k_cache, v_cache, cache_seqlens, in_proj_weight, x_proj_weight,
                  dt_proj_weight, A, D, dt_bias, out_proj_weight, router_w1, router_b1, router_w2,
                  router_b2, qkv_weight, attn_out_weight, semantic_down_weight=None,
                  semantic_down_bias=None, semantic_up_weight=None, semantic_up_bias=None, *,
                  n_heads, episodic_price, semantic_reward=0.0, q_hat=None, key_mask=None,
                  forced_path=None):
    """One token per stream of `cram_forward_ref` from a state (`cram_ext.cram_step`, same
    arguments): `selective_state_update_ref` and `routed_attention_with_kvcache_ref`, the
    state and caches updated in place. `forced_path` (batch,) routes as given where it is not
    -1, as in `cram_forward_ref` (the op has no such argument: tests route a float64 reference
    as the op routed). Returns (out, path, predicted_loss, scores, attention_out) as the op
    does."""
    batch, d = x.shape
    d_inner, dt_rank, N = out_proj_weight.shape[1], dt_proj_weight.shape[1], A.shape[1]
    u, z = (x @ in_proj_weight.t()).split(d_inner, dim=-1)
    dt, B, C = (u @ x_proj_weight.t()).split([dt_rank, N, N], dim=-1)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = selective_state_update_ref(state, u, dt @ dt_proj_weight.t(), A, B, C, D, z, dt_bias,
                                   dt_softplus=True, dt_scale=torch.log1p(gap).to(acc))
    head_dim = d // n_heads
    kv_dim = (qkv_weight.shape[0] - d) // 2
    q, k, v = (t.reshape(batch, -1, 1, head_dim)
               for t in (x @ qkv_weight.t()).split([d, kv_dim, kv_dim], dim=-1))

    def attend(route):
        attention = routed_attention_with_kvcache_ref(q, k_cache, v_cache, k, v, cache_seqlens,
                                                      route=route[:, None], key_mask=key_mask)
        return attention.reshape(batch, d)

    return _route_and_mix(x, gap, y @ out_proj_weight.t(), attend, router_w1, router_b1,
                          router_w2, router_b2, attn_out_weight, semantic_down_weight,
                          semantic_down_bias, semantic_up_weight, semantic_up_bias,
                          episodic_price, semantic_reward, q_hat, forced_path)


def _route_and_mix(x, gap, working_out, attend, router_w1, router_b1, router_w2, router_b2,
                   attn_out_weight, semantic_down_weight, semantic_down_bias, semantic_up_weight,
                   semantic_up_bias, episodic_price, semantic_reward, q_hat, forced_path):
    """The router's decision on tokens x (..., d_model) with their working-memory output, and
    the mixed output: `attend(route)` gives the attention output (..., d_model), 0 off the
    route. Returns (out, path, predicted_loss, scores, attention_out)."""
    d = x.shape[-1]
    q_hat = x.new_zeros(x.shape[:-1]) if q_hat is None else q_hat
    features = torch.cat([x, torch.log1p(gap)[..., None],
                          (working_out.norm(dim=-1) / math.sqrt(d))[..., None], q_hat[..., None]],
                         dim=-1)
    predicted = F.linear(F.relu(F.linear(features, router_w1, router_b1)), router_w2, router_b2)
    price = torch.zeros_like(predicted)
    price[..., 1] = episodic_price
    if predicted.shape[-1] == 3:
        price[..., 2] = -semantic_reward * q_hat
    scores = predicted + price
    path = scores.argmin(-1)
    if forced_path is not None:
        path = torch.where(forced_path >= 0, forced_path, path)
    route = path == 1
    attention_out = attend(route)
    out = working_out + route[..., None].to(x.dtype) * (attention_out @ attn_out_weight.t())
    if semantic_down_weight is not None:
        recalled = F.linear(F.relu(F.linear(x, semantic_down_weight, semantic_down_bias)),
                            semantic_up_weight, semantic_up_bias)
        # Selected, not multiplied by a 0/1 mask: an overflowing f_sem leaves other rows alone.
        out = out + torch.where((path == 2)[..., None], recalled, 0.0)
    return out, path, predicted, scores, attention_out
