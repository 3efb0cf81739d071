"""GPU benchmarks of the CUDA kernels against PyTorch's own kernels (skipped without CUDA).

    BENCH_RESULTS_JSONL=OUT/gpu_bench.jsonl pytest bench/test_bench_gpu.py

Every number is appended to BENCH_RESULTS_JSONL as soon as it is measured (bench/conftest.py),
one JSON object a line, so a run cut short keeps what it measured. Tests run in order of value:

1. test_attention_decisive: routed attention forward (bf16, causal, batch 1, heads = 1024 /
   head_dim) at head_dim 64 and 128, L 8192 and 16384, 1.6% and 100% of rows routed, against
   dense causal scaled_dot_product_attention with only the flash or only the cuDNN backend (the
   dense computation routing is meant to avoid; timed once per shape). Each is timed eager and
   replayed from a CUDA graph: eager includes the host's launch and allocation overhead, the
   graph shows device time alone, so the difference is the host cost per call.
2. test_scan_bandwidth: selective scan forward and backward (bf16), achieved GB/s (each input
   read once, each output written once) beside a measured device-to-device copy;
   test_attention_backward: routed attention forward + backward (bf16, head_dim 64 and 128,
   L 8192, 1.6% and 100% routed) against dense causal SDPA's with the flash backend, eager.
3. test_attention_more: the rest of the grid (L 2048; 12.5% and 50% routed), with the same
   baselines plus `unfused` (gather the routed rows, SDPA with an explicit causal mask on their
   positions, scatter back).
4. test_flex_attention: FlexAttention (compiled) with a block mask of causal & route[b, q_idx],
   few cases; one compilation per shape family, the route entering as a captured tensor whose
   values change between cases, so a new route fraction does not recompile.

5. test_kvcache_decoding (the streaming stage of bench/device_check.sh): one decoding step of
   routed_attention_with_kvcache (bf16, heads = 1024 / head_dim, one new row per sequence) over
   caches of 8K and 32K, batch 1 and 8, every row or 1.6% of the rows routed, beside dense SDPA
   over the same cache; selective_state_update at batch 8, dim 2048; and test_cram_step_decoding,
   one CRAM layer's decoding step (the fused op, and the layer fused and composed).

6. test_training_cpu_preset (the training stage): the cpu preset's CRAM run trained on the GPU
   and measured on the test stream, beside the CPU runs of docs/RESULTS.md.

TFLOP/s counts routed FLOPs only: 4 * head_dim * (visible keys) per routed row and head. Times
are medians of CUDA-event-timed calls after warm-up.
"""
import time

import pytest
import torch
import torch.nn.functional as F

import cram_ext
from cram_ext.models.router import Path
from cases import attention_inputs, scan_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
HIDDEN = 1024  # heads = HIDDEN // head_dim
WARMUP, REPS = 3, 20
DECISIVE = [(d, L, fraction) for d in (64, 128) for L in (8192, 16384) for fraction in (0.016, 1.0)]
MORE = [(d, L, fraction) for d in (64, 128) for L in (2048, 8192, 16384)
        for fraction in (0.016, 0.125, 0.5, 1.0) if (d, L, fraction) not in DECISIVE]
FLEX = [(128, L, fraction) for L in (8192, 16384) for fraction in (0.016, 0.125)]
BACKWARD = [(d, 8192, fraction) for d in (64, 128) for fraction in (0.016, 1.0)]


def case_id(case):
    d, L, fraction = case
    return f"d{d}-L{L}-r{fraction:g}"


def cuda_time_ms(fn, warmup=WARMUP, reps=REPS):
    """Median milliseconds of fn() over `reps` CUDA-event-timed calls, after `warmup` calls.
    The device is idle when each call starts, so the time includes the host's launch cost
    wherever the host is slower than the kernels."""
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


def graph_of(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as capture requires);
    returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def eager_and_graph_ms(fn, name):
    """{name_eager_ms, name_graph_ms}; a failure (backend unavailable, capture unsupported) is
    recorded as name_error instead of ending the case."""
    result = {}
    stream = torch.cuda.current_stream()
    for mode, timed in (("eager", lambda: fn), ("graph", lambda: graph_of(fn))):
        try:
            result[f"{name}_{mode}_ms"] = cuda_time_ms(timed())
        except RuntimeError as e:
            # A capture that fails at its end leaves the capture's side stream current.
            torch.cuda.set_stream(stream)
            result[f"{name}_{mode}_ms"] = None
            result[f"{name}_{mode}_error"] = str(e).splitlines()[0][:200]
    return result


