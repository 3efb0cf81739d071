"""The CUDA kernels against the references on cases too large for the CPU suite: long
sequences, every dtype, the tensor-core and SIMT attention paths, key splits (skipped without a
CUDA device). test_routed_attention.py and test_selective_scan.py run their cases on CUDA too.

Accuracy rule and input builders: cases.py (every output is poisoned before the kernel runs, so
an element it forgets to write fails). Seeds come from the `seed` fixture
(python_tests/conftest.py) and appear in every assertion message.
"""
import math

import pytest
import torch

import cram_ext
from cases import (ALL_DTYPES, attention_inputs, check_routed_attention, check_selective_scan,
                   cram_ops_called, scan_inputs)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"

# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("L", [1, 7, 1000, 4097])
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "bare"])
def test_scan_forward(seed, dtype, L, full):
    x = scan_inputs(seed, batch=2, dim=10, L=L, N=6, groups=2, dtype=dtype, full=full,
                    noncontiguous=L == 1000, device=DEVICE)
    check_selective_scan(seed, x, delta_softplus=full, backward=False)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("L", [7, 1000, 4097])
def test_scan_backward(seed, dtype, L):
    x = scan_inputs(seed, batch=2, dim=10, L=L, N=5, groups=2, dtype=dtype,
                    noncontiguous=L == 1000, device=DEVICE)
    check_selective_scan(seed, x)


@pytest.mark.parametrize("N, dim, groups", [(1, 3, 3), (256, 5, 1)])
def test_scan_state_size_and_channels_per_group_edges(seed, N, dim, groups):
    # N = 1 and N = 256 (the largest), one channel per group (spare warps in every block).
    x = scan_inputs(seed, batch=1, dim=dim, L=300, N=N, groups=groups, device=DEVICE)
    check_selective_scan(seed, x, backward=False)


# ---------------------------------------------------------------------------------------------
# Routed attention
# ---------------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # (batch, heads, kv_heads, L, head_dim, route fraction, key_mask, per-head route, layout)
    (1, 2, 2, 1, 64, 1.0, False, False, "bhld"),
    (2, 4, 2, 7, 128, 0.5, True, True, "bhld"),
    (1, 4, 1, 1000, 64, 0.016, False, False, "blhd"),
    (1, 2, 2, 1000, 128, 0.5, True, False, "bhld"),
    (1, 2, 1, 4097, 64, 1.0, False, False, "bhld"),
    (1, 2, 2, 4097, 128, 0.016, True, True, "blhd"),
    (2, 2, 2, 300, 64, 0.0, False, False, "bhld"),
    (1, 2, 2, 300, 80, 0.5, True, False, "bhld"),        # head_dim without a tensor-core tile
    (1, 2, 1, 300, 64, 0.5, False, True, "unaligned"),   # rows the tensor-core path cannot load
    (1, 2, 2, 200, 256, 1.0, False, False, "bhld"),      # the largest head_dim
    # 288 tiles of 64 rows: more than one per multiprocessor, so the tensor-core forward runs
    # without key splits (the small cases above all take the split-and-merge path).
    (2, 8, 4, 1100, 64, 1.0, False, False, "bhld"),
]
CASE_IDS = [f"b{c[0]}h{c[1]}kv{c[2]}L{c[3]}d{c[4]}r{c[5]}{'-mask' if c[6] else ''}-{c[8]}"
            for c in ATTENTION_CASES]


def case_inputs(seed, case, dtype):
    batch, heads, kv_heads, L, d, fraction, key_mask, per_head_route, layout = case
    return attention_inputs(seed, batch=batch, heads=heads, kv_heads=kv_heads, Lq=L, d=d,
                            dtype=dtype, fraction=fraction, key_mask=key_mask,
                            per_head_route=per_head_route, layout=layout, device=DEVICE)


def lse_ref(q, k, key_mask, causal, scale):
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(heads // kv_heads, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k) * scale
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    visible = visible.expand(q.shape[0], 1, -1, -1)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return s.masked_fill(~visible, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=CASE_IDS)
def test_attention_forward(seed, dtype, case):
    q, k, v, route, mask = case_inputs(seed, case, dtype)
    check_routed_attention(seed, q, k, v, route, mask, is_causal=True, backward=False)
    scale = 1 / math.sqrt(q.shape[-1])
    _, lse = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, mask, True, scale)
    routed = route[:, None, :].expand(-1, q.shape[1], -1) if route.dim() == 2 else route
    want_lse = lse_ref(q, k, mask, True, scale).masked_fill(~routed, float("-inf"))
    finite = want_lse.isfinite()
    assert (lse[~finite] == float("-inf")).all(), f"lse must be -inf where nothing is seen [seed {seed}]"
    if finite.any():
        lse_tol = 1e-10 if dtype == torch.float64 else 1e-4
        err = (lse[finite].double() - want_lse[finite]).abs().max().item()
        # 16-bit inputs: the scores are rounded to 16 bits only in P V, not in lse.
        assert err <= lse_tol * max(1.0, want_lse[finite].abs().max().item()), \
            f"lse error {err:.3g} [seed {seed}]"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=CASE_IDS)
