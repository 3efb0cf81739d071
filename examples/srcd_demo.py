"""Train CRAM on SRCD at the small CPU configuration and watch attention being given up.

    python -m examples.srcd_demo                       # a few minutes on 2 CPU cores
    python -m examples.srcd_demo --steps 600 --plot attention.png

Prints retrieval accuracy (all queries, recurring and novel keys), the dynamics MSE beside its
noise floor, the attention fraction and, per layer, the fraction of recurring queries, novel
queries and other tokens that ran attention (inference routing on a test stream no training
reads), then saves the attention-fraction-vs-step plot.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from cram_ext.evaluate import TEST_SEED_OFFSET, routing_table
from cram_ext.srcd import consolidation
from cram_ext.train import Trainer, run_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400,
                        help="training steps; every token attends for the first 200, then the "
                             "price of attention reaches its full weight at 300, so fewer than "
                             "~350 steps end mid-way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the model is small enough that one is fastest "
                             "on a shared 2-core machine")
    parser.add_argument("--plot", default="cram_demo_attention.png")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)

    config = run_config("cram", "cpu", steps=args.steps, seed=args.seed, data_seed=args.seed,
                        threads=args.threads, eval_every=25, checkpoint_every=args.steps)
    data = config.data_config()
    print(f"CRAM on SRCD: N={data.seq_len}, {data.n_queries} queries per sequence "
          f"({100 * data.recurring_fraction:.0f}% on {data.n_patterns} recurring patterns); "
          f"ideal attention fraction {100 * data.ideal_attention_fraction:.2f}%")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        started = time.time()
        trainer = Trainer(config, out)
        trainer.fit()
        final = trainer.evaluate(8, seed_offset=TEST_SEED_OFFSET)
        with open(trainer.log_path) as f:
            log = [json.loads(line) for line in f]
    elapsed = time.time() - started
    curve = consolidation.attention_curve(log)
    summary = consolidation.consolidation_summary(curve)
    if os.path.dirname(args.plot):
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    consolidation.plot_attention([curve], summary, args.plot, ideal=data.ideal_attention_fraction)
    print(f"retrieval accuracy {100 * final['accuracy']:.2f}% "
          f"(recurring {100 * final['accuracy_recurring']:.2f}%, "
          f"novel {100 * final['accuracy_novel']:.2f}%)")
    print(f"dynamics MSE {final['dynamics_mse']:.4f} (noise floor {data.noise_std ** 2:.4f}, "
          f"Bayes predictor {final['oracle_mse']:.4f})")
    print(f"attention fraction {100 * final['attention_fraction']:.2f}% "
          f"(peak during training {100 * summary['peak_attention']:.1f}%, "
          f"fell {summary['fall_factor']:.1f}×"
          + (f", transition at step {summary['transition_step']}"
             if summary["transition_step"] else "") + ")")
    print(f"mean q {final['mean_q']:.3f}, mean q̂ at queries {final['mean_q_hat']:.3f}")
    print("routing by token kind (consolidation: recurring queries leave attention, novel ones "
          "keep it):")
    print(routing_table(final))
    print(f"{args.steps} steps in {elapsed / 60:.1f} min; plot: {args.plot}")
    return {"final": final, "consolidation": summary, "seconds": elapsed,
            "smoothed_attention": np.asarray(curve["smoothed"]).tolist()}


if __name__ == "__main__":
    main()
