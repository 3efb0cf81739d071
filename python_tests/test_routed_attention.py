"""cram_ext.routed_attention against the reference `routed_attention_ref` and against
`F.scaled_dot_product_attention` itself, on the CPU and, where there is one, the CUDA device (the
same cases; larger CUDA-only cases are in test_cuda_kernels.py). Accuracy rule and input
builders: cases.py.

Random cases take the `seed` fixture (python_tests/conftest.py: fresh per test unless
CRAM_TEST_SEED is set) and put it in their assertion messages; a few cases use fixed seeds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cases import (ALL_DTYPES, DEVICES, assert_gradcheck, assert_matches_reference,
                   attention_inputs, check_routed_attention, cram_ops_called, random_attn_mask,
                   routed_rows)
from cram_ext import routed_attention
from cram_ext.reference import routed_attention_ref

# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [1, 7, 128, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.016, 0.5, 1.0])
@pytest.mark.parametrize("per_head_route", [False, True])
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference_across_lengths_and_route_fractions(L, fraction, per_head_route, is_causal,
                                                              device, seed):
    case = attention_inputs(seed, batch=1 if L == 1000 else 2, Lq=L, fraction=fraction,
                            per_head_route=per_head_route, device=device)
    check_routed_attention(seed, *case, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Lq, Lk", [(1, 9), (5, 17), (64, 200), (130, 40), (33, 1)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("key_mask", [False, True])
def test_matches_reference_when_query_and_key_lengths_differ(Lq, Lk, is_causal, key_mask, device,
                                                             seed):
    case = attention_inputs(seed, Lq=Lq, Lk=Lk, d=24, fraction=0.7, per_head_route=True,
                            key_mask=key_mask, device=device)
    check_routed_attention(seed, *case, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("per_head_route", [False, True])
def test_grouped_query_attention(is_causal, per_head_route, device, seed):
    case = attention_inputs(seed, batch=2, heads=8, kv_heads=2, Lq=70, d=32, fraction=0.5,
                            per_head_route=per_head_route, key_mask=True, device=device)
    check_routed_attention(seed, *case, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fixed_seed", [0, 1, 20240611])
def test_fixed_seed_cases(fixed_seed, device):
    case = attention_inputs(fixed_seed, batch=2, heads=4, kv_heads=2, Lq=150, d=64, fraction=0.3,
                            per_head_route=True, key_mask=True, device=device)
    check_routed_attention(fixed_seed, *case, is_causal=True)
    check_routed_attention(fixed_seed, *case, is_causal=False, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_dtypes(dtype, is_causal, device, seed):
    case = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=90, Lk=90, d=40, dtype=dtype,
                            fraction=0.6, per_head_route=True, key_mask=True, device=device)
    check_routed_attention(seed, *case, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_sparse_key_mask(dtype, is_causal, device, seed):
    """A key_mask that keeps a fifth of the keys, as an episodic buffer of written entries does
    (the CPU kernels then visit only the kept keys, here in two blocks of up to 64 per batch)."""
    case = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=500, d=16, dtype=dtype,
                            fraction=0.2, per_head_route=True, key_mask=True, key_share=0.2,
                            device=device)
    check_routed_attention(seed, *case, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 3, 17, 100, 256])
def test_head_dims(d, device, seed):
    case = attention_inputs(seed, Lq=40, d=d, fraction=0.8, device=device)
    check_routed_attention(seed, *case, is_causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    batch, heads, L, d = 2, 4, 50, 16
    randn = lambda *shape: torch.randn(shape, generator=g, device=device)  # noqa: E731
    q = randn(batch, L, heads, d).transpose(1, 2)          # transposed view
    k = randn(batch, heads, 2 * L, d)[:, :, ::2]           # strided rows
    v = randn(batch, heads, L, 2 * d)[..., ::2]            # last dim strided
    route = (torch.rand(batch, heads, 2 * L, generator=g, device=device) < 0.5)[..., ::2]
    key_mask = (torch.rand(2 * batch, L, generator=g, device=device) < 0.8)[::2]
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    check_routed_attention(seed, q, k, v, route, key_mask, is_causal=True)


# ---------------------------------------------------------------------------------------------
# Special rows and values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_all_routed_equals_sdpa(is_causal, device, seed):
    for heads, kv_heads, L in [(2, 2, 128), (8, 2, 300)]:
        q, k, v, _, _ = attention_inputs(seed, batch=2, heads=heads, kv_heads=kv_heads, Lq=L, d=32,
                                         device=device)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                  enable_gqa=heads != kv_heads)
        all_rows = torch.ones(2, L, dtype=torch.bool, device=device)
        for route in (None, all_rows):
            out = routed_attention(q, k, v, is_causal=is_causal, enable_gqa=heads != kv_heads,
                                   route=route)
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_unrouted_rows_are_exactly_zero_with_zero_gradient(device, seed):
    q, k, v, route, key_mask = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=60,
                                                fraction=0.3, per_head_route=True, key_mask=True,
                                                device=device)
    q.requires_grad_()
    out = routed_attention(q, k, v, is_causal=True, enable_gqa=True, route=route, key_mask=key_mask)
    out.backward(torch.randn_like(out))
    off = ~route
    assert torch.equal(out[off], torch.zeros_like(out[off])), f"seed={seed}"
    assert torch.equal(q.grad[off], torch.zeros_like(q.grad[off])), f"seed={seed}"
    assert out[route].abs().sum() > 0, f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_routed_gives_zero_gradients_everywhere(device):
    q, k, v, _, _ = attention_inputs(3, Lq=30, device=device)
    for t in (q, k, v):
        t.requires_grad_()
    route = torch.zeros(2, 30, dtype=torch.bool, device=device)
    out = routed_attention(q, k, v, is_causal=True, route=route)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_visible_keys_are_zero_with_minus_inf_lse(device, seed):
    q, k, v, _, _ = attention_inputs(seed, batch=2, Lq=20, d=8, device=device)
    key_mask = torch.ones(2, 20, dtype=torch.bool, device=device)
    key_mask[0, :5] = False   # causal rows 0..4 of batch 0 see no key
    key_mask[1] = False       # batch 1 sees no key at all
    route = torch.ones(2, 20, dtype=torch.bool, device=device)
    out = check_routed_attention(seed, q, k, v, route, key_mask, is_causal=True, scale=0.25)
    _, lse = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, key_mask, True, 0.25)
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 5:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_the_reference(device):
    q, k, v, _, _ = attention_inputs(11, batch=1, heads=2, Lq=40, d=8, device=device)
    route = torch.ones(1, 40, dtype=torch.bool, device=device)
    route[0, 30] = False
    q[0, 0, 12, 3] = float("nan")   # one query row
    k[0, 1, 20, 0] = float("nan")   # causal rows from 20 on of head 1
    for key_mask in (None, torch.ones(1, 40, dtype=torch.bool, device=device)):
        out = check_routed_attention(11, q, k, v, route, key_mask, is_causal=True, backward=False)
        assert out[0, 0, 12].isnan().all() and out[0, 1, 20:30].isnan().all()
        assert not out[0, 1, 30].isnan().any(), "an unrouted row stays 0"
    v[0, 0, 0, 5] = float("inf")    # the first key, seen by every causal row of head 0
    out = check_routed_attention(11, q, k, v, route, is_causal=True, backward=False)
    assert not out[0, 0, route[0], 5].isfinite().any(), "every routed row of head 0 sees the Inf"


@pytest.mark.parametrize("device", DEVICES)
def test_nan_key_in_sparse_routing_with_split_keys(device):
    """float16, head_dim 64: on CUDA the tensor-core path, whose few tiles at sparse routing
    split their keys across blocks and merge the splits' (out, lse): a NaN split must make the
    row's out and lse NaN, as on the CPU. The lse shows in dV: the backward recomputes P from
    it, so every key a NaN row sees gets a NaN dV row, as in the reference."""
    q, k, v, route, _ = attention_inputs(13, batch=1, heads=2, Lq=256, d=64, fraction=0.1,
                                         dtype=torch.float16, device=device)
    k[0, 1, 20, 0] = float("nan")
    route[0, 100] = True
    out = check_routed_attention(13, q, k, v, route, is_causal=True, backward=False)
    assert out[0, 1, 100].isnan().all()
    dv = {}
    for name, dtype, fn in (("kernel", None, routed_attention), ("reference", torch.float64,
                                                                 routed_attention_ref)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        attended = fn(*leaves, route=route, is_causal=True)
        dv[name] = torch.autograd.grad(attended, leaves[2], torch.ones_like(attended))[0]
    assert dv["reference"].isnan().any()
    assert torch.equal(dv["kernel"].isnan(), dv["reference"].isnan())


@pytest.mark.parametrize("device", DEVICES)
def test_a_visible_key_whose_weight_underflows_still_reads_its_value(device):
    """exp(-2000) is 0 (in float64 too), but the key is visible: 0 · inf in its value row is
    NaN, as in the reference (a kernel that skipped zero weights would return a finite row)."""
    q = torch.zeros(1, 1, 2, 8, device=device)
    q[0, 0, 1, 0] = 1.0
    k = torch.zeros(1, 1, 2, 8, device=device)
    k[0, 0, 1, 0] = -2000.0
    v = torch.randn(1, 1, 2, 8, device=device)
    v[0, 0, 1] = float("inf")
    route = torch.ones(1, 2, dtype=torch.bool, device=device)
    out = check_routed_attention(0, q, k, v, route, None, is_causal=False, scale=1.0,
                                 backward=False)
    assert out[0, 0, 1].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse_keys", [False, True],
                         ids=["infinite-key", "nan-value-of-a-dropped-key"])
def test_keys_no_row_weighs_get_zero_gradients_whatever_they_hold(sparse_keys, device):
    """A key scoring -inf for every row (3 routed rows: one partial tile of padding lanes), or a
    key that key_mask drops whose value row is NaN (an unwritten buffer slot): dK and dV of that
    key are 0, as in the reference (0 · inf and 0 · NaN must not reach them)."""
    g = torch.Generator().manual_seed(0)
    L = 16 if sparse_keys else 4
    q, k, v = (torch.randn(1, 1, L, 8, generator=g).to(device) for _ in range(3))
    key_mask, is_causal = None, False
    if sparse_keys:
        key_mask = torch.zeros(1, L, dtype=torch.bool, device=device)
        key_mask[0, ::4] = True
        v[0, 0, 1], is_causal, key = float("nan"), True, 1
    else:
        q, key = q[:, :, :3], 2
        q[..., 0] = q[..., 0].abs()
        k[0, 0, key, 0] = -float("inf")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = routed_attention(*leaves, is_causal=is_causal, key_mask=key_mask)
    out.backward(torch.ones_like(out))
    assert (leaves[1].grad[0, 0, key] == 0).all() and (leaves[2].grad[0, 0, key] == 0).all()
    expected = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = routed_attention_ref(*expected, is_causal=is_causal, key_mask=key_mask)
    ref.backward(torch.ones_like(ref))
    assert (expected[1].grad[0, 0, key] == 0).all() and (expected[2].grad[0, 0, key] == 0).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_cpu_never_reads_keys_outside_a_sparse_key_mask(is_causal):
    """With a key_mask that keeps at most half of the keys, the CPU forward reads only the kept
    key and value rows (the fused CRAM op leaves the others unwritten): NaN there reaches no
    row, and the result equals the reference with those rows zeroed."""
    q, k, v, route, key_mask = attention_inputs(12, batch=2, heads=2, Lq=48, d=16, key_mask=True,
                                                key_share=0.2)
    clean = check_routed_attention(12, q, k.masked_fill(~key_mask[:, None, :, None], 0),
                                   v.masked_fill(~key_mask[:, None, :, None], 0), route, key_mask,
                                   is_causal=is_causal, backward=False)
    dropped = ~key_mask[:, None, :, None]
    out = routed_attention(q, k.masked_fill(dropped, float("nan")), v.masked_fill(dropped, float("nan")),
                           is_causal=is_causal, route=route, key_mask=key_mask)
    assert torch.equal(out, clean)


# ---------------------------------------------------------------------------------------------
# Against scaled_dot_product_attention itself
# ---------------------------------------------------------------------------------------------

def check_against_sdpa(seed, q, k, v, attn_mask=None, *, route=None, **sdpa_kwargs):
    """routed_attention against `F.scaled_dot_product_attention` with the same arguments, by the
    accuracy rule (SDPA in float64 the reference, SDPA in q's dtype the same-dtype one): routed
    rows equal SDPA's rows, the others are exactly 0."""
    out = routed_attention(q, k, v, attn_mask, route=route, **sdpa_kwargs)
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() \
        else attn_mask
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask64,
                                              **sdpa_kwargs)
    same_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask, **sdpa_kwargs)
    if route is not None:
        routed = routed_rows(route, out.shape[:-1])
        assert (out[~routed] == 0).all(), f"rows not routed must be exactly 0 [seed {seed}]"
        expected, same_dtype = (torch.where(routed[..., None], t, 0)
                                for t in (expected, same_dtype))
    assert_matches_reference(out, expected, same_dtype, what="out", seed=seed)


