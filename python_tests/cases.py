"""Inputs of the CPU tests, the CUDA tests, the benchmarks and the sanitizer driver, and the one
accuracy rule they are all held to.

Accuracy (FlashAttention's rule): a kernel's error against the float64 reference may be at most
`factor` times the error of the same reference computation done in the inputs' own dtype, plus
a small floor. For float64 inputs the two references coincide and only the floor remains; for
16-bit inputs the reference accumulates in float32 and rounds its result, which is what an exact
kernel in that dtype can do at best. Errors are normwise (‖actual − reference‖ / ‖reference‖):
an element a kernel gets wrong shows in the norm, and the ratio of two normwise errors does not
swing from run to run the way a ratio of largest elementwise errors does. Exact properties
(unrouted rows are 0, NaN positions, dtypes) are asserted separately, exactly.

Inputs come from a torch.Generator seeded with the test's seed (see conftest.py), made on the
device they are used on.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cram_ext import routed_attention, selective_scan
from cram_ext.models.router import Path
from cram_ext.reference import routed_attention_ref, selective_scan_ref

LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]
# Normwise error every kernel may have on top of factor x the same-dtype reference's error, by
# accumulation dtype: float64 kernels run the same formula in another order (1e-15 measured);
# float32 kernels use a polynomial or fast-math exp and their own summation order (CPU: at most
# 5e-7 measured, the float32 reference 4e-7), so the floor leaves room for long CUDA reductions.
FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5}
# The backward recomputes P and rounds more intermediates than the reference's single final
# rounding: CPU dq reached 2.6x the same-dtype error in 40 seeds of 7-row cases (median 1.4x).
FORWARD_FACTOR, BACKWARD_FACTOR = 2.0, 4.0


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The accuracy rule
# ---------------------------------------------------------------------------------------------

def relative_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ over the finite entries of `expected`, in float64. A
    reference that is exactly zero (dq when every routed row sees a single key) is compared by
    the largest absolute error instead."""
    finite = expected.isfinite()
    diff = actual.double()[finite] - expected.double()[finite]
    norm = expected.double()[finite].norm()
    if norm == 0:
        return diff.abs().max().item() if diff.numel() else 0.0
    return (diff.norm() / norm).item()


def assert_matches_reference(actual, reference, same_dtype, *, what, seed, factor=FORWARD_FACTOR):
    """`actual` (a kernel's result) against `reference` (the float64 reference) with the rule
    above; `same_dtype` is the reference computed from the same inputs in their own dtype.

    Non-finite reference entries (NaN/Inf inputs) must be reproduced exactly; an entry the kernel
    leaves NaN where the reference is finite fails.
    """
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} [seed {seed}]"
    finite = reference.isfinite()
    a, e = actual[~finite].double(), reference[~finite].double()
    assert ((a == e) | (a.isnan() & e.isnan())).all(), \
        f"{what}: non-finite entries differ from the reference [seed {seed}]"
    assert actual[finite].isfinite().all(), \
        f"{what}: NaN/Inf where the reference is finite (an element left unwritten?) [seed {seed}]"
    err = relative_error(actual, reference)
    base_err = relative_error(same_dtype, reference)
    tol = factor * base_err + FLOOR[accumulation_dtype(actual.dtype)]
    assert err <= tol, (f"{what} ({actual.dtype}, {actual.device.type}): error {err:.3g} > "
                        f"{factor:g} x {base_err:.3g} (same-dtype reference) + floor [seed {seed}]")


# ---------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------

def generator(seed, device):
    return torch.Generator(device=device).manual_seed(seed)


def random_route(g, shape, fraction, device="cpu"):
    """Bool route of `shape` (..., L) with exactly round(fraction · L) rows routed per leading
    index, at uniformly random positions."""
    L = shape[-1]
    ranks = torch.rand(shape, generator=g, device=device).argsort(-1).argsort(-1)
    return ranks < round(fraction * L)


