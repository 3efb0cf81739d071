"""cram_ext.routed_attention on the CPU against the reference `routed_attention_ref`.

Random cases take the `seed` fixture (python_tests/conftest.py: fresh per test unless
CRAM_TEST_SEED is set) and put it in their assertion messages; a few cases use fixed seeds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cram_ext import routed_attention
from cram_ext.reference import routed_attention_ref

FORWARD_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


def make_route(generator, shape, fraction):
    """Bool route of `shape` (..., Lq) with round(fraction · Lq) rows routed per leading index."""
    Lq = shape[-1]
    n_routed = round(fraction * Lq)
    route = torch.zeros(shape, dtype=torch.bool).reshape(-1, Lq)
    for r in route:
        r[torch.randperm(Lq, generator=generator)[:n_routed]] = True
    return route.reshape(shape)


def make_case(seed, *, batch=2, heads=2, kv_heads=None, Lq=16, Lk=None, d=16, dtype=torch.float32,
              fraction=0.5, per_head_route=False, key_mask=False):
    """Random q, k, v (standard normal), route and optional key_mask for one test case."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    Lk = Lq if Lk is None else Lk
    q = torch.randn(batch, heads, Lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, kv_heads, Lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, kv_heads, Lk, d, generator=g, dtype=torch.float64).to(dtype)
    route = make_route(g, (batch, heads, Lq) if per_head_route else (batch, Lq), fraction)
    mask = torch.rand(batch, Lk, generator=g) < 0.7 if key_mask else None
    return q, k, v, route, mask


