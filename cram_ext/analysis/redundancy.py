"""Attention redundancy: how much of attention a linear probe can predict.

For every layer and token the CRAM paper fits a linear probe ``â = W·h + b``
from the hidden state ``h`` that the attention sublayer reads (after its
pre-norm) to the sublayer's output ``a``, and reports, on held-out tokens::

    R = 1 − Σ‖a − â‖² / Σ‖a‖²

R near 1 means most of what attention writes into the residual stream is a
fixed linear function of the current token's own state, i.e. it did not
need to look at other tokens.  This module measures R for a whole layer
(the output after the output projection) and for every head (that head's
slice of the input to the output projection).

How it is measured
------------------
* Activations are captured with forward hooks while token windows stream
  through the model (eval mode, no grad).
* The probe is ridge regression solved in closed form.  Only second
  moments are kept, in float64: ``XᵀX``, ``XᵀY`` and the per-column
  ``Σ y²`` (``X`` carries a bias column), so memory does not grow with the
  number of tokens.  One solve per layer serves the layer and all of its
  heads at once, because a least-squares fit separates by output column.
* Windows are split into probe-fitting and held-out sets (every k-th
  window is held out).  The held-out error is streamed too:
  ``Σ‖y − Wᵀx‖² = Σ‖y‖² − 2·tr(Wᵀ XᵀY) + tr(Wᵀ XᵀX W)`` needs only the
  held-out set's second moments.
* The ridge penalty is ``ridge × mean(diag XᵀX)`` on the weights (not on the
  bias).  It must be positive for LayerNorm models: LayerNorm outputs lie
  on a hyperplane, so ``XᵀX`` with a bias column is exactly singular.
* Besides the paper's R, the report carries ``R_centered``, whose
  denominator is the held-out variance ``Σ‖a − ā‖²``.  The bias column
  alone already earns ``Σ‖ā‖²`` of the paper's R, so ``R_centered`` tells
  how much of R comes from the token-dependent part of the probe.

Architectures: adapters
-----------------------
An *adapter* is a function ``adapter(model) -> list[AttentionTaps] | None``
returning one :class:`AttentionTaps` per layer, or ``None`` when the model
is not its kind.  Each ``AttentionTaps`` names three :class:`Tap` points
(a module plus whether to capture its first input or its output) and the
number of heads:

``pre_attention``
    the hidden state the attention sublayer reads (GPT-2: ``ln_1`` output);
``attention_output``
    what the sublayer adds to the residual stream (GPT-2: ``attn.c_proj``
    output);
``per_head``
    the concatenated head outputs before the output projection (GPT-2:
    ``attn.c_proj`` input), split into ``n_heads`` equal slices.

Built in: ``gpt2`` (``transformer.h[i].ln_1 / .attn.c_proj``) and
``llama`` (``model.layers[i].input_layernorm / .self_attn.o_proj``, which
also covers Mistral, Qwen2 and other models laid out the same way).  A model
from this package registers its own adapter with::

    from cram_ext.analysis.redundancy import AttentionTaps, Tap, register_adapter

    def cram_adapter(model):
        if not isinstance(model, MyModel):
            return None
        return [AttentionTaps(Tap(block.norm1, "output"),
                              Tap(block.attn.out_proj, "output"),
                              Tap(block.attn.out_proj, "input"),
                              block.attn.n_heads)
                for block in model.blocks]

    register_adapter("cram", cram_adapter)

Models that are not Hugging Face models are called as ``model(token_ids)``.

Command line
------------
``python -m cram_ext.analysis.redundancy --model gpt2 --local-files-only \\
--text corpus.txt --out-json r.json --heatmap r.png`` (``--help`` lists all
options).  ``--local-files-only`` (or ``HF_HUB_OFFLINE=1``) loads only from
the local Hugging Face cache or a local directory.  Loading models needs the
``analysis`` extra: ``pip install cram_ext[analysis]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

# --------------------------------------------------------------------------
# Probe statistics and closed-form fit
# --------------------------------------------------------------------------


class ProbeStatistics:
    """Running second moments of (x, y) pairs for the affine probe y ≈ Wᵀ[x, 1].

    ``xx`` is ``Σ x̃ x̃ᵀ`` and ``xy`` is ``Σ x̃ yᵀ`` with ``x̃ = [x, 1]``;
    ``yy`` is the per-column ``Σ y²``.  The bias row of ``xy`` is ``Σ y`` and
    the corner of ``xx`` is the sample count, so means need no extra storage.
    """

    def __init__(self, in_dim: int, out_dim: int, device: torch.device | str | None = None):
        options = {"dtype": torch.float64, "device": device}
        self.xx = torch.zeros(in_dim + 1, in_dim + 1, **options)
        self.xy = torch.zeros(in_dim + 1, out_dim, **options)
        self.yy = torch.zeros(out_dim, **options)

    @property
    def count(self) -> int:
        """Number of samples accumulated."""
        return int(round(self.xx[-1, -1].item()))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add samples: ``x`` is (n, in_dim), ``y`` is (n, out_dim)."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x (n, in) and y (n, out), got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.to(self.xx.device, torch.float64)
        y = y.to(self.xx.device, torch.float64)
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += (y * y).sum(dim=0)


def fit_ridge(stats: ProbeStatistics, ridge: float) -> torch.Tensor:
    """Solve the ridge probe; returns W of shape (in_dim + 1, out_dim), bias last.

    The penalty ``ridge × mean(diag XᵀX)`` is scale-free, so one default
    suits models whose activations differ in size by orders of magnitude.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be non-negative, got {ridge}")
    features = stats.xx.shape[0] - 1
    scale = stats.xx.diagonal()[:features].mean().clamp_min(torch.finfo(torch.float64).tiny)
    penalty = torch.zeros(features + 1, dtype=torch.float64, device=stats.xx.device)
    penalty[:features] = ridge * scale
    try:
        return torch.linalg.solve(stats.xx + torch.diag(penalty), stats.xy)
    except torch.linalg.LinAlgError as error:
        raise ValueError(
            "the probe's normal equations are singular; use a positive ridge "
            "(LayerNorm outputs make XᵀX singular without one)"
        ) from error


