"""CRAM model and baselines: shapes, routing that really skips attention, the loss terms by
hand, the memories' formulas, configuration errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import cram_ext
from cram_ext.models import (MODEL_NAMES, CRAMLayer, CRAMModel, LayerRecord, LayerSpec,
                             ModelConfig, ModelOutput, model_config)
from cram_ext.models import memory
from cram_ext.models.cram import RoutingPrices
from cram_ext.models.router import Path, Router, RoutingDecision
from cram_ext.srcd import SRCDConfig, batch_at

torch.set_num_threads(1)
DATA = SRCDConfig(seq_len=64)


def tiny(name, **overrides):
    return model_config(name, d_model=32, n_heads=2, **overrides)


@pytest.fixture
def batch():
    return batch_at(DATA, seed=0, step=0, batch_size=3)


class AttentionCounter:
    """Wraps `cram_ext.routed_attention` and `cram_ext.cram_forward` (evaluation's fused layer)
    to record the route of every call."""

    def __init__(self, monkeypatch):
        self.routes = []
        original = cram_ext.routed_attention

        def counted(q, k, v, *, route, **kwargs):
            self.routes.append(route.clone())
            out = original(q, k, v, route=route, **kwargs)
            assert (out[~route[:, None, :].expand(out.shape[:3])] == 0).all()
            return out
        monkeypatch.setattr(cram_ext, "routed_attention", counted)
        original_fused = cram_ext.cram_forward

        def counted_fused(*args, **kwargs):
            result = original_fused(*args, **kwargs)
            route = result.path == Path.EPISODIC
            self.routes.append(route.clone())
            assert int(result.attention_rows) == int(route.sum())
            assert (result.attention_out[~route] == 0).all()
            return result
        monkeypatch.setattr(cram_ext, "cram_forward", counted_fused)

    @property
    def rows(self):
        return sum(int(r.sum()) for r in self.routes)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_named_model_runs_forward_and_backward(name, batch):
    torch.manual_seed(0)
    model = CRAMModel(tiny(name))
    output = model(batch, step=0)
    assert output.value_logits.shape == (3, 64, DATA.n_values)
    assert output.next_value.shape == (3, 64)
    assert len(output.layers) == 2
    losses = model.losses(batch, output)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def scramble_routers(model):
    """Random loss predictions, so the routers' choices are a real mix of paths."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                torch.nn.init.normal_(layer.router.predict_loss[-1].weight, std=2.0)


def test_routed_attention_runs_exactly_the_rows_routed_to_episodic_memory(monkeypatch, batch):
    torch.manual_seed(0)
    model = CRAMModel(tiny("cram")).eval()
    scramble_routers(model)
    counter = AttentionCounter(monkeypatch)
    with torch.no_grad():
        output = model(batch)
    assert len(counter.routes) == 2
    for route, record in zip(counter.routes, output.layers):
        episodic = record.routing.choice == Path.EPISODIC
        assert torch.equal(record.routing.choice, record.routing.scores.argmin(-1))
        assert torch.equal(route, episodic)
        assert torch.equal(record.attention_rows, episodic)
        assert 0 < int(route.sum()) < route.numel()   # a real mix, not all or nothing


def test_training_explores_uniformly_and_attends_exactly_the_episodic_choices(monkeypatch,
                                                                             batch):
    torch.manual_seed(1)
    config = tiny("cram", explore_rate_start=1.0, explore_rate_end=1.0, episodic_cost_start=0)
    model = CRAMModel(config).train()
    counter = AttentionCounter(monkeypatch)
    output = model(batch, step=5)
    choices = torch.cat([r.routing.choice.flatten() for r in output.layers])
    counts = torch.bincount(choices, minlength=3).double() / choices.numel()
    assert (counts - 1 / 3).abs().max() < 0.05      # 384 draws: 5% is > 4 standard errors
    for route, record in zip(counter.routes, output.layers):
        assert torch.equal(route, record.routing.choice == Path.EPISODIC)
    assert counter.rows == sum(int(r.attention_rows.sum()) for r in output.layers)


def test_every_token_attends_during_the_warm_up(monkeypatch, batch):
    torch.manual_seed(1)
    model = CRAMModel(tiny("cram", explore_rate_start=0.0, explore_rate_end=0.0,
                           episodic_cost_start=10)).train()
    scramble_routers(model)
    counter = AttentionCounter(monkeypatch)
    model(batch, step=9)
    assert counter.rows == 2 * batch["gap"].numel()
    counter.routes.clear()
    model(batch, step=10)
    assert 0 < counter.rows < 2 * batch["gap"].numel()


def test_router_takes_the_lowest_predicted_loss_plus_price():
    router = Router(4, tuple(Path), reads_state=True, reads_q=True, episodic_bias=0.0)
    x, gap, working_out = torch.zeros(1, 3, 4), torch.zeros(1, 3), torch.zeros(1, 3, 4)
    q_hat = torch.tensor([[0.0, 0.0, 1.0]])
    with torch.no_grad():
        router.predict_loss[-1].bias.copy_(torch.tensor([1.0, 0.2, 1.02]))
    # attention at price 0.5 beats working memory (0.7 < 1.0); at price 0.9 it does not
    cheap = router(x, gap, working_out, q_hat, episodic_price=0.5, semantic_reward=0.0)
    assert cheap.choice.tolist() == [[Path.EPISODIC] * 3]
    dear = router(x, gap, working_out, q_hat, episodic_price=0.9, semantic_reward=0.05)
    # semantic memory earns 0.05·q̂: 1.02 − 0.05 < 1.0 only where q̂ = 1
    assert dear.choice.tolist() == [[Path.WORKING, Path.WORKING, Path.SEMANTIC]]
    torch.testing.assert_close(dear.scores[0, 2], torch.tensor([1.0, 1.1, 0.97]))


def test_a_router_averaged_over_steps_chooses_by_the_average_and_regresses_itself():
    router = Router(4, tuple(Path), reads_state=True, reads_q=True, episodic_bias=0.0,
                    average_steps=4)
    x, gap, working_out = torch.zeros(1, 3, 4), torch.zeros(1, 3), torch.zeros(1, 3, 4)
    q_hat = torch.tensor([[0.0, 0.0, 1.0]])
    live = torch.tensor([1.0, 0.2, 1.02])
    with torch.no_grad():
        router.predict_loss[-1].bias.copy_(live)
    prices = dict(episodic_price=0.5, semantic_reward=0.05)
    # The average still predicts 0 for every path: attention (0.5) loses everywhere, semantic
    # memory wins where q̂ = 1; the predictor itself would send every token to attention.
    decision = router.train()(x, gap, working_out, q_hat, **prices)
    assert decision.choice.tolist() == [[Path.WORKING, Path.WORKING, Path.SEMANTIC]]
    torch.testing.assert_close(decision.predicted_loss[0, 0], live)   # what is regressed
    assert decision.predicted_loss.requires_grad
    evaluated = router.eval()(x, gap, working_out, q_hat, **prices)
    assert torch.equal(evaluated.choice, decision.choice)
    assert (evaluated.predicted_loss == 0).all()                        # what decided
    router.update_average()
    torch.testing.assert_close(router.predict_loss_average[-1].bias, live / 4)
    for _ in range(40):
        router.update_average()
    assert router(x, gap, working_out, q_hat, **prices).choice.tolist() == [[Path.EPISODIC] * 3]
    # the average is no parameter any optimizer or gradient reaches
    model = CRAMModel(tiny("cram", router_average_steps=4))
    grouped = {id(p) for group in model.param_groups(1e-3, 0.1) for p in group["params"]}
    averages = [p for layer in model.layers for p in layer.router.predict_loss_average.parameters()]
    assert averages and not any(p.requires_grad or id(p) in grouped for p in averages)


def test_baselines_spend_the_attention_their_design_says(monkeypatch, batch):
    counter = AttentionCounter(monkeypatch)
    CRAMModel(tiny("transformer")).eval()(batch)
    assert counter.rows == 2 * batch["gap"].numel()
    counter.routes.clear()
    CRAMModel(tiny("mamba")).eval()(batch)
    assert counter.rows == 0
    jamba = model_config("jamba", n_layers=8, d_model=32)
    assert [spec.attention for spec in jamba.layers].count("dense") == 1
    jamba16 = model_config("jamba", n_layers=16, d_model=32)
    assert [spec.attention for spec in jamba16.layers].count("dense") == 2


def test_episodic_keys_are_the_written_entries(monkeypatch, batch):
    seen = {}
    original = cram_ext.routed_attention

    def record_mask(q, k, v, *, key_mask, **kwargs):
        seen["key_mask"] = key_mask
        return original(q, k, v, key_mask=key_mask, **kwargs)
    monkeypatch.setattr(cram_ext, "routed_attention", record_mask)
    original_fused = cram_ext.cram_forward

    def record_fused_mask(*args, key_mask, **kwargs):
        seen["key_mask"] = key_mask
        return original_fused(*args, key_mask=key_mask, **kwargs)
    monkeypatch.setattr(cram_ext, "cram_forward", record_fused_mask)
    CRAMModel(tiny("cram")).eval()(batch)
    assert torch.equal(seen["key_mask"], batch["value"] != DATA.n_values)
    small_buffer = CRAMModel(tiny("cram", memory_size=2))
    with pytest.raises(ValueError, match="memory_size"):
        small_buffer(batch)


def hand_attention(layer, x, key_mask):
    """Causal multi-head softmax attention over the written keys, every row, by hand."""
    att = layer.episodic
    batch, length, d = x.shape
    q, k, v = (t.view(batch, length, att.n_heads, -1).transpose(1, 2)
               for t in att.qkv(x).chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = torch.ones(length, length, dtype=torch.bool).tril() & key_mask[:, None, None, :]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return att.out_proj((probs @ v).transpose(1, 2).reshape(batch, length, d))


def test_layer_measures_q_and_consolidation_error_by_the_formulas():
    torch.manual_seed(2)
    config = tiny("cram")
    layer = CRAMLayer(config, config.layers[0]).train()
    with torch.no_grad():   # force every token onto the episodic path
        layer.router.predict_loss[-1].bias.copy_(torch.tensor([50.0, 0.0, 50.0]))
    x, gap = torch.randn(2, 10, 32), torch.rand(2, 10)
    key_mask = torch.rand(2, 10) < 0.5
    key_mask[:, 0] = True
    out, record = layer(x, gap, key_mask, RoutingPrices(episodic=0.1, semantic=0.05))
    assert record.attention_rows.all()
    retrieved = hand_attention(layer, x, key_mask)
    recalled = layer.semantic.up(F.relu(layer.semantic.down(x)))
    error = (recalled - retrieved).pow(2).sum(-1)
    torch.testing.assert_close(record.consolidation_error, error / 32)
    spread = retrieved.reshape(-1, 32).var(0, unbiased=False).sum()   # every row ran
    q = torch.exp(-error / (config.q_sigma ** 2 * spread))
    torch.testing.assert_close(record.q, q)
    # attention, not the semantic path, reaches the output: out = Norm(x + y + r^E) → FFN
    h = layer.norm_mix(x + layer.working(x, gap) + retrieved)
    torch.testing.assert_close(out, layer.norm_ffn(h + layer.ffn(h)))


def test_losses_match_a_hand_computation():
    config = tiny("cram", gamma_consolidation=0.5, counterfactual_probes=False)
    model = CRAMModel(config)
    batch = {"target_class": torch.tensor([[-100, 2, -100], [1, -100, -100]]),
             "dynamics_mask": torch.tensor([[True, False, True], [False, False, True]]),
             "target_value": torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 2.0]])}
    torch.manual_seed(3)
    logits = torch.randn(2, 3, config.n_values)
    next_value = torch.tensor([[0.5, 9.0, -1.0], [9.0, 9.0, 1.0]])
    predicted = torch.rand(2, 3, 3)
    choice = torch.tensor([[0, 1, 2], [1, 1, 0]])
    rows = choice == Path.EPISODIC
    q_hat = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.4]])
    q = torch.tensor([[0.0, 0.7, 0.0], [0.1, 0.6, 0.0]])
    error = torch.tensor([[0.0, 0.4, 0.0], [2.0, 1.0, 0.0]])
    layer = LayerRecord(attention_rows=rows, routing=RoutingDecision(choice, predicted, predicted),
                        q_hat=q_hat, q=q, consolidation_error=error)
    losses = model.losses(batch, ModelOutput(logits, next_value, [layer, layer]))

    # task terms: sums over their positions divided by all 6 positions
    ce1, ce2 = -logits[0, 1].log_softmax(-1)[2], -logits[1, 0].log_softmax(-1)[1]
    token_loss = torch.tensor([[(0.5 - 1.0) ** 2, float(ce1), 0.0],
                               [float(ce2), 0.0, (1.0 - 2.0) ** 2]])
    ce, mse = (ce1 + ce2) / 6, ((0.5 - 1.0) ** 2 + (1.0 - 2.0) ** 2) / 6
    taken = predicted.gather(-1, choice[..., None]).squeeze(-1)
    routing = 2 * (taken - token_loss).pow(2).sum() / 6     # two identical layers
    cons = (0.4 + 2.0 + 1.0) / 3            # both layers identical: (2·sum) / (2·3)
    q_reg = ((0.5 - 0.7) ** 2 + (0.2 - 0.1) ** 2 + (0.3 - 0.6) ** 2) / 3
    expected = ce + mse + routing + 0.5 * cons + q_reg
    for name, value in (("retrieval", ce), ("dynamics", mse), ("routing", routing),
                        ("consolidation", cons), ("q_regression", q_reg), ("total", expected)):
        assert float(losses[name]) == pytest.approx(float(value), rel=1e-5), name


