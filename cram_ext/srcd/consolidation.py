"""Consolidation in training logs: the attention curve and its transition, the q distribution
around it, and the power law of P(episodic | pattern seen k times).

The figures are PNG files drawn with matplotlib (the `plot` extra), imported only when drawing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..plotting import pyplot


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    values = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (cumulative[idx] - cumulative[start]) / (idx - start)


def attention_curve(log: List[dict], window: int = 25) -> Dict[str, np.ndarray]:
    """Training attention fraction per step (raw and smoothed) and the evaluated points."""
    steps = np.array([r["step"] for r in log])
    fraction = np.array([r["attention_fraction"] for r in log])
    evaluated = [r for r in log if "eval" in r]
    return {"steps": steps, "fraction": fraction, "smoothed": smooth(fraction, window),
            "eval_steps": np.array([r["step"] for r in evaluated]),
            "eval_fraction": np.array([r["eval"]["attention_fraction"] for r in evaluated])}


def consolidation_summary(curve: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Peak and final attention fraction of the smoothed training curve, their ratio
    (consolidation ratio = final / peak, B6) and the transition step: the first step after the
    peak where the curve falls below the geometric mean of peak and final. A curve that does
    not fall at least 2× has no transition; one that never attends has no ratio."""
    smoothed, steps = np.asarray(curve["smoothed"]), np.asarray(curve["steps"])
    peak_index = int(np.argmax(smoothed))
    peak = float(smoothed[peak_index])
    final = float(smoothed[-1])
    if peak <= 0:
        return {"peak_attention": 0.0, "final_attention": final,
                "consolidation_ratio": float("nan"), "fall_factor": float("nan"),
                "transition_step": None}
    fall = peak / final if final > 0 else float("inf")
    transition = None
    if fall >= 2:
        below = np.flatnonzero(smoothed[peak_index:] <= np.sqrt(peak * max(final, 1e-12)))
        transition = int(steps[peak_index + below[0]])
    return {"peak_attention": peak, "final_attention": final, "consolidation_ratio": final / peak,
            "fall_factor": fall, "transition_step": transition}


def q_distributions(log: List[dict], transition_step: Optional[int]) -> Dict[str, np.ndarray]:
    """Histograms (10 bins on [0, 1]) of the measured q in the 10% of steps before the
    transition and in the last 10% of training."""
    n = len(log)
    span = max(1, n // 10)
    if transition_step is None:
        before = log[:span]
    else:
        end = max(1, min(n, transition_step))
        before = log[max(0, end - span):end]
    after = log[-span:]
    total = lambda rows: np.sum([r["q_histogram"] for r in rows], axis=0)  # noqa: E731
    return {"before": total(before), "after": total(after)}


def fit_power_law(k: np.ndarray, probability: np.ndarray, weight: np.ndarray):
    """Weighted least squares of log P = log a − γ log k. Returns (a, γ)."""
    keep = (probability > 0) & (weight > 0)
    if keep.sum() < 2:
        return float("nan"), float("nan")
    x, y, w = np.log(k[keep]), np.log(probability[keep]), weight[keep]
    slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
    return float(np.exp(intercept)), float(-slope)


def exposure_power_law(episodic: np.ndarray, total: np.ndarray, n_bootstrap: int = 1000,
                       seed: int = 0) -> Dict[str, object]:
    """P(episodic | pattern seen k times) from per-pattern, per-⌊log2 k⌋-bin counts (arrays of
    shape (patterns, bins), pooled over runs by stacking patterns), its power-law fit and a
    95% bootstrap interval of γ (resampling patterns)."""
    bins = np.arange(episodic.shape[1])
    k = 2.0 ** bins * 1.5 - 0.5          # the middle of [2^b, 2^(b+1) - 1]
    counts = total.sum(0)
    probability = np.divide(episodic.sum(0), counts, out=np.zeros(len(bins)), where=counts > 0)
    a, gamma = fit_power_law(k, probability, counts)
    rng = np.random.default_rng(seed)
    gammas = []
    for _ in range(n_bootstrap):
        pick = rng.integers(0, episodic.shape[0], size=episodic.shape[0])
        c = total[pick].sum(0)
        p = np.divide(episodic[pick].sum(0), c, out=np.zeros(len(bins)), where=c > 0)
        gammas.append(fit_power_law(k, p, c)[1])
    gammas = np.array([g for g in gammas if np.isfinite(g)])
    interval = (np.percentile(gammas, [2.5, 97.5]).tolist() if len(gammas) else
                [float("nan"), float("nan")])
    used = counts > 0
    return {"k": k[used].tolist(), "probability": probability[used].tolist(),
            "count": counts[used].tolist(), "a": a, "gamma": gamma, "gamma_ci95": interval}


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _label_and_save(plt, fig, ax, path: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(curves: List[Dict[str, np.ndarray]], summary: Dict[str, float], path: str,
                   title: str = "CRAM on SRCD: attention fraction during training",
                   ideal: Optional[float] = None) -> None:
    """Attention fraction vs step on a log scale, one faint line per run and the first run's
    evaluation points, with the transition step marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, curve in enumerate(curves):
        ax.plot(curve["steps"], np.maximum(curve["smoothed"], 1e-4), lw=1.5 if i == 0 else 0.8,
                alpha=1.0 if i == 0 else 0.4, color="C0",
                label="training (sampled routing, smoothed)" if i == 0 else None)
    if len(curves[0]["eval_steps"]):
        ax.plot(curves[0]["eval_steps"], np.maximum(curves[0]["eval_fraction"], 1e-4), "o",
                color="C1", ms=3, label="evaluation (inference routing)")
    if summary.get("transition_step"):
        ax.axvline(summary["transition_step"], color="k", ls="--", lw=1,
                   label=f"transition, step {summary['transition_step']}")
    if ideal:
        ax.axhline(ideal, color="C2", ls=":", lw=1, label=f"ideal {ideal:.2%}")
    ax.set_yscale("log")
    ax.set_title(title)
    _label_and_save(plt, fig, ax, path, "training step", "attention fraction")


def plot_q_distribution(distributions: Dict[str, np.ndarray], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    centres = (np.arange(10) + 0.5) / 10
    for name, color, label in (("before", "C3", "10% of steps before the transition"),
                               ("after", "C0", "last 10% of training")):
        counts = np.asarray(distributions[name], dtype=float)
        density = counts / counts.sum() if counts.sum() else counts
        ax.bar(centres + (-0.02 if name == "before" else 0.02), density, width=0.04,
               color=color, label=f"{label} (n={int(counts.sum())})")
    _label_and_save(plt, fig, ax, path, "measured q (where attention ran)", "share of tokens")


def plot_power_law(fit: Dict[str, object], path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    k, p = np.array(fit["k"]), np.array(fit["probability"])
    positive = p > 0
    ax.loglog(k[positive], p[positive], "o", label="measured")
    if np.isfinite(fit["gamma"]):
        grid = np.geomspace(k.min(), k.max(), 50)
        low, high = fit["gamma_ci95"]
        ax.loglog(grid, fit["a"] * grid ** -fit["gamma"], "-",
                  label=f"{fit['a']:.2f}·k^-{fit['gamma']:.2f} (γ 95% CI {low:.2f}–{high:.2f})")
    _label_and_save(plt, fig, ax, path, "times the pattern was seen in training, k",
                    "P(episodic | k)")
