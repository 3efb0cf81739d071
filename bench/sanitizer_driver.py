"""Calls every CUDA kernel of cram_ext once, forward and backward, on small inputs: the program
that bench/device_check.sh runs under `compute-sanitizer --tool memcheck` and `--tool racecheck`.

    python bench/sanitizer_driver.py [--device cpu]

Sizes are chosen to reach every code path cheaply: partial scan chunks and spare warps
(channels per group not a multiple of 4), partial attention tiles and key blocks, GQA, a
key_mask, both attention kernels (bf16 head_dim 64/128 on tensor cores; head_dim 80 and float32
on the SIMT kernel) and a routed row that sees no key; the streaming ops (a scan from an initial
state, one state update, cache attention with GQA and a key_mask) and the fused layer forward
(every path taken) with its backward. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1
so that every tensor is its own allocation and memcheck sees accesses past its end.
`--device cpu` runs the same calls on the CPU kernels: the dry run's proof that the driver starts.
"""
import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "python_tests"))
import cram_ext  # noqa: E402
from cases import (attention_inputs, cram_forward_inputs, initial_state,  # noqa: E402
                   kvcache_inputs, position, scan_inputs)


def scan(device, dtype, L):
    inputs = scan_inputs(0, batch=2, dim=6, L=L, N=5, groups=2, dtype=dtype, device=device)
    leaves = {name: t.requires_grad_() for name, t in inputs.items()}
    out = cram_ext.selective_scan(**leaves, delta_softplus=True)
    out.backward(torch.randn_like(out))


def attention(device, dtype, head_dim, L, kv_heads=1):
    q, k, v, route, key_mask = attention_inputs(0, batch=2, heads=2, kv_heads=kv_heads, Lq=L,
                                                d=head_dim, dtype=dtype, fraction=0.5,
                                                per_head_route=True, key_mask=True, device=device)
    route[:, :, 0] = True
    key_mask[:, 0] = False  # row 0 is routed and sees no key
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = cram_ext.routed_attention(*leaves, route=route, is_causal=True, key_mask=key_mask)
    out.backward(torch.randn_like(out))


def streaming(device, dtype):
    inputs = scan_inputs(0, batch=2, dim=6, L=300, N=5, groups=2, dtype=dtype, device=device)
    h0 = initial_state(0, inputs)
    leaves = {name: t.requires_grad_() for name, t in {**inputs, "initial_state": h0}.items()}
    out = cram_ext.selective_scan(**leaves, delta_softplus=True)
    out.backward(torch.randn_like(out))
    step = {name: t.detach() for name, t in position(inputs, 0).items()}
    cram_ext.selective_state_update(h0.clone(), **step, dt_softplus=True)
    q, k_cache, v_cache, k, v, lengths, route, key_mask = kvcache_inputs(
        0, d=64, dtype=dtype, device=device, key_mask=True)
    cram_ext.routed_attention_with_kvcache(q, k_cache, v_cache, k, v, lengths, route=route,
                                           key_mask=key_mask)


def fused_layer(device):
    args, kwargs = cram_forward_inputs(0, L=40, device=device)
    leaves = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in args]
    result = cram_ext.cram_forward(*leaves, **kwargs)
    result.out.backward(torch.randn_like(result.out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args().device
    scan(device, torch.bfloat16, 300)
    scan(device, torch.float64, 7)
    attention(device, torch.bfloat16, 64, 130)
    attention(device, torch.float16, 128, 70, kv_heads=2)
    attention(device, torch.bfloat16, 80, 40)
    attention(device, torch.float32, 64, 33)
    streaming(device, torch.bfloat16)
    fused_layer(device)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer driver: all kernels ran on {device} ({cram_ext.__file__})")


if __name__ == "__main__":
    main()
