"""Streaming inference: the ops (`selective_state_update`, `selective_scan` with an initial state,
`routed_attention_with_kvcache`) against their references and the full-sequence ops, and
`CRAMModel.prefill`/`step` against the full forward. Accuracy rule and builders: cases.py."""
import copy
import dataclasses

import pytest
import torch

import cram_ext
from cases import (ALL_DTYPES, DEVICES, accumulation_dtype, assert_matches_reference,
                   assert_scan_gradcheck, assert_scan_ops_pass_opcheck, attention_inputs,
                   check_selective_scan, cram_ops_called, generator, initial_state,
                   kvcache_inputs, position, randn, random_route, scan_inputs)
from cram_ext.models import CRAMModel, model_config
from cram_ext.models import memory
from cram_ext.models.router import Path
from cram_ext.reference import (routed_attention_with_kvcache_ref, selective_scan_ref,
                                selective_state_update_ref)
from cram_ext.srcd import SRCDConfig, batch_at

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# selective_state_update
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("full", [True, False], ids=["all-options", "bare"])
def test_steps_reproduce_the_scan(seed, dtype, groups, full, device):
    """Stepping through a sequence gives the scan's outputs and final state: to rounding in
    float64, to the accuracy rule in float32."""
    inputs = scan_inputs(seed, batch=2, dim=20, L=9, N=5, groups=groups, dtype=dtype, full=full,
                         device=device)
    out, last = cram_ext.selective_scan(**inputs, delta_softplus=full, return_last_state=True)
    state = torch.zeros_like(last)
    steps = torch.stack([cram_ext.selective_state_update(state, **position(inputs, t),
                                                         dt_softplus=full)
                         for t in range(inputs["u"].shape[-1])], -1)
    assert steps.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(steps, out, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(state, last, rtol=1e-13, atol=1e-13)
    else:
        ref, ref_last = selective_scan_ref(**{k: v.double() for k, v in inputs.items()},
                                           delta_softplus=full, return_last_state=True)
        assert_matches_reference(steps, ref, out, what="steps", seed=seed)
        assert_matches_reference(state, ref_last, last, what="state", seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_state_update_matches_reference(seed, dtype, device):
    inputs = scan_inputs(seed, batch=3, dim=24, L=1, N=8, groups=3, dtype=dtype, device=device)
    h0 = initial_state(seed, inputs)
    step = position(inputs, 0)
    state = h0.clone()
    y = cram_ext.selective_state_update(state, **step, dt_softplus=True)
    ref_state = h0.double()
    ref = selective_state_update_ref(ref_state, **{k: v.double() for k, v in step.items()},
                                     dt_softplus=True)
    same_state = h0.clone()
    same = selective_state_update_ref(same_state, **step, dt_softplus=True)
    assert y.dtype == dtype and state.dtype == accumulation_dtype(dtype)
    assert_matches_reference(y, ref, same, what="y", seed=seed)
    assert_matches_reference(state, ref_state, same_state, what="state", seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_state_update_opcheck(seed, device):
    inputs = scan_inputs(seed, batch=2, dim=6, L=1, N=4, groups=2, device=device)
    calls = cram_ops_called(lambda: cram_ext.selective_state_update(
        initial_state(seed, inputs), **position(inputs, 0), dt_softplus=True))
    assert [op.name() for op, _, _ in calls] == ["cram_ext::selective_state_update"]
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


STATE_UPDATE_ERRORS = {
    "state_shape": (lambda s, a: (s[:, :-1], a), r"state must have shape \(batch, dim, N\)"),
    "state_dtype": (lambda s, a: (s.double(), a), "state must be Float"),
    "state_strides": (lambda s, a: (s.transpose(1, 2).contiguous().transpose(1, 2), a),
                      "state must be contiguous in its last dimension"),
    "x_ndim": (lambda s, a: (s, {**a, "x": a["x"][0]}), r"x must have shape \(batch, dim\)"),
    "dt_shape": (lambda s, a: (s, {**a, "dt": a["dt"][:1]}), r"dt must have shape \(batch, dim\)"),
    "B_shape": (lambda s, a: (s, {**a, "B": a["B"][..., :-1]}), r"B must have shape"),
    "A_dtype": (lambda s, a: (s, {**a, "A": a["A"].double()}), "A must be Float"),
    "dt_scale_shape": (lambda s, a: (s, {**a, "dt_scale": a["dt_scale"][:, None]}),
                       r"dt_scale must have shape \(batch,\)"),
}


@pytest.mark.parametrize("case", list(STATE_UPDATE_ERRORS))
def test_state_update_bad_input_errors(case):
    inputs = scan_inputs(0, batch=2, dim=6, L=1, N=4)
    mutate, message = STATE_UPDATE_ERRORS[case]
    state, step = mutate(initial_state(0, inputs), position(inputs, 0))
    with pytest.raises(RuntimeError, match=message):
        cram_ext.selective_state_update(state, **step, dt_softplus=True)


# ---------------------------------------------------------------------------------------------
# selective_scan with an initial state
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, L", [(torch.float64, 9), (torch.float32, 300),
                                      (torch.bfloat16, 7)])
def test_initial_state_forward_and_gradients_match_reference(seed, dtype, L, device):
    """300 steps cross a checkpoint chunk: the backward restarts from the initial state for
    the first chunk only."""
    inputs = scan_inputs(seed, dim=20, L=L, N=4, groups=2, dtype=dtype, device=device)
    inputs["initial_state"] = initial_state(seed, inputs)
    check_selective_scan(seed, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [1, 5, 256, 299])
def test_chunked_scan_equals_whole_scan(seed, split, device):
    """[0, t) then [t, L) from the returned state equals [0, L); 256 is a checkpoint boundary."""
    inputs = scan_inputs(seed, dim=20, L=300, N=4, groups=2, dtype=torch.float64, device=device)
    out, last = cram_ext.selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    head = {k: v[..., :split] if k in ("u", "delta", "B", "C", "z", "dt_scale") else v
            for k, v in inputs.items()}
    tail = {k: v[..., split:] if k in ("u", "delta", "B", "C", "z", "dt_scale") else v
            for k, v in inputs.items()}
    out0, state = cram_ext.selective_scan(**head, delta_softplus=True, return_last_state=True)
    out1, last1 = cram_ext.selective_scan(**tail, delta_softplus=True, return_last_state=True,
                                          initial_state=state)
    torch.testing.assert_close(torch.cat([out0, out1], -1), out, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(last1, last, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_gradcheck_float64(seed, device):
    inputs = scan_inputs(seed, batch=2, dim=5, L=9, N=3, dtype=torch.float64, device=device)
    inputs["initial_state"] = initial_state(seed, inputs)
    assert_scan_gradcheck(seed, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_initial_state_empty_sequence_and_opcheck(seed, device):
    inputs = scan_inputs(seed, batch=2, dim=2, L=260, N=3, groups=2, device=device)
    h0 = initial_state(seed, inputs)
    empty = {k: v[..., :0] if k in ("u", "delta", "B", "C", "z", "dt_scale") else v
             for k, v in inputs.items()}
    _, last = cram_ext.selective_scan(**empty, delta_softplus=True, return_last_state=True,
                                      initial_state=h0)
    assert torch.equal(last, h0)
    assert_scan_ops_pass_opcheck({**inputs, "initial_state": h0})


def test_initial_state_bad_input_errors():
    inputs = scan_inputs(0)
    h0 = initial_state(0, inputs)
    with pytest.raises(RuntimeError, match=r"initial_state must have shape \(batch, dim, N\)"):
        cram_ext.selective_scan(**inputs, initial_state=h0[:, :-1])
    with pytest.raises(RuntimeError, match="initial_state must be Float"):
        cram_ext.selective_scan(**inputs, initial_state=h0.double())


# ---------------------------------------------------------------------------------------------
# routed_attention_with_kvcache
# ---------------------------------------------------------------------------------------------

def check_kvcache(seed, q, k_cache, v_cache, k, v, lengths, route, mask):
    """The kernel against the float64 reference (and the same-dtype one) by the rule; the
    caches must come out as the reference writes them."""
    results = {}
    for name, dtype, fn in [("reference", torch.float64, routed_attention_with_kvcache_ref),
                            ("same_dtype", None, routed_attention_with_kvcache_ref),
                            ("kernel", None, cram_ext.routed_attention_with_kvcache)]:
        if name == "same_dtype" and q.dtype == torch.float64:
            results[name] = results["reference"]
            continue
        kc, vc = k_cache.clone().to(dtype or q.dtype), v_cache.clone().to(dtype or q.dtype)
        conv = (lambda t: t if t is None else t.to(dtype)) if dtype else (lambda t: t)
        out = fn(conv(q), kc, vc, conv(k), conv(v), lengths, route=route, key_mask=mask,
                 scale=0.25)
        results[name] = (out, kc, vc)
    out, kc, vc = results["kernel"]
    assert out.dtype == q.dtype
    rows = (route[:, None, :] if route.dim() == 2 else route).expand(out.shape[:3])
    assert (out[~rows] == 0).all(), f"rows not routed must be exactly 0 [seed {seed}]"
    assert_matches_reference(out, results["reference"][0], results["same_dtype"][0], what="out",
                             seed=seed)
    ref_kc, ref_vc = results["same_dtype"][1:]
    assert torch.equal(kc.isnan(), ref_kc.isnan()) and torch.equal(kc.nan_to_num(), ref_kc.nan_to_num())
    assert torch.equal(vc.nan_to_num(), ref_vc.nan_to_num())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n_new", [1, 3])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kvcache_matches_reference(seed, dtype, n_new, kv_heads, device):
    check_kvcache(seed, *kvcache_inputs(seed, n_new=n_new, kv_heads=kv_heads, dtype=dtype,
                                        device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_key_mask_per_head_route_and_no_append(seed, device):
    q, k_cache, v_cache, k, v, lengths, _, mask = kvcache_inputs(seed, key_mask=True,
                                                                 device=device)
    per_head = random_route(generator(seed + 3, device), q.shape[:3], 0.5, device)
    check_kvcache(seed, q, k_cache, v_cache, k, v, lengths, per_head, mask)
    # Without new entries the rows are the cache's last positions.
    route = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=device)
    check_kvcache(seed, q, k_cache, v_cache, None, None, lengths, route, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_infinite_and_nan_keys_follow_the_reference(device):
    """A key scoring -inf weighs 0 wherever the kernel meets it (slot 0 is the first key of a
    CUDA warp and of a CPU block); a NaN key reaches the row even from a 64-key block where no
    key scores finite."""
    g = generator(0, device)
    capacity, d = 130, 8
    q = torch.randn(1, 1, 1, d, generator=g, device=device).abs()
    k_cache = torch.randn(1, 1, capacity, d, generator=g, device=device)
    v_cache = torch.randn(1, 1, capacity, d, generator=g, device=device)
    lengths = torch.tensor([capacity], dtype=torch.int32, device=device)
    route = torch.ones(1, 1, dtype=torch.bool, device=device)
    k_cache[0, 0, 0] = -float("inf")
    assert check_kvcache(0, q, k_cache, v_cache, None, None, lengths, route, None).isfinite().all()
    mask = torch.zeros(1, capacity, dtype=torch.bool, device=device)
    mask[0, [1, 65]] = True
    k_cache[0, 0, 1] = float("nan")
    assert check_kvcache(0, q, k_cache, v_cache, None, None, lengths, route, mask).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_decoding_equals_routed_attention(seed, device):
    """Appending a sequence one token at a time (and three at a time) gives causal
    routed_attention on the whole sequence with the same key_mask."""
    q, k, v, route, key_mask = attention_inputs(seed, batch=2, heads=4, kv_heads=2, Lq=12,
                                                d=16, key_mask=True, device=device)
    full = cram_ext.routed_attention(q, k, v, is_causal=True, enable_gqa=True, route=route,
                                     key_mask=key_mask)
    for chunk in (1, 3):
        k_cache = torch.zeros(2, 2, 12, 16, device=device)
        v_cache = torch.zeros_like(k_cache)
        outs = []
        for t in range(0, 12, chunk):
            piece = slice(t, t + chunk)
            outs.append(cram_ext.routed_attention_with_kvcache(
                q[:, :, piece], k_cache, v_cache, k[:, :, piece], v[:, :, piece], t,
                route=route[:, piece], key_mask=key_mask))
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k_cache, k)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_opcheck(seed, device):
    q, k_cache, v_cache, k, v, lengths, route, mask = kvcache_inputs(seed, key_mask=True,
                                                                     device=device)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # opcheck compares outputs
    calls = cram_ops_called(lambda: cram_ext.routed_attention_with_kvcache(
        q, k_cache, v_cache, k, v, lengths, route=route, key_mask=mask))
    assert [op.name() for op, _, _ in calls] == ["cram_ext::routed_attention_kvcache"]
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs)


def test_kvcache_full_cache_error():
    q, k_cache, v_cache, k, v, lengths, route, _ = kvcache_inputs(0, capacity=21)
    # batch 2 holds 19 entries: 3 more do not fit in 21 slots, 1 more does.
    with pytest.raises(RuntimeError, match="the cache is full: batch 2 holds 19 entries and 3 "
                                           "new ones do not fit in capacity 21"):
        cram_ext.routed_attention_with_kvcache(q, k_cache, v_cache, k, v, lengths)
    cram_ext.routed_attention_with_kvcache(q[:, :, :1], k_cache, v_cache, k[:, :, :1],
                                           v[:, :, :1], lengths)


KVCACHE_ERRORS = {
    "q_ndim": (lambda a: a.update(q=a["q"][0]), r"q must have shape \(batch, heads, n_new"),
    "cache_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :, :-1]), "v_cache must have"),
    "cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].double()), "k_cache must be Float"),
    "cache_strides": (lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3).contiguous()
                                         .transpose(2, 3)), "k_cache must be contiguous"),
    "heads": (lambda a: a.update(q=a["q"][:, :3]), r"key/value heads \(2\) must divide"),
    "no_heads": (lambda a: a.update(q=a["q"][:, :0]), r"query heads \(0\), both positive"),
    "k_without_v": (lambda a: a.update(v=None), "k and v must be given together"),
    "k_shape": (lambda a: a.update(k=a["k"][:, :, :1], v=a["v"][:, :, :1]),
                r"k must have shape \(batch, kv_heads, n_new, head_dim\)"),
    "seqlens_dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
                      "cache_seqlens must be Int"),
    "seqlens_negative": (lambda a: a.update(cache_seqlens=a["cache_seqlens"] - 6),
                         r"cache_seqlens\[0\] = -1 is negative"),
    "route_shape": (lambda a: a.update(route=a["route"][:, :1]), r"route must have shape"),
    "route_dtype": (lambda a: a.update(route=a["route"].int()), "route must be a bool"),
    "key_mask_shape": (lambda a: a.update(key_mask=a["key_mask"][:, :-1]),
                       r"key_mask must have shape \(batch, capacity\)"),
}


@pytest.mark.parametrize("case", list(KVCACHE_ERRORS))
def test_kvcache_bad_input_errors(case):
    q, k_cache, v_cache, k, v, lengths, route, mask = kvcache_inputs(0, key_mask=True)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lengths,
                route=route, key_mask=mask)
    mutate, message = KVCACHE_ERRORS[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        cram_ext.routed_attention_with_kvcache(**args)


# ---------------------------------------------------------------------------------------------
# CRAMModel.prefill / step against the full forward
# ---------------------------------------------------------------------------------------------

DATA = SRCDConfig(seq_len=64, query_rate=0.1)


def streaming_model(name, working=None):
    """A small eval-mode model whose routers make mixed decisions (the initial router predicts
    the same loss for every token): random loss predictors. `working` replaces the working
    memory of the layers that have one."""
    torch.manual_seed(0)
    config = model_config(name, d_model=32, n_heads=2, n_layers=2)
    if working:
        config = dataclasses.replace(config, layers=tuple(
            dataclasses.replace(spec, working=working) if spec.working else spec
            for spec in config.layers))
    model = CRAMModel(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                layer.router.predict_loss[-1].weight.normal_(0, 2.0)
    return model


class KVCacheRowCounter:
    """Counts the rows that ran attention in the streaming and in the full-sequence op."""

    def __init__(self, monkeypatch):
        self.rows = {"stream": 0, "full": 0}
        cached, full, fused = memory.cached_attention_op, memory.attention_op, memory.fused_layer_op
        fused_step = memory.fused_step_op

        def counted_cached(q, k_cache, v_cache, k, v, cache_seqlens, route, key_mask):
            self.rows["stream"] += int(route.sum())
            return cached(q, k_cache, v_cache, k, v, cache_seqlens, route, key_mask)

        def counted_full(q, k, v, route, key_mask):
            self.rows["full"] += int(route.sum())
            return full(q, k, v, route, key_mask)
        def counted_fused(*args, **kwargs):  # the full forward of a routed scan layer, in eval
            result = fused(*args, **kwargs)
            self.rows["full"] += int(result.attention_rows)
            return result

        def counted_fused_step(*args, **kwargs):  # its step
            result = fused_step(*args, **kwargs)
            self.rows["stream"] += int((result.path == Path.EPISODIC).sum())
            return result
        monkeypatch.setattr(memory, "cached_attention_op", counted_cached)
        monkeypatch.setattr(memory, "fused_step_op", counted_fused_step)
        monkeypatch.setattr(memory, "attention_op", counted_full)
        monkeypatch.setattr(memory, "fused_layer_op", counted_fused)


@pytest.mark.parametrize("name, working", [("cram", None), ("seqboat", None),
                                           ("transformer", None), ("jamba", None),
                                           ("mamba", None), ("cram", "ctode")])
@pytest.mark.parametrize("split", [0, 1, 40], ids=["steps", "prefill-1", "prefill-40"])
@torch.no_grad()
def test_prefill_and_steps_equal_forward(name, working, split, monkeypatch):
    """A prefix through `prefill`, the rest token by token through `step`: the same outputs
    (fp32 tolerance), the same routing decisions and the same number of attention rows as the
    full forward; the same consolidation errors, and q 0 wherever attention did not run (q
    itself differs: its σ² is the spread of the attention outputs of the call's rows)."""
    model = streaming_model(name, working)
    batch = batch_at(DATA, seed=0, step=0, batch_size=3)
    L = DATA.seq_len
    counter = KVCacheRowCounter(monkeypatch)
    full = model(batch)
    state = model.init_state(3, capacity=L)
    logits, next_value, choices, rows, errors, qs = [], [], [], [], [], []
    if split:
        out, state = model.prefill({k: v[:, :split] for k, v in batch.items()}, state)
        logits.append(out.value_logits)
        next_value.append(out.next_value)
        choices.append([r.routing.choice if r.routing else None for r in out.layers])
        rows.append([r.attention_rows for r in out.layers])
        errors.append([r.consolidation_error for r in out.layers])
        qs.append([r.q for r in out.layers])
    for t in range(split, L):
        out, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
        logits.append(out.value_logits[:, None])
        next_value.append(out.next_value[:, None])
        choices.append([r.routing.choice[:, None] if r.routing else None for r in out.layers])
        rows.append([None if r.attention_rows is None else r.attention_rows[:, None]
                     for r in out.layers])
        errors.append([None if r.q is None else r.consolidation_error[:, None]
                       for r in out.layers])
        qs.append([None if r.q is None else r.q[:, None] for r in out.layers])
    assert state.position == L
    for i, record in enumerate(full.layers):
        if record.routing is not None:
            assert torch.equal(torch.cat([c[i] for c in choices], 1), record.routing.choice)
        if record.attention_rows is not None:
            assert torch.equal(torch.cat([r[i] for r in rows], 1), record.attention_rows)
        if record.q is not None:
            torch.testing.assert_close(torch.cat([e[i] for e in errors], 1),
                                       record.consolidation_error, rtol=1e-4, atol=1e-5)
            assert (torch.cat([q[i] for q in qs], 1)[~record.attention_rows] == 0).all()
    assert counter.rows["stream"] == counter.rows["full"]
    assert counter.rows["full"] > 0 or name == "mamba"
    torch.testing.assert_close(torch.cat(logits, 1), full.value_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(next_value, 1), full.next_value, rtol=1e-4, atol=1e-4)
    if name in ("cram", "seqboat"):  # routed: some rows attend, some do not
        attended = full.layers[0].attention_rows
        assert attended.any() and not attended.all()


@torch.no_grad()
def test_written_buffer_evicts_oldest_entries():
    """With more written entries than memory_size, `step` keeps the most recent ones (where
    `forward` refuses): the first layer's cache then holds the keys of the last memory_size
    written tokens, and `prefill` (which then reads in chunks that end where an entry is
    evicted) gives the same outputs and buffer."""
    model = streaming_model("cram")
    model.config = dataclasses.replace(model.config, memory_size=3)
    batch = batch_at(DATA, seed=1, step=0, batch_size=2)
    written = batch["value"] != DATA.n_values
    assert int(written.sum(-1).min()) > 3
    with pytest.raises(ValueError, match="memory_size=3"):
        model(batch)
    state = model.init_state(2, capacity=DATA.seq_len)
    logits = []
    for t in range(DATA.seq_len):
        out, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
        logits.append(out.value_logits)
    prefilled, chunked = model.prefill(batch, model.init_state(2, capacity=DATA.seq_len))
    torch.testing.assert_close(prefilled.value_logits, torch.stack(logits, 1), rtol=1e-4,
                               atol=1e-4)
    for streamed, read in zip(state.layers, chunked.layers):
        assert torch.equal(streamed.attention.lengths, read.attention.lengths)
        torch.testing.assert_close(streamed.attention.in_order()[0][:, :, :3],
                                   read.attention.in_order()[0][:, :, :3])
    # A single chunk that overflows the buffer before its last token is refused.
    layer = model.layers[0]
    with pytest.raises(ValueError, match=r"memory_size=3\) before its last token"):
        layer.episodic.step(model.encoder(batch), written[:, :] | True, written,
                            layer.episodic.init_state(2, DATA.seq_len, 3))
    cache = state.layers[0].attention
    assert cache.capacity == 4 and (cache.lengths == 3).all()
    episodic = model.layers[0].episodic
    keys = episodic.qkv(model.encoder(batch)).chunk(3, dim=-1)[1]
    keys = keys.view(2, DATA.seq_len, episodic.n_heads, -1).transpose(1, 2)
    for b in range(2):
        last_written = written[b].nonzero()[-3:, 0]
        torch.testing.assert_close(cache.in_order()[0][b, :, :3], keys[b, :, last_written])


@torch.no_grad()
def test_chunk_after_the_ring_wrapped_equals_steps():
    """A chunk of several tokens read after one-token steps have wrapped the buffer's ring
    (entries no longer oldest first in their slots) gives what stepping through it gives:
    the same outputs and, oldest first, the same entries."""
    model = streaming_model("cram")
    model.config = dataclasses.replace(model.config, memory_size=4)
    batch = batch_at(DATA, seed=2, step=0, batch_size=2)
    state = model.init_state(2, capacity=DATA.seq_len)
    # Just after the first sequence's fifth write its ring starts at slot 1.
    split = int((batch["value"][0] != DATA.n_values).nonzero()[4, 0]) + 1
    for t in range(split):
        _, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
    assert all(layer.attention.start[0] == 1 for layer in state.layers if layer.attention)
    chunked = copy.deepcopy(state)
    logits = []
    for t in range(split, DATA.seq_len):
        out, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
        logits.append(out.value_logits)
    read, chunked = model.prefill({k: v[:, split:] for k, v in batch.items()}, chunked)
    torch.testing.assert_close(read.value_logits, torch.stack(logits, 1), rtol=1e-4, atol=1e-4)
    for streamed, prefilled in zip(state.layers, chunked.layers):
        if streamed.attention is None:
            continue
        assert torch.equal(streamed.attention.lengths, prefilled.attention.lengths)
        for ours, theirs in zip(streamed.attention.in_order(), prefilled.attention.in_order()):
            torch.testing.assert_close(ours[:, :, :4], theirs[:, :, :4])


def output_tensors(output):
    """A ModelOutput's tensors by name, the records' (and their routing's) fields included."""
    tensors = {"value_logits": output.value_logits, "next_value": output.next_value}
    for index, record in enumerate(output.layers):
        for part in (record, record.routing):
            for field in dataclasses.fields(part) if part is not None else ():
                value = getattr(part, field.name)
                if isinstance(value, torch.Tensor):
                    tensors[f"layers.{index}.{field.name}"] = value
    return tensors


@pytest.mark.parametrize("name, working", [("cram", None), ("seqboat", None),
                                           ("transformer", None), ("jamba", None),
                                           ("cram", "ctode")])
@torch.no_grad()
def test_step_equals_prefill_of_one_token(name, working):
    """`step` reads a token on tensors without the length dimension (the scan's one-step
    update, the attention's one-token view of q, k, v); `prefill` of that token reads it as a
    chunk of length 1 (the scan from a state). Token by token from equal states, through
    evictions from a buffer of 3 entries: the same outputs, every record field and the same
    states (scan states, and the entries the buffers hold)."""
    model = streaming_model(name, working)
    model.config = dataclasses.replace(model.config, memory_size=3)
    batch = batch_at(DATA, seed=1, step=0, batch_size=2)
    assert int((batch["value"] != DATA.n_values).sum(-1).min()) > 3  # entries get evicted
    stepped, prefilled = (model.init_state(2, capacity=DATA.seq_len) for _ in range(2))
    attended = 0
    for t in range(DATA.seq_len):
        out, stepped = model.step({k: v[:, t] for k, v in batch.items()}, stepped)
        ref, prefilled = model.prefill({k: v[:, t:t + 1] for k, v in batch.items()}, prefilled)
        attended += sum(int(r.attention_rows.sum()) for r in out.layers
                        if r.attention_rows is not None)
        out, ref = output_tensors(out), output_tensors(ref)
        assert out.keys() == ref.keys()
        for field, value in out.items():
            expected = ref[field][:, 0]
            if value.is_floating_point():
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=field)
            else:
                assert torch.equal(value, expected), (t, field)
    assert stepped.position == prefilled.position == DATA.seq_len
    assert attended > 0
    for streamed, read in zip(stepped.layers, prefilled.layers):
        if streamed.working is not None:
            torch.testing.assert_close(streamed.working, read.working, rtol=1e-5, atol=1e-5)
        if streamed.attention is not None:  # the entries held (the slots past them are free)
            assert torch.equal(streamed.attention.lengths, read.attention.lengths)
            for b, length in enumerate(read.attention.lengths.tolist()):
                for ours, theirs in zip(streamed.attention.in_order(),
                                        read.attention.in_order()):
                    torch.testing.assert_close(ours[b, :, :length], theirs[b, :, :length])