def test_attention_backward(seed, dtype, case):
    q, k, v, route, mask = case_inputs(seed, case, dtype)
    check_routed_attention(seed, q, k, v, route, mask, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_more_keys_than_queries(seed, dtype, causal):
    # Lq != Lk (causal stays top-left aligned, as in SDPA), both directions.
    case = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=300, Lk=517, d=64, dtype=dtype,
                            fraction=0.5, key_mask=True, device=DEVICE)
    check_routed_attention(seed, *case, is_causal=causal)


# ---------------------------------------------------------------------------------------------
# Op contracts and determinism
# ---------------------------------------------------------------------------------------------

def test_opcheck_attention_tensor_cores(seed):
    q, k, v, route, mask = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=100, d=64,
                                            dtype=torch.bfloat16, key_mask=True, device=DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def call():
        out = cram_ext.routed_attention(*leaves, is_causal=True, scale=0.125, enable_gqa=True,
                                        route=route, key_mask=mask)
        out.backward(torch.ones_like(out))

    for op, args, kwargs in cram_ops_called(call):
        torch.library.opcheck(op, args, kwargs)


def test_forward_is_bitwise_deterministic(seed):
    x = scan_inputs(seed, batch=2, dim=8, L=1000, N=8, groups=2, dtype=torch.bfloat16,
                    device=DEVICE)
    first = cram_ext.selective_scan(**x, delta_softplus=True, return_last_state=True)
    second = cram_ext.selective_scan(**x, delta_softplus=True, return_last_state=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), f"scan [seed {seed}]"
    q, k, v, route, mask = attention_inputs(seed, batch=1, heads=4, kv_heads=2, Lq=2000, d=128,
                                            dtype=torch.bfloat16, key_mask=True, device=DEVICE)
    first = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, mask, True, 0.1)
    second = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, mask, True, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), f"attention [seed {seed}]"


def test_attention_dk_dv_are_bitwise_deterministic(seed):
    # dK and dV are summed in registers in a fixed order; dQ is accumulated with atomics across
    # key blocks (and the scan backward's shared gradients across blocks), so those may differ
    # in the last bits between runs.
    q, k, v, route, mask = attention_inputs(seed, batch=1, heads=4, kv_heads=2, Lq=1500, d=64,
                                            dtype=torch.bfloat16, key_mask=True, device=DEVICE)
    out, lse = torch.ops.cram_ext.routed_attention_fwd(q, k, v, route, mask, True, 0.125)
    dout = torch.randn_like(out)
    first = torch.ops.cram_ext.routed_attention_bwd(dout, q, k, v, out, lse, route, mask, True, 0.125)
    second = torch.ops.cram_ext.routed_attention_bwd(dout, q, k, v, out, lse, route, mask, True, 0.125)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2]), f"[seed {seed}]"


# ---------------------------------------------------------------------------------------------
# Streaming: selective_state_update, initial_state, routed_attention_with_kvcache
# ---------------------------------------------------------------------------------------------