def test_router_learns_from_measured_losses_only(batch):
    torch.manual_seed(4)
    model = CRAMModel(tiny("cram")).train()
    output = model(batch, step=500)
    losses = model.losses(batch, output)
    router = model.layers[0].router.predict_loss[-1].weight
    task = losses["retrieval"] + losses["dynamics"]
    task_grad = torch.autograd.grad(task, router, retain_graph=True, allow_unused=True)[0]
    assert task_grad is None or (task_grad == 0).all()      # hard gates: no straight-through
    assert torch.autograd.grad(losses["routing"], router, retain_graph=True)[0].abs().sum() > 0
    # the router's regression reads detached features: it trains no other part
    encoder = model.encoder.type_embedding.weight
    routing_grad = torch.autograd.grad(losses["routing"], encoder, allow_unused=True)[0]
    assert routing_grad is None or (routing_grad == 0).all()


def test_a_pass_on_the_routers_own_choices_reproduces_the_forward(batch):
    torch.manual_seed(6)
    model = CRAMModel(tiny("cram")).train()
    output = model(batch, step=500)            # exploring: the choices are partly random
    again = model(batch, step=500, paths=[r.routing.choice for r in output.layers])
    torch.testing.assert_close(again.value_logits, output.value_logits)
    for first, second in zip(output.layers, again.layers):
        assert torch.equal(first.routing.choice, second.routing.choice)