def attention_case(head_dim, L, fraction):
    q, k, v, route, _ = attention_inputs(0, batch=1, heads=HIDDEN // head_dim, Lq=L, d=head_dim,
                                         dtype=torch.bfloat16, fraction=fraction, device=DEVICE)
    return q, k, v, route


def routed_flops(route, heads, head_dim):
    positions = route[0].nonzero().flatten().double()
    return 4.0 * head_dim * heads * (positions + 1).sum().item()


_dense = {}


def dense_ms(q, k, v):
    """Dense causal SDPA with the flash and the cuDNN backend, once per shape (it ignores the
    route)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = tuple(q.shape)
    if shape not in _dense:
        _dense[shape] = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            _dense[shape].update(eager_and_graph_ms(sdpa, name))
    return _dense[shape]


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


def measure_attention(record, head_dim, L, fraction, with_unfused):
    q, k, v, route = attention_case(head_dim, L, fraction)
    heads = q.shape[1]
    entry = dict(kind="routed_attention_forward", dtype="bfloat16", batch=1, heads=heads,
                 head_dim=head_dim, L=L, route_fraction=fraction, routed_rows=int(route.sum()))
    entry.update(eager_and_graph_ms(
        lambda: cram_ext.routed_attention(q, k, v, route=route, is_causal=True), "routed"))
    entry.update(dense_ms(q, k, v))
    if with_unfused:
        entry["unfused_eager_ms"] = cuda_time_ms(lambda: unfused_routed_attention(q, k, v, route))
    for mode in ("eager", "graph"):
        ms = entry.get(f"routed_{mode}_ms")
        if ms:
            entry[f"routed_{mode}_tflops"] = routed_flops(route, heads, head_dim) / ms / 1e9
            for baseline in ("flash", "cudnn"):
                if entry.get(f"{baseline}_{mode}_ms"):
                    entry[f"speedup_vs_{baseline}_{mode}"] = entry[f"{baseline}_{mode}_ms"] / ms
    record(**entry)
    assert entry["routed_eager_ms"] is not None, entry.get("routed_eager_error")


@pytest.mark.parametrize("case", DECISIVE, ids=case_id)
def test_attention_decisive(record, case):
    measure_attention(record, *case, with_unfused=False)


_copy_bandwidth = {}


def copy_bandwidth_gbs(record):
    """Measured device-to-device copy bandwidth, bytes read + written, GB/s (once)."""
    if "gbs" not in _copy_bandwidth:
        src = torch.randn(256 << 20, device=DEVICE)  # 1 GiB
        dst = torch.empty_like(src)
        ms = cuda_time_ms(lambda: dst.copy_(src))
        _copy_bandwidth["gbs"] = 2 * src.numel() * src.element_size() / ms / 1e6
        record(kind="copy", bytes=2 * src.numel() * src.element_size(), ms=ms,
               gbs=_copy_bandwidth["gbs"])
    return _copy_bandwidth["gbs"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_scan_bandwidth(record, direction):
    batch, dim, L, N = 4, 2048, 4096, 16
    inputs = scan_inputs(0, batch=batch, dim=dim, L=L, N=N, groups=1, dtype=torch.bfloat16,
                         device=DEVICE)
    seq_bytes = batch * dim * L * 2
    bc_bytes = 2 * batch * N * L * 2
    if direction == "forward":
        def fn():
            with torch.no_grad():
                cram_ext.selective_scan(**inputs, delta_softplus=True)
        moved = 4 * seq_bytes + bc_bytes  # u, delta, z in; out
    else:
        leaves = {name: t.requires_grad_() for name, t in inputs.items()}
        out = cram_ext.selective_scan(**leaves, delta_softplus=True)
        dout = torch.randn_like(out)
        grad_of = list(leaves.values())
        fn = lambda: torch.autograd.grad(out, grad_of, dout, retain_graph=True)  # noqa: E731
        # dout, u, delta, z in; du, ddelta, dz out; B, C in, dB, dC out (float32)
        moved = 7 * seq_bytes + bc_bytes + 2 * bc_bytes * 2
    ms = cuda_time_ms(fn)
    gbs = moved / ms / 1e6
    copy = copy_bandwidth_gbs(record)
    record(kind=f"scan_{direction}", batch=batch, dim=dim, L=L, N=N, dtype="bfloat16", ms=ms,
           bytes=moved, gbs=gbs, copy_gbs=copy, fraction_of_copy=gbs / copy)


@pytest.mark.parametrize("case", BACKWARD, ids=case_id)
def test_attention_backward(record, case):
    """Forward + backward (dq, dk, dv) of routed attention against dense causal SDPA's with the
    flash backend, eager: the training step's attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, route = attention_case(*case)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def routed():
        out = cram_ext.routed_attention(*leaves, route=route, is_causal=True)
        return torch.autograd.grad(out, leaves, grad_out)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
        return torch.autograd.grad(out, leaves, grad_out)

    head_dim, L, fraction = case
    entry = dict(kind="routed_attention_backward", dtype="bfloat16", batch=1, heads=q.shape[1],
                 head_dim=head_dim, L=L, route_fraction=fraction, routed_rows=int(route.sum()),
                 routed_eager_ms=cuda_time_ms(routed), flash_eager_ms=cuda_time_ms(flash))
    entry["speedup_vs_flash_eager"] = entry["flash_eager_ms"] / entry["routed_eager_ms"]
    record(**entry)


