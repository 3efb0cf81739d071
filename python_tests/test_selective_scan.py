"""cram_ext.selective_scan against cram_ext.reference.selective_scan_ref, on the CPU and, where
there is one, the CUDA device (the same cases; larger CUDA-only cases are in
test_cuda_kernels.py). Accuracy rule and input builders: cases.py."""
import pytest
import torch

import cram_ext
from cases import (ALL_DTYPES, DEVICES, LOW_PRECISION, assert_matches_reference, assert_scan_gradcheck,
                   assert_scan_ops_pass_opcheck, check_selective_scan, scan_inputs)
from cram_ext.reference import selective_scan_ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [1, 7, 128, 1000])
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "bare"])
def test_forward_matches_reference(seed, L, full, device):
    inputs = scan_inputs(seed, L=L, dim=20, groups=2 if full else None, full=full, device=device)
    check_selective_scan(seed, inputs, delta_softplus=full, backward=False)


SCAN_SHAPES = [  # (L, dim, N, groups); 600 steps cross two checkpoint chunks
    *[pytest.param(7, 20, 4, 2, dtype) for dtype in ALL_DTYPES],
    *[pytest.param(300, 18, 8, None, dtype) for dtype in ALL_DTYPES],
    *[pytest.param(600, 20, 4, 2, dtype) for dtype in (torch.float32, *LOW_PRECISION)],
    # 5 channel blocks per group: the CPU backward's work items (4 blocks) split each group
    pytest.param(300, 160, 4, 2, torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, dim, N, groups, dtype", SCAN_SHAPES)
def test_forward_and_gradients_match_reference(seed, dtype, L, dim, N, groups, device):
    inputs = scan_inputs(seed, L=L, dim=dim, N=N, groups=groups, dtype=dtype, device=device)
    check_selective_scan(seed, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False])
def test_gradcheck_float64(seed, full, device):
    inputs = scan_inputs(seed, batch=2, dim=5, L=9, N=3, dtype=torch.float64, full=full,
                         device=device)
    assert_scan_gradcheck(seed, inputs, delta_softplus=full)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_across_checkpoints(seed, device):
    """Two full checkpoint chunks and a partial third: the backward restarts from saved
    states."""
    inputs = scan_inputs(seed, batch=1, dim=1, L=2 * cram_ext.ops.SCAN_CHUNK_SIZE + 3, N=2,
                         groups=1, dtype=torch.float64, device=device)
    assert_scan_gradcheck(seed, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(seed, device):
    inputs = scan_inputs(seed, L=40, dim=16, groups=1, device=device)
    # Channel-major storage (L not the fastest dimension) and sliced views with gaps.
    strided = dict(inputs)
    strided["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["delta"] = torch.cat([inputs["delta"], inputs["delta"]], dim=1)[:, ::2]
    strided["z"] = torch.cat([inputs["z"], inputs["z"]], dim=2)[:, :, ::2]
    strided["B"] = inputs["B"][:1].expand(2, 1, 4, 40)  # zero batch stride
    assert not strided["u"].is_contiguous() and not strided["z"].is_contiguous()
    assert strided["B"].stride(0) == 0
    check_selective_scan(seed, strided)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_reference(seed, device):
    inputs = scan_inputs(seed, L=20, dim=4, device=device)
    inputs["u"][0, 1, 5] = float("nan")
    out = check_selective_scan(seed, inputs, backward=False)
    assert out[0, 1, 5:].isnan().all() and not out[0, 1, :5].isnan().any()
    assert not out[1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [7, 300])
def test_an_infinite_decay_keeps_the_references_finite_results(seed, L, device):
    """A = -inf (A = -exp(A_log) once A_log passes about 88.7) forgets that state entry at every
    step: output, last state and gradients are finite where the reference's are (on CUDA the
    steps past L must be identity maps, not exp(0 · A))."""
    inputs = scan_inputs(seed, dim=4, L=L, device=device)
    inputs["A"][0, 0] = -float("inf")
    check_selective_scan(seed, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_an_infinite_input_reaches_the_shared_gradients_as_in_the_reference(seed, device):
    """u = inf in one channel of a group whose channel count leaves CUDA warps spare: dB and dC,
    summed over the group's channels, get that channel's infinities as in the reference, not NaN
    from a spare warp's 0 · inf. (The per-step gradients of delta and dt_scale at that step are
    NaN here where the reference's are ±inf: not compared.)"""
    inputs = scan_inputs(seed, dim=5, L=7, groups=1, device=device)
    inputs["u"][0, 0, 3] = float("inf")
    grads = {}
    for name, dtype, fn in [("reference", torch.float64, selective_scan_ref),
                            ("same_dtype", None, selective_scan_ref),
                            ("kernel", None, cram_ext.selective_scan)]:
        leaves = {n: t.detach().to(dtype or t.dtype).requires_grad_(n in ("B", "C"))
                  for n, t in inputs.items()}
        out = fn(**leaves, delta_softplus=True)
        grads[name] = torch.autograd.grad(out, [leaves["B"], leaves["C"]], torch.ones_like(out))
    assert grads["reference"][0].isinf().any(), "the case must put infinities into dB"
    for i, what in enumerate(("dB", "dC")):
        assert_matches_reference(grads["kernel"][i], grads["reference"][i], grads["same_dtype"][i],
                                 what=what, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_inputs_without_d_and_with_a_very_negative_gate(device):
    """Without D the output adds no 0 · u (an infinite u gives ±inf, not NaN); a gate z of -1e38
    gives silu(z) = 0 and finite gradients (dout · z alone would overflow), as in the reference."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, 4, generator=g)
    u[0, 0, 0] = float("inf")
    delta = (0.1 + torch.rand(1, 1, 4, generator=g))
    A, B, C = -torch.ones(1, 1), torch.ones(1, 1, 4), torch.ones(1, 1, 4)
    inputs = [t.to(device) for t in (u, delta, A, B, C)]
    out = cram_ext.selective_scan(*inputs)
    expected = selective_scan_ref(*[t.double() for t in inputs])
    assert torch.equal(out.isinf(), expected.isinf()) and not out.isnan().any()
    u = torch.randn(1, 1, 4, generator=g).to(device)
    z = torch.randn(1, 1, 4, generator=g).to(device)
    z[0, 0, 2] = -1e38
    B, C = (torch.randn(1, 1, 4, generator=g).to(device) for _ in range(2))
    grads = []
    for dtype, fn in ((None, cram_ext.selective_scan), (torch.float64, selective_scan_ref)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_()
                  for t in (u, delta.to(device), A, B, C, z)]
        out = fn(*leaves[:5], z=leaves[5])
        grads.append(torch.autograd.grad(out, leaves[0], torch.full_like(out, 4.0))[0])
    assert grads[0].isfinite().all()
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_positional_call(seed, device):
    """Mamba's argument order: (u, delta, A, B, C, D, z, delta_bias, delta_softplus)."""
    i = scan_inputs(seed, L=16, dim=8, device=device)
    positional = [i[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = cram_ext.selective_scan(*positional, True)
    ref = selective_scan_ref(*[t.double() for t in positional], True)
    assert_matches_reference(out, ref, selective_scan_ref(*positional, True), what="out", seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence(device):
    inputs = scan_inputs(0, L=0, dim=4, device=device)
    out, last = cram_ext.selective_scan(**inputs, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 4, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "bare"])
def test_opcheck(seed, full, device):
    """Every op the public call dispatches, forward and backward, with the arguments it passes;
    260 steps cross a checkpoint chunk."""
    inputs = scan_inputs(seed, batch=2, dim=2, L=260, N=3, groups=2, full=full, device=device)
    assert_scan_ops_pass_opcheck(inputs, delta_softplus=full)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(seed, device):
    inputs = scan_inputs(seed, L=24, dim=8, groups=2, device=device)
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}

    def layer(u, delta, A, B, C, D, z, delta_bias, dt_scale):
        y = cram_ext.selective_scan(u.tanh(), delta, A, B, C, D, z, delta_bias, True, dt_scale)
        return (y * y).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(**leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    eager_loss = layer(**leaves)
    eager_grads = torch.autograd.grad(eager_loss, list(leaves.values()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


ERROR_CASES = {
    "u_ndim": (lambda i: i.update(u=i["u"][0]), r"u must have shape \(batch, dim, L\)"),
    "u_int": (lambda i: i.update(u=i["u"].long(), delta=i["delta"].long(), B=i["B"].long(),
                                 C=i["C"].long()), "u must be float32, float64, float16 or bfloat16"),
    "delta_shape": (lambda i: i.update(delta=i["delta"][:, :, :-1]), "delta must have shape"),
    "delta_dtype": (lambda i: i.update(delta=i["delta"].double()), "delta must be Float"),
    "A_shape": (lambda i: i.update(A=i["A"][:-1]), r"A must have shape \(dim, N\)"),
    "A_dtype": (lambda i: i.update(A=i["A"].half()), "A must be Float"),
    "A_complex": (lambda i: i.update(A=torch.complex(i["A"], i["A"])), "A must be real"),
    "B_ndim": (lambda i: i.update(B=i["B"][0]), r"B must have shape \(batch, N, L\)"),
    "B_shape": (lambda i: i.update(B=i["B"][:, None, :, :-1], C=i["C"][:, None]),
                r"B must have shape \(batch, groups, N, L\)"),
    "C_ndim": (lambda i: i.update(C=i["C"][None]), "C must have the same number of dimensions"),
    "groups": (lambda i: i.update(B=torch.randn(2, 4, 4, 33), C=torch.randn(2, 4, 4, 33)),
               r"groups in B \(4\) must divide dim \(6\)"),
    "D_shape": (lambda i: i.update(D=i["D"][:-1]), r"D must have shape \(dim,\)"),
    "z_shape": (lambda i: i.update(z=i["z"][:1]), "z must have shape"),
    "z_dtype": (lambda i: i.update(z=i["z"].half()), "z must be Float"),
    "bias_dtype": (lambda i: i.update(delta_bias=i["delta_bias"].double()), "delta_bias must be Float"),
    "dt_scale_shape": (lambda i: i.update(dt_scale=i["dt_scale"].T), r"dt_scale must have shape \(batch, L\)"),
    "state_size": (lambda i: i.update(A=torch.randn(6, 300)), r"N = A.size\(1\) must be in \[1, 256\]"),
    # An expanded view: the check must come before anything touches 2^31 elements.
    "length_int32": (lambda i: i.update(u=torch.zeros(()).expand(2, 6, 2**31)),
                     "L = 2147483648 exceeds the kernels' 32-bit index range"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_errors(case):
    inputs = scan_inputs(0)  # batch 2, dim 6, L 33, N 4: the sizes the cases above assume
    mutate, message = ERROR_CASES[case]
    mutate(inputs)
    with pytest.raises(RuntimeError, match=message):
        cram_ext.selective_scan(**inputs, delta_softplus=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch_error():
    inputs = scan_inputs(0, device="cuda")
    inputs["A"] = inputs["A"].cpu()
    with pytest.raises(RuntimeError, match="A is on cpu but u is on cuda"):
        cram_ext.selective_scan(**inputs)