def reference_dtype(dtype):
    """The reference runs in float32 for the 16-bit types (the kernels accumulate in float32)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def check_forward_and_backward(seed, q, k, v, route, key_mask, is_causal, scale=None):
    """Output and gradients of q, k, v against the reference (autograd through it)."""
    dtype, ref_dtype = q.dtype, reference_dtype(q.dtype)
    if dtype == torch.float64 and scale is None:
        # The kernels receive the scale as a float32; give the float64 reference that same value.
        scale = torch.tensor(1 / math.sqrt(q.shape[-1]), dtype=torch.float32).item()
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
    out = routed_attention(*inputs, route, is_causal=is_causal, scale=scale, key_mask=key_mask)
    ref = routed_attention_ref(*ref_inputs, route, is_causal=is_causal, scale=scale, key_mask=key_mask)
    msg = f"seed={seed}"
    torch.testing.assert_close(out.to(ref_dtype), ref, **FORWARD_TOL[dtype], msg=lambda m: f"{msg}: out: {m}")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64).to(dtype)
    out.backward(grad_out)
    ref.backward(grad_out.to(ref_dtype))
    for name, t, r in zip("qkv", inputs, ref_inputs):
        torch.testing.assert_close(t.grad.to(ref_dtype), r.grad, **GRAD_TOL[dtype],
                                   msg=lambda m, name=name: f"{msg}: d{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 7, 128, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.016, 0.5, 1.0])
@pytest.mark.parametrize("per_head_route", [False, True])
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_reference_across_lengths_and_route_fractions(L, fraction, per_head_route, is_causal, seed):
    case = make_case(seed, batch=1 if L == 1000 else 2, Lq=L, fraction=fraction,
                     per_head_route=per_head_route)
    check_forward_and_backward(seed, *case, is_causal)


@pytest.mark.parametrize("Lq, Lk", [(1, 9), (5, 17), (64, 200), (130, 40), (33, 1)])
@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("key_mask", [False, True])
def test_matches_reference_when_query_and_key_lengths_differ(Lq, Lk, is_causal, key_mask, seed):
    case = make_case(seed, Lq=Lq, Lk=Lk, d=24, fraction=0.7, per_head_route=True, key_mask=key_mask)
    check_forward_and_backward(seed, *case, is_causal)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("per_head_route", [False, True])
def test_grouped_query_attention(is_causal, per_head_route, seed):
    case = make_case(seed, batch=2, heads=8, kv_heads=2, Lq=70, d=32, fraction=0.5,
                     per_head_route=per_head_route, key_mask=True)
    check_forward_and_backward(seed, *case, is_causal)


@pytest.mark.parametrize("fixed_seed", [0, 1, 20240611])
def test_fixed_seed_cases(fixed_seed):
    case = make_case(fixed_seed, batch=2, heads=4, kv_heads=2, Lq=150, d=64, fraction=0.3,
                     per_head_route=True, key_mask=True)
    check_forward_and_backward(fixed_seed, *case, is_causal=True)
    check_forward_and_backward(fixed_seed, *case, is_causal=False, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [True, False])
def test_dtypes(dtype, is_causal, seed):
    case = make_case(seed, batch=2, heads=4, kv_heads=2, Lq=90, Lk=90, d=40, dtype=dtype,
                     fraction=0.6, per_head_route=True, key_mask=True)
    check_forward_and_backward(seed, *case, is_causal)


@pytest.mark.parametrize("d", [1, 3, 17, 100, 256])
def test_head_dims(d, seed):
    check_forward_and_backward(seed, *make_case(seed, Lq=40, d=d, fraction=0.8), is_causal=True)


def test_non_contiguous_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    batch, heads, L, d = 2, 4, 50, 16
    q = torch.randn(batch, L, heads, d, generator=g).transpose(1, 2)          # transposed view
    k = torch.randn(batch, heads, 2 * L, d, generator=g)[:, :, ::2]           # strided rows
    v = torch.randn(batch, heads, L, 2 * d, generator=g)[..., ::2]            # last dim strided
    route = (torch.rand(batch, heads, 2 * L, generator=g) < 0.5)[..., ::2]    # strided route
    key_mask = (torch.rand(2 * batch, L, generator=g) < 0.8)[::2]
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    check_forward_and_backward(seed, q, k, v, route, key_mask, is_causal=True)


# ---------------------------------------------------------------------------------------------
# Special rows and values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [True, False])
def test_all_routed_equals_sdpa(is_causal, seed):
    for heads, kv_heads, L in [(2, 2, 128), (8, 2, 300)]:
        q, k, v, _, _ = make_case(seed, batch=2, heads=heads, kv_heads=kv_heads, Lq=L, d=32)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                  enable_gqa=heads != kv_heads)
        all_rows = torch.ones(2, L, dtype=torch.bool)
        for route in (None, all_rows):
            out = routed_attention(q, k, v, route, is_causal=is_causal)
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"seed={seed}: {m}")


def test_unrouted_rows_are_exactly_zero_with_zero_gradient(seed):
    q, k, v, route, key_mask = make_case(seed, batch=2, heads=4, kv_heads=2, Lq=60, fraction=0.3,
                                         per_head_route=True, key_mask=True)
    q.requires_grad_()
    out = routed_attention(q, k, v, route, key_mask=key_mask)
    out.backward(torch.randn_like(out))
    off = ~route
    assert torch.equal(out[off], torch.zeros_like(out[off])), f"seed={seed}"
    assert torch.equal(q.grad[off], torch.zeros_like(q.grad[off])), f"seed={seed}"
    assert out[route].abs().sum() > 0, f"seed={seed}"


def test_nothing_routed_gives_zero_gradients_everywhere():
    q, k, v, _, _ = make_case(3, Lq=30)
    for t in (q, k, v):
        t.requires_grad_()
    route = torch.zeros(2, 30, dtype=torch.bool)
    out = routed_attention(q, k, v, route)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_rows_without_visible_keys_are_zero_with_minus_inf_lse(seed):
    q, k, v, _, _ = make_case(seed, batch=2, Lq=20, d=8)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[0, :5] = False   # causal rows 0..4 of batch 0 see no key
    key_mask[1] = False       # batch 1 sees no key at all
    route = torch.ones(2, 20, dtype=torch.bool)
    out, lse = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, key_mask, True, 0.25)
    ref = routed_attention_ref(q, k, v, route, key_mask=key_mask, scale=0.25)
    torch.testing.assert_close(out, ref, **FORWARD_TOL[torch.float32], msg=lambda m: f"seed={seed}: {m}")
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 5:]).all()
    check_forward_and_backward(seed, q, k, v, route, key_mask, is_causal=True)


def test_nan_propagates_like_the_reference():
    q, k, v, _, _ = make_case(11, batch=1, heads=2, Lq=40, d=8)
    route = torch.ones(1, 40, dtype=torch.bool)
    route[0, 30] = False
    q[0, 0, 12, 3] = float("nan")   # one query row
    k[0, 1, 20, 0] = float("nan")   # causal rows from 20 on of head 1
    for key_mask in (None, torch.ones(1, 40, dtype=torch.bool)):
        out = routed_attention(q, k, v, route, key_mask=key_mask)
        ref = routed_attention_ref(q, k, v, route, key_mask=key_mask)
        torch.testing.assert_close(out, ref, equal_nan=True, **FORWARD_TOL[torch.float32])
        assert out[0, 0, 12].isnan().all() and out[0, 1, 20:30].isnan().all()
        assert not out[0, 1, 30].isnan().any(), "an unrouted row stays 0"
    v[0, 0, 0, 5] = float("inf")    # the first key, seen by every causal row of head 0
    torch.testing.assert_close(routed_attention(q, k, v, route), routed_attention_ref(q, k, v, route),
                               equal_nan=True, **FORWARD_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# Autograd, op registration, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_causal", [True, False])
def test_gradcheck(is_causal, seed):
    q, k, v, route, key_mask = make_case(seed, batch=2, heads=4, kv_heads=2, Lq=9, Lk=9 if is_causal else 11,
                                         d=4, dtype=torch.float64, fraction=0.6, per_head_route=True,
                                         key_mask=True)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return routed_attention(q, k, v, route, is_causal=is_causal, key_mask=key_mask)

    assert torch.autograd.gradcheck(fn, inputs), f"seed={seed}"


def opcheck_inputs():
    case_a = make_case(5, Lq=12, d=8, fraction=0.5)
    case_b = make_case(6, heads=4, kv_heads=2, Lq=9, Lk=14, d=8, fraction=0.7, per_head_route=True,
                       key_mask=True)
    case_c = make_case(7, Lq=10, d=8, dtype=torch.bfloat16, fraction=1.0)
    return [
        (*[t.requires_grad_() for t in case_a[:3]], case_a[3], None, True, 0.35),
        (*[t.requires_grad_() for t in case_b[:3]], case_b[3], case_b[4], False, 0.5),
        (*case_c[:4], None, True, 0.3),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    torch.library.opcheck(torch.ops.cram_ext.routed_attention_fwd, opcheck_inputs()[case])


def test_torch_compile_fullgraph_matches_eager(seed):
    q, k, v, route, key_mask = make_case(seed, heads=4, kv_heads=2, Lq=33, d=16, fraction=0.5,
                                         key_mask=True)

    def layer(q, k, v):
        return routed_attention(q * 2, k, v, route, key_mask=key_mask).square().sum()

    compiled = torch.compile(layer, fullgraph=True)
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
    q, k, v, route, key_mask = make_case(0, heads=4, kv_heads=2, Lq=8, d=8, key_mask=True)
    return dict(q=q, k=k, v=v, route=route, key_mask=key_mask)


def bad(**changes):
    inputs = good_inputs()
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("inputs, message", [
    (bad(q=torch.randn(2, 4, 8)), "q must have shape"),
    (bad(k=torch.randn(2, 2, 8)), "k must have shape"),
    (bad(k=torch.randn(3, 2, 8, 8)), "k must have shape"),
    (bad(v=torch.randn(2, 2, 9, 8)), "v must have shape"),
    (bad(route=torch.ones(2, 9, dtype=torch.bool)), "route must have shape"),
    (bad(route=torch.ones(2, 3, 8, dtype=torch.bool)), "route must have shape"),
    (bad(route=torch.ones(8, dtype=torch.bool)), "route must have shape"),
    (bad(key_mask=torch.ones(2, 9, dtype=torch.bool)), "key_mask must have shape"),
    (bad(k=torch.randn(2, 2, 8, 8, dtype=torch.float64)), "k must be"),
    (bad(v=torch.randn(2, 2, 8, 8).half()), "v must be"),
    (bad(q=torch.ones(2, 4, 8, 8, dtype=torch.int32), k=torch.ones(2, 2, 8, 8, dtype=torch.int32),
         v=torch.ones(2, 2, 8, 8, dtype=torch.int32)), "q must be float32, float64, float16 or bfloat16"),
    (bad(route=torch.ones(2, 8)), "route must be a bool tensor"),
    (bad(key_mask=torch.ones(2, 8, dtype=torch.uint8)), "key_mask must be a bool tensor"),
    (bad(k=torch.randn(2, 3, 8, 8), v=torch.randn(2, 3, 8, 8)), "key/value heads .* must divide"),
    (bad(k=torch.randn(2, 2, 8, 4), v=torch.randn(2, 2, 8, 4)), "k must have shape"),
    (bad(q=torch.randn(2, 4, 8, 300), k=torch.randn(2, 2, 8, 300), v=torch.randn(2, 2, 8, 300)),
     "head_dim must be in"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_inputs_name_the_argument(inputs, message):
    with pytest.raises(RuntimeError, match=message):
        routed_attention(inputs["q"], inputs["k"], inputs["v"], inputs["route"], key_mask=inputs["key_mask"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_names_the_argument():
    inputs = good_inputs()
    with pytest.raises(RuntimeError, match="k is on"):
        routed_attention(inputs["q"].cuda(), inputs["k"], inputs["v"].cuda(), inputs["route"].cuda())