SDPA_CALLS = {  # SDPA keyword arguments, attention_inputs shapes
    "defaults": ({}, {}),
    "is_causal": (dict(is_causal=True), {}),
    "is_causal-Lq<Lk": (dict(is_causal=True), dict(Lq=12, Lk=29)),
    "scale": (dict(scale=0.3), {}),
    "enable_gqa": (dict(enable_gqa=True), dict(heads=8, kv_heads=2)),
    "one-kv-head-broadcast": ({}, dict(heads=4, kv_heads=1)),
    "causal-gqa-scale": (dict(is_causal=True, enable_gqa=True, scale=0.2),
                         dict(heads=4, kv_heads=2)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call", list(SDPA_CALLS))
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("routed", ["all", "route", "per-head-route"])
def test_each_sdpa_keyword_matches_sdpa(call, mask, routed, device, seed):
    kwargs, shape = SDPA_CALLS[call]
    if mask and kwargs.get("is_causal"):
        pytest.skip("SDPA refuses attn_mask with is_causal: test_attn_mask_combines_with_is_causal")
    q, k, v, route, _ = attention_inputs(seed, **{"Lq": 17, "d": 16, **shape},
                                         per_head_route=routed == "per-head-route", device=device)
    attn_mask = random_attn_mask(seed, (q.shape[0], 1, q.shape[2], k.shape[2]), mask, device) \
        if mask else None
    check_against_sdpa(seed, q, k, v, attn_mask, route=None if routed == "all" else route, **kwargs)


KERNELS_DO_NOT_TAKE = {  # query, key, value shapes and SDPA keywords SDPA accepts
    "value-head-dim-differs": ((2, 4, 9, 8), (2, 4, 11, 8), (2, 4, 11, 3), {}),
    "head-dim-0": ((2, 2, 5, 0), (2, 2, 7, 0), (2, 2, 7, 3), {}),
    "head-dim-above-the-kernels": ((1, 2, 5, 300), (1, 2, 6, 300), (1, 2, 6, 300),
                                   dict(is_causal=True)),
    "key-one-head-value-four": ((2, 4, 5, 8), (2, 1, 7, 8), (2, 4, 7, 8), {}),
    "gqa-key-two-heads-value-one": ((2, 4, 5, 8), (2, 2, 7, 8), (2, 1, 7, 8),
                                    dict(enable_gqa=True)),
}


@pytest.mark.parametrize("case", list(KERNELS_DO_NOT_TAKE))
def test_calls_the_kernels_do_not_take_match_sdpa(case, seed):
    """Shapes SDPA accepts that the kernels do not: computed by the PyTorch composite, routed
    rows and gradients as SDPA's."""
    *shapes, kwargs = KERNELS_DO_NOT_TAKE[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes)
    route = torch.rand(shapes[0][0], shapes[0][2], generator=g) < 0.6
    check_against_sdpa(seed, q, k, v, **kwargs)
    check_against_sdpa(seed, q, k, v, route=route, **kwargs)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(F.scaled_dot_product_attention(q, k, v, **kwargs).shape, generator=g,
                           dtype=torch.float64)
    got = torch.autograd.grad(routed_attention(*leaves, **kwargs), leaves, grad_out)
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, **kwargs), leaves,
                                   grad_out)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def test_no_head_and_a_scale_that_is_not_finite_are_sdpas():
    q, k, v = torch.randn(2, 0, 5, 8), torch.randn(2, 0, 7, 8), torch.randn(2, 0, 7, 8)
    assert routed_attention(q, k, v).shape == F.scaled_dot_product_attention(q, k, v).shape
    with pytest.raises(RuntimeError, match="query has 4 heads and key/value none"):
        routed_attention(torch.randn(2, 4, 5, 8), k, v, enable_gqa=True)
    # NaN as SDPA's math backend gives it (its CPU flash kernel returns 0).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with sdpa_kernel(SDPBackend.MATH):
        assert F.scaled_dot_product_attention(q, k, v, scale=float("nan")).isnan().all()
    assert routed_attention(q, k, v, scale=float("nan")).isnan().all()


