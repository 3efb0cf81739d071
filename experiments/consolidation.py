"""Does CRAM consolidate, and does it stay consolidated? CRAM on SRCD at the cpu preset, every
seed, at the preset's step count and at 3× and 10× it, measured on a test stream no run trains
or evaluates on, with inference routing:

    python -m experiments.consolidation                          # 5 seeds × 400, 1200, 4000 steps
    python -m experiments.consolidation --seeds 0 1 --steps 400  # a part of it
    python -m experiments.consolidation --summarize-only         # tables from the finished runs
    python -m experiments.consolidation --models cram_no_consolidation ablate_no_semantic \
        --steps 1200                                             # what each part buys

Per run (`<runs>/<model>_<steps>_s<seed>/`: log, checkpoint, `result.json`; a finished run is
not redone, only measured again from its checkpoint when its record used another number of test
batches; an interrupted one resumes): retrieval accuracy on recurring and novel queries,
P(attention | recurring query / novel query / other token) and P(semantic | kind) per layer,
the attention fraction and the dynamics MSE. The summary (`results/consolidation_summary.json`,
the section between `<!-- consolidation:begin -->` and `<!-- consolidation:end -->` of
docs/RESULTS.md, the figure docs/figures/consolidation_by_kind.png) gives mean ± std over seeds,
the targets of spec C beside what was measured, the step where recurring-query attention falls
in each layer with mean q and q̂ there, and P(episodic | pattern seen k times) with its
power-law fit in the layer that consolidates.

CRAM without consolidation (γ = 0, no q̂ reward) and CRAM without a semantic path run at 3× and
10× the preset (`VARIANT_STEPS`): whether the consolidation signal or the semantic path is what
takes recurring queries off attention, or the rest of the network memorises their bindings too.
Their table and figure (docs/figures/consolidation_variants.png, P(attention | recurring query)
and the attention fraction against step) sit between `<!-- consolidation-variants:begin -->`
and `<!-- consolidation-variants:end -->`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from cram_ext.evaluate import TEST_BATCHES, TEST_SEED_OFFSET, load_checkpoint
from cram_ext.plotting import pyplot
from cram_ext.srcd import consolidation
from cram_ext.srcd.metrics import TOKEN_KINDS, routed_layers
from cram_ext.train import Trainer, run_config

if not __package__:   # run as a script: its sibling modules are imported from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.srcd import mean_std, save_result, separating_layer  # noqa: E402
from experiments.srcd_report import write_section  # noqa: E402

PRESET_STEPS = 400
STEP_COUNTS = (PRESET_STEPS, 3 * PRESET_STEPS, 10 * PRESET_STEPS)
# CRAM's parts taken away one at a time, beside CRAM, where CRAM consolidates.
VARIANTS = ("cram_no_consolidation", "ablate_no_semantic")
VARIANT_STEPS = STEP_COUNTS[1:]
SEEDS = (0, 1, 2, 3, 4)
MARKERS = ("<!-- consolidation:begin -->", "<!-- consolidation:end -->")
VARIANT_MARKERS = ("<!-- consolidation-variants:begin -->", "<!-- consolidation-variants:end -->")
VARIANT_HEADING = "### CRAM without consolidation, CRAM without semantic memory"
HEADING = "## Consolidation: recurring queries leave attention, novel ones keep it"
# Spec C, for the target lines of the report.
TARGETS = dict(accuracy_recurring=0.995, accuracy_novel=0.99, recurring_attention=0.05,
               novel_attention=0.95, attention_fraction=0.01)


def run_name(model: str, steps: int, seed: int) -> str:
    return f"{model}_{steps}_s{seed}"


def train_one(runs: str, model: str, steps: int, seed: int) -> dict:
    """Train (or resume, or just read) `model` for `steps` steps with `seed`; its result
    record."""
    directory = os.path.join(runs, run_name(model, steps, seed))
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        if result.get("test_batches") != TEST_BATCHES:
            trainer, _ = load_checkpoint(os.path.join(directory, "checkpoint.pt"))
            result.update(test=trainer.evaluate(TEST_BATCHES, seed_offset=TEST_SEED_OFFSET),
                          test_batches=TEST_BATCHES)
            save_result(result_path, result)
        return result
    config = run_config(model, "cpu", steps=steps, seed=seed, data_seed=seed,
                        eval_every=max(25, steps // 40), checkpoint_every=100)
    started = time.time()
    trainer = Trainer(config, directory)
    if os.path.exists(trainer.checkpoint_path):
        trainer.load_checkpoint(trainer.checkpoint_path)
    trainer.fit()
    with open(trainer.log_path) as f:
        log = [json.loads(line) for line in f]
    evals = [r for r in log if "eval" in r]
    result = {"model": model, "steps": steps, "seed": seed,
              "command": f"python -m experiments.consolidation --models {model} "
              f"--steps {steps} --seeds {seed} --runs {runs}",
              "test": trainer.evaluate(TEST_BATCHES, seed_offset=TEST_SEED_OFFSET),
              "test_batches": TEST_BATCHES,
              "curve": {"steps": [r["step"] for r in evals],
                        "eval": [r["eval"] for r in evals]},
              "exposure": {k: v.tolist() for k, v in trainer.exposure.state_dict().items()},
              "seconds": time.time() - started}
    save_result(result_path, result)
    return result


def aggregate(runs: List[dict]) -> dict:
    """Mean ± std over seeds of the test metrics, per-layer routing by kind included."""
    tests = [r["test"] for r in runs]
    keys = ["accuracy", "accuracy_recurring", "accuracy_novel", "dynamics_mse", "oracle_mse",
            "attention_fraction"]
    keys += sorted(k for k in tests[0] if k.startswith(("attention/", "semantic/")))
    return {"seeds": [r["seed"] for r in runs],
            **{k: mean_std([t[k] for t in tests]) for k in keys}}


def transition(run: dict, layer: int) -> Optional[dict]:
    """First evaluation after the peak where P(attention | recurring query) in `layer` is below
    the midpoint of its peak and its final value, with mean q and q̂ of recurring queries there;
    None when it never fell by half or more of its peak."""
    curve = np.array([e[f"attention/{layer}/recurring"] for e in run["curve"]["eval"]])
    peak = int(np.argmax(curve))
    if curve[peak] - curve[-1] < 0.5 * curve[peak]:
        return None
    below = np.flatnonzero(curve[peak:] < 0.5 * (curve[peak] + curve[-1]))[0] + peak
    at = run["curve"]["eval"][below]
    return {"step": run["curve"]["steps"][below], "peak": float(curve[peak]),
            "mean_q": at.get("mean_q_recurring"), "mean_q_hat": at.get("mean_q_hat_recurring")}


def plot_by_kind(runs: List[dict], path: str) -> None:
    """P(attention | recurring query), P(attention | novel query) and P(attention | other
    token) against step on the in-training evaluation stream, one panel per layer; thin lines
    per seed, thick the mean; the warm-up (every token attends in training) shaded."""
    plt = pyplot()
    layers = routed_layers(runs[0]["test"])
    warm_up = run_config("cram", "cpu").model_config().episodic_cost_start
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 3.6), sharey=True,
                             squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for kind, color in (("recurring", "C0"), ("novel", "C3"), ("other", "0.5")):
            curves = np.array([[e[f"attention/{layer}/{kind}"] for e in r["curve"]["eval"]]
                               for r in runs])
            steps = runs[0]["curve"]["steps"]
            for curve in curves:
                ax.plot(steps, curve, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, curves.mean(0), color=color, lw=2,
                    label=f"P(attention | {kind}{' query' if kind != 'other' else ' token'})")
        ax.axvspan(0, warm_up, color="0.92", zorder=0,
                   label="warm-up: every token attends in training")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(attention), inference routing")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def separator(header: str) -> str:
    """The Markdown rule under `header`, one cell per column (escaped pipes are no columns)."""
    return "|" + "---|" * (header.replace("\\|", "").count("|") - 1)


def pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"


def markdown_section(summary: dict) -> str:
    lines = [f"Generated by `{summary['command']}` (CRAM, cpu preset of `cram_ext.train`: N=128, "
             "d=64, 2 layers, batch 16; runs of 400, 1200 and 4000 steps with nothing else "
             "changed; every number is mean ± std over the seeds listed, on "
             f"{TEST_BATCHES} batches of a test stream no run trains or evaluates on, with "
             "inference routing).", ""]
    if summary["missing"]:
        lines += [f"**Partial**: not yet run: {', '.join(summary['missing'])}.", ""]
    layers = summary["layers"]
    header = ("| steps | seeds | acc. recurring / novel | "
              + " | ".join(f"P(attn \\| {k}) L{l}" for l in layers for k in TOKEN_KINDS)
              + " | attention fraction | dyn. MSE |")
    lines += [header, separator(header)]
    for steps, row in summary["by_steps"].items():
        cells = [steps, ", ".join(map(str, row["seeds"])),
                 f"{pct(row['accuracy_recurring'])} / {pct(row['accuracy_novel'])}"]
        cells += [f"{row[f'attention/{l}/{k}']['mean']:.3f} ± {row[f'attention/{l}/{k}']['std']:.3f}"
                  for l in layers for k in TOKEN_KINDS]
        cells += [f"{100 * row['attention_fraction']['mean']:.2f} ± "
                  f"{100 * row['attention_fraction']['std']:.2f}%",
                  f"{row['dynamics_mse']['mean']:.4f} ± {row['dynamics_mse']['std']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Semantic memory's share (P(semantic | kind), same runs):", ""]
    header = "| steps | " + " | ".join(f"P(sem \\| {k}) L{l}" for l in layers for k in TOKEN_KINDS) + " |"
    lines += [header, separator(header)]
    for steps, row in summary["by_steps"].items():
        lines.append(f"| {steps} | " + " | ".join(
            f"{row[f'semantic/{l}/{k}']['mean']:.3f}" for l in layers for k in TOKEN_KINDS) + " |")
    lines += ["", "### Targets (spec C), per step count", ""]
    for steps, checks in summary["targets"].items():
        lines.append(f"- {steps} steps: " + "; ".join(
            f"{name} {value} → {'met' if ok else 'NOT met'}" for name, value, ok in checks))
    lines += ["", "### P(attention | kind) during training", "",
              "![attention by token kind](figures/consolidation_by_kind.png)", ""]
    for steps, found in summary["transitions"].items():
        lines.append(f"- {steps} steps, layer {found['layer']} (the layer that tells recurring "
                     f"from novel queries apart): " + "; ".join(
                         f"seed {seed}: " + ("no fall to half its peak" if t is None else
                                             f"step {t['step']} (peak {t['peak']:.2f}, mean q "
                                             f"{t['mean_q'] or float('nan'):.2f}, q̂ "
                                             f"{t['mean_q_hat'] or float('nan'):.2f})")
                         for seed, t in found["per_seed"].items()))
    law = summary.get("power_law")
    if law:
        lo, hi = law["gamma_ci95"]
        lines += ["", f"P(episodic | pattern seen k times) in layer {law['layer']}, "
                  f"{law['steps']}-step runs, pooled over seeds: P = {law['a']:.2f}·k^−γ, "
                  f"γ = {law['gamma']:.2f} (95% bootstrap interval over patterns "
                  f"{lo:.2f}–{hi:.2f}); paper: 0.89·k^−0.43, γ = 0.43 ± 0.04."]
    return "\n".join([MARKERS[0], "", *lines, "", MARKERS[1]])


def target_checks(row: dict, layers: List[int]) -> list:
    recurring = max(row[f"attention/{l}/recurring"]["mean"] for l in layers)
    novel = max(row[f"attention/{l}/novel"]["mean"] for l in layers)
    return [("recurring accuracy", pct(row["accuracy_recurring"]),
             row["accuracy_recurring"]["mean"] >= TARGETS["accuracy_recurring"]),
            ("novel accuracy", pct(row["accuracy_novel"]),
             row["accuracy_novel"]["mean"] >= TARGETS["accuracy_novel"]),
            ("max over layers P(attn | recurring) ≤ 0.05", f"{recurring:.3f}",
             recurring <= TARGETS["recurring_attention"]),
            ("max over layers P(attn | novel) ≥ 0.95", f"{novel:.3f}",
             novel >= TARGETS["novel_attention"]),
            ("attention fraction ≤ 1.0%", pct(row["attention_fraction"]),
             row["attention_fraction"]["mean"] <= TARGETS["attention_fraction"])]


def summarize(runs_by_steps: Dict[int, List[dict]], missing: List[str], args) -> dict:
    finished = {steps: runs for steps, runs in runs_by_steps.items() if runs}
    summary = {"command": "python -m experiments.consolidation" + (
                   f" --runs {args.runs}" if args.runs != "runs/consolidation" else ""),
               "missing": missing, "by_steps": {}, "targets": {}, "transitions": {}}
    if not finished:
        return summary
    layers = routed_layers(next(iter(finished.values()))[0]["test"])
    summary["layers"] = layers
    for steps, runs in sorted(finished.items()):
        row = aggregate(runs)
        summary["by_steps"][str(steps)] = row
        summary["targets"][str(steps)] = target_checks(row, layers)
        layer = separating_layer(row)
        summary["transitions"][str(steps)] = {
            "layer": layer, "per_seed": {r["seed"]: transition(r, layer) for r in runs}}
    longest = max(finished)
    runs = finished[longest]
    layer = separating_layer(summary["by_steps"][str(longest)])
    episodic = np.concatenate([np.array(r["exposure"]["episodic"])[layers.index(layer)]
                               for r in runs])
    total = np.concatenate([np.array(r["exposure"]["total"]) for r in runs])
    summary["power_law"] = {"layer": layer, "steps": longest,
                            **consolidation.exposure_power_law(episodic, total)}
    os.makedirs(args.figures, exist_ok=True)
    plot_by_kind(runs, os.path.join(args.figures, "consolidation_by_kind.png"))
    write_section(args.results_md, markdown_section(summary), MARKERS, HEADING)
    return summary


def settled_below(run: dict, layer: int, level: float) -> Optional[int]:
    """The first in-training evaluation step from which P(attention | recurring query) in
    `layer` stays at most `level` to the end of the run (None: the last one is above)."""
    curve = [record[f"attention/{layer}/recurring"] for record in run["curve"]["eval"]]
    above = [i for i, value in enumerate(curve) if value > level]
    start = above[-1] + 1 if above else 0
    return run["curve"]["steps"][start] if start < len(curve) else None


def plot_variants(variants: Dict[str, Dict[int, List[dict]]], path: str) -> None:
    """Per step count, P(attention | recurring query) in layer 0 (solid) and the attention
    fraction (dashed) against step on the in-training evaluation stream, mean over seeds, one
    colour per model; the warm-up (every token attends in training) shaded."""
    plt = pyplot()
    warm_up = run_config("cram", "cpu").model_config().episodic_cost_start
    step_counts = sorted({steps for by_steps in variants.values() for steps in by_steps})
    fig, axes = plt.subplots(1, len(step_counts), figsize=(5 * len(step_counts), 3.6),
                             squeeze=False)
    for ax, steps in zip(axes[0], step_counts):
        for color, (model, by_steps) in zip(("C0", "C1", "C2"), variants.items()):
            runs = by_steps.get(steps)
            if not runs:
                continue
            x = runs[0]["curve"]["steps"]
            for key, style, label in (("attention/0/recurring", "-", "P(attn | recurring) L0"),
                                      ("attention_fraction", "--", "attention fraction")):
                y = np.mean([[e[key] for e in r["curve"]["eval"]] for r in runs], 0)
                ax.plot(x, y, style, color=color, lw=1.6, label=f"{model}: {label}")
        ax.axvspan(0, warm_up, color="0.92", zorder=0)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"{steps} steps")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("inference routing, eval stream")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def variants_section(table: Dict[str, Dict[str, dict]], early: Dict[str, Dict[str, list]],
                     missing: List[str]) -> str:
    lines = ["Generated by `python -m experiments.consolidation --models cram_no_consolidation "
             "ablate_no_semantic` (cpu preset, nothing else changed; mean ± std over the seeds "
             f"listed, {TEST_BATCHES} test batches, inference routing; CRAM's rows are the runs "
             "above). \"P(attn | rec) ≤ 0.1 from\" is the in-training evaluation step from which "
             "layer 0's P(attention | recurring query) stays at most 0.1 to the end, per seed "
             "(– not at the end).", ""]
    if missing:
        lines += [f"**Partial**: not yet run: {', '.join(missing)}.", ""]
    header = ("| model | steps | seeds | acc. recurring / novel | P(attn \\| recurring) L0 / L1 "
              "| P(attn \\| novel) L0 / L1 | P(sem \\| recurring) L0 / L1 | attention fraction "
              "| dyn. MSE | P(attn \\| rec) ≤ 0.1 from |")
    lines += [header, separator(header)]
    for model, by_steps in table.items():
        for steps, row in by_steps.items():
            layers = routed_layers(row)

            def per_layer(kind: str, path: str = "attention", spread: bool = False) -> str:
                values = [row.get(f"{path}/{l}/{kind}") for l in layers]
                return " / ".join("–" if v is None else f"{v['mean']:.3f}"
                                  + (f" ± {v['std']:.3f}" if spread else "") for v in values)

            cells = [model, steps, ", ".join(map(str, row["seeds"])),
                     f"{pct(row['accuracy_recurring'])} / {pct(row['accuracy_novel'])}",
                     per_layer("recurring", spread=True), per_layer("novel"),
                     per_layer("recurring", "semantic"),
                     f"{100 * row['attention_fraction']['mean']:.2f} ± "
                     f"{100 * row['attention_fraction']['std']:.2f}%",
                     f"{row['dynamics_mse']['mean']:.4f} ± {row['dynamics_mse']['std']:.4f}",
                     ", ".join("–" if s is None else str(s) for s in early[model][steps])]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "![CRAM and its variants during training](figures/consolidation_variants.png)"]
    return "\n".join([VARIANT_MARKERS[0], "", *lines, "", VARIANT_MARKERS[1]])


def summarize_variants(variants: Dict[str, Dict[int, List[dict]]], missing: List[str],
                       args) -> dict:
    """CRAM beside its variants at `VARIANT_STEPS`: the table, the figure and their section."""
    finished = {model: {steps: runs for steps, runs in by_steps.items() if runs}
                for model, by_steps in variants.items()}
    finished = {model: by_steps for model, by_steps in finished.items() if by_steps}
    table = {model: {str(steps): aggregate(runs) for steps, runs in sorted(by_steps.items())}
             for model, by_steps in finished.items()}
    early = {model: {str(steps): [settled_below(r, 0, 0.1) for r in runs]
                     for steps, runs in sorted(by_steps.items())}
             for model, by_steps in finished.items()}
    summary = {"missing": missing, "by_model": table,
               "recurring_attention_settled_below_0.1": early}
    if len(finished) > 1:
        os.makedirs(args.figures, exist_ok=True)
        plot_variants(finished, os.path.join(args.figures, "consolidation_variants.png"))
        write_section(args.results_md, variants_section(table, early, missing), VARIANT_MARKERS,
                      VARIANT_HEADING)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cram"], choices=("cram",) + VARIANTS,
                        help="train these (CRAM's variants run at 3x and 10x the preset)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--runs", default="runs/consolidation")
    parser.add_argument("--summary", default="results/consolidation_summary.json")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: summarize every finished run of the full plan")
    args = parser.parse_args(argv)

    def step_counts(model: str) -> List[int]:
        planned = set(STEP_COUNTS if model == "cram" else VARIANT_STEPS)
        return sorted(planned | (set(args.steps) if model in args.models else set()))

    # Step-major, CRAM first: every seed of the preset first, so the shortest plan finishes first.
    plan = [(model, steps, seed) for model in ("cram",) + VARIANTS
            for steps in step_counts(model) for seed in SEEDS]
    os.makedirs(os.path.dirname(args.summary) or ".", exist_ok=True)
    finished = lambda *run: os.path.exists(  # noqa: E731
        os.path.join(args.runs, run_name(*run), "result.json"))
    runs = {model: {steps: [] for steps in step_counts(model)} for model in ("cram",) + VARIANTS}
    summary: dict = {}
    for model, steps, seed in plan:
        selected = (not args.summarize_only and model in args.models and steps in args.steps
                    and seed in args.seeds)
        if not (finished(model, steps, seed) or selected):
            continue
        runs[model][steps].append(train_one(args.runs, model, steps, seed))
        missing = [run for run in plan if not finished(*run)]
        summary = summarize(runs["cram"], [run_name(*r) for r in missing if r[0] == "cram"], args)
        variants = {model: {steps: runs[model].get(steps, []) for steps in VARIANT_STEPS}
                    for model in ("cram",) + VARIANTS}
        summary["variants"] = summarize_variants(
            variants, [run_name(*r) for r in missing if r[0] != "cram"], args)
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
