"""cram_ext.cram_forward (one CRAM layer's paths in one op) against the reference
`cram_forward_ref` and against the composed `CRAMLayer`, on the CPU and, where there is one, the
CUDA device. Accuracy rule and input builders: cases.py."""
from __future__ import annotations

import pytest
import torch

from cases import (CRAM_FORWARD_WEIGHTS, DEVICES, ONE_PATH_PRICES, assert_gradcheck,
                   check_cram_forward, cram_forward_inputs, cram_ops_called, cram_step_inputs,
                   relative_error)
from cram_ext import cram_forward, cram_step
from cram_ext.models import CRAMLayer, model_config
from cram_ext.models.cram import RoutingPrices
from cram_ext.models.router import Path
from cram_ext.reference import cram_forward_ref, cram_step_ref

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantic", [True, False])
@pytest.mark.parametrize("key_share", [0.8, 0.1, None], ids=["most keys", "few keys", "no key_mask"])
def test_matches_reference(dtype, semantic, key_share, device, seed):
    """With few keys (an episodic buffer of written entries) the CPU op computes keys and values
    only on the key rows, and attention visits only those."""
    args, kwargs = cram_forward_inputs(seed, L=40, dtype=dtype, semantic=semantic,
                                       key_mask=key_share is not None, key_share=key_share or 0.0,
                                       device=device)
    got = check_cram_forward(seed, args, kwargs)
    taken = set(got.path.unique().tolist())
    assert taken == ({0, 1, 2} if semantic else {0, 1}), f"paths taken {taken} [seed {seed}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_heads, kv_heads", [(4, 1), (4, 2)])
