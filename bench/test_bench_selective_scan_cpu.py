"""CPU benchmark: selective_scan forward (and forward + backward) against the reference, and its
achieved memory traffic beside this machine's copy bandwidth measured in the same run.

    pytest bench/test_bench_selective_scan_cpu.py --benchmark-json=bench/results/cpu_scan.json
"""
import time

import pytest
import torch

import cram_ext
from cram_ext.reference import selective_scan_ref
from cases import scan_inputs

BATCH, DIM, L, N = 2, 768, 2048, 16  # a Mamba-130M-sized layer


def mamba_layer_inputs(dtype):
    return scan_inputs(0, batch=BATCH, dim=DIM, L=L, N=N, dtype=dtype)


def scan_bytes(inputs):
    """Bytes the scan must move at least: every input read once and the output written once."""
    return sum(t.numel() * t.element_size() for t in inputs.values()) + inputs["u"].numel() * inputs["u"].element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_selective_scan_forward(benchmark, dtype):
    inputs = mamba_layer_inputs(dtype)
    benchmark.group = "selective_scan"
    benchmark.extra_info.update(kernel="selective_scan", dtype=str(dtype), bytes=scan_bytes(inputs),
                                shape=f"batch={BATCH} dim={DIM} L={L} N={N}")
    with torch.no_grad():
        benchmark(lambda: cram_ext.selective_scan(**inputs, delta_softplus=True))


def test_selective_scan_forward_backward(benchmark):
    """Forward and backward (gradients of every input), fp32: the target is <= 4x the forward."""
    inputs = {k: v.requires_grad_() for k, v in mamba_layer_inputs(torch.float32).items()}
    grad_out = torch.randn(BATCH, DIM, L, generator=torch.Generator().manual_seed(1))
    benchmark.group = "selective_scan"
    benchmark.extra_info.update(kernel="selective_scan_fwd_bwd", dtype=str(torch.float32),
                                bytes=scan_bytes(inputs), shape=f"batch={BATCH} dim={DIM} L={L} N={N}")

    def forward_backward():
        out = cram_ext.selective_scan(**inputs, delta_softplus=True)
        return torch.autograd.grad(out, list(inputs.values()), grad_out)

    benchmark(forward_backward)
    # On a shared machine the load changes between benchmarks: the ratio to the forward is also
    # measured with the two alternating, fastest of each.
    def forward():
        with torch.no_grad():
            return cram_ext.selective_scan(**inputs, delta_softplus=True)

    benchmark.extra_info["paired_ratio"] = paired_ratio(forward_backward, forward)


def paired_ratio(fn, baseline, pairs=7, warm=False):
    """min time of fn / min time of baseline, the two called alternately. With `warm`, each timed
    call follows an untimed call of the same function, so neither is timed right after the other
    (a call of a few ms timed right after one of 100 ms can run 20% slower than timed after
    itself: bench/cold_start_cpu.py)."""
    times = {fn: [], baseline: []}
    for _ in range(pairs):
        for f in (fn, baseline):
            if warm:
                f()
            start = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - start)
    return min(times[fn]) / min(times[baseline])


def test_selective_scan_reference(benchmark):
    inputs = mamba_layer_inputs(torch.float32)
    benchmark.group = "selective_scan"
    benchmark.extra_info.update(kernel="selective_scan_ref", dtype=str(torch.float32), bytes=scan_bytes(inputs),
                                shape=f"batch={BATCH} dim={DIM} L={L} N={N}")
    with torch.no_grad():
        benchmark.pedantic(lambda: selective_scan_ref(**inputs, delta_softplus=True), rounds=3, iterations=1)


def test_copy_bandwidth(benchmark):
    """Copy of a buffer far larger than the caches: bytes read + written per second."""
    src = torch.randn(64 * 2**20 // 4 * 4)  # 256 MiB
    dst = torch.empty_like(src)
    benchmark.group = "selective_scan"
    benchmark.extra_info.update(kernel="copy", bytes=2 * src.numel() * src.element_size())
    benchmark(lambda: dst.copy_(src))
