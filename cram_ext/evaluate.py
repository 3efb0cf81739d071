"""Evaluate a trained SRCD model on a stream no training run sees, with inference routing.

    python -m cram_ext.evaluate runs/cram/checkpoint.pt
    python -m cram_ext.evaluate runs/cram/checkpoint.pt --batches 32 --json routing.json

Prints retrieval accuracy (recurring / novel keys), the dynamics MSE beside the Bayes
predictor's, the attention fraction, and per layer with a router the fraction of each token kind
(recurring query, novel query, every other token) that ran attention and that went to semantic
memory: where consolidation shows (recurring queries leave attention, novel ones keep it).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from .srcd.metrics import TOKEN_KINDS

# Sequences of the test stream: the same bindings as training, a seed offset no training or
# in-training evaluation stream uses.
TEST_SEED_OFFSET = 2_000_003


def routed_layers(metrics: Dict[str, float]) -> List[int]:
    return sorted({int(key.split("/")[1]) for key in metrics if key.startswith("attention/")
                   and key.count("/") == 2})


def routing_table(metrics: Dict[str, float]) -> str:
    """Per layer: P(attention | kind) and P(semantic | kind) for every token kind, as text."""
    header = "layer  " + "  ".join(f"{'attention | ' + kind:>20}" for kind in TOKEN_KINDS) \
        + "  " + "  ".join(f"{'semantic | ' + kind:>19}" for kind in TOKEN_KINDS)
    lines = [header]
    for layer in routed_layers(metrics):
        cells = [f"{metrics[f'attention/{layer}/{kind}']:>20.3f}" for kind in TOKEN_KINDS]
        cells += [f"{metrics.get(f'semantic/{layer}/{kind}', float('nan')):>19.3f}"
                  for kind in TOKEN_KINDS]
        lines.append(f"{layer:<5}  " + "  ".join(cells))
    return "\n".join(lines)


def summary_lines(metrics: Dict[str, float]) -> List[str]:
    """The headline numbers of an evaluation, one per line."""
    return [f"retrieval accuracy {100 * metrics['accuracy']:.2f}% (recurring "
            f"{100 * metrics['accuracy_recurring']:.2f}%, novel "
            f"{100 * metrics['accuracy_novel']:.2f}%)",
            f"dynamics MSE {metrics['dynamics_mse']:.4f} (Bayes predictor "
            f"{metrics['oracle_mse']:.4f})",
            f"attention fraction {100 * metrics['attention_fraction']:.2f}%",
            routing_table(metrics)]


def main(argv=None) -> Dict[str, float]:
    from .train import RunConfig, Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint.pt written by cram_ext.train")
    parser.add_argument("--batches", type=int, default=16,
                        help="test batches (of the run's batch size)")
    parser.add_argument("--json", default=None, help="also write the metrics here")
    args = parser.parse_args(argv)

    state = torch.load(args.checkpoint, weights_only=False)
    trainer = Trainer(RunConfig(**state["config"]), None, show_progress=False)
    trainer.model.load_state_dict(state["model"])
    metrics = trainer.evaluate(args.batches, seed_offset=TEST_SEED_OFFSET)
    print(f"{args.checkpoint} (step {state['step']}), {args.batches} test batches")
    print("\n".join(summary_lines(metrics)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