def test_grouped_query_attention(n_heads, kv_heads, device, seed):
    args, kwargs = cram_forward_inputs(seed, L=30, d=32, n_heads=n_heads, kv_heads=kv_heads,
                                       device=device)
    check_cram_forward(seed, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_longer_sequences_span_several_scan_chunks(device, seed):
    args, kwargs = cram_forward_inputs(seed, batch=1, L=600, d=32, device=device)
    check_cram_forward(seed, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prices, path", ONE_PATH_PRICES)
def test_every_token_on_one_path_by_its_price(prices, path, device, seed):
    """No token attends (the empty route), every token attends, every token is semantic."""
    args, kwargs = cram_forward_inputs(seed, L=24, device=device)
    got = check_cram_forward(seed, args, dict(kwargs, **prices))
    if path is None:
        assert int(got.attention_rows) == 0 and (got.path != Path.EPISODIC).all()
    else:
        assert (got.path == path).all()
        assert int(got.attention_rows) == (got.path.numel() if path == Path.EPISODIC else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_feature_routes_as_the_reference(device):
    """A NaN router feature (here a gap, which also makes the scan NaN from that token on) passes
    the hidden layer's ReLU as in F.relu: those tokens' predicted losses are NaN and argmin's rule
    takes path 0, as in the reference."""
    args, kwargs = cram_forward_inputs(3, device=device)
    args[1][0, 5] = float("nan")
    got = cram_forward(*args, **kwargs)
    expected = cram_forward_ref(*args, **kwargs)
    assert torch.equal(got.path, expected[1])
    assert got.predicted_loss[0, 5].isnan().all() and (got.path[0, 5:] == Path.WORKING).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semantic_price_is_rounded_once_as_the_router_forms_it(dtype, device):
    """-semantic_reward · q̂ in the accumulation type, rounded once to the inputs' dtype, as the
    composed router computes it (rounding the reward first moves about half of these prices by one
    unit in the last place)."""
    args, kwargs = cram_forward_inputs(0, L=64, dtype=dtype, device=device)
    args[11], args[12] = torch.zeros_like(args[11]), torch.zeros_like(args[12])  # predicted 0
    q_hat = torch.linspace(0, 1, 128, device=device).view(2, 64).to(dtype)
    got = cram_forward(*args, **dict(kwargs, semantic_reward=0.3, q_hat=q_hat))
    assert torch.equal(got.scores[..., Path.SEMANTIC], -0.3 * q_hat)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_the_adapter_reaches_the_gradients_as_in_the_reference(device):
    """The semantic adapter's ReLU in the backward selects as relu's backward does: NaN in W_up
    reaches dx only through the hidden units that are on, as in the reference."""
    args, kwargs = cram_forward_inputs(42, batch=1, L=5, d=16, n_heads=4, kv_heads=2, device=device)
    args[17][1, 0] = float("nan")  # semantic_up_weight
    got_inputs = [None if t is None else t.detach().clone().requires_grad_(n is not None)
                  for t, n in zip(args, CRAM_FORWARD_WEIGHTS)]
    got = cram_forward(*got_inputs, **kwargs)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_(n is not None)
                  for t, n in zip(args, CRAM_FORWARD_WEIGHTS)]
    ref = cram_forward_ref(*ref_inputs, **dict(kwargs, forced_path=got.path,
                                                q_hat=kwargs["q_hat"].double()))
    grad = torch.randn(got.out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    got.out.backward(grad)
    ref[0].backward(grad.double())
    nan_tokens = ref_inputs[0].grad.isnan().any(-1)
    assert nan_tokens.any() and not nan_tokens.all()
    assert torch.equal(got_inputs[0].grad.isnan().any(-1), nan_tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_a_16_bit_router_sums_its_first_layer_once_as_the_reference(device):
    """float16: the router's first Linear over [x, log(1 + gap), norm, q̂] is one sum, as in
    F.linear, not its x-part rounded to 16 bits first: an x-part past 65504 that the q̂ column
    cancels stays finite, in cram_forward and in cram_step's decoding step alike."""
    args, kwargs = cram_forward_inputs(0, batch=1, L=6, d=16, dtype=torch.float16, device=device)
    step_args, step_kwargs = cram_step_inputs(0, batch=2, d=16, dtype=torch.float16, device=device)
    for w1, x in ((args[9], args[0]), (step_args[13], step_args[0])):
        w1[0, :16], w1[0, 16:] = 4096.0, 0.0
        w1[0, 18] = -32768.0  # times q̂ = 2: cancels the x-part, 16 · 4096 = 65536 > 65504
        x.fill_(1.0)
    kwargs["q_hat"] = torch.full((1, 6), 2.0, dtype=torch.float16, device=device)
    step_kwargs["q_hat"] = torch.full((2,), 2.0, dtype=torch.float16, device=device)

    def wide(values):  # float64 copies, for the reference
        return [t.double() if torch.is_tensor(t) and t.is_floating_point() else
                t.clone() if torch.is_tensor(t) else t for t in values]

    # The references' predicted losses: cram_forward_ref returns the op's tuple, cram_step_ref
    # (out, path, predicted_loss, ...).
    for op, ref, at, op_args, op_kwargs in (
            (cram_forward, cram_forward_ref, 3, args, kwargs),
            (cram_step, cram_step_ref, 2, step_args, step_kwargs)):
        expected = ref(*wide(op_args), **dict(zip(op_kwargs, wide(op_kwargs.values()))))[at]
        got = op(*op_args, **op_kwargs).predicted_loss
        assert got.isfinite().all() and expected.isfinite().all()
        assert relative_error(got, expected) < 1e-2  # float16's rounding, not an overflow


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowing_semantic_output_leaves_other_rows_alone(device):
    """f_sem = inf (float16 overflow) on every row: the rows that do not take the semantic path
    stay finite, in the op as in the reference."""
    args, kwargs = cram_forward_inputs(0, L=40, dtype=torch.float16, device=device)
    args[18] = torch.full_like(args[18], float("inf"))
    got = cram_forward(*args, **kwargs)
    semantic = got.path == Path.SEMANTIC
    assert semantic.any() and (~semantic).any()
    assert got.out[~semantic].isfinite().all() and got.out[semantic].isinf().all()
    assert cram_forward_ref(*args, **kwargs)[0][~semantic].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_forced_paths_override_the_router_row_by_row(device, seed):
    """A batch whose rows route differently: row 0 all episodic, row 1 none, row 2 the router's
    choice except a few forced tokens."""
    args, kwargs = cram_forward_inputs(seed, batch=3, L=20, device=device)
    forced = torch.full((3, 20), -1, dtype=torch.long, device=device)
    forced[0] = Path.EPISODIC
    forced[1] = Path.WORKING
    forced[2, ::5] = Path.SEMANTIC
    got = check_cram_forward(seed, args, dict(kwargs, forced_path=forced))
    assert (got.path[0] == Path.EPISODIC).all() and (got.path[1] == Path.WORKING).all()
    assert (got.path[2, ::5] == Path.SEMANTIC).all()
    free = cram_forward(*args, **kwargs)
    keep = forced[2] < 0
    assert torch.equal(got.path[2, keep], free.path[2, keep])
    assert int(got.attention_rows) == 20 + int((got.path[2] == Path.EPISODIC).sum())


# ---------------------------------------------------------------------------------------------
# The composed layer
# ---------------------------------------------------------------------------------------------

def scrambled_layer(name, seed, d_model=32, **overrides):
    torch.manual_seed(seed)
    config = model_config(name, d_model=d_model, n_heads=2, **overrides)
    layer = CRAMLayer(config, config.layers[0]).eval()
    with torch.no_grad():   # random loss predictions: a real mix of paths
        torch.nn.init.normal_(layer.router.predict_loss[-1].weight, std=2.0)
        if layer.router.predict_loss_average is not None:
            torch.nn.init.normal_(layer.router.predict_loss_average[-1].weight, std=2.0)
    return layer


def split_routes(layer, x, gap, key_mask, prices):
    """Shifts the scrambled router's attention prediction so that half of these tokens attend:
    random predictor weights alone sent every token of a batch to attention for about 1 seed
    in 150. The cut lies midway between two tokens' margins, so no token is left at a tie that
    the fused and the composed layer could break differently."""
    with torch.no_grad():
        _, record = layer(x, gap, key_mask, prices)
        scores = record.routing.scores
        others = [i for i, path in enumerate(layer.router.paths) if path != Path.EPISODIC]
        margin = (scores[..., Path.EPISODIC] - scores[..., others].amin(-1)).flatten().sort()[0]
        half = margin.numel() // 2
        layer.router.deciding_predictor[-1].bias[Path.EPISODIC] -= (margin[half - 1]
                                                                    + margin[half]) / 2


@pytest.mark.parametrize("key_share", [0.8, 0.1])
@pytest.mark.parametrize("name", ["cram", "ablate_no_semantic", "ablate_no_q_router"])
def test_same_routing_outputs_records_and_gradients_as_the_composed_layer(name, key_share, seed):
    layer = scrambled_layer(name, seed)
    assert layer.fused
    x = torch.randn(2, 50, 32)
    gap = 3 * torch.rand(2, 50)
    key_mask = torch.rand(2, 50) < key_share
    key_mask[:, 0] = True
    prices = RoutingPrices(episodic=0.1, semantic=0.05)
    split_routes(layer, x, gap, key_mask, prices)
    results = {}
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out, record = layer(inputs, gap, key_mask, prices)
        out.backward(torch.ones_like(out))
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[fused] = out.detach(), record, inputs.grad, grads
    (out, record, dx, grads), (out_ref, record_ref, dx_ref, grads_ref) = results[True], results[False]
    assert torch.equal(record.routing.choice, record_ref.routing.choice), f"seed {seed}"
    assert torch.equal(record.attention_rows, record_ref.attention_rows)
    assert 0 < int(record.attention_rows.sum()) < record.attention_rows.numel()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(record.routing.predicted_loss, record_ref.routing.predicted_loss)
    torch.testing.assert_close(record.routing.scores, record_ref.routing.scores)
    for field in ("q", "q_hat", "consolidation_error"):
        a, b = getattr(record, field), getattr(record_ref, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a.detach(), b.detach(), msg=field)
    torch.testing.assert_close(dx, dx_ref)
    # The router is trained by its regression loss, not through the layer output.
    router = {n for n in grads_ref if n.startswith(("router.", "q_predictor."))}
    assert set(grads) - router == set(grads_ref) - router
    for n in set(grads) - router:
        torch.testing.assert_close(grads[n], grads_ref[n], msg=n)


def test_a_router_averaged_over_steps_decides_the_fused_layer_as_the_composed_one(seed):
    layer = scrambled_layer("cram", seed, router_average_steps=3)
    x, gap = torch.randn(2, 50, 32), 3 * torch.rand(2, 50)
    key_mask = torch.ones(2, 50, dtype=torch.bool)
    prices = RoutingPrices(episodic=0.1, semantic=0.05)
    split_routes(layer, x, gap, key_mask, prices)
    records = {}
    with torch.no_grad():
        for fused in (True, False):
            layer.fused = fused
            records[fused] = layer(x, gap, key_mask, prices)[1].routing
    assert torch.equal(records[True].choice, records[False].choice), f"seed {seed}"
    torch.testing.assert_close(records[True].predicted_loss, records[False].predicted_loss)
    # the average decides: the scrambled predictor itself would route otherwise
    layer.router.predict_loss_average = None
    with torch.no_grad():
        own = layer(x, gap, key_mask, prices)[1].routing
    assert not torch.equal(own.choice, records[True].choice)


def test_layer_dispatches_one_fused_op_in_evaluation_and_the_composed_ops_in_training():
    layer = scrambled_layer("cram", 0)
    x, gap = torch.randn(1, 16, 32), torch.rand(1, 16)
    prices = RoutingPrices(episodic=0.1, semantic=0.05)
    with torch.no_grad():
        names = [f.name() for f, *_ in cram_ops_called(lambda: layer(x, gap, None, prices))]
    assert names == ["cram_ext::cram_forward_fwd"]
    layer.train()
    names = [f.name() for f, *_ in cram_ops_called(lambda: layer(x, gap, None, prices))]
    assert names == ["cram_ext::selective_scan_fwd", "cram_ext::routed_attention_fwd"]


# ---------------------------------------------------------------------------------------------
# Autograd, op registration, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantic", [True, False])
def test_gradcheck(semantic, device, seed):
    args, kwargs = cram_forward_inputs(seed, batch=2, L=6, d=8, d_state=2, semantic=semantic,
                                       dtype=torch.float64, device=device)
    # Forced paths: a perturbed input must not flip a decision (the gate is not differentiable).
    g = torch.Generator(device=device).manual_seed(seed)
    forced = torch.randint(0, 3 if semantic else 2, (2, 6), generator=g, device=device)
    kwargs = dict(kwargs, forced_path=forced)
    positions = [i for i, a in enumerate(args)
                 if a is not None and i not in (1, 9, 10, 11, 12)]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return cram_forward(*full, **kwargs).out

    inputs = [args[i].detach().requires_grad_() for i in positions]
    assert_gradcheck(seed, fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantic", [True, False])
def test_opcheck(semantic, device):
    args, kwargs = cram_forward_inputs(0, batch=2, L=6, d=8, d_state=2, semantic=semantic,
                                       device=device)
    for i in (0, 2, 8, 13):
        args[i] = args[i].requires_grad_()
    calls = cram_ops_called(lambda: cram_forward(*args, **kwargs))
    assert [f.name() for f, *_ in calls] == ["cram_ext::cram_forward_fwd"]
    for op, op_args, op_kwargs in calls:
        torch.library.opcheck(op, op_args, op_kwargs)


def test_torch_compile_fullgraph_matches_eager(seed):
    args, kwargs = cram_forward_inputs(seed, L=20)

    def layer(x, *weights):
        result = cram_forward(x, *weights, **kwargs)
        return result.out * 2, result.path, result.attention_rows

    compiled = torch.compile(layer, fullgraph=True)
    x_eager, x_compiled = (args[0].clone().requires_grad_() for _ in range(2))
    out, path, rows = compiled(x_compiled, *args[1:])
    out_ref, path_ref, rows_ref = layer(x_eager, *args[1:])
    torch.testing.assert_close(out, out_ref)
    assert torch.equal(path, path_ref) and torch.equal(rows, rows_ref)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

def _with(args, kwargs, **changes):
    args, kwargs = list(args), dict(kwargs)
    names = ["x", "gap", "in_proj_weight", "x_proj_weight", "dt_proj_weight", "A", "D", "dt_bias",
             "out_proj_weight", "router_w1", "router_b1", "router_w2", "router_b2", "qkv_weight",
             "attn_out_weight", "semantic_down_weight", "semantic_down_bias",
             "semantic_up_weight", "semantic_up_bias"]
    for name, value in changes.items():
        if name in names:
            args[names.index(name)] = value(args[names.index(name)]) if callable(value) else value
        else:
            kwargs[name] = value(kwargs[name]) if callable(value) else value
    return args, kwargs


@pytest.mark.parametrize("changes, message", [
    (dict(x=lambda t: t[0]), "x must have shape \\(batch, L, d_model\\)"),
    (dict(x=lambda t: t.to(torch.int32)), "x must be float32"),
    (dict(gap=lambda t: t[:, 1:]), "gap must have shape"),
    (dict(in_proj_weight=lambda t: t.double()), "in_proj_weight must be Float"),
    (dict(in_proj_weight=lambda t: t[:, 1:]), "in_proj_weight must have shape"),
    (dict(x_proj_weight=lambda t: t[1:]), "x_proj_weight must have shape"),
    (dict(A=lambda t: t.double()), "A must be Float"),
    (dict(D=lambda t: t[1:]), "D must have shape"),
    (dict(out_proj_weight=lambda t: t.t()), "out_proj_weight must have shape"),
    (dict(router_w1=lambda t: t[:, 3:]), "router_w1 must have shape"),
    (dict(router_w2=lambda t: torch.cat([t, t[:1]])), "router_w2 must have shape"),
    (dict(qkv_weight=lambda t: t[1:]), "qkv_weight must have shape"),
    (dict(n_heads=3), "n_heads \\(3\\) must be positive and divide d_model"),
    (dict(semantic_up_bias=None), "semantic_up_bias is required"),
    (dict(router_w2=lambda t: t[:2], router_b2=lambda t: t[:2]), "semantic_down_weight must be None"),
    (dict(q_hat=lambda t: t[:1]), "q_hat must have shape"),
    (dict(key_mask=lambda t: t.float()), "key_mask must be Bool"),
    (dict(forced_path=torch.zeros(2, 12, dtype=torch.int32)), "forced_path must be Long"),
    (dict(forced_path=torch.full((2, 12), 3, dtype=torch.long)), "forced_path entries"),
    (dict(episodic_price=float("nan")), "episodic_price and semantic_reward must be finite"),
    (dict(x=lambda t: t[..., :0]), "d_model \\(the last dimension of x\\) must be positive"),
])
def test_bad_inputs_raise_clear_errors(changes, message):
    args, kwargs = cram_forward_inputs(0)
    args, kwargs = _with(args, kwargs, **changes)
    with pytest.raises(RuntimeError, match=message):
        cram_forward(*args, **kwargs)