@pytest.mark.parametrize("case", MORE, ids=case_id)
def test_attention_more(record, case):
    measure_attention(record, *case, with_unfused=True)


_flex = {}


def flex_family(head_dim, L):
    """One compiled FlexAttention per (head_dim, L): the mask_mod closes over a route buffer
    that each case overwrites, so the function and every guard on it stay the same."""
    if (head_dim, L) not in _flex:
        route_rows = torch.zeros(1, L, dtype=torch.bool, device=DEVICE)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & route_rows[b, q_idx]

        _flex[(head_dim, L)] = (route_rows, mask_mod)
    return _flex[(head_dim, L)]


_compiled_flex = []


@pytest.mark.parametrize("case", FLEX, ids=case_id)
def test_flex_attention(record, case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    head_dim, L, fraction = case
    q, k, v, route = attention_case(head_dim, L, fraction)
    if not _compiled_flex:
        _compiled_flex.append(torch.compile(flex_attention, dynamic=False))
    flex = _compiled_flex[0]
    route_rows, mask_mod = flex_family(head_dim, L)
    route_rows.copy_(route)
    block_mask = create_block_mask(mask_mod, 1, None, L, L, device=DEVICE)
    t0 = time.perf_counter()
    flex(q, k, v, block_mask=block_mask)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0  # includes compilation for a new family
    ms_flex = cuda_time_ms(lambda: flex(q, k, v, block_mask=block_mask))
    ms = cuda_time_ms(lambda: cram_ext.routed_attention(q, k, v, route=route, is_causal=True))
    record(kind="flex_attention_baseline", dtype="bfloat16", head_dim=head_dim, L=L,
           route_fraction=fraction, flex_ms=ms_flex, flex_first_call_s=first_call_s,
           routed_eager_ms=ms, speedup_vs_flex=ms_flex / ms,
           routed_tflops=routed_flops(route, q.shape[1], head_dim) / ms / 1e9)


# ---------------------------------------------------------------------------------------------
# Fused CRAM forward
# ---------------------------------------------------------------------------------------------

CRAM_LAYER = [(d, L, fraction) for d in (64, 256) for L in (2048, 8192) for fraction in (0.02, 0.1)]


@pytest.mark.parametrize("case", CRAM_LAYER, ids=case_id)
def test_cram_forward(record, case):
    """The evaluation forward of one CRAM layer (batch 8, fp32): the fused op, eager and replayed
    from a CUDA graph (only the fused layer has no host synchronisation, so only it can be
    captured); the layer with the fused op and with the composed ops; and the op's stages timed
    alone (scan, attention, GEMMs: test_bench_cram_forward_cpu.parts), the CPU table's columns."""
    from test_bench_cram_forward_cpu import PRICES, fused_call, layer_case, parts
    d, L, fraction = case
    layer, x, gap, key_mask = layer_case(d, L, fraction)
    layer = layer.to(DEVICE)
    x, gap, key_mask = x.to(DEVICE), gap.to(DEVICE), key_mask.to(DEVICE)
    result = dict(kind="cram_forward", d_model=d, L=L, batch=x.shape[0], fraction=fraction)
    with torch.no_grad():
        op = fused_call(layer, x, gap, key_mask)
        path = op().path
        result["attention_rows"] = int((path == Path.EPISODIC).sum())
        result["semantic_rows"] = int((path == Path.SEMANTIC).sum())
        result.update(eager_and_graph_ms(op, "fused_op"))
        for fused in (True, False):
            layer.fused = fused
            result[f"layer_{'fused' if fused else 'composed'}_eager_ms"] = cuda_time_ms(
                lambda: layer(x, gap, key_mask, PRICES))
        layer.fused = True
        for name, stage in parts(layer, x, gap, key_mask, path).items():
            result[f"{name}_eager_ms"] = cuda_time_ms(stage)
    result["parts_sum_eager_ms"] = sum(result[f"{name}_eager_ms"]
                                       for name in ("scan", "attention", "gemms"))
    if result["fused_op_eager_ms"] is not None:
        result["op_over_parts"] = result["fused_op_eager_ms"] / result["parts_sum_eager_ms"]
    result["layer_speedup"] = result["layer_composed_eager_ms"] / result["layer_fused_eager_ms"]
    record(**result)


# ---------------------------------------------------------------------------------------------
# Streaming: one decoding step
# ---------------------------------------------------------------------------------------------

DECODING = [(d, context, batch, fraction) for d in (64, 128) for context in (8192, 32768)
            for batch in (1, 8) for fraction in (0.016, 1.0)]


@pytest.mark.parametrize("case", DECODING, ids=lambda c: f"d{c[0]}-ctx{c[1]}-b{c[2]}-r{c[3]}")
def test_kvcache_decoding(record, case):
    head_dim, context, batch, fraction = case
    heads = HIDDEN // head_dim
    g = torch.Generator(device=DEVICE).manual_seed(0)
    cache = [torch.randn(batch, heads, context + 1, head_dim, generator=g, device=DEVICE,
                         dtype=torch.bfloat16) for _ in range(2)]
    q, k, v = (torch.randn(batch, heads, 1, head_dim, generator=g, device=DEVICE,
                           dtype=torch.bfloat16) for _ in range(3))
    lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    # `fraction` of the (sequence, head) rows routed, at least one: per-head routes, so batch 1
    # has some too.
    routed = max(1, round(fraction * batch * heads))
    route = torch.zeros(batch * heads, dtype=torch.bool, device=DEVICE)
    route[torch.randperm(batch * heads, generator=g, device=DEVICE)[:routed]] = True
    route = route.view(batch, heads, 1)

    def step():
        return cram_ext.routed_attention_with_kvcache(q, cache[0], cache[1], k, v, lengths,
                                                      route=route)

    def dense():
        return F.scaled_dot_product_attention(q, cache[0], cache[1])

    result = {**eager_and_graph_ms(step, "kvcache"), **eager_and_graph_ms(dense, "sdpa")}
    # Bytes the routed rows must read: their keys and values, once per routed row.
    kv_bytes = routed * (context + 1) * head_dim * 2 * 2
    graph_ms = result.get("kvcache_graph_ms")
    record(kind="kvcache_decoding", head_dim=head_dim, heads=heads, context=context,
           batch=batch, fraction=fraction, routed_rows=routed, kv_bytes=kv_bytes,
           kvcache_gbs=kv_bytes / graph_ms / 1e6 if graph_ms else None, **result)


CRAM_STEP = [(d, batch) for d in (64, 256) for batch in (1, 8)]


@pytest.mark.parametrize("case", CRAM_STEP, ids=lambda c: f"d{c[0]}-b{c[1]}")
def test_cram_step_decoding(record, case):
    """One decoding step of a CRAM layer (fp32, the layer of test_cram_forward with every token
    routed to attention: the step's dearest case; at its 2% a step of 1 or 8 streams routes none)
    over a full episodic buffer of 512 written entries: `cram_step` eager and replayed from a
    CUDA graph, and the layer's step with the fused op and with the composed ops (eager only:
    both read the written flags on the host)."""
    from cram_ext.models import memory
    from test_bench_cram_forward_cpu import PRICES, layer_case
    d, batch = case
    layer, x, gap, _ = layer_case(d, 128, 1.0)
    layer = layer.to(DEVICE)
    x, gap = x[:batch, 0].to(DEVICE), gap[:batch, 0].to(DEVICE)
    state = layer.init_state(batch, capacity=4096, memory_size=512, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    state.working.normal_(0, 0.1, generator=g)
    cache = state.attention
    cache.keys.normal_(generator=g)
    cache.values.normal_(generator=g)
    cache.lengths.fill_(512)
    written = torch.zeros(batch, dtype=torch.bool, device=DEVICE)  # no eviction between calls
    result = dict(kind="cram_step", d_model=d, batch=batch, buffer=512)
    with torch.no_grad():
        q_hat = layer.q_predictor(x)
        weights, options = layer._fused_weights(), layer._fused_options(PRICES, q_hat)
        key_mask = memory.step_key_mask(cache, written)

        def op():
            return cram_ext.cram_step(x, gap, state.working, cache.keys, cache.values,
                                      cache.lengths, *weights, **options, key_mask=key_mask)

        result["attention_rows"] = int((op().path == Path.EPISODIC).sum())
        result.update(eager_and_graph_ms(op, "cram_step"))
        for fused in (True, False):
            layer.fused = fused
            result[f"layer_step_{'fused' if fused else 'composed'}_eager_ms"] = cuda_time_ms(
                lambda: layer(x, gap, written, PRICES, state=state))
        layer.fused = True
    record(**result)


def test_state_update_step(record):
    batch, dim, N = 8, 2048, 16
    inputs = scan_inputs(0, batch=batch, dim=dim, L=1, N=N, groups=1, dtype=torch.bfloat16,
                         device=DEVICE)
    state = torch.zeros(batch, dim, N, device=DEVICE)
    args = dict(x=inputs["u"][..., 0], dt=inputs["delta"][..., 0], A=inputs["A"],
                B=inputs["B"][..., 0], C=inputs["C"][..., 0], D=inputs["D"],
                z=inputs["z"][..., 0], dt_bias=inputs["delta_bias"],
                dt_scale=inputs["dt_scale"][:, 0])
    result = eager_and_graph_ms(
        lambda: cram_ext.selective_state_update(state, **args, dt_softplus=True), "state_update")
    record(kind="state_update", batch=batch, dim=dim, N=N, dtype="bfloat16",
           state_bytes=2 * state.numel() * 4, **result)


# ---------------------------------------------------------------------------------------------
# Training: CRAM on SRCD with the CUDA kernels
# ---------------------------------------------------------------------------------------------

def test_training_cpu_preset(record):
    """The cpu preset's seed-0 CRAM run (400 steps, `python -m cram_ext.train --config cram --size
    cpu --seed 0 --data-seed 0 --device cuda`) trained on the GPU, then measured on the 64 test
    batches as `python -m cram_ext.evaluate` measures the CPU runs (docs/RESULTS.md): whether
    consolidation happens on the CUDA kernels as on the CPU ones, and the time per step."""
    from cram_ext.evaluate import TEST_BATCHES, TEST_SEED_OFFSET
    from cram_ext.train import Trainer, run_config
    seed = 0
    trainer = Trainer(run_config("cram", "cpu", seed=seed, data_seed=seed, device="cuda"), None,
                      show_progress=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while trainer.step < trainer.config.steps:
        trainer.train_step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    metrics = trainer.evaluate(TEST_BATCHES, seed_offset=TEST_SEED_OFFSET)
    record(kind="training", model="cram", size="cpu", seed=seed, steps=trainer.step,
           ms_per_step=1e3 * seconds / trainer.step,
           **{name: metrics[name] for name in (
               "accuracy_recurring", "accuracy_novel", "attention/0/recurring",
               "attention/0/novel", "attention/1/recurring", "attention/1/novel",
               "attention/0/other", "attention_fraction", "dynamics_mse")})