def residual_energy(stats: ProbeStatistics, weights: torch.Tensor) -> torch.Tensor:
    """Per-column Σ (y − Wᵀx̃)² over the samples in ``stats``, from moments only."""
    cross = (weights * stats.xy).sum(dim=0)
    quadratic = ((stats.xx @ weights) * weights).sum(dim=0)
    return (stats.yy - 2.0 * cross + quadratic).clamp_min(0.0)


def centered_energy(stats: ProbeStatistics) -> torch.Tensor:
    """Per-column Σ (y − ȳ)² over the samples in ``stats``."""
    count = stats.xx[-1, -1].clamp_min(1.0)
    return (stats.yy - stats.xy[-1] ** 2 / count).clamp_min(0.0)


def explained_fraction(residual: torch.Tensor, energy: torch.Tensor) -> float:
    """1 − Σ residual / Σ energy, summed over the given columns."""
    total = energy.sum().item()
    if total <= 0.0:
        return float("nan")
    return 1.0 - residual.sum().item() / total


@dataclass
class LayerScores:
    """Held-out R of one layer and of each of its heads."""

    r: float
    r_centered: float
    head_r: list[float]
    head_r_centered: list[float]


def score_layer(
    train: ProbeStatistics, heldout: ProbeStatistics, output_dim: int, n_heads: int, ridge: float
) -> LayerScores:
    """Fit on ``train`` and score on ``heldout``.

    The target columns are ``[attention output (output_dim) | head outputs]``;
    the head part is split into ``n_heads`` equal slices.
    """
    weights = fit_ridge(train, ridge)
    residual = residual_energy(heldout, weights)
    raw, centered = heldout.yy, centered_energy(heldout)

    def r_over(columns: slice) -> tuple[float, float]:
        return (
            explained_fraction(residual[columns], raw[columns]),
            explained_fraction(residual[columns], centered[columns]),
        )

    head_width = raw.shape[0] - output_dim
    if n_heads < 1 or head_width % n_heads:
        raise ValueError(f"per-head activations of width {head_width} cannot be split into {n_heads} heads; check the adapter")
    layer_r, layer_rc = r_over(slice(0, output_dim))
    head_dim = head_width // n_heads
    heads = [r_over(slice(output_dim + h * head_dim, output_dim + (h + 1) * head_dim)) for h in range(n_heads)]
    return LayerScores(layer_r, layer_rc, [h[0] for h in heads], [h[1] for h in heads])


