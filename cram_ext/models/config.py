"""Model configurations: CRAM, its baselines and ablations, all built by the same `CRAMModel`.

A model is a stack of layers; each layer is described by a `LayerSpec` (which memories it has and
how attention is routed). `ModelConfig` holds the sizes and the training-time schedules of the
router. `model_config(name, **overrides)` returns one of the named configurations used in the
paper's tables; `MODELS` (at the end of this file) lists them, each with a one-line description.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .router import Path

WORKING_MEMORIES = ("scan", "ctode", None)
ATTENTION_MODES = ("routed", "dense", None)   # routed: only router-selected rows run attention
EPISODIC_KEYS = ("prefix", "written")


@dataclass(frozen=True)
class LayerSpec:
    """Which memories a layer has.

    working: "scan" (B1 selective scan), "ctode" (the paper's K-step Euler CT-ODE) or None.
    attention: "routed" (rows chosen by the router), "dense" (every row) or None.
    semantic: whether the low-rank semantic adapter is one of the router's paths.
    router_reads_state: the router sees log-gap, working-memory norm (and q̂ when
        `router_reads_q`) besides x_t; False makes it a static gate on x_t alone (SeqBoat).
    router_reads_q: the router reads the q̂ predictor.
    """

    working: Optional[str] = "scan"
    attention: Optional[str] = "routed"
    semantic: bool = True
    router_reads_state: bool = True
    router_reads_q: bool = True

    def __post_init__(self):
        if self.working not in WORKING_MEMORIES:
            raise ValueError(f"working memory must be one of {WORKING_MEMORIES}, "
                             f"got {self.working!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.semantic and self.attention != "routed":
            raise ValueError("the semantic path needs routed attention to consolidate from")
        if self.attention == "dense" and self.working is not None:
            raise ValueError("dense-attention layers carry no working memory "
                             "(interleave layers instead, as `jamba` does)")
        if self.router_reads_q and not (self.semantic and self.router_reads_state):
            raise ValueError("router_reads_q needs a semantic path and a state-reading router")

    @property
    def has_router(self) -> bool:
        return self.attention == "routed"

    @property
    def paths(self) -> Tuple[Path, ...]:
        """The router's choices for this layer, in the order of its predictions."""
        if not self.has_router:
            return ()
        return tuple(Path) if self.semantic else (Path.WORKING, Path.EPISODIC)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cram"
    layers: Tuple[LayerSpec, ...] = (LayerSpec(),) * 2
    d_model: int = 64
    n_heads: int = 2
    d_state: int = 16
    expand: int = 2                      # scan width = expand · d_model (Mamba)
    ffn_mult: int = 4
    semantic_rank: Optional[int] = None  # None: d_model // 16 (the paper), at least 1
    ctode_steps: int = 3
    positional_embedding: bool = False   # sinusoidal positions, for the attention-only model
    episodic_keys: str = "written"       # "written": keys are the tokens that wrote a binding
    memory_size: int = 512               # M, the episodic buffer bound for "written" keys
    gap_frequencies: Tuple[float, ...] = (0.5, 1.0, 2.0)  # sin/cos(ω Δτ) input features
    # Router and consolidation (B3-B5)
    router_episodic_bias: float = 2.0    # initial predicted-loss advantage of attention
    explore_rate_start: float = 0.1      # fraction of (token, layer) pairs exploring a path
    explore_rate_end: float = 0.02
    explore_steps: int = 1000            # linear anneal of the exploration rate
    q_sigma: float = 0.5                 # q = exp(-‖f_sem - r‖² / (q_sigma² Σ Var r))
    # Price of one attention call, in nats of the token's own loss: attention is worth it where
    # it lowers that loss by more. At 0.1 or 0.5 recurring queries kept attending long after
    # the rest of the network answered them (0.1 nats is within the noise of the router's
    # loss predictions); at 2.0 with a 100-step warm-up the router gave attention up before it
    # had learned to retrieve (SRCD, cpu preset, which now takes 2.0 after a 125-step warm-up).
    lambda_episodic: float = 1.0
    episodic_cost_start: int = 100       # every token attends before this step; λ_E is 0 ...
    episodic_cost_ramp: int = 100        # ... then rises linearly to its value over these steps
    lambda_semantic: float = 0.05        # semantic memory's reward per unit q̂, nats
    gamma_consolidation: float = 0.5
    use_q_reward: bool = True            # the −λ_S Σ π_S q̂ term
    semantic_lr_mult: float = 0.1        # the paper's consolidation lr: 0.1 × base lr
    # Each training step also measures, without gradient, the loss tokens that attended would
    # have had on another path, and regresses the router's prediction on it
    # (`CRAMModel.counterfactual_routing_loss`).
    counterfactual_probes: bool = True
    # The routers' learning rate, × the base lr: their loss predictions must follow what the
    # other paths answer as the network learns. At 1× (cpu preset, 400 steps) the router still
    # predicted 1.4-3.4 nats on the semantic path for recurring patterns it answered at 0.0-0.3.
    router_lr_mult: float = 10.0
    # Hidden units of each router's loss predictor; None: d_model. What a path is worth depends
    # on the token's key (a recurring key semantic memory has learnt, or a novel one), so the
    # predictor memorises a label per key; at d_model units (64, cpu preset) it still predicted
    # 1.3-3.2 nats on the semantic path at step 400 for rare recurring keys answered there below
    # 0.5, and kept them on attention.
    router_width: Optional[int] = None
    # Paths chosen by a moving average of each router's loss predictor over about this many
    # steps (0: by the predictor itself; see `router.Router`). At 10 (cpu preset, 400 steps,
    # ten seeds) observations moved between working and semantic memory less than half as often
    # and the dynamics MSE of every seed ended within 7% of the best baseline (21% in one seed
    # without), but recurring queries left attention more slowly unless the price starts 25
    # steps earlier (docs/RESULTS.md, "a router that decides by an average"). The cpu preset
    # takes both.
    router_average_steps: int = 0
    episodic_lr_mult: float = 1.0        # the attention projections' learning rate, × the base lr
    # Data interface (SRCD vocabulary)
    n_keys: int = 512
    n_values: int = 64
    # Evaluation runs each routed scan layer as one `cram_ext.cram_forward` call, and each of
    # its decoding steps (`CRAMModel.step`) as one `cram_ext.cram_step` call (the same routing
    # and outputs as the composed ops, fewer passes); False keeps the composed ops.
    # Training always composes: its exploration and router regression need the composed path.
    fused: bool = True

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a model needs at least one layer")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.episodic_keys not in EPISODIC_KEYS:
            raise ValueError(f"episodic_keys must be one of {EPISODIC_KEYS}")
        for rate in (self.explore_rate_start, self.explore_rate_end):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"exploration rates must be in [0, 1], got {rate}")
        if self.memory_size < 1:
            raise ValueError("memory_size must be positive")
        if self.router_average_steps < 0:
            raise ValueError("router_average_steps must be >= 0, got "
                             f"{self.router_average_steps}")
        if self.router_width is not None and self.router_width < 1:
            raise ValueError("router_width must be positive (or None: d_model), got "
                             f"{self.router_width}")

    @property
    def rank(self) -> int:
        return self.semantic_rank or max(1, self.d_model // 16)

    def episodic_cost_weight(self, step: int) -> float:
        """λ_E at `step`: 0 at first, so attention learns to retrieve before the router is
        charged for using it, then ramped up. With the full charge from step 0 the router
        abandons attention while its output is still noise and never learns to retrieve novel
        keys (seen on SRCD: novel-key accuracy stays at chance)."""
        progress = (step - self.episodic_cost_start) / max(1, self.episodic_cost_ramp)
        return self.lambda_episodic * min(1.0, max(0.0, progress))

    def explore_rate(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.explore_steps))
        return (self.explore_rate_start
                + (self.explore_rate_end - self.explore_rate_start) * progress)


