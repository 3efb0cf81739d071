"""CPU benchmark: routed attention against dense causal SDPA on the same tensors.

fp32, batch 1, 8 heads, head_dim 64. The route is a uniformly random set of positions (fixed
seed) shared by the heads. Run with `pytest bench/ --benchmark-json=...`; the SDPA baseline of
each length is its own case, and `extra_info` records L, the route fraction and routed rows.
"""
import pytest
import torch
import torch.nn.functional as F

from cases import attention_inputs
from cram_ext import routed_attention
from test_bench_selective_scan_cpu import paired_ratio

HEADS, HEAD_DIM = 8, 64
LENGTHS = [1024, 4096]
FRACTIONS = [0.016, 0.1, 0.5, 1.0]


def inputs(L, fraction=1.0):
    """q, k, v (batch 1) and a route of round(fraction · L) rows shared by the heads."""
    q, k, v, route, _ = attention_inputs(L, batch=1, heads=HEADS, Lq=L, d=HEAD_DIM,
                                         fraction=fraction)
    return q, k, v, route


@pytest.mark.parametrize("L", LENGTHS)
def test_sdpa_causal(benchmark, L):
    q, k, v, _ = inputs(L)
    benchmark.group = f"L={L}"
    benchmark.extra_info.update(kernel="sdpa", L=L, fraction=1.0, routed_rows=L)
    benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=True)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("L", LENGTHS)
def test_routed_attention(benchmark, L, fraction):
    q, k, v, route = inputs(L, fraction)
    benchmark.group = f"L={L}"
    benchmark.extra_info.update(kernel="routed_attention", L=L, fraction=fraction,
                                routed_rows=int(route.sum()))
    benchmark(routed_attention, q, k, v, is_causal=True, route=route)
    # On a shared machine the load changes between benchmarks: the speed-up over SDPA is also
    # measured with the two alternating, fastest of each: each timed right after the other
    # (paired), and each timed right after an untimed call of itself (paired, warm), as the
    # benchmark above times both.
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    routed = lambda: routed_attention(q, k, v, is_causal=True, route=route)
    benchmark.extra_info["paired_speedup"] = paired_ratio(sdpa, routed)
    benchmark.extra_info["paired_speedup_warm"] = paired_ratio(sdpa, routed, warm=True)


@pytest.mark.parametrize("fraction", [0.016, 0.1])
def test_routed_attention_sparse_keys(benchmark, fraction):
    """L = 4096 with a key_mask that keeps 5% of the keys, as an episodic buffer of written
    entries does (SRCD writes about 5% of its tokens)."""
    q, k, v, route, key_mask = attention_inputs(0, batch=1, heads=HEADS, Lq=4096, d=HEAD_DIM,
                                                fraction=fraction, key_mask=True, key_share=0.05)
    benchmark.group = "L=4096, 5% of keys"
    benchmark.extra_info.update(kernel="routed_attention_sparse_keys", L=4096, fraction=fraction,
                                routed_rows=int(route.sum()), kept_keys=int(key_mask.sum()))
    benchmark(routed_attention, q, k, v, is_causal=True, route=route, key_mask=key_mask)
