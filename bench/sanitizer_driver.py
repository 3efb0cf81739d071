"""Calls every CUDA kernel of cram_ext once, forward and backward, on small inputs: the program
that bench/device_check.sh runs under `compute-sanitizer --tool memcheck` and `--tool racecheck`.

Sizes are chosen to reach every code path cheaply: partial scan chunks and spare warps
(channels per group not a multiple of 4), partial attention tiles and key blocks, GQA, a
key_mask, both attention kernels (bf16 head_dim 64/128 on tensor cores; head_dim 80 and float32
on the SIMT kernel) and a routed row that sees no key. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1
so that every tensor is its own allocation and memcheck sees accesses past its end.
"""
import torch

import cram_ext


def scan(dtype, L):
    batch, dim, N, groups = 2, 6, 5, 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, z = (torch.randn(batch, dim, L, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
    B, C = (torch.randn(batch, groups, N, L, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(2))
    A = (-(0.1 + torch.rand(dim, N, device="cuda", dtype=acc))).requires_grad_()
    D, bias = (torch.randn(dim, device="cuda", dtype=acc, requires_grad=True) for _ in range(2))
    dt_scale = (0.5 + torch.rand(batch, L, device="cuda", dtype=acc)).requires_grad_()
    out = cram_ext.selective_scan(u, delta, A, B, C, D, z, bias, True, dt_scale)
    out.backward(torch.randn_like(out))


def attention(dtype, head_dim, L, kv_heads=1):
    batch, heads = 2, 2
    q = torch.randn(batch, heads, L, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, L, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(2))
    route = torch.rand(batch, heads, L, device="cuda") < 0.5
    route[:, :, 0] = True
    key_mask = torch.rand(batch, L, device="cuda") < 0.8
    key_mask[:, 0] = False  # row 0 is routed and sees no key
    out = cram_ext.routed_attention(q, k, v, route, key_mask=key_mask)
    out.backward(torch.randn_like(out))


def main():
    torch.manual_seed(0)
    scan(torch.bfloat16, 300)
    scan(torch.float64, 7)
    attention(torch.bfloat16, 64, 130)
    attention(torch.float16, 128, 70, kv_heads=2)
    attention(torch.bfloat16, 80, 40)
    attention(torch.float32, 64, 33)
    torch.cuda.synchronize()
    print("sanitizer driver: all kernels ran")


if __name__ == "__main__":
    main()