def _every_layer(**spec) -> Callable[[int], Tuple[LayerSpec, ...]]:
    """A stack of identical layers, `LayerSpec(**spec)`, of any depth."""
    return lambda n_layers: (LayerSpec(**spec),) * n_layers


def _jamba_layers(n_layers: int) -> Tuple[LayerSpec, ...]:
    """One dense-attention layer in every 8 (Jamba's 1:7), at the middle of each block of 8;
    a stack shorter than 8 gets one attention layer in its middle."""
    attention_at = {min(i + 4, n_layers - 1) for i in range(0, n_layers, 8)}
    return tuple(LayerSpec(working=None, attention="dense", semantic=False,
                           router_reads_state=False, router_reads_q=False)
                 if i in attention_at else
                 LayerSpec(working="scan", attention=None, semantic=False,
                           router_reads_state=False, router_reads_q=False)
                 for i in range(n_layers))


def _semantic_lr_times_10(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, semantic_lr_mult=10 * config.semantic_lr_mult)


@dataclass(frozen=True)
class NamedModel:
    """How a named configuration is built: its layer stack for a depth, the `ModelConfig` fields
    it sets (overrides win over them), and an adjustment of the overridden config."""

    description: str
    layers: Callable[[int], Tuple[LayerSpec, ...]]
    fields: Mapping[str, Any] = field(default_factory=dict)
    adjust: Optional[Callable[[ModelConfig], ModelConfig]] = None


