"""Attention redundancy R of this package's own SRCD models (`cram_ext.models.CRAMModel`).

`cram_ext.analysis.redundancy` measures R with forward hooks found by an *adapter* and drives
the model with token windows.  A `CRAMModel` needs two things that module does not know about:

* **where its attention is.**  Each `CRAMLayer` with an episodic path owns an
  `EpisodicAttention` (``layer.episodic``: ``qkv`` → causal attention → ``out_proj``).  The
  probe input h is the tensor that path reads, the first input of ``layer.episodic`` (a
  `CRAMLayer` is post-norm, so for layer 0 that is the input encoding and for later layers the
  previous layer's normalised output); the target a is the output of ``out_proj``, what the path
  adds to the layer's mix; the per-head targets are the heads' slices of ``out_proj``'s input.
  Layers without an episodic path (Mamba's, the working-memory part of a hybrid) are skipped.
  `cram_adapter` says this and is registered as ``"cram"``.
* **how to feed it.**  `CRAMModel` is called with an SRCD batch dict (gaps, token types, keys,
  values, last observed values), not with token ids.  Rather than teach `measure_redundancy`
  about dicts, `SRCDSequenceFeeder` wraps the model in a module whose input *is* an id tensor:
  each row holds the stream index of one SRCD sequence, repeated over the sequence's length, and
  the wrapper regenerates that sequence (SRCD sequence ``i`` of stream ``seed`` is a pure
  function of ``(seed, i)``) and runs the model on it.  The driver's bookkeeping then works
  unchanged: one row is one window, every ``holdout_every``-th sequence is held out, and the
  token count is sequences × length.

Routed layers (CRAM's own) run attention only for the tokens their router picks; elsewhere
``out_proj`` sees zeros and writes zeros, which the probe would count as perfectly predicted
tokens.  This module therefore measures only dense-attention layers (the Transformer baseline
and the attention layers of Jamba) and says so when a model has none.

Command line::

    python -m cram_ext.analysis.cram_models --checkpoint runs/srcd/transformer_s0/checkpoint.pt \\
        --sequences 2000 --out-json r.json --heatmap r.png

The held-out SRCD stream uses data seed ``training data_seed + HELDOUT_SEED_OFFSET``, which is
neither the training stream nor the trainer's evaluation stream (``+ EVAL_SEED_OFFSET``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..models import CRAMModel
from ..srcd.generator import SRCDConfig, collate, generate_sequence, pattern_values
from .redundancy import (AttentionTaps, RedundancyReport, Tap, UnsupportedArchitectureError,
                         measure_redundancy, register_adapter, save_heatmap, write_json)

HELDOUT_SEED_OFFSET = 2_000_029   # probe stream: seed offset from the training data seed


# --------------------------------------------------------------------------
# Feeding SRCD sequences through the token-window driver
# --------------------------------------------------------------------------


class SRCDSequenceFeeder(nn.Module):
    """A `CRAMModel` whose input is a (batch, seq_len) tensor of SRCD sequence indices.

    Row r of the input is ``index_r`` repeated ``seq_len`` times, so the tensor has the shape of
    the token windows `measure_redundancy` expects while naming which sequences to generate.
    Sequences come from stream ``seed`` of ``data`` with the binding table of ``data``, the same
    generator the model was trained on.
    """

    def __init__(self, model: CRAMModel, data: SRCDConfig, seed: int):
        super().__init__()
        self.model = model
        self.data, self.seed = data, seed
        self.bindings = pattern_values(data)

    def batch(self, indices: torch.Tensor) -> dict:
        """The SRCD batch dict of the sequences named by ``indices`` (a row index tensor)."""
        if indices.ndim != 2 or indices.shape[1] != self.data.seq_len:
            raise ValueError(f"expected (batch, {self.data.seq_len}) sequence indices, "
                             f"got shape {tuple(indices.shape)}")
        if (indices != indices[:, :1]).any():
            raise ValueError("each row must repeat one sequence index (see sequence_index_batches)")
        sequences = [generate_sequence(self.data, self.seed, int(i), self.bindings)
                     for i in indices[:, 0].tolist()]
        return collate(sequences)

    def forward(self, indices: torch.Tensor):
        device = indices.device
        batch = {name: value.to(device) for name, value in self.batch(indices).items()}
        return self.model(batch)


def sequence_index_batches(n_sequences: int, seq_len: int, batch_size: int,
                           first: int = 0) -> Iterator[torch.Tensor]:
    """(batch, seq_len) index tensors naming sequences ``first … first + n_sequences − 1``."""
    if n_sequences < 1 or batch_size < 1:
        raise ValueError("n_sequences and batch_size must be positive")
    for start in range(first, first + n_sequences, batch_size):
        stop = min(start + batch_size, first + n_sequences)
        yield torch.arange(start, stop)[:, None].expand(-1, seq_len)


# --------------------------------------------------------------------------
# Adapter
# --------------------------------------------------------------------------


def attention_layers(model: CRAMModel) -> list[int]:
    """Indices of the layers whose episodic path runs dense (every-token) attention."""
    return [i for i, layer in enumerate(model.layers) if layer.spec.attention == "dense"]


def cram_adapter(model: nn.Module) -> Optional[list[AttentionTaps]]:
    """Taps of a `CRAMModel` (bare or in an `SRCDSequenceFeeder`): one per dense-attention layer.

    Returns None for other models.  A `CRAMModel` with no dense-attention layer raises, because
    "no adapter knows this model" would be the wrong diagnosis.
    """
    cram = model.model if isinstance(model, SRCDSequenceFeeder) else model
    if not isinstance(cram, CRAMModel):
        return None
    layers = attention_layers(cram)
    if not layers:
        kinds = sorted({str(layer.spec.attention) for layer in cram.layers})
        raise UnsupportedArchitectureError(
            f"this CRAMModel has no dense attention layer (layer attention kinds: {kinds}); "
            "redundancy is measured on the episodic attention of dense layers only, so a "
            "recurrent model such as mamba has nothing to measure")
    taps = []
    for i in layers:
        episodic = cram.layers[i].episodic
        taps.append(AttentionTaps(pre_attention=Tap(episodic, "input"),
                                  attention_output=Tap(episodic.out_proj, "output"),
                                  per_head=Tap(episodic.out_proj, "input"),
                                  n_heads=episodic.n_heads))
    return taps


register_adapter("cram", cram_adapter)


# --------------------------------------------------------------------------
# Checkpoints and measurement
# --------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> tuple[CRAMModel, "RunConfig"]:
    """Rebuild the model of a `cram_ext.train` checkpoint (config from the checkpoint itself)."""
    from ..train import RunConfig

    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a cram_ext.train checkpoint (needs 'config' and 'model')")
    config = RunConfig(**state["config"])
    model = CRAMModel(config.model_config())
    model.load_state_dict(state["model"])
    return model.eval(), config


def measure_checkpoint(path: str | Path, n_sequences: int, *, batch_size: int = 16,
                       data_seed: Optional[int] = None, ridge: float = 1e-6,
                       holdout_every: int = 5, progress: bool = False) -> RedundancyReport:
    """R of a trained SRCD checkpoint on ``n_sequences`` sequences of a held-out stream."""
    model, config = load_checkpoint(path)
    data = config.data_config()
    seed = config.data_seed + HELDOUT_SEED_OFFSET if data_seed is None else data_seed
    if seed in (config.data_seed, config.data_seed + _eval_seed_offset()):
        raise ValueError(f"data seed {seed} is the training or evaluation stream of this run")
    feeder = SRCDSequenceFeeder(model, data, seed)
    report = measure_redundancy(
        feeder, sequence_index_batches(n_sequences, data.seq_len, batch_size),
        ridge=ridge, holdout_every=holdout_every, model_name=f"{config.model} ({Path(path).parent.name})",
        progress_total=n_sequences * data.seq_len, progress=progress)
    report.extra.update(checkpoint=str(path), run_config=dataclasses.asdict(config),
                        measured_layers=attention_layers(model), data_seed=seed,
                        sequences=n_sequences, seq_len=data.seq_len)
    return report


def _eval_seed_offset() -> int:
    from ..train import EVAL_SEED_OFFSET

    return EVAL_SEED_OFFSET


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cram_ext.analysis.cram_models",
        description="Attention redundancy R of a CRAMModel checkpoint trained on SRCD.")
    parser.add_argument("--checkpoint", required=True, help="cram_ext.train checkpoint.pt")
    parser.add_argument("--sequences", type=int, default=2000, help="SRCD sequences to stream")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--data-seed", type=int, default=None,
                        help=f"held-out stream (default: training data_seed + {HELDOUT_SEED_OFFSET})")
    parser.add_argument("--holdout-every", type=int, default=5, help="hold out every k-th sequence")
    parser.add_argument("--ridge", type=float, default=1e-6, help="ridge penalty relative to mean(diag XᵀX)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out-json", help="write the report as JSON here")
    parser.add_argument("--heatmap", help="save a layer × head heatmap PNG here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ("sequences", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cram_ext.analysis.cram_models``."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = measure_checkpoint(args.checkpoint, args.sequences, batch_size=args.batch_size,
                                    data_seed=args.data_seed, ridge=args.ridge,
                                    holdout_every=args.holdout_every,
                                    progress=not args.no_progress)
    except (ValueError, UnsupportedArchitectureError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(report.format_table())
    if report.extra["measured_layers"] != list(range(len(report.layer_r))):
        print(f"table rows are the model's layers {report.extra['measured_layers']}")
    if args.out_json:
        write_json(report.to_dict(), args.out_json)
    if args.heatmap:
        save_heatmap(report, args.heatmap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
