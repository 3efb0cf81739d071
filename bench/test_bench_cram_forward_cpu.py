"""CPU benchmark: the evaluation forward of one CRAM layer, fused (`cram_ext.cram_forward`)
against the composed ops, and the fused op against the sum of its parts timed alone.

One `CRAMLayer` (scan working memory, routed attention, semantic adapter), batch 8, fp32, with
its router's episodic bias set so that a given fraction of the tokens attends (the others split
between the working and the semantic path). Cases per (d_model, L, fraction):

* layer_composed / layer_fused: `CRAMLayer.forward` in eval mode (paths, records, Add&Norm, FFN)
  with `fused` off and on;
* fused_op: the `cram_forward` call alone;
* parts: the op's stages timed alone and summed: the scan kernel, routed attention on the same
  route, and the GEMMs the op makes (in/x/dt/out projections, the router's x-part, k/v on the
  written rows, q and the attention out-projection on the routed rows, the adapter on the
  semantic rows).

pytest-benchmark times the fused layer; every candidate is also timed interleaved with the others
(fastest of CRAM_BENCH_ROUNDS rounds each, in `extra_info`), which is what the ratios use.

    CRAM_BENCH_LENGTHS=2048 pytest bench/test_bench_cram_forward_cpu.py \\
        --benchmark-json=bench/results/cram_forward_cpu.json

CRAM_BENCH_LENGTHS and CRAM_BENCH_DIMS (comma-separated) select a subset; the default is the
full grid, d_model 64 and 256, L 2048 and 8192. CRAM_BENCH_THREADS (default 1) and
CRAM_BENCH_ROUNDS (default 3) set the threads and the timed rounds per case.
"""
import os
import time

import pytest
import torch

import cram_ext
from cram_ext.models import CRAMLayer, model_config
from cram_ext.models.cram import RoutingPrices
from cram_ext.models.memory import gap_scale
from cram_ext.models.router import Path

BATCH = 8
THREADS = int(os.environ.get("CRAM_BENCH_THREADS", "1"))
DIMS = [int(v) for v in os.environ.get("CRAM_BENCH_DIMS", "64,256").split(",")]
LENGTHS = [int(v) for v in os.environ.get("CRAM_BENCH_LENGTHS", "2048,8192").split(",")]
FRACTIONS = [0.02, 0.1]
PRICES = RoutingPrices(episodic=1.0, semantic=0.05)
ROUNDS = int(os.environ.get("CRAM_BENCH_ROUNDS", "3"))

_cases = {}


def layer_case(d, L, fraction):
    """A layer routing `fraction` of its tokens to attention, with its inputs (cached)."""
    key = (d, L, fraction)
    if key in _cases:
        return _cases[key]
    _cases.clear()
    torch.manual_seed(0)
    config = model_config("cram", d_model=d, n_heads=2 if d <= 64 else 4)
    layer = CRAMLayer(config, config.layers[0]).eval()
    x, gap = torch.randn(BATCH, L, d), 3 * torch.rand(BATCH, L)
    key_mask = torch.rand(BATCH, L) < 0.05    # the written entries (SRCD writes ~5%)
    key_mask[:, 0] = True
    with torch.no_grad():
        torch.nn.init.normal_(layer.router.predict_loss[-1].weight, std=2.0)
        layer.fused = False
        scores = layer(x, gap, key_mask, PRICES)[1].routing.scores
        others = torch.cat([scores[..., :Path.EPISODIC], scores[..., Path.EPISODIC + 1:]], -1)
        margin = (scores[..., Path.EPISODIC] - others.min(-1).values).flatten()
        shift = margin.kthvalue(max(1, round(fraction * margin.numel()))).values
        layer.router.predict_loss[-1].bias[Path.EPISODIC] -= shift + 1e-4
        layer.fused = True
    _cases[key] = layer, x, gap, key_mask
    return _cases[key]