@pytest.mark.parametrize("name", ["cram", "ablate_no_semantic"])
def test_counterfactual_probes_regress_another_path_of_attended_tokens(name, batch):
    model = CRAMModel(tiny(name, counterfactual_probes=True)).train()
    torch.manual_seed(7)
    output = model(batch, step=500)
    state = torch.random.get_rng_state()
    losses = model.losses(batch, output)
    # by hand, with the same draws: every token that attended takes one of its layer's other
    # paths, uniformly, in one of the layers where it attended; the other tokens repeat their
    # choices
    torch.random.set_rng_state(state)
    attended = torch.stack([r.routing.choice == Path.EPISODIC for r in output.layers])
    layer_drawn = torch.rand(attended.shape).masked_fill(~attended, -1.0).argmax(0)
    swapped, paths = [], []
    for k, (layer, record) in enumerate(zip(model.layers, output.layers)):
        others = torch.tensor([p for p in layer.router.paths if p != Path.EPISODIC])
        drawn = others[torch.randint(len(others), record.routing.choice.shape)]
        swapped.append((record.routing.choice == Path.EPISODIC) & (layer_drawn == k))
        paths.append(torch.where(swapped[-1], drawn, record.routing.choice))
    assert all(s.any() and (~s).any() for s in swapped)
    assert not (swapped[0] & swapped[1]).any()            # one layer per token ...
    assert torch.equal(swapped[0] | swapped[1], attended.any(0))   # ... where it attended
    assert all((p[s] != Path.EPISODIC).all() for p, s in zip(paths, swapped))
    if name == "cram":   # both other paths get measured
        assert set(torch.cat([p[s] for p, s in zip(paths, swapped)]).tolist()) == {
            Path.WORKING, Path.SEMANTIC}
    with torch.no_grad():
        counterfactual = model.token_losses(batch, model(batch, paths=paths))
    expected = sum(((r.routing.predicted_loss.gather(-1, p[..., None]).squeeze(-1)
                     - counterfactual).pow(2) * s).sum()
                   for s, p, r in zip(swapped, paths, output.layers)) / counterfactual.numel()
    value = {name: float(term.detach()) for name, term in losses.items()}
    assert value["counterfactual"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert value["total"] == pytest.approx(sum(
        value[k] for k in ("retrieval", "dynamics", "routing", "counterfactual",
                           "q_regression")) + model.config.gamma_consolidation
        * value["consolidation"], rel=1e-5)
    # it trains the router's predictions of the other paths only: no gradient reaches the
    # network, nor the prediction for attention
    weight = model.layers[0].router.predict_loss[-1].weight
    grad = torch.autograd.grad(losses["counterfactual"], weight, retain_graph=True)[0]
    assert grad[Path.WORKING].abs().sum() > 0 and (grad[Path.EPISODIC] == 0).all()
    encoder = model.encoder.type_embedding.weight
    assert torch.autograd.grad(losses["counterfactual"], encoder, allow_unused=True)[0] is None
    # only when configured, and never in evaluation
    off = CRAMModel(tiny(name, counterfactual_probes=False)).train()
    assert not off.losses(batch, output)["counterfactual"]
    assert not model.eval().losses(batch, output)["counterfactual"]


def test_selective_scan_memory_is_the_scan_with_log_gap_steps():
    torch.manual_seed(5)
    wm = memory.SelectiveScanMemory(d_model=8, d_state=4, expand=2)
    x, gap = torch.randn(2, 6, 8), torch.rand(2, 6) * 5
    u, z = wm.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    dt, B, C = wm.x_proj(u.transpose(1, 2)).split([wm.dt_rank, 4, 4], dim=-1)
    y = cram_ext.reference.selective_scan_ref(
        u, wm.dt_proj(dt).transpose(1, 2), -torch.exp(wm.A_log), B.transpose(1, 2),
        C.transpose(1, 2), wm.D, z, wm.dt_bias, True, torch.log1p(gap))
    torch.testing.assert_close(wm(x, gap), wm.out_proj(y.transpose(1, 2)), rtol=1e-4, atol=1e-5)


def test_ctode_memory_follows_the_euler_steps_and_carries_state():
    torch.manual_seed(6)
    wm = memory.CTODEMemory(d_model=4, steps=3)
    x, gap = torch.randn(1, 2, 4), torch.tensor([[0.5, 3.0]])
    h = torch.zeros(1, 4)
    expected = []
    for t in range(2):
        rate = torch.sigmoid(wm.W_tau(torch.log1p(gap[:, t:t + 1]))) / 3
        for _ in range(3):
            h = h + rate * torch.tanh(wm.W1(h) + wm.W2(x[:, t]))
        expected.append(wm.W_o(h))
    torch.testing.assert_close(wm(x, gap), torch.stack(expected, dim=1))
    model = CRAMModel(tiny("cram", layers=(LayerSpec(working="ctode"),)))
    assert model(batch_at(DATA, 0, 0, 1)).value_logits.shape == (1, 64, DATA.n_values)


def test_schedules_and_parameter_groups():
    config = tiny("cram", explore_steps=10, episodic_cost_start=100, episodic_cost_ramp=100,
                  lambda_episodic=0.1, router_width=48, episodic_lr_mult=3.0)
    assert config.explore_rate(0) == pytest.approx(0.1)
    assert config.explore_rate(5) == pytest.approx(0.06)
    assert config.explore_rate(500) == pytest.approx(0.02)
    assert config.episodic_cost_weight(100) == 0.0
    assert config.episodic_cost_weight(150) == pytest.approx(0.05)
    assert config.episodic_cost_weight(1000) == pytest.approx(0.1)
    model = CRAMModel(config)
    groups = {frozenset(id(p) for p in g["params"]): g
              for g in model.param_groups(lr=1e-3, weight_decay=0.01)}
    semantic = frozenset(id(p) for layer in model.layers for p in layer.semantic.parameters())
    router = frozenset(id(p) for layer in model.layers for p in layer.router.parameters())
    episodic = frozenset(id(p) for layer in model.layers for p in layer.episodic.parameters())
    assert groups[semantic]["lr"] == pytest.approx(1e-4)
    assert groups[episodic]["lr"] == pytest.approx(3e-3)
    assert groups[episodic]["weight_decay"] == 0.01
    assert model.layers[0].router.predict_loss[0].out_features == 48
    assert CRAMModel(tiny("cram")).layers[0].router.predict_loss[0].out_features == 32  # d_model
    assert groups[router]["lr"] == pytest.approx(1e-2) and groups[router]["weight_decay"] == 0
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    assert tiny("ablate_semantic_lr10").semantic_lr_mult == pytest.approx(1.0)
    assert tiny("ablate_no_cons_loss").gamma_consolidation == 0.0
    assert not tiny("ablate_no_q_router").layers[0].router_reads_q
    assert tiny("ablate_no_semantic").layers[0].paths == (Path.WORKING, Path.EPISODIC)
    assert tiny("seqboat").layers[0].router_reads_state is False


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        model_config("gpt")
    with pytest.raises(ValueError, match="router_width must be positive"):
        tiny("cram", router_width=0)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="semantic path needs routed attention"):
        LayerSpec(attention="dense", semantic=True)
    with pytest.raises(ValueError, match="working memory"):
        LayerSpec(working="lstm")
    with pytest.raises(ValueError, match="exploration rates"):
        ModelConfig(explore_rate_start=1.5)
    with pytest.raises(ValueError, match="attention must be one of"):
        LayerSpec(attention="sparse", semantic=False)
    with pytest.raises(ValueError, match="dense-attention layers carry no working memory"):
        LayerSpec(attention="dense", semantic=False, router_reads_q=False)
    with pytest.raises(ValueError, match="router_reads_q needs a semantic path"):
        LayerSpec(semantic=False)
    with pytest.raises(ValueError, match="at least one layer"):
        ModelConfig(layers=())
    with pytest.raises(ValueError, match="episodic_keys must be one of"):
        ModelConfig(episodic_keys="all")
    with pytest.raises(ValueError, match="memory_size must be positive"):
        ModelConfig(memory_size=0)
    with pytest.raises(ValueError, match="router_average_steps must be >= 0"):
        ModelConfig(router_average_steps=-1)
    with pytest.raises(ValueError, match="ctode_steps must be at least 1"):
        CRAMModel(ModelConfig(layers=(LayerSpec(working="ctode"),), ctode_steps=0))