# --------------------------------------------------------------------------
# Architecture adapters and hooks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """A capture point: the first positional input or the output of ``module``."""

    module: nn.Module
    side: Literal["input", "output"]


@dataclass(frozen=True)
class AttentionTaps:
    """Where one layer's probe input and targets are captured (see module docstring)."""

    pre_attention: Tap
    attention_output: Tap
    per_head: Tap
    n_heads: int


Adapter = Callable[[nn.Module], Optional[list[AttentionTaps]]]
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, adapter: Adapter) -> None:
    """Make ``adapter`` available to :func:`attention_taps` (later names are tried later)."""
    _ADAPTERS[name] = adapter


class UnsupportedArchitectureError(ValueError):
    """No registered adapter recognises the model."""


def attention_taps(model: nn.Module) -> tuple[str, list[AttentionTaps]]:
    """Return (adapter name, per-layer taps) from the first adapter that accepts ``model``."""
    for name, adapter in _ADAPTERS.items():
        taps = adapter(model)
        if taps:
            return name, taps
    raise UnsupportedArchitectureError(
        f"no attention adapter for {type(model).__name__}; known adapters: {', '.join(_ADAPTERS)}. "
        "Register one with cram_ext.analysis.redundancy.register_adapter (see the module docstring)."
    )


def _gpt2_adapter(model: nn.Module) -> Optional[list[AttentionTaps]]:
    """GPT-2 family: ``transformer.h[i]`` (or ``h[i]`` on the bare GPT2Model)."""
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
        hasattr(b, "ln_1") and hasattr(getattr(b, "attn", None), "c_proj") for b in blocks
    ):
        return None
    return [
        AttentionTaps(Tap(b.ln_1, "output"), Tap(b.attn.c_proj, "output"), Tap(b.attn.c_proj, "input"), b.attn.num_heads)
        for b in blocks
    ]