def attention_inputs(seed, *, batch=2, heads=2, kv_heads=None, Lq=16, Lk=None, d=16,
                     dtype=torch.float32, fraction=0.5, per_head_route=False, key_mask=False,
                     key_share=0.8, layout="bhld", device="cpu"):
    """Random q, k, v (standard normal), route and optional key_mask (a share `key_share` of the
    keys present).

    layout: "bhld" dense (batch, heads, L, d); "blhd" a (batch, L, heads, d) buffer seen through
    a transpose, as projections produce it; "unaligned" rows that start 2 bytes past a 16-byte
    boundary (a slice of a d + 1 wide buffer), which the CUDA tensor-core path cannot load.
    """
    g = generator(seed, device)
    kv_heads = kv_heads or heads
    Lk = Lq if Lk is None else Lk

    def tensor(h, L):
        if layout == "blhd":
            return randn(g, (batch, L, h, d), dtype, device).transpose(1, 2)
        if layout == "unaligned":
            return randn(g, (batch, h, L, d + 1), dtype, device)[..., 1:]
        return randn(g, (batch, h, L, d), dtype, device)

    q, k, v = tensor(heads, Lq), tensor(kv_heads, Lk), tensor(kv_heads, Lk)
    route = random_route(g, (batch, heads, Lq) if per_head_route else (batch, Lq), fraction, device)
    mask = torch.rand(batch, Lk, generator=g, device=device) < key_share if key_mask else None
    return q, k, v, route, mask


def random_attn_mask(seed, shape, kind, device="cpu"):
    """SDPA's attn_mask of `shape`: "bool" (True, 70% of entries, takes part) or "float"
    (additive float32, 0.5 · standard normal, -inf at 20% of entries)."""
    g = generator(seed + 2, device)
    keep = torch.rand(shape, generator=g, device=device) < (0.7 if kind == "bool" else 0.8)
    if kind == "bool":
        return keep
    return (0.5 * torch.randn(shape, generator=g, device=device)).masked_fill(~keep, float("-inf"))


def routed_rows(route, shape):
    """`route`, (*batch, L) or (*batch, heads, L), expanded to an output's (*batch, heads, L)."""
    return (route.unsqueeze(-2) if route.dim() == len(shape) - 1 else route).expand(shape)


def scan_inputs(seed, *, batch=2, dim=6, L=33, N=4, groups=None, dtype=torch.float32, full=True,
                noncontiguous=False, device="cpu"):
    """Random selective-scan inputs; `groups=None` gives B and C the (batch, N, L) form. With
    `full`, every optional input (D, z, delta_bias, dt_scale) is given and the caller applies
    softplus; without it delta is the step itself and stays positive so the scan is stable.
    `noncontiguous`: u, B, C and z are channel slices of wider buffers (batch and channel strides
    that are not dense)."""
    g = generator(seed, device)
    acc = accumulation_dtype(dtype)
    bc_shape = (batch, N, L) if groups is None else (batch, groups, N, L)

    def sequence(shape):
        if not noncontiguous:
            return randn(g, shape, dtype, device)
        return randn(g, (shape[0], shape[1] + 3, *shape[2:]), dtype, device)[:, 2:2 + shape[1]]

    uniform = lambda *shape: torch.rand(shape, generator=g, device=device, dtype=acc)  # noqa: E731
    inputs = dict(
        u=sequence((batch, dim, L)),
        delta=(0.5 * randn(g, (batch, dim, L), acc, device) - 0.5 if full
               else 0.5 * uniform(batch, dim, L) + 0.01).to(dtype),
        A=-(0.1 + uniform(dim, N)),
        B=sequence(bc_shape),
        C=sequence(bc_shape),
    )
    if full:
        inputs.update(D=randn(g, (dim,), acc, device), z=sequence((batch, dim, L)),
                      delta_bias=0.1 * randn(g, (dim,), acc, device),
                      dt_scale=0.2 + 2 * uniform(batch, L))
    return inputs


def initial_state(seed, inputs):
    """A random scan state (batch, dim, N) for scan_inputs' `inputs`, in the accumulation type."""
    u, A = inputs["u"], inputs["A"]
    g = generator(seed + 7, u.device.type)
    return torch.randn(u.shape[0], u.shape[1], A.shape[1], generator=g, device=u.device,
                       dtype=accumulation_dtype(u.dtype))

def position(inputs, t):
    """selective_state_update's arguments for position t of selective_scan's inputs."""
    step = dict(x=inputs["u"][..., t], dt=inputs["delta"][..., t], A=inputs["A"],
                B=inputs["B"][..., t], C=inputs["C"][..., t])
    if "D" in inputs:
        step.update(D=inputs["D"], z=inputs["z"][..., t], dt_bias=inputs["delta_bias"],
                    dt_scale=inputs["dt_scale"][:, t])
    return step

