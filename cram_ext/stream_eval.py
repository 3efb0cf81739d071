"""Evaluate a trained SRCD model on long test streams read token by token (`CRAMModel.step`).

    python -m cram_ext.stream_eval runs/cram/checkpoint.pt --length 65536
    python -m cram_ext.stream_eval runs/cram/checkpoint.pt --length 8192 --streams 4 --prefill 1024

Each stream is `--length` tokens of SRCD test sequences of `--segment` tokens (default: the
length, at most 2048, the paper's N) one after another, from the test stream `cram_ext.evaluate`
uses (a seed no training run reads), with the run's bindings; SRCD cannot make a single sequence
much longer than 2048 (its recurring queries need distinct patterns). The model's state carries
across segment boundaries, so a novel key that an earlier segment bound differently can still
sit in the episodic buffer: the stream is harder than its segments. The model reads the first
`--prefill` tokens in one `prefill` call, then the rest one token at a time, keeping only its
streaming state (scan states and key/value caches; the episodic buffer keeps the last
memory_size written entries). Prints retrieval accuracy, the attention fraction, the routing
table of `cram_ext.evaluate`, the decoding speed (tokens/s over every stream) and the state's
memory per stream.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Dict, List

import torch
from tqdm import tqdm

from .evaluate import TEST_SEED_OFFSET, load_checkpoint, summary_lines
from .models.cram import ModelOutput
from .srcd.generator import batch_at
from .srcd.metrics import add_sums, batch_sums, summarize

WINDOW = 256  # steps whose outputs are gathered before they are scored


def _cat(parts):
    """Per-position outputs (records of (batch,) tensors, or None) joined along a new
    length dimension."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.stack(parts, 1)
    return type(first)(**{f.name: _cat([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(first)})


def _window_output(outputs: List[ModelOutput]) -> ModelOutput:
    return ModelOutput(torch.stack([o.value_logits for o in outputs], 1),
                       torch.stack([o.next_value for o in outputs], 1),
                       [_cat([o.layers[i] for o in outputs]) for i in range(len(outputs[0].layers))])


@torch.no_grad()
def evaluate_stream(model, batch: Dict[str, torch.Tensor], prefill: int = 0,
                    show_progress: bool = True) -> Dict[str, float]:
    """Reads `batch` (streams, N) through `prefill` of the first `prefill` tokens and `step`
    for the rest; returns the summary metrics of `cram_ext.srcd.metrics` over every token, plus
    tokens_per_s (streaming tokens over wall time, prefill included), step_tokens_per_s
    (the token-by-token part alone) and state_bytes_per_stream."""
    model.eval()
    n_streams, length = batch["gap"].shape
    n_layers = len(model.layers)
    state = model.init_state(n_streams, capacity=length)
    sums: Dict[str, float] = {}
    start = time.perf_counter()
    if prefill:
        head = {k: v[:, :prefill] for k, v in batch.items()}
        output, state = model.prefill(head, state)
        add_sums(sums, batch_sums(head, output, n_layers))
    stepping = time.perf_counter()
    outputs: List[ModelOutput] = []
    window_start = prefill
    for t in tqdm(range(prefill, length), disable=not show_progress, unit="tok",
                  desc=f"{n_streams} stream(s)"):
        output, state = model.step({k: v[:, t] for k, v in batch.items()}, state)
        outputs.append(output)
        if len(outputs) == WINDOW or t == length - 1:
            window = {k: v[:, window_start:t + 1] for k, v in batch.items()}
            add_sums(sums, batch_sums(window, _window_output(outputs), n_layers))
            outputs, window_start = [], t + 1
    end = time.perf_counter()
    metrics = summarize(sums)
    metrics["tokens_per_s"] = n_streams * length / (end - start)
    metrics["step_tokens_per_s"] = (n_streams * (length - prefill) / (end - stepping)
                                    if length > prefill else float("nan"))
    metrics["state_bytes_per_stream"] = state.nbytes() / n_streams
    return metrics


def test_streams(trainer, length: int, n_streams: int, segment=None) -> Dict[str, torch.Tensor]:
    """`n_streams` streams (n_streams, length) of consecutive test sequences of `segment`
    tokens: stream i is sequences [i·k, (i+1)·k) of the test stream, k = ceil(length /
    segment), joined and cut to `length`."""
    segment = segment or min(length, 2048)
    per_stream = -(-length // segment)
    data = dataclasses.replace(trainer.data, seq_len=segment)
    sequences = batch_at(data, trainer.config.data_seed + TEST_SEED_OFFSET, 0,
                         n_streams * per_stream, bindings=trainer.bindings)
    return {name: value.reshape(n_streams, per_stream * segment, *value.shape[2:])[:, :length]
            for name, value in sequences.items()}


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint.pt written by cram_ext.train")
    parser.add_argument("--length", type=int, default=65536, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=1, help="streams decoded as one batch")
    parser.add_argument("--segment", type=int, default=None,
                        help="tokens per SRCD sequence of a stream (default min(length, 2048))")
    parser.add_argument("--prefill", type=int, default=0,
                        help="tokens read in one prefill call before stepping")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the metrics here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 0 <= args.prefill <= args.length:
        parser.error("--prefill must be in [0, --length]")

    torch.set_num_threads(args.threads)
    trainer, state = load_checkpoint(args.checkpoint)
    batch = test_streams(trainer, args.length, args.streams, args.segment)
    metrics = evaluate_stream(trainer.model, batch, args.prefill, not args.no_progress)
    segment = args.segment or min(args.length, 2048)
    print(f"{args.checkpoint} (step {state['step']}), {args.streams} test stream(s) of "
          f"{args.length} tokens (SRCD sequences of {segment}), {args.prefill} prefilled")
    print("\n".join(summary_lines(metrics)))
    print(f"{metrics['tokens_per_s']:.0f} tokens/s ({metrics['step_tokens_per_s']:.0f} tokens/s "
          f"token by token), state {metrics['state_bytes_per_stream'] / 2**20:.2f} MiB per stream")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
