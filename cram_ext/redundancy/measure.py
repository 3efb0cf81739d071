"""Measuring redundancy: token windows through a model, the probes' moments gathered at its
taps, the held-out `RedundancyReport`; token sources; the heatmap and JSON output."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..plotting import pyplot
from .probe import ProbeSplits, score_layer
from .taps import ActivationRecorder, attention_taps


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
    layers = [ProbeSplits() for _ in taps]
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
            for splits, (pre, out, heads) in zip(layers, recorder.take()):
                heldout_tokens = heldout.to(pre.device)[:, None].expand(pre.shape[:-1]).reshape(-1)
                splits.update(*(t.reshape(-1, t.shape[-1]) for t in (pre, out, heads)), heldout_tokens)
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
    plt = pyplot()
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