def kvcache_inputs(seed, *, batch=3, heads=4, kv_heads=2, n_new=3, capacity=40, d=16,
                   dtype=torch.float32, device="cpu", key_mask=False):
    """A cache of `capacity` slots holding 5 + 7b random entries in batch b (the rest NaN:
    a kernel that reads a slot past the entries shows it), n_new new rows and entries."""
    g = generator(seed, device)
    k_cache = randn(g, (batch, kv_heads, capacity, d), dtype, device)
    v_cache = randn(g, (batch, kv_heads, capacity, d), dtype, device)
    lengths = torch.tensor([5 + 7 * b for b in range(batch)], dtype=torch.int32, device=device)
    unused = torch.arange(capacity, device=device) >= lengths[:, None].long()
    k_cache[unused[:, None].expand_as(k_cache[..., 0])] = float("nan")
    v_cache[unused[:, None].expand_as(v_cache[..., 0])] = float("nan")
    q = randn(g, (batch, heads, n_new, d), dtype, device)
    k = randn(g, (batch, kv_heads, n_new, d), dtype, device)
    v = randn(g, (batch, kv_heads, n_new, d), dtype, device)
    route = random_route(g, (batch, n_new), 0.67, device)
    mask = torch.rand(batch, capacity, generator=g, device=device) < 0.7 if key_mask else None
    return q, k_cache, v_cache, k, v, lengths, route, mask


def randn(g, shape, dtype, device):
    """Standard normal in `dtype`, drawn in its accumulation dtype and rounded."""
    return torch.randn(shape, generator=g, device=device, dtype=accumulation_dtype(dtype)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Kernel against reference, forward and backward
# ---------------------------------------------------------------------------------------------

def fill_free_cuda_memory_with_nan(nbytes=256 << 20, small_blocks=64):
    """The caching allocator hands out these NaN-filled blocks next, so an output element a
    kernel forgets to write reads as NaN. Its cached blocks are released first (else a block
    the reference just freed, holding numbers, can serve the output), and both of its pools are
    filled: allocations of at most 1 MB come from a small-block pool the large block never
    feeds."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    large = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))
    small = [torch.empty((1 << 20) // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))
             for _ in range(small_blocks)]
    del large, small


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def check_routed_attention(seed, q, k, v, route, key_mask=None, *, attn_mask=None, is_causal=False,
                           scale=None, backward=True):
    """routed_attention's output (and dq, dk, dv) against the float64 reference, by the rule.
    Also exact: unrouted rows are 0 and get dq = 0; with no routed row every gradient is 0.
    The cases' grouped-query shapes are passed with enable_gqa, as SDPA needs them.
    Returns the kernel's output."""
    if scale is None and q.dtype == torch.float64:
        # The kernels receive the scale as a float32; give the float64 reference that same value.
        scale = torch.tensor(1 / math.sqrt(q.shape[-1]), dtype=torch.float32).item()
    kwargs = dict(is_causal=is_causal, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3],
                  route=route, key_mask=key_mask)
    grad_out = randn(generator(seed + 1, q.device.type), q.shape, q.dtype, q.device.type)
    results = {}
    for name, dtype, fn in [("reference", torch.float64, routed_attention_ref),
                            ("same_dtype", None, routed_attention_ref),
                            ("kernel", None, routed_attention)]:
        if name == "same_dtype" and q.dtype == torch.float64:
            results[name] = results["reference"]
            continue
        leaves = _leaves((q, k, v), dtype)
        # A float mask goes with its query's dtype into the float64 reference.
        mask = attn_mask.to(dtype) if dtype and attn_mask is not None and \
            attn_mask.is_floating_point() else attn_mask
        if name == "kernel" and q.is_cuda:
            fill_free_cuda_memory_with_nan()
        out = fn(*leaves, mask, **kwargs)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype)) if backward else ()
        results[name] = (out.detach(), grads)
    out, grads = results["kernel"]
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads), f"dtypes [seed {seed}]"
    routed = routed_rows(route, q.shape[:-1])
    assert (out[~routed] == 0).all(), f"rows not routed must be exactly 0 [seed {seed}]"
    assert_matches_reference(out, results["reference"][0], results["same_dtype"][0], what="out",
                             seed=seed)
    if backward:
        assert (grads[0][~routed] == 0).all(), f"dq of rows not routed must be 0 [seed {seed}]"
        if not routed.any():
            assert all((g == 0).all() for g in grads), f"no routed row: zero gradients [seed {seed}]"
        for name, g, g_ref, g_same in zip("qkv", grads, results["reference"][1],
                                          results["same_dtype"][1]):
            assert_matches_reference(g, g_ref, g_same, what=f"d{name}", seed=seed,
                                     factor=BACKWARD_FACTOR)
    return out


