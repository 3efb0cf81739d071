"""Attention redundancy R of this package's own SRCD models (`cram_ext.models.CRAMModel`).

`cram_ext.redundancy` measures R with forward hooks found by an *adapter* and drives the model
with token windows.  A `CRAMModel` needs two things that module does not know about:

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
tokens.  The adapter (and so `measure_redundancy` and the report) therefore covers only
dense-attention layers (the Transformer baseline, Jamba's attention layers) and says so when a
model has none.  `measure_token_subsets` (``--token-subsets``) fits separate probes on chosen
tokens instead: each SRCD token type (observation, key-write, query), and, in routed layers,
only the rows that ran attention.  SRCD is 90% observations, so the all-token R mostly says how
attention treats them; the query subset is where retrieval happens.

Command line::

    python -m cram_ext.redundancy.cram_models --checkpoint runs/srcd/transformer_s0/checkpoint.pt \\
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
from ..srcd.generator import KEY_WRITE, OBSERVATION, QUERY
from ..train import EVAL_SEED_OFFSET, RunConfig
from .measure import RedundancyReport, measure_redundancy, model_device, save_heatmap, write_json
from .probe import ProbeSplits, score_layer
from .taps import (ActivationRecorder, AttentionTaps, Tap, UnsupportedArchitectureError,
                   register_adapter)

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


def attention_layers(model: CRAMModel, kinds: tuple = ("dense",)) -> list[int]:
    """Indices of the layers whose episodic path is of one of ``kinds`` ("dense", "routed")."""
    return [i for i, layer in enumerate(model.layers) if layer.spec.attention in kinds]


def episodic_taps(model: CRAMModel, layers: Sequence[int]) -> list[AttentionTaps]:
    """Probe input = input of ``layer.episodic``; targets = ``out_proj`` output and input.

    The taps are forward hooks on those modules, which only the composed layer calls (the fused
    op, `cram_ext.cram_forward`, takes their weights), so the tapped layers are set to compose.
    """
    taps = []
    for i in layers:
        model.layers[i].fused = False
        episodic = model.layers[i].episodic
        taps.append(AttentionTaps(pre_attention=Tap(episodic, "input"),
                                  attention_output=Tap(episodic.out_proj, "output"),
                                  per_head=Tap(episodic.out_proj, "input"),
                                  n_heads=episodic.n_heads))
    return taps


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
            "recurrent model such as mamba has nothing to measure; for routed attention "
            "use measure_token_subsets (--token-subsets), which keeps only the rows that ran it")
    return episodic_taps(cram, layers)


register_adapter("cram", cram_adapter)


# --------------------------------------------------------------------------
# R over chosen tokens: token types, and the rows routed attention ran for
# --------------------------------------------------------------------------

TOKEN_SUBSETS = {"all": None, "observation": OBSERVATION, "key_write": KEY_WRITE, "query": QUERY}


@torch.no_grad()
def measure_token_subsets(feeder: SRCDSequenceFeeder, index_batches, *, ridge: float = 1e-6,
                          holdout_every: int = 5) -> dict:
    """R of every episodic layer, fitted and scored separately on each token subset.

    A token of layer ℓ enters the probe only if layer ℓ ran attention for it (every token in
    a dense layer; the router's picks in a routed one, where the other rows' output is a
    structural zero) and its SRCD type is the subset's ("all" keeps every type).  Held-out
    sequences are the same as in `measure_redundancy` (every ``holdout_every``-th), so
    "all" on a dense model reproduces its report.  Each subset gets its own probe: R then
    says how linear attention is on those tokens, not how well one probe fitted mostly to
    observations does on queries.

    Returns ``{subset: {"layers", "layer_r", "layer_r_centered", "head_r",
    "head_r_centered", "train_tokens", "heldout_tokens"}}``; a (subset, layer) pair with fewer
    fitting tokens than probe features, or no held-out token, gets ``None`` in place of R.
    """
    model = feeder.model.eval()
    layers = attention_layers(model, ("dense", "routed"))
    if not layers:
        raise UnsupportedArchitectureError("this CRAMModel has no episodic attention layer")
    taps = episodic_taps(model, layers)
    device = model_device(model)
    accumulators = {name: [ProbeSplits() for _ in layers] for name in TOKEN_SUBSETS}
    sequences_seen = 0
    with ActivationRecorder(taps) as recorder:
        for indices in index_batches:
            batch = {k: v.to(device) for k, v in feeder.batch(indices).items()}
            output = model(batch)
            window = torch.arange(sequences_seen, sequences_seen + indices.shape[0], device=device)
            sequences_seen += indices.shape[0]
            heldout = (window % holdout_every == holdout_every - 1)[:, None].expand(indices.shape)
            for position, (layer, (pre, out, heads)) in enumerate(zip(layers, recorder.take())):
                ran = output.layers[layer].attention_rows
                for name, token_type in TOKEN_SUBSETS.items():
                    keep = ran if token_type is None else ran & (batch["token_type"] == token_type)
                    accumulators[name][position].update(pre[keep], out[keep], heads[keep],
                                                        heldout[keep])
    return {name: _score_subset(accs, taps, layers, ridge) for name, accs in accumulators.items()}


def _score_subset(accumulators, taps, layers, ridge) -> dict:
    result = {"layers": layers, "layer_r": [], "layer_r_centered": [], "head_r": [],
              "head_r_centered": [], "train_tokens": [], "heldout_tokens": []}
    for acc, tap in zip(accumulators, taps):
        train, heldout = acc.counts()
        result["train_tokens"].append(train)
        result["heldout_tokens"].append(heldout)
        features = acc.splits[False].xx.shape[0] if acc.splits else 0
        if not acc.splits or train < features or heldout == 0:
            for key in ("layer_r", "layer_r_centered", "head_r", "head_r_centered"):
                result[key].append(None)
            continue
        scores = score_layer(acc.splits[False], acc.splits[True], acc.output_dim, tap.n_heads,
                             ridge)
        result["layer_r"].append(scores.r)
        result["layer_r_centered"].append(scores.r_centered)
        result["head_r"].append(scores.head_r)
        result["head_r_centered"].append(scores.head_r_centered)
    return result


def format_subsets(subsets: dict) -> str:
    """Plain-text table: R (R_centered) per subset and layer, with held-out token counts."""
    layers = next(iter(subsets.values()))["layers"]
    lines = ["R (R_centered) [held-out tokens] by token subset; each subset has its own probe",
             f"{'subset':>12} " + " ".join(f"{'layer ' + str(i):>26}" for i in layers)]
    for name, result in subsets.items():
        cells = []
        for r, rc, n in zip(result["layer_r"], result["layer_r_centered"], result["heldout_tokens"]):
            cells.append(f"{'too few tokens':>18} [{n}]" if r is None else f"{r:.4f} ({rc:.4f}) [{n}]")
        lines.append(f"{name:>12} " + " ".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Checkpoints and measurement
# --------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> tuple[CRAMModel, RunConfig]:
    """Rebuild the model of a `cram_ext.train` checkpoint (config from the checkpoint itself)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a cram_ext.train checkpoint (needs 'config' and 'model')")
    config = RunConfig(**state["config"])
    model = CRAMModel(config.model_config())
    model.load_state_dict(state["model"])
    return model.eval(), config