def interleaved_min_s(fns, rounds=ROUNDS):
    """{name: fastest time in seconds} of the callables, called in turn `rounds` times after one
    warm-up each: on a shared machine the load drifts, and alternating the candidates exposes
    them to the same load."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fused_call(layer, x, gap, key_mask):
    q_hat = layer.q_predictor(x)
    args, kwargs = layer._fused_weights(), layer._fused_options(PRICES, q_hat)
    return lambda: cram_ext.cram_forward(x, gap, *args, **kwargs, key_mask=key_mask)


def parts(layer, x, gap, key_mask, path):
    """The op's stages, each as a callable on inputs prepared beforehand, in the op's layouts:
    on the CPU its GEMMs gather the rows of each path, on a CUDA device they run over every row
    (the row counts stay on the device there)."""
    w, att, router, sem = layer.working, layer.episodic, layer.router, layer.semantic
    batch, L, d = x.shape
    d_inner, R, N = w.out_proj.weight.shape[1], w.dt_rank, w.d_state
    x_flat = x.reshape(-1, d)
    as_sequence = lambda t: t.view(-1, batch, L).permute(1, 0, 2)  # noqa: E731
    xz = w.in_proj.weight @ x_flat.t()
    x_dbl = w.x_proj.weight @ xz[:d_inner]
    delta = w.dt_proj.weight @ x_dbl[:R]
    scan_inputs = [as_sequence(t) for t in (xz[:d_inner], delta, x_dbl[R:R + N], x_dbl[R + N:],
                                            xz[d_inner:])]
    A, dt_scale = -torch.exp(w.A_log), gap_scale(gap).contiguous()

    def scan():
        u, delta_, B, C, z = scan_inputs
        return cram_ext.selective_scan(u, delta_, A, B, C, D=w.D, z=z, delta_bias=w.dt_bias,
                                       delta_softplus=True, dt_scale=dt_scale)

    y_channels = scan().permute(1, 0, 2).reshape(d_inner, -1)
    route = path == Path.EPISODIC
    rows = route.flatten().nonzero().squeeze(1)
    recalled = (path == Path.SEMANTIC).flatten().nonzero().squeeze(1)
    # 5% of the tokens are written: few enough that the op computes k/v on those rows only.
    written = key_mask.flatten().nonzero().squeeze(1)
    kv = torch.empty(batch * L, att.qkv.weight.shape[0] - d, device=x.device)
    q, k, v = (t.view(batch, L, att.n_heads, -1).transpose(1, 2)
               for t in att.qkv(x).chunk(3, dim=-1))
    attn_flat = torch.zeros(batch * L, d, device=x.device)
    semantic_rows = (path == Path.SEMANTIC).flatten()[:, None].to(x.dtype)
    first = router.predict_loss[0]

    def gemms():
        xz_ = w.in_proj.weight @ x_flat.t()
        x_dbl_ = w.x_proj.weight @ xz_[:d_inner]
        w.dt_proj.weight @ x_dbl_[:R]
        out = y_channels.t() @ w.out_proj.weight.t()
        torch.addmm(first.bias, x_flat, first.weight[:, :d].t())
        if x.is_cuda:
            x_flat @ att.qkv.weight.t()
            out.addmm_(attn_flat, att.out_proj.weight.t())
            h = torch.relu(torch.addmm(sem.down.bias, x_flat, sem.down.weight.t()))
            out.add_(torch.addmm(sem.up.bias, h, sem.up.weight.t()) * semantic_rows)
            return
        kv.index_copy_(0, written, x_flat.index_select(0, written) @ att.qkv.weight[d:].t())
        x_flat.index_select(0, rows) @ att.qkv.weight[:d].t()
        out.index_add_(0, rows, attn_flat.index_select(0, rows) @ att.out_proj.weight.t())
        h = torch.relu(torch.addmm(sem.down.bias, x_flat.index_select(0, recalled),
                                   sem.down.weight.t()))
        out.index_add_(0, recalled, torch.addmm(sem.up.bias, h, sem.up.weight.t()))

    return {"scan": scan, "gemms": gemms,
            "attention": lambda: cram_ext.routed_attention(q, k, v, is_causal=True, route=route,
                                                           key_mask=key_mask)}


CASES = [(d, L, f) for d in DIMS for L in LENGTHS for f in FRACTIONS]
IDS = [f"d{d}-L{L}-{int(f * 100)}pct" for d, L, f in CASES]


@pytest.mark.parametrize("d, L, fraction", CASES, ids=IDS)
def test_cram_layer_forward(benchmark, d, L, fraction):
    """pytest-benchmark times the fused layer; `extra_info` has the interleaved minima of every
    candidate (seconds) and the two ratios the issue asks for."""
    torch.set_num_threads(THREADS)
    layer, x, gap, key_mask = layer_case(d, L, fraction)
    benchmark.group = f"d={d} L={L} {fraction:.0%}"

    def layer_forward(fused):
        def run():
            layer.fused = fused
            return layer(x, gap, key_mask, PRICES)
        return run

    with torch.no_grad():
        op = fused_call(layer, x, gap, key_mask)
        path = op().path
        candidates = {"layer_composed": layer_forward(False), "layer_fused": layer_forward(True),
                      "fused_op": op, **parts(layer, x, gap, key_mask, path)}
        best = interleaved_min_s(candidates)
        parts_sum = best["scan"] + best["attention"] + best["gemms"]
        benchmark.extra_info.update(
            {f"{name}_s": t for name, t in best.items()}, parts_sum_s=parts_sum,
            layer_speedup=best["layer_composed"] / best["layer_fused"],
            op_over_parts=best["fused_op"] / parts_sum, d_model=d, L=L, batch=BATCH,
            fraction=fraction, attention_rows=int((path == Path.EPISODIC).sum()),
            semantic_rows=int((path == Path.SEMANTIC).sum()), threads=torch.get_num_threads())
        benchmark.pedantic(layer_forward(True), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    layer.fused = True
