"""cram_ext.selective_scan against cram_ext.reference.selective_scan_ref."""
import pytest
import torch

import cram_ext
from cram_ext.reference import selective_scan_ref

LOW_PRECISION = [torch.bfloat16, torch.float16]


def make_inputs(batch=2, dim=6, L=33, N=4, groups=None, dtype=torch.float32, full=True,
                device="cpu"):
    """Random scan inputs; `groups=None` gives the (batch, N, L) form of B and C."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)
    inputs = dict(
        u=torch.randn(batch, dim, L, device=device).to(dtype),
        # With `full` the tests apply softplus; without it delta must stay positive to be stable.
        delta=(0.5 * torch.randn(batch, dim, L, device=device) - 0.5 if full
               else 0.5 * torch.rand(batch, dim, L, device=device) + 0.01).to(dtype),
        A=-(0.1 + torch.rand(dim, N, device=device)).to(acc),
        B=torch.randn(bc_shape, device=device).to(dtype),
        C=torch.randn(bc_shape, device=device).to(dtype),
    )
    if full:
        inputs.update(
            D=torch.randn(dim, device=device).to(acc),
            z=torch.randn(batch, dim, L, device=device).to(dtype),
            delta_bias=(0.1 * torch.randn(dim, device=device)).to(acc),
            dt_scale=(0.2 + 2 * torch.rand(batch, L, device=device)).to(acc),
        )
    return inputs


def assert_close(actual, expected, seed, dtype, what="out"):
    tol = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} (relative to {scale:.3g}) > {tol} [seed {seed}]"


@pytest.mark.parametrize("L", [1, 7, 128, 1000])
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "bare"])
def test_forward_matches_reference(seed, L, full):
    inputs = make_inputs(L=L, dim=20, groups=2 if full else None, full=full)
    softplus = full
    out, last = cram_ext.selective_scan(**inputs, delta_softplus=softplus, return_last_state=True)
    ref, ref_last = selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == inputs["u"].dtype and last.dtype == torch.float32
    assert_close(out, ref, seed, torch.float32)
    assert_close(last, ref_last, seed, torch.float32, "last_state")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_forward(seed, dtype):
    inputs = make_inputs(L=300, dim=18, N=8, dtype=dtype)
    out = cram_ext.selective_scan(**inputs, delta_softplus=True)
    # Same (already rounded) inputs, computed in float32: only the output rounding differs.
    ref = selective_scan_ref(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == dtype
    assert_close(out, ref, seed, dtype)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION)
@pytest.mark.parametrize("L", [7, 600])
def test_gradients_match_reference(seed, dtype, L):
    inputs = make_inputs(L=L, dim=20, groups=2, dtype=dtype)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    out = cram_ext.selective_scan(**leaves, delta_softplus=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    ref_leaves = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    ref = selective_scan_ref(**ref_leaves, delta_softplus=True)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), grad_out.float())
    for name, g, rg in zip(leaves, grads, ref_grads):
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape
        assert_close(g, rg, seed, dtype if dtype == torch.float32 else torch.bfloat16, f"d{name}")


@pytest.mark.parametrize("full", [True, False])
def test_gradcheck_float64(seed, full):
    inputs = make_inputs(batch=2, dim=5, L=9, N=3, groups=None, dtype=torch.float64, full=full)
    names = list(inputs)

    def scan(*tensors):
        return cram_ext.selective_scan(**dict(zip(names, tensors)), delta_softplus=full)

    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(scan, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_across_checkpoints(seed):
    """Sequences longer than one checkpoint chunk: the backward restarts from saved states.
    Two full chunks and a partial third."""
    L = 2 * cram_ext.ops.SCAN_CHUNK_SIZE + 3
    inputs = make_inputs(batch=1, dim=3, L=L, N=2, groups=1, dtype=torch.float64)
    names = list(inputs)
    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(
        lambda *ts: cram_ext.selective_scan(**dict(zip(names, ts)), delta_softplus=True),
        tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_non_contiguous_inputs(seed):
    inputs = make_inputs(L=40, dim=16, groups=1)
    # Channel-major storage (L not the fastest dimension) and sliced views with gaps.
    strided = dict(inputs)
    strided["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["delta"] = torch.cat([inputs["delta"], inputs["delta"]], dim=1)[:, ::2]
    strided["z"] = torch.randn(2, 16, 80)[:, :, ::2]
    strided["B"] = inputs["B"].expand(2, 1, 4, 40)  # zero batch stride
    assert not strided["u"].is_contiguous() and not strided["z"].is_contiguous()
    ref_inputs = {k: v.contiguous() for k, v in strided.items()}
    out = cram_ext.selective_scan(**strided, delta_softplus=True)
    ref = selective_scan_ref(**ref_inputs, delta_softplus=True)
    assert_close(out, ref, seed, torch.float32)


def test_nan_propagates_like_reference(seed):
    inputs = make_inputs(L=20, dim=4)
    inputs["u"][0, 1, 5] = float("nan")
    out = cram_ext.selective_scan(**inputs, delta_softplus=True)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 1, 5:].isnan().all() and not out[0, 1, :5].isnan().any()
    assert not out[1].isnan().any()


def test_mamba_positional_call(seed):
    """Mamba's argument order: (u, delta, A, B, C, D, z, delta_bias, delta_softplus)."""
    i = make_inputs(L=16, dim=8)
    out = cram_ext.selective_scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"],
                                  i["delta_bias"], True)
    ref = selective_scan_ref(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"],
                             i["delta_bias"], True)
    assert_close(out, ref, seed, torch.float32)


def test_empty_sequence():
    inputs = make_inputs(L=0, dim=4)
    out, last = cram_ext.selective_scan(**inputs, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 4))


def test_opcheck(seed):
    # Longer than one checkpoint chunk, so chunk_states has several entries.
    L = cram_ext.ops.SCAN_CHUNK_SIZE + 10
    inputs = make_inputs(batch=1, dim=4, L=L, N=3, groups=1)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    i = inputs
    args = (i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"],
            i["dt_scale"], True)
    torch.library.opcheck(torch.ops.cram_ext.selective_scan_fwd.default, args)
    # Without softplus the raw delta is the step: positive inputs keep the state bounded.
    b = {k: v.requires_grad_() for k, v in make_inputs(batch=1, dim=4, L=L, N=3, full=False).items()}
    bare = (b["u"], b["delta"], b["A"], b["B"], b["C"], None, None, None, None, False)
    torch.library.opcheck(torch.ops.cram_ext.selective_scan_fwd.default, bare)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, states = torch.ops.cram_ext.selective_scan_fwd(*detached)
    assert states.shape[2] == 2
    bwd_args = (torch.randn_like(out), *detached[:9], states, True)
    torch.library.opcheck(torch.ops.cram_ext.selective_scan_bwd.default, bwd_args)


def test_torch_compile_fullgraph(seed):
    inputs = make_inputs(L=24, dim=8, groups=2)
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
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_errors(case):
    inputs = make_inputs(groups=None)
    mutate, message = ERROR_CASES[case]
    mutate(inputs)
    with pytest.raises(RuntimeError, match=message):
        cram_ext.selective_scan(**inputs, delta_softplus=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_error():
    inputs = make_inputs(device="cuda")
    inputs["A"] = inputs["A"].cpu()
    with pytest.raises(RuntimeError, match="A is on cpu but u is on cuda"):
        cram_ext.selective_scan(**inputs)
