"""Whether routed attention at sparse routing costs what its tiles visit: the CPU forward's time
for routes of the same few rows placed differently, against the key positions its tiles visit.

The CPU kernel packs a head's routed rows into tiles of one vector's worth (16 fp32 lanes with
AVX-512, 8 with AVX2; the partly filled tile first) and a causal tile visits every key up to its
last row. "Tile-keys" sums that over the tiles: the forward's vector FMAs are 2 · head_dim per
tile-key. L = 4096, 8 heads, d = 64, fp32, batch 1, warm (each timed call follows another):

    python bench/tile_cost_cpu.py [--calls 30]

Routes: `random` is the 1.6% case of bench/test_bench_routed_attention_cpu.py (66 rows); the
others place 66 rows so that tiles span 16 consecutive positions (`clustered`: no causal waste
inside a tile) or sit at the end (`end`: every tile visits every key).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_tests"))
from cases import attention_inputs  # noqa: E402
from cram_ext import routed_attention  # noqa: E402

L = 4096


def simd_lanes():
    """fp32 lanes of the CPU kernels' vectors: the build targets this machine (-march=native)."""
    with open("/proc/cpuinfo") as f:
        return 16 if " avx512f" in f.read() else 8


def tile_keys(route, lanes):
    """Keys the tiles of one head visit, summed: each tile up to its last row's position."""
    rows = route[0].nonzero().flatten().tolist()
    partial = len(rows) % lanes
    last_rows = ([rows[partial - 1]] if partial else []) + rows[partial + lanes - 1::lanes]
    return sum(row + 1 for row in last_rows)


def route_at(rows):
    route = torch.zeros(1, L, dtype=torch.bool)
    route[0, rows] = True
    return route


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    q, k, v, random_route, _ = attention_inputs(4096, batch=1, heads=8, Lq=L, d=64, fraction=0.016)
    n = int(random_route.sum())
    routes = {
        "random": random_route,
        "clustered": route_at(list(range(n % 16)) + [start + i for start in range(1000, L, 1000)
                                                        for i in range(16)][:n - n % 16]),
        "end": route_at(list(range(L - n, L))),
    }
    lanes = simd_lanes()
    print(f"{n} routed rows of L={L}, {lanes}-lane tiles; fastest / median of {args.calls} warm calls")
    for name, route in routes.items():
        call = lambda: routed_attention(q, k, v, is_causal=True, route=route)  # noqa: E731
        call()
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        times.sort()
        keys = tile_keys(route, lanes)
        print(f"  {name:9s} tile-keys per head {keys:6d}   {times[0] * 1e3:.2f} / {times[len(times) // 2] * 1e3:.2f} ms"
              f"   {times[0] * 1e9 / keys:.0f} ns per tile-key (fastest)")


if __name__ == "__main__":
    main()
