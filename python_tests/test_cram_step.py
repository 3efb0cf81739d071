"""cram_ext.cram_step (one token per stream of a CRAM layer's fused forward, from a scan state
and a key/value cache) against the reference `cram_step_ref` and against `cram_forward` run over
the whole sequence, on the CPU and, where there is one, the CUDA device. The model's use of it
(`CRAMModel.step` equal to the composed step and to the full forward) is tested in
test_streaming.py. Accuracy rule and input builders: cases.py."""
from __future__ import annotations

import pytest
import torch

from cases import (DEVICES, ONE_PATH_PRICES, check_cram_step, cram_forward_inputs,
                   cram_step_inputs)
from cram_ext import cram_forward, cram_step
from cram_ext.models.router import Path

torch.set_num_threads(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantic", [True, False])
@pytest.mark.parametrize("key_mask", [True, False])
def test_matches_reference(dtype, semantic, key_mask, device, seed):
    args, kwargs = cram_step_inputs(seed, dtype=dtype, semantic=semantic, key_mask=key_mask,
                                    device=device)
    got = check_cram_step(seed, args, kwargs)
    taken = set(got.path.unique().tolist())
    assert taken == ({0, 1, 2} if semantic else {0, 1}), f"paths taken {taken} [seed {seed}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_heads, kv_heads", [(4, 1), (4, 2)])
def test_grouped_query_attention(n_heads, kv_heads, device, seed):
    args, kwargs = cram_step_inputs(seed, d=32, n_heads=n_heads, kv_heads=kv_heads, device=device)
    check_cram_step(seed, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prices, path", ONE_PATH_PRICES)
def test_every_stream_on_one_path_by_its_price(prices, path, device, seed):
    """No stream attends (every new entry is still written), every stream attends, every
    stream is semantic."""
    args, kwargs = cram_step_inputs(seed, device=device)
    got = check_cram_step(seed, args, dict(kwargs, **prices))
    if path is None:
        assert (got.path != Path.EPISODIC).all() and (got.attention_out == 0).all()
    else:
        assert (got.path == path).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantic", [True, False])
def test_steps_equal_the_fused_forward_position_by_position(semantic, device, seed):
    """A sequence read one token at a time from a zero state into an empty cache gives what
    `cram_forward` gives on the whole sequence: the same paths, outputs to fp32 tolerance."""
    args, kwargs = cram_forward_inputs(seed, batch=3, L=20, semantic=semantic, device=device)
    del kwargs["forced_path"]
    full = cram_forward(*args, **kwargs)
    x, gap, weights = args[0], args[1], args[2:]
    batch, L, d = x.shape
    head_dim = d // kwargs["n_heads"]
    kv_heads = (weights[11].shape[0] - d) // (2 * head_dim)
    state = torch.zeros(batch, weights[0].shape[0] // 2, weights[3].shape[1], device=device)
    k_cache, v_cache = (torch.zeros(batch, kv_heads, L, head_dim, device=device) for _ in range(2))
    lengths = torch.zeros(batch, dtype=torch.int32, device=device)
    keys = kwargs["key_mask"]
    for t in range(L):
        mask = torch.zeros(batch, L, dtype=torch.bool, device=device)
        mask[:, :t + 1] = keys[:, :t + 1]
        step = cram_step(x[:, t], gap[:, t], state, k_cache, v_cache, lengths, *weights,
                         **dict(kwargs, q_hat=kwargs["q_hat"][:, t], key_mask=mask))
        lengths += 1
        assert torch.equal(step.path, full.path[:, t]), f"position {t} [seed {seed}]"
        for name in ("out", "predicted_loss", "scores", "attention_out"):
            torch.testing.assert_close(getattr(step, name), getattr(full, name)[:, t],
                                       rtol=1e-4, atol=1e-5, msg=f"{name} at {t}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantic", [True, False])
def test_opcheck(semantic, device):
    args, kwargs = cram_step_inputs(0, semantic=semantic, device=device)
    torch.library.opcheck(torch.ops.cram_ext.cram_step.default,
                          (*args, kwargs["q_hat"], kwargs["key_mask"], kwargs["n_heads"],
                           kwargs["episodic_price"], kwargs["semantic_reward"]))


def test_torch_compile_fullgraph_matches_eager(seed):
    args, kwargs = cram_step_inputs(seed)

    def layer(x, state, k_cache, v_cache):
        result = cram_step(x, args[1], state, k_cache, v_cache, *args[5:], **kwargs)
        return result.out * 2, result.path

    mutable = [args[0], args[2], args[3], args[4]]
    eager, compiled = ([t.clone() for t in mutable] for _ in range(2))
    out, path = torch.compile(layer, fullgraph=True)(*compiled)
    out_ref, path_ref = layer(*eager)
    torch.testing.assert_close(out, out_ref)
    assert torch.equal(path, path_ref)
    for a, b in zip(compiled[1:], eager[1:]):  # the state and caches were updated alike
        torch.testing.assert_close(a, b)


NAMES = ["x", "gap", "state", "k_cache", "v_cache", "cache_seqlens", "in_proj_weight",
         "x_proj_weight", "dt_proj_weight", "A", "D", "dt_bias", "out_proj_weight", "router_w1",
         "router_b1", "router_w2", "router_b2", "qkv_weight", "attn_out_weight"]


@pytest.mark.parametrize("changes, message", [
    (dict(x=lambda t: t[:, None]), "cram_step: x must have shape \\(batch, d_model\\)"),
    (dict(x=lambda t: t.to(torch.int32)), "x must be float32"),
    (dict(gap=lambda t: t[1:]), "gap must have shape \\(batch,\\)"),
    (dict(state=lambda t: t[:, 1:]), "state must have shape \\(batch, d_inner, N\\)"),
    (dict(k_cache=lambda t: t[:, :1]), "k_cache must have shape \\(batch=16, kv_heads=2"),
    (dict(v_cache=lambda t: t[:, :, 1:]), "v_cache must have shape"),
    (dict(cache_seqlens=lambda t: t.long()), "cache_seqlens must be Int"),
    (dict(cache_seqlens=lambda t: t + 12), "the cache is full"),
    (dict(in_proj_weight=lambda t: t.double()), "cram_step: in_proj_weight must be Float"),
    (dict(router_w1=lambda t: t[:, 3:]), "router_w1 must have shape"),
    (dict(n_heads=3), "n_heads \\(3\\) must be positive and divide d_model"),
    (dict(q_hat=lambda t: t[:, None]), "q_hat must have shape \\(batch,\\)"),
    (dict(key_mask=lambda t: t.float()), "key_mask must be Bool"),
    (dict(episodic_price=float("nan")), "episodic_price and semantic_reward must be finite"),
])
def test_bad_inputs_raise_clear_errors(changes, message):
    args, kwargs = cram_step_inputs(0)
    for name, value in changes.items():
        if name in NAMES:
            args[NAMES.index(name)] = value(args[NAMES.index(name)])
        else:
            kwargs[name] = value(kwargs[name]) if callable(value) else value
    with pytest.raises(RuntimeError, match=message):
        cram_step(*args, **kwargs)
