"""GPU benchmarks of the CUDA kernels against PyTorch's own kernels (skipped without CUDA).

    pytest bench/test_bench_gpu.py --benchmark-json=OUT/gpu_bench.json

Attention (bf16, causal, head_dim 64 and 128, L in {2048, 8192, 16384}, route fractions
{1.6%, 12.5%, 50%, 100%}), all on the same tensors:
  - routed: cram_ext routed attention (the kernel under test);
  - flash / cudnn: dense causal scaled_dot_product_attention with that backend only (the dense
    computation routing is meant to avoid; timed once per shape);
  - unfused: gather the routed query rows, SDPA with an explicit causal mask on their original
    positions, scatter back;
  - flex: FlexAttention (compiled) with a block mask of causal & route[b, q_idx].
TFLOP/s counts routed FLOPs only: 4 * head_dim * (visible keys) per routed row and head.
Scan: forward and backward of the selective scan in bf16, achieved GB/s (each input read once,
each output written once) beside a measured device-to-device copy (bytes read + written).

Times are medians of CUDA-event-timed repetitions after warm-up. Every result is appended to
BENCH_RESULTS_JSON (default bench/results/gpu_bench_results.json) as soon as it is measured, so
a run cut short still leaves its numbers; pytest-benchmark's JSON holds the routed kernel's
own statistics with the baselines in extra_info.
"""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if torch.cuda.is_available():
    import cram_ext
    from torch.nn.attention import SDPBackend, sdpa_kernel

DEVICE = "cuda"
RESULTS_PATH = os.environ.get("BENCH_RESULTS_JSON",
                              os.path.join(os.path.dirname(__file__), "results", "gpu_bench_results.json"))
SEQ_LENS = [2048, 8192, 16384]
HEAD_DIMS = [64, 128]
ROUTE_FRACTIONS = [0.016, 0.125, 0.5, 1.0]
HIDDEN = 1024  # heads = HIDDEN // head_dim
WARMUP, REPS = 3, 15