from cases import generator, initial_state, kvcache_inputs, position, randn  # noqa: E402
from test_streaming import check_kvcache, streaming_model  # noqa: E402


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("dim, N, groups", [(999, 16, 3), (130, 256, 1)])
def test_state_update_matches_cpu_kernel(seed, dtype, dim, N, groups):
    """Blocks of channels that straddle a group boundary (999 / 3) and the largest state."""
    inputs = scan_inputs(seed, batch=3, dim=dim, L=1, N=N, groups=groups, dtype=dtype,
                         device=DEVICE)
    h0 = initial_state(seed, inputs)
    state = h0.clone()
    y = cram_ext.selective_state_update(state, **position(inputs, 0), dt_softplus=True)
    cpu_state = h0.cpu()
    y_cpu = cram_ext.selective_state_update(
        cpu_state, **{k: v.cpu() for k, v in position(inputs, 0).items()}, dt_softplus=True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2) \
        if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.cpu(), y_cpu, **tol)
    torch.testing.assert_close(state.cpu(), cpu_state, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_reproduce_a_long_scan(seed, dtype):
    inputs = scan_inputs(seed, batch=2, dim=64, L=300, N=16, groups=2, dtype=dtype, device=DEVICE)
    out, last = cram_ext.selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    state = torch.zeros_like(last)
    steps = torch.stack([cram_ext.selective_state_update(state, **position(inputs, t),
                                                         dt_softplus=True)
                         for t in range(300)], -1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, out, **tol)
    torch.testing.assert_close(state, last, **tol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("L", [7, 4097])
def test_scan_initial_state_forward_and_backward(seed, dtype, L):
    x = scan_inputs(seed, batch=2, dim=10, L=L, N=5, groups=2, dtype=dtype, device=DEVICE)
    x["initial_state"] = initial_state(seed, x)
    check_selective_scan(seed, x)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("d", [40, 64, 256])
@pytest.mark.parametrize("n_new", [1, 4])
def test_kvcache_long_cache(seed, dtype, d, n_new):
    """A cache of 3000 slots, a key_mask, GQA; head dims below, at and above one warp's width."""
    q, k_cache, v_cache, k, v, _, route, mask = kvcache_inputs(
        seed, batch=3, heads=4, kv_heads=2, n_new=n_new, capacity=3000, d=d, dtype=dtype,
        device=DEVICE, key_mask=True)
    lengths = torch.tensor([0, 1234, 3000 - n_new], dtype=torch.int32, device=DEVICE)
    # Every slot random: kvcache_inputs fills those past its own short lengths with NaN.
    g = generator(seed + 1, DEVICE)
    k_cache, v_cache = (randn(g, k_cache.shape, dtype, DEVICE) for _ in range(2))
    check_kvcache(seed, q, k_cache, v_cache, k, v, lengths, route, mask)


@pytest.mark.parametrize("name", ["cram", "transformer"])
@torch.no_grad()
def test_model_steps_equal_forward_on_cuda(name):
    from cram_ext.srcd import SRCDConfig, batch_at
    model = streaming_model(name).to(DEVICE)
    data = SRCDConfig(seq_len=64, query_rate=0.1)
    batch = {k: v.to(DEVICE) for k, v in batch_at(data, seed=0, step=0, batch_size=3).items()}
    full = model(batch)
    state = model.init_state(3, capacity=64)
    out, state = model.prefill({k: v[:, :20] for k, v in batch.items()}, state)
    logits = [out.value_logits]
    for t in range(20, 64):
        out, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
        logits.append(out.value_logits[:, None])
    torch.testing.assert_close(torch.cat(logits, 1), full.value_logits, rtol=1e-4, atol=1e-4)


# Fused CRAM forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L, d, n_heads, kv_heads", [(7, 16, 2, 2), (700, 64, 4, 2), (2100, 64, 2, 2)])
def test_cram_forward_matches_reference(seed, dtype, L, d, n_heads, kv_heads):
    from cases import check_cram_forward, cram_forward_inputs
    args, kwargs = cram_forward_inputs(seed, batch=2, L=L, d=d, n_heads=n_heads,
                                       kv_heads=kv_heads, d_state=8, dtype=dtype, device=DEVICE)
    check_cram_forward(seed, args, kwargs)


def test_cram_forward_agrees_with_the_cpu_kernel_and_never_syncs(seed):
    """The same paths and row count as the CPU kernel; the op runs under a CUDA graph capture,
    which fails on any host synchronisation."""
    from cases import cram_forward_inputs
    args, kwargs = cram_forward_inputs(seed, batch=3, L=300, d=32, device="cpu")
    to_cuda = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    cuda_args = [to_cuda(a) for a in args]
    cuda_kwargs = {k: to_cuda(v) for k, v in kwargs.items()}
    cpu = cram_ext.cram_forward(*args, **kwargs)
    gpu = cram_ext.cram_forward(*cuda_args, **cuda_kwargs)
    assert torch.equal(gpu.path.cpu(), cpu.path), f"seed {seed}"
    assert int(gpu.attention_rows) == int(cpu.attention_rows)
    torch.testing.assert_close(gpu.out.cpu(), cpu.out, rtol=1e-4, atol=1e-4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cram_ext.cram_forward(*cuda_args, **cuda_kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cram_ext.cram_forward(*cuda_args, **cuda_kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.path, gpu.path)
    torch.testing.assert_close(captured.out, gpu.out)