# The CUDA backwards sum some gradients across thread blocks with atomics (the scan's dB and
# dC, attention's dQ), so two backward passes may differ in the last bits; gradcheck demands
# identical Jacobians unless told how far they may drift.
CUDA_ATOMICS_NONDET_TOL = 1e-10


def assert_gradcheck(seed, fn, inputs, **tolerances):
    """torch.autograd.gradcheck of fn at float64 `inputs`, allowing the CUDA backwards' atomics."""
    nondet_tol = CUDA_ATOMICS_NONDET_TOL if any(t.is_cuda for t in inputs) else 0.0
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=nondet_tol, **tolerances), f"seed={seed}"


def assert_scan_gradcheck(seed, inputs, *, delta_softplus=True):
    """float64 gradcheck of selective_scan in every input of `inputs` (scan_inputs' keywords)."""
    names = list(inputs)
    tensors = [t.requires_grad_() for t in inputs.values()]
    assert_gradcheck(seed, lambda *ts: selective_scan(**dict(zip(names, ts)), delta_softplus=delta_softplus),
                     tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def assert_scan_ops_pass_opcheck(inputs, *, delta_softplus=True):
    """selective_scan's forward and backward ops, as one forward + backward calls them, pass
    torch.library.opcheck (schema, fake tensor, autograd registration)."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def forward_and_backward():
        out = selective_scan(**leaves, delta_softplus=delta_softplus)
        out.backward(torch.ones_like(out))

    calls = cram_ops_called(forward_and_backward)
    assert [op.name() for op, _, _ in calls] == ["cram_ext::selective_scan_fwd",
                                                "cram_ext::selective_scan_bwd"]
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


def check_selective_scan(seed, inputs, *, delta_softplus=True, backward=True):
    """selective_scan's output, last state (and every input's gradient) against the float64
    reference, by the rule; outputs and gradients keep their inputs' dtypes and shapes."""
    names = list(inputs)
    grad_out = randn(generator(seed + 1, inputs["u"].device.type), inputs["u"].shape,
                     inputs["u"].dtype, inputs["u"].device.type)
    results = {}
    for name, dtype, fn in [("reference", torch.float64, selective_scan_ref),
                            ("same_dtype", None, selective_scan_ref),
                            ("kernel", None, selective_scan)]:
        if name == "same_dtype" and inputs["u"].dtype == torch.float64:
            results[name] = results["reference"]
            continue
        leaves = dict(zip(names, _leaves(inputs.values(), dtype)))
        if name == "kernel" and inputs["u"].is_cuda:
            fill_free_cuda_memory_with_nan()
        out, last = fn(**leaves, delta_softplus=delta_softplus, return_last_state=True)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype)) \
            if backward else ()
        results[name] = (out.detach(), last.detach(), grads)
    out, last, grads = results["kernel"]
    assert out.dtype == inputs["u"].dtype and last.dtype == accumulation_dtype(out.dtype)
    ref, ref_last, ref_grads = results["reference"]
    same, same_last, same_grads = results["same_dtype"]
    assert_matches_reference(out, ref, same, what="out", seed=seed)
    assert_matches_reference(last, ref_last, same_last, what="last_state", seed=seed)
    for name, g, g_ref, g_same in zip(names, grads, ref_grads, same_grads):
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, f"d{name}"
        assert_matches_reference(g, g_ref, g_same, what=f"d{name}", seed=seed,
                                 factor=BACKWARD_FACTOR)
    return out


class _RecordCramOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "cram_ext":
            if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "Autograd"):
                # A backward kernel: autograd never differentiates it, so neither does opcheck.
                args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def cram_ops_called(fn):
    """Runs fn() and returns the cram_ext ops it dispatched as (OpOverload, args, kwargs), so a
    test can `torch.library.opcheck` each op with the arguments the public API really passes."""
    with _RecordCramOps() as recorder:
        fn()
    return recorder.calls


# ---------------------------------------------------------------------------------------------
# Fused CRAM forward
# ---------------------------------------------------------------------------------------------

# The differentiable tensors of `cram_forward`, by position in `cram_forward_inputs`' args.
# Prices that put every token of the fused ops on one path, with that path (None: none attends).
ONE_PATH_PRICES = [(dict(episodic_price=1e6), None),
                   (dict(episodic_price=-1e6), Path.EPISODIC),
                   (dict(episodic_price=1e6, semantic_reward=1e6), Path.SEMANTIC)]


