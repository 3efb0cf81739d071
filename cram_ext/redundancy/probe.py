"""The redundancy probe's algebra: running second moments of (pre-attention state, attention
output) pairs, the closed-form ridge fit, and held-out R from moments only (see the package
docstring for the method)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class ProbeSplits:
    """Fitting (``splits[False]``) and held-out (``splits[True]``) moments of one layer's probe,
    created on first use from the widths of the first samples."""

    def __init__(self) -> None:
        self.splits: dict[bool, ProbeStatistics] = {}
        self.output_dim = 0

    def update(self, pre: torch.Tensor, out: torch.Tensor, heads: torch.Tensor, heldout: torch.Tensor) -> None:
        """``pre``, ``out``, ``heads``: (tokens, features); ``heldout``: a bool per token."""
        target = torch.cat([out, heads], dim=-1)
        if not self.splits:
            self.output_dim = out.shape[-1]
            self.splits = {split: ProbeStatistics(pre.shape[-1], target.shape[-1], pre.device) for split in (False, True)}
        for split, stats in self.splits.items():
            rows = heldout == split
            if rows.any():
                stats.update(pre[rows], target[rows])

    def counts(self) -> tuple[int, int]:
        """(fitting, held-out) token counts."""
        return tuple(self.splits[split].count if self.splits else 0 for split in (False, True))