def _llama_adapter(model: nn.Module) -> Optional[list[AttentionTaps]]:
    """Llama/Mistral layout: ``model.layers[i].input_layernorm / .self_attn.o_proj``."""
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    config = getattr(model, "config", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(config, "num_attention_heads"):
        return None
    if not all(hasattr(l, "input_layernorm") and hasattr(getattr(l, "self_attn", None), "o_proj") for l in layers):
        return None
    return [
        AttentionTaps(
            Tap(l.input_layernorm, "output"),
            Tap(l.self_attn.o_proj, "output"),
            Tap(l.self_attn.o_proj, "input"),
            config.num_attention_heads,
        )
        for l in layers
    ]


register_adapter("gpt2", _gpt2_adapter)
register_adapter("llama", _llama_adapter)


class ActivationRecorder:
    """Context manager that keeps the latest tensor seen at each layer's taps.

    After a forward pass, ``recorder.take()[layer]`` is
    ``(pre_attention, attention_output, heads)``.
    """

    def __init__(self, taps: Sequence[AttentionTaps]):
        self.taps = list(taps)
        self._latest: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "ActivationRecorder":
        for layer, taps in enumerate(self.taps):
            for role in ("pre_attention", "attention_output", "per_head"):
                self._handles.append(self._hook(getattr(taps, role), (layer, role)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, tap: Tap, key: tuple[int, str]) -> torch.utils.hooks.RemovableHandle:
        if tap.side not in ("input", "output"):
            raise ValueError(f"Tap.side must be 'input' or 'output', got {tap.side!r}")

        def keep(module, inputs, output):
            value = inputs[0] if tap.side == "input" else output
            self._latest[key] = (value[0] if isinstance(value, (tuple, list)) else value).detach()

        return tap.module.register_forward_hook(keep)

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer ``(pre_attention, attention_output, heads)`` of the last forward pass.

        The tensors are forgotten once taken, so a tap that a later pass
        fails to reach is reported instead of silently reusing old values.
        """
        roles = ("pre_attention", "attention_output", "per_head")
        missing = [(layer, role) for layer in range(len(self.taps)) for role in roles if (layer, role) not in self._latest]
        if missing:
            raise RuntimeError(f"the forward pass did not reach taps {missing}; check the adapter")
        layers = [tuple(self._latest[(layer, role)] for role in roles) for layer in range(len(self.taps))]
        self._latest.clear()
        return layers


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class RedundancyReport:
    """Held-out redundancy R per layer and head, with the run's settings."""

    model: str
    architecture: str
    layer_r: list[float]
    layer_r_centered: list[float]
    head_r: list[list[float]]
    head_r_centered: list[list[float]]
    train_tokens: int
    heldout_tokens: int
    ridge: float
    holdout_every: int
    context: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """Mean of the per-layer R (how the paper summarises a model)."""
        return sum(self.layer_r) / len(self.layer_r)

    @property
    def overall_centered(self) -> float:
        return sum(self.layer_r_centered) / len(self.layer_r_centered)

    def thirds(self, values: Optional[Sequence[float]] = None) -> dict[str, Optional[float]]:
        """Mean R over the early, middle and late thirds of the layers (None, JSON null, for a
        third with no layer: a model of fewer than three layers)."""
        values = list(self.layer_r if values is None else values)
        size = len(values)
        groups = {}
        for i, name in enumerate(("early", "middle", "late")):
            part = values[i * size // 3 : (i + 1) * size // 3]
            groups[name] = sum(part) / len(part) if part else None
        return groups

    def head_shares(self, low: float = 0.5, high: float = 0.8) -> dict[str, float]:
        """Share of heads with R > high, low ≤ R ≤ high, and R < low."""
        heads = [r for layer in self.head_r for r in layer]
        n = len(heads)
        return {
            f"above_{high}": sum(r > high for r in heads) / n,
            f"{low}_to_{high}": sum(low <= r <= high for r in heads) / n,
            f"below_{low}": sum(r < low for r in heads) / n,
        }

    def to_dict(self) -> dict:
        summary = {
            "overall_r": self.overall,
            "overall_r_centered": self.overall_centered,
            "thirds_r": self.thirds(),
            "thirds_r_centered": self.thirds(self.layer_r_centered),
            "head_shares": self.head_shares(),
        }
        return {**asdict(self), "summary": summary}

    def format_table(self) -> str:
        """Plain-text table: per layer, thirds, overall, head shares."""
        lines = [
            f"model {self.model} ({self.architecture}); probe fit on {self.train_tokens} tokens, "
            f"R on {self.heldout_tokens} held-out tokens; ridge {self.ridge:g}",
            f"{'layer':>8} {'R':>8} {'R_cent':>8} {'head R min/mean/max':>22}",
        ]
        for layer, (r, rc, heads) in enumerate(zip(self.layer_r, self.layer_r_centered, self.head_r)):
            spread = f"{min(heads):.3f}/{sum(heads) / len(heads):.3f}/{max(heads):.3f}"
            lines.append(f"{layer:>8} {r:>8.4f} {rc:>8.4f} {spread:>22}")
        centered = self.thirds(self.layer_r_centered)
        for name, value in self.thirds().items():
            if value is None:
                lines.append(f"{name:>8} {'n/a':>8} {'n/a':>8}")
            else:
                lines.append(f"{name:>8} {value:>8.4f} {centered[name]:>8.4f}")
        lines.append(f"{'overall':>8} {self.overall:>8.4f} {self.overall_centered:>8.4f}")
        shares = self.head_shares()
        lines.append("heads: " + ", ".join(f"R {k.replace('_', ' ')}: {v:.1%}" for k, v in shares.items()))
        return "\n".join(lines)


class _LayerAccumulator:
    """Fitting and held-out statistics of one layer, created on first use."""

    def __init__(self) -> None:
        self.splits: dict[bool, ProbeStatistics] = {}
        self.output_dim = 0

    def update(self, pre: torch.Tensor, out: torch.Tensor, heads: torch.Tensor, heldout: torch.Tensor) -> None:
        """Add a batch; ``heldout`` is a bool per window (batch row)."""
        target = torch.cat([out, heads], dim=-1)
        if not self.splits:
            self.output_dim = out.shape[-1]
            self.splits = {split: ProbeStatistics(pre.shape[-1], target.shape[-1], pre.device) for split in (False, True)}
        for split, stats in self.splits.items():
            rows = (heldout == split).to(pre.device)
            if rows.any():
                stats.update(pre[rows].reshape(-1, pre.shape[-1]), target[rows].reshape(-1, target.shape[-1]))


def _run_backbone(model: nn.Module, token_ids: torch.Tensor) -> None:
    """Forward pass that reaches every attention layer without the LM head."""
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and hasattr(model, "config"):
        backbone(input_ids=token_ids, use_cache=False)
    else:
        model(token_ids)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (where token ids are sent)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def measure_redundancy(
    model: nn.Module,
    token_batches: Iterable[torch.Tensor],
    *,
    ridge: float = 1e-6,
    holdout_every: int = 5,
    model_name: Optional[str] = None,
    progress_total: Optional[int] = None,
    progress: bool = False,
) -> RedundancyReport:
    """Measure held-out attention redundancy R of ``model``.

    ``token_batches`` yields LongTensors of shape (batch, window).  Windows
    are numbered in stream order; every ``holdout_every``-th window (the
    last of each group) is held out for scoring, the rest fit the probes.
    The model is put in eval mode.  ``progress`` shows a tqdm bar over tokens.
    """
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be at least 2, got {holdout_every}")
    architecture, taps = attention_taps(model)
    model.eval()
    device = model_device(model)
    layers = [_LayerAccumulator() for _ in taps]
    windows_seen = 0
    context = None
    bar = _progress_bar(progress_total, progress)
    with ActivationRecorder(taps) as recorder:
        for batch in token_batches:
            if batch.ndim != 2:
                raise ValueError(f"token batches must be (batch, window), got shape {tuple(batch.shape)}")
            context = batch.shape[1]
            window_index = torch.arange(windows_seen, windows_seen + batch.shape[0], device=device)
            heldout = window_index % holdout_every == holdout_every - 1
            windows_seen += batch.shape[0]
            _run_backbone(model, batch.to(device))
            for accumulator, (pre, out, heads) in zip(layers, recorder.take()):
                accumulator.update(pre, out, heads, heldout)
            if bar is not None:
                bar.update(batch.numel())
    if bar is not None:
        bar.close()
    return _build_report(layers, taps, architecture, ridge, holdout_every, context, windows_seen, model_name or type(model).__name__)


def _progress_bar(total: Optional[int], enabled: bool):
    """A tqdm bar counting tokens, or None when progress is off (tqdm is imported only then)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="redundancy")


def _build_report(layers, taps, architecture, ridge, holdout_every, context, windows_seen, model_name) -> RedundancyReport:
    if windows_seen < holdout_every:
        raise ValueError(
            f"too little text: {windows_seen} complete window(s) of {context or 'the requested'} tokens, but at least {holdout_every} are "
            f"needed so that one is held out (every {holdout_every}th window is); supply more tokens or a shorter window"
        )
    train_tokens = layers[0].splits[False].count
    features = layers[0].splits[False].xx.shape[0]
    if train_tokens < features:
        raise ValueError(
            f"too little text: the probe has {features} parameters per output but only {train_tokens} "
            "fitting tokens; supply more tokens"
        )
    scores = [score_layer(acc.splits[False], acc.splits[True], acc.output_dim, t.n_heads, ridge) for acc, t in zip(layers, taps)]
    return RedundancyReport(
        model=model_name,
        architecture=architecture,
        layer_r=[s.r for s in scores],
        layer_r_centered=[s.r_centered for s in scores],
        head_r=[s.head_r for s in scores],
        head_r_centered=[s.head_r_centered for s in scores],
        train_tokens=train_tokens,
        heldout_tokens=layers[0].splits[True].count,
        ridge=ridge,
        holdout_every=holdout_every,
        context=context,
    )


# --------------------------------------------------------------------------
# Token sources
# --------------------------------------------------------------------------


def encode_bytes(text: str) -> torch.Tensor:
    """Byte-level tokenisation: the UTF-8 bytes of ``text`` as ids 0–255."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def read_text_token_chunks(path: str | os.PathLike, encode: Callable[[str], torch.Tensor], chunk_chars: int = 1 << 20) -> Iterator[torch.Tensor]:
    """Tokenise a text file piece by piece, cutting pieces at line ends.

    Cutting at newlines keeps tokens from being split across pieces for
    tokenisers that do not merge across line breaks, and keeps memory flat.
    """
    pending = ""
    with open(path, encoding="utf-8", newline="") as handle:
        while True:
            block = handle.read(chunk_chars)
            if not block:
                break
            pending += block
            cut = pending.rfind("\n") + 1
            if cut > 0:
                yield encode(pending[:cut])
                pending = pending[cut:]
    if pending:
        yield encode(pending)


def load_token_ids(path: str | os.PathLike) -> torch.Tensor:
    """Token ids from a ``.npy`` or ``.pt`` file, flattened to 1-D."""
    suffix = Path(path).suffix
    if suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(path))
    elif suffix == ".pt":
        ids = torch.load(path, weights_only=True)
    else:
        raise ValueError(f"token ids must be a .npy or .pt file, got {path}")
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{path} must hold an integer tensor/array of token ids")
    return ids.reshape(-1).long()


def token_windows(chunks: Iterable[torch.Tensor], window: int, max_windows: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Cut a stream of 1-D id chunks into consecutive windows of ``window`` ids."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    buffer = torch.empty(0, dtype=torch.long)
    produced = 0
    for chunk in chunks:
        buffer = torch.cat([buffer, chunk.reshape(-1).long()])
        while buffer.numel() >= window:
            if max_windows is not None and produced >= max_windows:
                return
            yield buffer[:window]
            buffer = buffer[window:]
            produced += 1


def batched(windows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive windows into (batch_size, window) tensors (last one may be smaller)."""
    group: list[torch.Tensor] = []
    for window in windows:
        group.append(window)
        if len(group) == batch_size:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)


# --------------------------------------------------------------------------
# Output: heatmap and JSON
# --------------------------------------------------------------------------


def save_heatmap(report: RedundancyReport, path: str | os.PathLike, title: Optional[str] = None) -> None:
    """Save layer × head heatmaps of held-out R and R_centered side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"R (paper: Σ‖a‖² denominator)": report.head_r, "R_centered (Σ‖a − ā‖² denominator)": report.head_r_centered}
    n_layers, n_heads = len(report.head_r), len(report.head_r[0])
    low = min(0.0, *(r for grid in panels.values() for row in grid for r in row))
    width, height = max(3.5, 0.45 * n_heads + 1.5), max(3.0, 0.3 * n_layers + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width + 1.2, height), sharey=True)
    for ax, (label, grid) in zip(axes, panels.items()):
        image = ax.imshow(grid, cmap="viridis", vmin=low, vmax=1.0, aspect="auto")
        if n_layers * n_heads <= 300:
            _annotate_cells(ax, grid)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("head")
        ax.set_xticks(range(n_heads))
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(n_layers))
    fig.colorbar(image, ax=list(axes), label="held-out R")
    fig.suptitle(title or f"{report.model}: held-out R per head (mean layer R {report.overall:.3f})", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _annotate_cells(ax, grid: list[list[float]]) -> None:
    for layer, row in enumerate(grid):
        for head, value in enumerate(row):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white" if value < 0.6 else "black")


def write_json(data: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cram_ext.analysis.redundancy",
        description="Measure attention redundancy R (held-out linear-probe fit of attention outputs) of a causal LM.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    parser.add_argument("--local-files-only", action="store_true", help="never download (also implied by HF_HUB_OFFLINE=1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="UTF-8 text file to stream through the model")
    source.add_argument("--token-ids", help=".npy or .pt file of token ids")
    parser.add_argument("--tokenizer", help="tokenizer name/path for --text (default: the model's), or 'bytes' for UTF-8 byte ids")
    parser.add_argument("--context", type=int, help="window length in tokens (default: model context, at most 1024)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=262_144, help="stop after this many tokens")
    parser.add_argument("--holdout-every", type=int, default=5, help="hold out every k-th window for scoring")
    parser.add_argument("--ridge", type=float, default=1e-6, help="ridge penalty relative to mean(diag XᵀX)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype (statistics are always float64)")
    parser.add_argument("--out-json", help="write the report as JSON here")
    parser.add_argument("--heatmap", help="save a layer × head heatmap PNG here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.context is not None and args.context < 1:
        parser.error("--context must be positive")
    return args


def _offline(args: argparse.Namespace) -> bool:
    return args.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise SystemExit("loading Hugging Face models needs transformers: pip install 'cram_ext[analysis]'") from error
    return transformers


def load_model(name: str, *, local_files_only: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """Load a causal LM by name or path, in eval mode on ``device``."""
    transformers = _require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=local_files_only, dtype=dtype)
    return model.to(device).eval()


def _text_encoder(args: argparse.Namespace, offline: bool) -> Callable[[str], torch.Tensor]:
    if args.tokenizer == "bytes":
        return encode_bytes
    transformers = _require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=offline)

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    return encode


def _default_context(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 1024)
    raise SystemExit("the model's context length is unknown; pass --context")


def _checked_against_vocab(chunks: Iterable[torch.Tensor], vocab_size: int) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        if chunk.numel() and (chunk.min() < 0 or chunk.max() >= vocab_size):
            raise SystemExit(f"token ids must lie in [0, {vocab_size}) for this model; found {chunk.min()}..{chunk.max()}")
        yield chunk


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cram_ext.analysis.redundancy`` / ``cram-redundancy``."""
    args = _parse_args(argv)
    offline = _offline(args)
    model = load_model(args.model, local_files_only=offline, device=args.device, dtype=_DTYPES[args.dtype])
    context = args.context or _default_context(model)
    if args.text is not None:
        chunks = read_text_token_chunks(args.text, _text_encoder(args, offline))
    else:
        chunks = iter([load_token_ids(args.token_ids)])
    chunks = _checked_against_vocab(chunks, model.get_input_embeddings().num_embeddings)
    max_windows = max(1, args.max_tokens // context)
    batches = batched(token_windows(chunks, context, max_windows), args.batch_size)
    try:
        report = measure_redundancy(
            model,
            batches,
            ridge=args.ridge,
            holdout_every=args.holdout_every,
            model_name=args.model,
            progress_total=max_windows * context,
            progress=not args.no_progress,
        )
    except (ValueError, UnsupportedArchitectureError) as error:
        raise SystemExit(f"error: {error}") from error
    report.extra["source"] = args.text or args.token_ids
    print(report.format_table())
    if args.out_json:
        write_json(report.to_dict(), args.out_json)
    if args.heatmap:
        save_heatmap(report, args.heatmap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