CRAM_FORWARD_WEIGHTS = ("x", None, "in_proj_weight", "x_proj_weight", "dt_proj_weight", "A", "D",
                        "dt_bias", "out_proj_weight", None, None, None, None, "qkv_weight",
                        "attn_out_weight", "semantic_down_weight", "semantic_down_bias",
                        "semantic_up_weight", "semantic_up_bias")


def cram_forward_inputs(seed, *, batch=2, L=12, d=16, n_heads=2, kv_heads=None, d_state=4,
                        expand=2, semantic=True, key_mask=True, key_share=0.8, dtype=torch.float32,
                        device="cpu"):
    """Random inputs of `cram_forward`: (args, kwargs). Weights are scaled like a trained layer's
    (unit-variance activations) and the router's so that every path is taken by some tokens
    (prices 0.1 and 0.05, q̂ uniform in (0, 1)); a share `key_share` of the tokens are keys, the
    first always."""
    g = generator(seed, device)
    acc = accumulation_dtype(dtype)
    kv_heads = kv_heads or n_heads
    d_inner, dt_rank, rank = expand * d, max(1, d // 16), max(1, d // 8)
    kv_dim = kv_heads * (d // n_heads)
    paths = 3 if semantic else 2

    def weight(*shape, std=None, dtype=dtype):
        scale = std if std is not None else 1.0 / math.sqrt(shape[-1])
        return (scale * randn(g, shape, accumulation_dtype(dtype), device)).to(dtype)

    uniform = lambda *shape: torch.rand(shape, generator=g, device=device, dtype=acc)  # noqa: E731
    args = [randn(g, (batch, L, d), dtype, device), (3 * uniform(batch, L)).to(dtype),
            weight(2 * d_inner, d), weight(dt_rank + 2 * d_state, d_inner),
            weight(d_inner, dt_rank), -(0.5 + uniform(d_inner, d_state)),
            randn(g, (d_inner,), acc, device), -2.0 + 0.5 * randn(g, (d_inner,), acc, device),
            weight(d, d_inner), weight(d, d + 3), weight(d, std=0.1), weight(paths, d, std=0.5),
            weight(paths, std=0.1), weight(d + 2 * kv_dim, d), weight(d, d)]
    if semantic:
        args += [weight(rank, d), weight(rank, std=0.1), weight(d, rank), weight(d, std=0.1)]
    else:
        args += [None] * 4
    mask = None
    if key_mask:
        mask = torch.rand(batch, L, generator=g, device=device) < key_share
        mask[:, 0] = True
    kwargs = dict(n_heads=n_heads, episodic_price=0.1, semantic_reward=0.05 if semantic else 0.0,
                  q_hat=uniform(batch, L).to(dtype), key_mask=mask, forced_path=None)
    # The router's bias centres each path's score on its mean, so no path wins everywhere.
    from cram_ext.reference import cram_forward_ref
    scores = cram_forward_ref(*args, **kwargs)[4]
    args[12] = args[12] - scores.flatten(0, 1).mean(0)
    return args, kwargs


def check_cram_forward(seed, args, kwargs, *, backward=True):
    """`cram_forward` against `cram_forward_ref`: exactly the paths of the reference in the
    inputs' dtype, then outputs (and gradients of `out`) by the accuracy rule against the float64
    reference routed the same way. Returns the op's result."""
    from cram_ext import cram_forward
    from cram_ext.reference import cram_forward_ref

    def leaves(tensors, dtype=None):
        return [None if t is None else
                t.detach().to(dtype or t.dtype).requires_grad_(backward and name is not None)
                if t.is_floating_point() else t
                for t, name in zip(tensors, CRAM_FORWARD_WEIGHTS)]

    got_inputs = leaves(args)
    got = cram_forward(*got_inputs, **kwargs)
    with torch.no_grad():
        same_routing = cram_forward_ref(*args, **kwargs)[1]
    assert torch.equal(got.path, same_routing), f"paths differ from the reference's [seed {seed}]"
    assert got.path.dtype == torch.long and got.attention_rows.dtype == torch.long
    assert got.attention_rows.dim() == 0 and int(got.attention_rows) == int((got.path == 1).sum())
    assert (got.attention_out[got.path != 1] == 0).all(), "attention_out is not 0 off the route"

    routed = dict(kwargs, forced_path=got.path)
    wide_kwargs = dict(routed, q_hat=None if kwargs["q_hat"] is None else kwargs["q_hat"].double())
    ref_inputs, same_inputs = leaves(args, torch.float64), leaves(args)
    ref = cram_forward_ref(*ref_inputs, **wide_kwargs)
    same = cram_forward_ref(*same_inputs, **routed)
    for i, name in ((0, "out"), (3, "predicted_loss"), (4, "scores"), (5, "attention_out")):
        assert_matches_reference(got[i].detach(), ref[i].detach(), same[i].detach(), what=name,
                                 seed=seed)
    if backward:
        grad = randn(generator(seed + 1, got.out.device), got.out.shape, got.out.dtype,
                     got.out.device)
        for out in (got.out, ref[0], same[0]):
            out.backward(grad.to(out.dtype))
        for name, a, r, s in zip(CRAM_FORWARD_WEIGHTS, got_inputs, ref_inputs, same_inputs):
            if name is not None and a is not None:
                assert_matches_reference(a.grad, r.grad, s.grad, what=f"d{name}", seed=seed,
                                         factor=BACKWARD_FACTOR)
    return got


def cram_step_inputs(seed, *, batch=16, d=16, n_heads=2, kv_heads=None, d_state=4, capacity=12,
                     semantic=True, key_mask=True, dtype=torch.float32, device="cpu"):
    """Random inputs of `cram_step`: (args, kwargs), `cram_forward_inputs`' weights and prices
    for one token per stream (enough streams that every path is taken), a random scan state and
    caches holding 0 to capacity - 1 entries; 80% of the slots are keys, the new entry always."""
    args, kwargs = cram_forward_inputs(seed, batch=batch, L=1, d=d, n_heads=n_heads,
                                       kv_heads=kv_heads, d_state=d_state, semantic=semantic,
                                       key_mask=False, dtype=dtype, device=device)
    g = generator(seed + 7, device)
    kv_heads = kv_heads or n_heads
    head_dim, d_inner = d // n_heads, args[2].shape[0] // 2
    state = randn(g, (batch, d_inner, d_state), accumulation_dtype(dtype), device)
    k_cache, v_cache = (randn(g, (batch, kv_heads, capacity, head_dim), dtype, device)
                        for _ in range(2))
    lengths = torch.randint(0, capacity, (batch,), generator=g, device=device, dtype=torch.int32)
    kwargs = dict(kwargs, q_hat=kwargs["q_hat"][:, 0])
    del kwargs["forced_path"]
    if key_mask:
        mask = torch.rand(batch, capacity, generator=g, device=device) < 0.8
        kwargs["key_mask"] = mask | (torch.arange(capacity, device=device) == lengths[:, None])
    return [args[0][:, 0], args[1][:, 0], state, k_cache, v_cache, lengths, *args[2:]], kwargs


def check_cram_step(seed, args, kwargs):
    """`cram_step` against `cram_step_ref`: exactly the paths of the reference in the inputs'
    dtype, then the outputs and the updated state and caches by the accuracy rule against the
    float64 reference routed the same way. Returns the op's result."""
    from cram_ext import cram_step
    from cram_ext.reference import cram_step_ref

    def fresh(dtype=None):  # the op and each reference update their own state and caches
        return [None if t is None else t.clone().to(dtype or t.dtype) if t.is_floating_point()
                else t.clone() for t in args]

    got_args, same_args, ref_args = fresh(), fresh(), fresh(torch.float64)
    got = cram_step(*got_args, **kwargs)
    same = cram_step_ref(*same_args, **kwargs)
    assert torch.equal(got.path, same[1]), f"paths differ from the reference's [seed {seed}]"
    assert got.path.dtype == torch.long and got.path.shape == args[0].shape[:1]
    assert (got.attention_out[got.path != 1] == 0).all(), "attention_out is not 0 off the route"
    q_hat = kwargs["q_hat"]
    ref = cram_step_ref(*ref_args, **dict(kwargs, forced_path=got.path,
                                          q_hat=None if q_hat is None else q_hat.double()))
    for i, name in ((0, "out"), (2, "predicted_loss"), (3, "scores"), (4, "attention_out")):
        assert_matches_reference(got[i], ref[i], same[i], what=name, seed=seed)
    for i, name in ((2, "state"), (3, "k_cache"), (4, "v_cache")):
        assert_matches_reference(got_args[i], ref_args[i], same_args[i], what=name, seed=seed)
    return got