def heldout_feeder(path: str | Path, data_seed: Optional[int] = None
                   ) -> tuple[SRCDSequenceFeeder, RunConfig]:
    """The checkpoint's model fed from a held-out SRCD stream of its own data configuration."""
    model, config = load_checkpoint(path)
    seed = config.data_seed + HELDOUT_SEED_OFFSET if data_seed is None else data_seed
    if seed in (config.data_seed, config.data_seed + EVAL_SEED_OFFSET):
        raise ValueError(f"data seed {seed} is the training or evaluation stream of this run")
    return SRCDSequenceFeeder(model, config.data_config(), seed), config


def measure_checkpoint(path: str | Path, n_sequences: int, *, batch_size: int = 16,
                       data_seed: Optional[int] = None, ridge: float = 1e-6,
                       holdout_every: int = 5, progress: bool = False) -> RedundancyReport:
    """R of a trained SRCD checkpoint's dense attention layers on ``n_sequences`` held-out
    sequences (the same report as the GPT-2 path; rows of the table are ``measured_layers``)."""
    feeder, config = heldout_feeder(path, data_seed)
    seq_len = feeder.data.seq_len
    report = measure_redundancy(
        feeder, sequence_index_batches(n_sequences, seq_len, batch_size),
        ridge=ridge, holdout_every=holdout_every,
        model_name=f"{config.model} ({Path(path).parent.name})",
        progress_total=n_sequences * seq_len, progress=progress)
    report.extra.update(checkpoint=str(path), run_config=dataclasses.asdict(config),
                        measured_layers=attention_layers(feeder.model), data_seed=feeder.seed,
                        sequences=n_sequences, seq_len=seq_len)
    return report


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cram_ext.redundancy.cram_models",
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
    parser.add_argument("--token-subsets", action="store_true",
                        help="also fit and score R separately on observation, key-write and query "
                             "tokens, over every episodic layer (routed ones: only the rows that "
                             "ran attention); a model with routed attention only gets just this")
    args = parser.parse_args(argv)
    for name in ("sequences", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cram_ext.redundancy.cram_models``."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        feeder, _ = heldout_feeder(args.checkpoint, args.data_seed)
        has_dense = bool(attention_layers(feeder.model))
        report = None
        if has_dense or not args.token_subsets:
            report = measure_checkpoint(args.checkpoint, args.sequences,
                                        batch_size=args.batch_size, data_seed=args.data_seed,
                                        ridge=args.ridge, holdout_every=args.holdout_every,
                                        progress=not args.no_progress)
            print(report.format_table())
            if report.extra["measured_layers"] != list(range(len(report.layer_r))):
                print(f"(table rows are the model's layers {report.extra['measured_layers']})")
        subsets = None
        if args.token_subsets:
            batches = sequence_index_batches(args.sequences, feeder.data.seq_len, args.batch_size)
            subsets = measure_token_subsets(feeder, batches, ridge=args.ridge,
                                            holdout_every=args.holdout_every)
            print(format_subsets(subsets))
    except (ValueError, UnsupportedArchitectureError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    if args.out_json:
        data = report.to_dict() if report is not None else {
            "model": args.checkpoint, "architecture": "cram", "ridge": args.ridge,
            "holdout_every": args.holdout_every,
            "extra": {"checkpoint": args.checkpoint, "data_seed": feeder.seed,
                      "sequences": args.sequences, "seq_len": feeder.data.seq_len}}
        if subsets is not None:
            data["token_subsets"] = subsets
        write_json(data, args.out_json)
    if args.heatmap:
        if report is None:
            print("no heatmap: the model has no dense attention layer (see token_subsets)")
        else:
            save_heatmap(report, args.heatmap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