def record(entry):
    """Appends one result to the JSON results file (a list), rewriting it whole."""
    results = []
    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as f:
            results = json.load(f)
    entry = dict(entry, device=torch.cuda.get_device_name(), torch=torch.__version__,
                 time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    results.append(entry)
    os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
    with open(RESULTS_PATH, "w") as f:
        json.dump(results, f, indent=1)


def cuda_time_ms(fn, warmup=WARMUP, reps=REPS):
    """Median milliseconds of fn() over `reps` CUDA-event-timed calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


_copy_bandwidth = {}


def copy_bandwidth_gbs():
    """Measured device-to-device copy bandwidth, bytes read + written, GB/s (cached)."""
    if "value" not in _copy_bandwidth:
        src = torch.randn(256 << 20, device=DEVICE)  # 1 GiB
        dst = torch.empty_like(src)
        ms = cuda_time_ms(lambda: dst.copy_(src))
        _copy_bandwidth["value"] = 2 * src.numel() * src.element_size() / ms / 1e6
        record(dict(kind="copy", bytes=2 * src.numel() * src.element_size(), ms=ms,
                    gbs=_copy_bandwidth["value"]))
    return _copy_bandwidth["value"]


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_scan_bandwidth(benchmark, direction):
    batch, dim, L, N = 4, 2048, 4096, 16
    dt = torch.bfloat16
    u, delta, z = (torch.randn(batch, dim, L, device=DEVICE, dtype=dt) for _ in range(3))
    B, C = (torch.randn(batch, 1, N, L, device=DEVICE, dtype=dt) for _ in range(2))
    A = -(0.1 + torch.rand(dim, N, device=DEVICE))
    D, bias = torch.randn(dim, device=DEVICE), 0.1 * torch.randn(dim, device=DEVICE)
    dt_scale = 0.5 + torch.rand(batch, L, device=DEVICE)
    ops = torch.ops.cram_ext
    args = (u, delta, A, B, C, D, z, bias, dt_scale, True, cram_ext.ops.SCAN_CHUNK_SIZE)
    seq_bytes = batch * dim * L * 2
    bc_bytes = 2 * batch * N * L * 2
    if direction == "forward":
        fn = lambda: ops.selective_scan_fwd(*args)  # noqa: E731
        moved = 4 * seq_bytes + bc_bytes  # u, delta, z in; out
    else:
        out, states = ops.selective_scan_fwd(*args)
        dout = torch.randn_like(out)
        fn = lambda: ops.selective_scan_bwd(dout, *args[:9], states, True, args[10])  # noqa: E731
        # dout, u, delta, z in; du, ddelta, dz out; B, C in, dB, dC out (float32)
        moved = 7 * seq_bytes + bc_bytes + 2 * bc_bytes * 2
    ms = cuda_time_ms(fn)
    gbs = moved / ms / 1e6
    copy = copy_bandwidth_gbs()
    entry = dict(kind=f"scan_{direction}", batch=batch, dim=dim, L=L, N=N, dtype="bfloat16", ms=ms,
                 bytes=moved, gbs=gbs, copy_gbs=copy, fraction_of_copy=gbs / copy)
    record(entry)
    benchmark.extra_info.update(entry)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# Routed attention
# ---------------------------------------------------------------------------------------------

def attention_tensors(head_dim, L, frac, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    heads = HIDDEN // head_dim
    q, k, v = (torch.randn(1, heads, L, head_dim, device=DEVICE, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    route = torch.rand(1, L, device=DEVICE, generator=g) < frac
    return q, k, v, route


def routed_flops(route, heads, head_dim):
    positions = route[0].nonzero().flatten().double()
    return 4.0 * head_dim * heads * (positions + 1).sum().item()


def unfused_routed_attention(q, k, v, route):
    """Gather the routed rows, attend with an explicit causal mask on their positions, scatter."""
    positions = route[0].nonzero().flatten()
    out = torch.zeros_like(q)
    if positions.numel() == 0:
        return out
    keys = torch.arange(k.shape[2], device=q.device)
    mask = keys[None, :] <= positions[:, None]
    out[:, :, positions] = F.scaled_dot_product_attention(q[:, :, positions], k, v, attn_mask=mask)
    return out


_dense_ms = {}


def dense_ms(backend, q, k, v):
    """Dense causal SDPA with one backend, timed once per shape (it ignores the route)."""
    key = (backend, tuple(q.shape))
    if key not in _dense_ms:
        try:
            with sdpa_kernel(backend):
                _dense_ms[key] = cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        except RuntimeError as e:  # backend unavailable for this shape / device
            _dense_ms[key] = None
            record(dict(kind="attention_baseline_unavailable", backend=str(backend), shape=list(q.shape),
                        error=str(e)[:200]))
    return _dense_ms[key]


@pytest.mark.parametrize("frac", ROUTE_FRACTIONS)
@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_routed_attention(benchmark, head_dim, L, frac):
    q, k, v, route = attention_tensors(head_dim, L, frac)
    heads = q.shape[1]
    fn = lambda: cram_ext.routed_attention(q, k, v, route)  # noqa: E731
    ms = cuda_time_ms(fn)
    flash = dense_ms(SDPBackend.FLASH_ATTENTION, q, k, v)
    cudnn = dense_ms(SDPBackend.CUDNN_ATTENTION, q, k, v)
    unfused = cuda_time_ms(lambda: unfused_routed_attention(q, k, v, route))
    flops = routed_flops(route, heads, head_dim)
    entry = dict(kind="routed_attention_forward", dtype="bfloat16", batch=1, heads=heads,
                 head_dim=head_dim, L=L, route_fraction=frac, routed_rows=int(route.sum()),
                 ms=ms, routed_tflops=flops / ms / 1e9, flash_ms=flash, cudnn_ms=cudnn,
                 unfused_ms=unfused,
                 speedup_vs_flash=flash / ms if flash else None,
                 speedup_vs_cudnn=cudnn / ms if cudnn else None,
                 speedup_vs_unfused=unfused / ms)
    record(entry)
    benchmark.extra_info.update(entry)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


_compiled = {}


# FlexAttention last: each new shape compiles, which is slow; results already recorded survive.
@pytest.mark.parametrize("frac", ROUTE_FRACTIONS)
@pytest.mark.parametrize("L", SEQ_LENS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_flex_attention_baseline(head_dim, L, frac):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, route = attention_tensors(head_dim, L, frac)
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    flex = _compiled["flex"]
    routed_rows = route

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & routed_rows[b, q_idx]

    block_mask = create_block_mask(mask_mod, 1, None, L, L, device=DEVICE)
    ms_flex = cuda_time_ms(lambda: flex(q, k, v, block_mask=block_mask))
    ms = cuda_time_ms(lambda: cram_ext.routed_attention(q, k, v, route))
    record(dict(kind="flex_attention_baseline", dtype="bfloat16", head_dim=head_dim, L=L,
                route_fraction=frac, flex_ms=ms_flex, routed_ms=ms, speedup_vs_flex=ms_flex / ms,
                routed_tflops=routed_flops(route, q.shape[1], head_dim) / ms / 1e9))