_NO_ROUTER = dict(semantic=False, router_reads_state=False, router_reads_q=False)

MODELS: Dict[str, NamedModel] = {
    "cram": NamedModel(
        "scan working memory + routed episodic attention + semantic adapter, 3-way router "
        "reading q̂, consolidation loss", _every_layer()),
    "transformer": NamedModel(
        "dense causal attention in every layer (plus FFN), positional embedding",
        _every_layer(working=None, attention="dense", **_NO_ROUTER),
        dict(positional_embedding=True, episodic_keys="prefix")),
    "mamba": NamedModel("selective-scan working memory only (SSM-only)",
                        _every_layer(attention=None, **_NO_ROUTER)),
    "jamba": NamedModel("1 dense-attention layer per 8, the others scan-only (Jamba's 1:7)",
                        _jamba_layers, dict(episodic_keys="prefix")),
    "seqboat": NamedModel("scan + episodic attention behind a static learned gate on x_t only",
                          _every_layer(**_NO_ROUTER)),
    "cram_no_consolidation": NamedModel(
        "CRAM without any consolidation signal (γ=0, no q̂ reward)", _every_layer(),
        dict(gamma_consolidation=0.0, use_q_reward=False)),
    "ablate_no_semantic": NamedModel("router over {working, episodic} only",
                                     _every_layer(semantic=False, router_reads_q=False)),
    "ablate_no_cons_loss": NamedModel("CRAM with γ=0", _every_layer(),
                                      dict(gamma_consolidation=0.0)),
    "ablate_no_q_router": NamedModel("CRAM whose router does not read q̂",
                                     _every_layer(router_reads_q=False)),
    "ablate_semantic_lr10": NamedModel(
        "CRAM with the semantic memory's learning rate ×10 (of the configured one)",
        _every_layer(), adjust=_semantic_lr_times_10),
}
MODEL_NAMES = tuple(MODELS)
TABLE1_MODELS = ("transformer", "mamba", "jamba", "seqboat", "cram", "cram_no_consolidation")
ABLATIONS = ("cram", "ablate_no_semantic", "ablate_no_cons_loss", "ablate_no_q_router",
             "ablate_semantic_lr10")


def model_config(name: str, n_layers: int = 2, **overrides) -> ModelConfig:
    """The named configuration, with `n_layers` layers and any `ModelConfig` field overridden."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    named = MODELS[name]
    fields = {"name": name, "layers": named.layers(n_layers), **named.fields, **overrides}
    config = dataclasses.replace(ModelConfig(), **fields)
    return named.adjust(config) if named.adjust else config
