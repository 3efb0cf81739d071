"""How much slower a short routed-attention call runs right after other heavy work than right
after itself: the gap between the "paired" and the other speed-ups in bench/results/cpu.md.

The 1.6% case of bench/test_bench_routed_attention_cpu.py (L = 4096, 8 heads, d = 64, fp32,
batch 1), timed in three consecutive calls after each kind of preceding work, fastest of
`--rounds` repetitions per call:

    python bench/cold_start_cpu.py [--rounds 9]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_tests"))
from cases import attention_inputs  # noqa: E402
from cram_ext import routed_attention  # noqa: E402

CALLS = 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    q, k, v, route, _ = attention_inputs(4096, batch=1, heads=8, Lq=4096, d=64, fraction=0.016)
    source = torch.empty(64 * 2**20)   # 256 MB: more than every cache
    target = torch.empty_like(source)
    routed = lambda: routed_attention(q, k, v, is_causal=True, route=route)  # noqa: E731
    preceding = {
        "itself": routed,
        "dense causal SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "a 256 MB copy": lambda: target.copy_(source),
        # The same, then the keys and values read once: how much of the cold start is theirs.
        "copy, K and V read": lambda: (target.copy_(source), k.sum(), v.sum()),
    }
    print(f"routed attention, 1.6% of L=4096 (ms, fastest of {args.rounds}), calls 1-{CALLS} after:")
    for name, work in preceding.items():
        best = [float("inf")] * CALLS
        for _ in range(args.rounds):
            work()
            for call in range(CALLS):
                start = time.perf_counter()
                routed()
                best[call] = min(best[call], time.perf_counter() - start)
        print(f"  {name:19s} " + "  ".join(f"{t * 1e3:.2f}" for t in best))


if __name__ == "__main__":
    main()
