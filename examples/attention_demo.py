"""Routed attention against dense `scaled_dot_product_attention` on the CPU.

    python -m examples.attention_demo [--length 4096] [--heads 8] [--head-dim 64]

For each route fraction it checks that the routed rows match SDPA's rows and that the other rows
are zero, then times both on the same tensors and prints the speed-up.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import cram_ext


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.016, 0.1, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    shape = (1, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        sdpa_s = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)
    print(f"routed_attention vs scaled_dot_product_attention, fp32, CPU ({torch.get_num_threads()} threads), "
          f"batch 1, {args.heads} heads, L={args.length}, d={args.head_dim}")
    print(f"{'routed':>8} {'rows':>6} {'max |err|':>10} {'routed ms':>10} {'SDPA ms':>8} {'speed-up':>9}")
    for fraction in args.fractions:
        route = torch.rand(1, args.length, generator=gen) < fraction
        with torch.no_grad():
            def routed():
                return cram_ext.routed_attention(q, k, v, is_causal=True, route=route)
            out = routed()
            routed_s = median_seconds(routed, args.repeats)
        err = (out - dense)[:, :, route[0]].abs().max().item() if route.any() else 0.0
        if (out[:, :, ~route[0]] != 0).any():
            raise SystemExit("rows that were not routed must be exactly zero")
        print(f"{fraction:>8.1%} {int(route.sum()):>6} {err:>10.2e} {routed_s * 1e3:>10.2f} "
              f"{sdpa_s * 1e3:>8.2f} {sdpa_s / routed_s:>8.1f}x")


if __name__ == "__main__":
    main()