def test_the_kernels_largest_head_dim_is_the_exported_one():
    """ATTENTION_MAX_HEAD_DIM decides which calls reach the kernels: it must be their limit."""
    from cram_ext.ops import ATTENTION_MAX_HEAD_DIM, _ops
    route = torch.ones(1, 3, dtype=torch.bool)
    for d in (ATTENTION_MAX_HEAD_DIM, ATTENTION_MAX_HEAD_DIM + 1):
        q = torch.randn(1, 1, 3, d)
        if d == ATTENTION_MAX_HEAD_DIM:
            _ops.routed_attention_fwd(q, q, q, route, None, True, 1.0)
        else:
            with pytest.raises(RuntimeError, match="head_dim must be in"):
                _ops.routed_attention_fwd(q, q, q, route, None, True, 1.0)


def test_defaults_are_sdpas(seed):
    """Positional and default arguments mean what they mean in SDPA: not causal by default."""
    q, k, v, _, _ = attention_inputs(seed, Lq=9, d=8)
    mask = random_attn_mask(seed, (9, 9), "bool")
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(routed_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(routed_attention(q, k, v, mask, 0.0, True),
                               F.scaled_dot_product_attention(q, k, v, mask & causal, 0.0, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leading", [(), (6,), (2, 3)], ids=["3-D", "4-D", "5-D"])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_any_number_of_leading_batch_dimensions(leading, mask, device, seed):
    q, k, v, route, _ = attention_inputs(seed, batch=math.prod(leading), heads=4, kv_heads=2,
                                         Lq=12, Lk=15, d=8, device=device)
    q, k, v, route = (t.reshape(*leading, *t.shape[1:]) for t in (q, k, v, route))
    attn_mask = random_attn_mask(seed, (*leading[-1:], 1, 12, 15), mask, device) if mask else None
    for r in (None, route):
        check_against_sdpa(seed, q, k, v, attn_mask, enable_gqa=True, route=r)


@pytest.mark.parametrize("mask", [None, "bool"])
def test_batch_dimensions_broadcast_like_sdpa(mask, seed):
    """Key and value with fewer or size-1 batch dimensions, a 2-D call, route and key_mask with
    size-1 dimensions."""
    q, k, v, route, _ = attention_inputs(seed, batch=6, heads=2, Lq=10, d=8)
    q, route = q.unflatten(0, (2, 3)), route.unflatten(0, (2, 3))[:1]      # route (1, 3, L)
    k, v = k[:3], v[:3]                                                     # (3, heads, S, d)
    attn_mask = random_attn_mask(seed, (10, 10), mask) if mask else None
    check_against_sdpa(seed, q, k, v, attn_mask, route=route)
    check_against_sdpa(seed, q[0, 0, 0], k[0, 0], v[0, 0], attn_mask)       # (L, d)
    key_mask = torch.ones(1, 1, 10, dtype=torch.bool)
    torch.testing.assert_close(routed_attention(q, k, v, attn_mask, route=route, key_mask=key_mask),
                               routed_attention(q, k, v, attn_mask, route=route))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_attn_mask_combines_with_is_causal(mask, device, seed):
    """SDPA refuses both; here a key must pass both: SDPA with the mask and the causal mask
    merged into one."""
    q, k, v, route, _ = attention_inputs(seed, heads=4, kv_heads=2, Lq=14, Lk=20, d=8,
                                         per_head_route=True, device=device)
    attn_mask = random_attn_mask(seed, (2, 4, 14, 20), mask, device)
    causal = torch.ones(14, 20, dtype=torch.bool, device=device).tril()
    merged = attn_mask & causal if mask == "bool" else attn_mask.masked_fill(~causal, float("-inf"))
    out = routed_attention(q, k, v, attn_mask, is_causal=True, enable_gqa=True, route=route)
    torch.testing.assert_close(out, routed_attention(q, k, v, merged, enable_gqa=True, route=route))
    check_against_sdpa(seed, q, k, v, merged, enable_gqa=True, route=route)


# ---------------------------------------------------------------------------------------------
# attn_mask: the composite path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("is_causal", [True, False])
def test_attn_mask_matches_reference(dtype, mask, is_causal, device, seed):
    q, k, v, route, key_mask = attention_inputs(seed, heads=4, kv_heads=2, Lq=33, Lk=40, d=16,
                                                dtype=dtype, fraction=0.4, per_head_route=True,
                                                key_mask=True, device=device)
    attn_mask = random_attn_mask(seed, (2, 1, 33, 40), mask, device)
    check_routed_attention(seed, q, k, v, route, key_mask, attn_mask=attn_mask, is_causal=is_causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_attn_mask_gradcheck(mask, device, seed):
    q, k, v, route, key_mask = attention_inputs(seed, heads=2, kv_heads=1, Lq=5, Lk=6, d=3,
                                                dtype=torch.float64, fraction=0.6,
                                                per_head_route=True, key_mask=True, device=device)
    attn_mask = random_attn_mask(seed, (2, 2, 5, 6), mask, device)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    if mask == "float":   # a float mask is differentiable too, as in SDPA
        inputs.append(attn_mask.double().requires_grad_())

    def fn(q, k, v, attn_mask=attn_mask):
        return routed_attention(q, k, v, attn_mask, is_causal=True, enable_gqa=True, route=route,
                                key_mask=key_mask)

    assert_gradcheck(seed, fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_that_see_no_key_are_zero_like_sdpa(device, seed):
    q, k, v, _, _ = attention_inputs(seed, Lq=6, d=8, device=device)
    for t in (q, k, v):
        t.requires_grad_()
    bool_mask = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=device)
    bool_mask[0, :, 2] = False
    float_mask = torch.zeros(2, 1, 6, 6, device=device).masked_fill(~bool_mask, float("-inf"))
    for attn_mask in (bool_mask, float_mask):
        out = routed_attention(q, k, v, attn_mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask)
        assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))
        assert torch.equal(expected[0, :, 2], torch.zeros_like(expected[0, :, 2]))
        torch.testing.assert_close(out, expected, msg=lambda m: f"seed={seed}: {m}")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(g.isfinite().all() for g in grads)
        assert torch.equal(grads[0][0, :, 2], torch.zeros_like(grads[0][0, :, 2]))


def test_attn_mask_is_read_only_for_routed_rows(seed):
    """NaN in the mask rows of unrouted queries reaches nothing: those rows are never read. The
    masked path is a composite: no cram_ext kernel runs."""
    q, k, v, route, _ = attention_inputs(seed, heads=2, Lq=20, d=8, fraction=0.3,
                                         per_head_route=True)
    attn_mask = random_attn_mask(seed, (2, 2, 20, 20), "float")
    poisoned = attn_mask.masked_fill(~route[..., None], float("nan"))
    calls = cram_ops_called(lambda: routed_attention(q, k, v, poisoned, route=route))
    assert calls == []
    torch.testing.assert_close(routed_attention(q, k, v, poisoned, route=route),
                               routed_attention(q, k, v, attn_mask, route=route), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Autograd, op registration, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_gradcheck(is_causal, device, seed):
    q, k, v, route, key_mask = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=9,
                                                Lk=9 if is_causal else 11, d=4,
                                                dtype=torch.float64, fraction=0.6,
                                                per_head_route=True, key_mask=True, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return routed_attention(q, k, v, is_causal=is_causal, enable_gqa=True, route=route,
                                key_mask=key_mask)

    assert_gradcheck(seed, fn, inputs)


OPCHECK_CASES = {  # (inputs, is_causal, scale, with gradients)
    "causal": (dict(Lq=12, d=8, fraction=0.5), True, 0.35, True),
    "gqa-masked-full": (dict(heads=4, kv_heads=2, Lq=9, Lk=14, d=8, fraction=0.7,
                             per_head_route=True, key_mask=True), False, 0.5, True),
    "bf16-forward": (dict(Lq=10, d=8, dtype=torch.bfloat16, fraction=1.0), True, 0.3, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    """Every op the public call dispatches, with the arguments it passes."""
    shape, is_causal, scale, with_gradients = OPCHECK_CASES[case]
    q, k, v, route, key_mask = attention_inputs(5, **shape, device=device)
    leaves = [t.requires_grad_(with_gradients) for t in (q, k, v)]

    def call():
        out = routed_attention(*leaves, is_causal=is_causal, scale=scale,
                               enable_gqa=q.shape[1] != k.shape[1], route=route, key_mask=key_mask)
        if with_gradients:
            out.backward(torch.ones_like(out))

    calls = cram_ops_called(call)
    assert [op.name() for op, _, _ in calls] == ["cram_ext::routed_attention_fwd",
                                                "cram_ext::routed_attention_bwd"][:1 + with_gradients]
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("mask", [None, "float"], ids=["kernels-fullgraph", "attn_mask-composite"])
def test_torch_compile_matches_eager(mask, seed):
    """The kernels' path compiles into one graph; the masked composite (data-dependent row
    counts) compiles with graph breaks."""
    q, k, v, route, key_mask = attention_inputs(seed, heads=4, kv_heads=2, Lq=33, d=16,
                                                fraction=0.5, key_mask=True)
    attn_mask = random_attn_mask(seed, (33, 33), mask) if mask else None

    def layer(q, k, v):
        return routed_attention(q * 2, k, v, attn_mask, is_causal=True, enable_gqa=True,
                                route=route, key_mask=key_mask).square().sum()

    compiled = torch.compile(layer, fullgraph=mask is None)
    eager_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = layer(*eager_inputs)
    got = compiled(*compiled_inputs)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected, msg=lambda m: f"seed={seed}: {m}")
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"seed={seed}: {m}")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def good_inputs():
    q, k, v, route, key_mask = attention_inputs(0, heads=4, kv_heads=2, Lq=8, d=8, key_mask=True)
    return dict(query=q, key=k, value=v, is_causal=True, enable_gqa=True, route=route,
                key_mask=key_mask)


def bad(**changes):
    inputs = good_inputs()
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("inputs, message", [
    (bad(query=torch.randn(2, 4, 8, 9)), "key's last dimension must be query's"),
    (bad(key=torch.randn(2, 2, 8)), "must have the same length S"),
    (bad(value=torch.randn(2, 2, 9, 8)), "must have the same length S"),
    (bad(key=torch.randn(3, 2, 8, 8), value=torch.randn(3, 2, 8, 8)),
     "batch dimensions of query .* do not broadcast"),
    (bad(route=torch.ones(2, 9, dtype=torch.bool)), "route must have shape"),
    (bad(route=torch.ones(2, 3, 8, dtype=torch.bool)), "route must have shape"),
    (bad(route=torch.ones(8, dtype=torch.bool)), "route must have shape"),
    (bad(key_mask=torch.ones(2, 9, dtype=torch.bool)), "key_mask must have shape"),
    (bad(key=torch.randn(2, 2, 8, 8, dtype=torch.float64)), "k must be"),
    (bad(value=torch.randn(2, 2, 8, 8).half()), "v must be"),
    (bad(query=torch.ones(2, 4, 8, 8, dtype=torch.int32), key=torch.ones(2, 2, 8, 8, dtype=torch.int32),
         value=torch.ones(2, 2, 8, 8, dtype=torch.int32)), "q must be float32, float64, float16 or bfloat16"),
    (bad(route=torch.ones(2, 8)), "route must be a bool tensor"),
    (bad(key_mask=torch.ones(2, 8, dtype=torch.uint8)), "key_mask must be a bool tensor"),
    (bad(key=torch.randn(2, 3, 8, 8), value=torch.randn(2, 3, 8, 8)), "key/value heads .* must divide"),
    (bad(key=torch.randn(2, 2, 8, 4), value=torch.randn(2, 2, 8, 4)),
     "key's last dimension must be query's"),
    (bad(enable_gqa=False), "grouped-query attention needs enable_gqa=True"),
    (bad(query=torch.zeros(()).expand(2, 4, 2**31, 8),  # expanded: nothing touches 2^31 rows
         route=torch.ones((), dtype=torch.bool).expand(2, 2**31)),
     "Lq = 2147483648 exceeds the kernels' 32-bit index range"),
    (bad(attn_mask=torch.ones(8, 9, dtype=torch.bool)), "attn_mask must be broadcastable"),
    (bad(attn_mask=torch.ones(3, 4, 8, 8, dtype=torch.bool)), "attn_mask must be broadcastable"),
    (bad(attn_mask=torch.zeros(2, 1, 4, 8, 8)), "attn_mask must be broadcastable"),
    (bad(attn_mask=torch.ones(8, 8, dtype=torch.int64)), "attn_mask must be bool, float32 or query"),
    (bad(attn_mask=torch.ones(8, 8, dtype=torch.bool), route=torch.ones(2, 8)),
     "route must be a bool tensor"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_inputs_name_the_argument(inputs, message):
    with pytest.raises(RuntimeError, match=message):
        routed_attention(**inputs)


@pytest.mark.parametrize("dropout_p", [0.1, 1.0])
def test_dropout_is_refused_by_name(dropout_p):
    inputs = good_inputs()
    with pytest.raises(ValueError, match="dropout_p must be 0.0"):
        routed_attention(**inputs, dropout_p=dropout_p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch_names_the_argument():
    inputs = good_inputs()
    with pytest.raises(RuntimeError, match="k is on"):
        routed_attention(**dict(inputs, query=inputs["query"].cuda(), value=inputs["value"].cuda(),
                                route=inputs["route"].cuda(), key_mask=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_names_an_lse_on_another_device():
    q, k, v, route, _ = attention_inputs(0, heads=2, Lq=8, d=8, device="cuda")
    out, lse = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, None, True, 0.5)
    with pytest.raises(RuntimeError, match="lse is on cpu but q is on cuda"):
        torch.ops.cram_ext.routed_attention_bwd(torch.ones_like(out), q, k, v, out, lse.cpu(), route,
                                                None, True, 0.5)
