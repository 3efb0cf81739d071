"""Regenerate the SRCD results: Table 1 (CRAM vs baselines), Fig. 2 (attention fraction during
training, transition, q before/after), Fig. 4 (P(episodic | pattern seen k times) and its power
law), Table 4 (ablations) and Table 2 (transfer to Copy and Associative recall).

    python -m experiments.srcd --size cpu      # this project's CPU run (1 core, about 2 hours)
    python -m experiments.srcd --size paper    # the paper's setting: a GPU run
    python -m experiments.srcd --size cpu --seeds 0 1 &   # the same plan on two cores (under
    python -m experiments.srcd --size cpu --seeds 2 3 4   # an hour), then --summarize-only

Run from the repository root (the defaults write into its `results/` and `docs/`). Every
(model, seed) run trains under `<runs>/<model>_s<seed>/` (log, checkpoint) and leaves a
`result.json` there; a run with a result is not redone and an interrupted one resumes from its
checkpoint, so the same command finishes a partial run. After every finished run the summary is
rewritten from the results present so far: `results/srcd_summary.json`, the figures
`docs/figures/srcd_*.png` and the section between `<!-- srcd:begin -->` and `<!-- srcd:end -->`
of `docs/RESULTS.md` (rendered by `experiments.srcd_report`; the rest of that file is left as it
is). Missing runs are listed and the section is marked partial.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from cram_ext.models import ABLATIONS, TABLE1_MODELS
from cram_ext.srcd import consolidation
from cram_ext.srcd.metrics import routed_layers
from cram_ext.srcd.transfer import TASKS as TRANSFER_TASKS
from cram_ext.train import Trainer, run_config

if not __package__:   # run as a script: its sibling modules are imported from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.srcd_report import (SECTION_HEADING, SECTION_MARKERS,  # noqa: E402
                                     markdown_section, write_section)


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    run_size: str           # the `cram_ext.train` preset of every run
    seeds: int
    steps: int
    transfer_steps: int
    transfer_seeds: int
    final_eval_batches: int
    overrides: tuple = ()   # extra RunConfig fields for every run, as (name, value) pairs


PLANS = {
    # 2-core CPU: N=128 tokens, d=64, 2 layers, 400 steps (`cram_ext.train`'s cpu preset).
    # Measured on a 2-core machine (before the counterfactual probes, which add a forward per
    # step): 35-70 s per routed run, about 50 min for the 45 + 12 runs in two processes.
    # Transfer runs last as long as the SRCD ones: with 200 steps a model trained from scratch
    # would end 75 steps after the preset's 125-step warm-up, its router barely having chosen.
    "cpu": ExperimentPlan(run_size="cpu", seeds=5, steps=400, transfer_steps=400,
                          transfer_seeds=2, final_eval_batches=8,
                          overrides=(("eval_every", 25), ("checkpoint_every", 100))),
    # The paper's setting on a GPU: N=2048, d=512, 8 layers, 10K steps.
    "paper": ExperimentPlan(run_size="paper", seeds=5, steps=10_000, transfer_steps=2000,
                            transfer_seeds=5, final_eval_batches=16),
    # Seconds: exercises the whole pipeline.
    "smoke": ExperimentPlan(run_size="tiny", seeds=2, steps=6, transfer_steps=4,
                            transfer_seeds=1, final_eval_batches=1),
}


def run_dir(runs: str, name: str, seed: int) -> str:
    return os.path.join(runs, f"{name}_s{seed}")


def train_one(plan: ExperimentPlan, runs: str, model: str, seed: int, task: str = "srcd",
              init_from: str = "", tag: Optional[str] = None) -> dict:
    """Train (or resume, or just read) one run and return its result record."""
    directory = run_dir(runs, tag or model, seed)
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    config = run_config(model, plan.run_size, seed=seed, data_seed=seed,
                        steps=plan.steps if task == "srcd" else plan.transfer_steps,
                        task=task, init_from=init_from, freeze_routing=bool(init_from),
                        **dict(plan.overrides))
    started = time.time()
    trainer = Trainer(config, directory, show_progress=True)
    if os.path.exists(trainer.checkpoint_path):
        trainer.load_checkpoint(trainer.checkpoint_path)
    trainer.fit()
    final = trainer.evaluate(plan.final_eval_batches)
    with open(trainer.log_path) as f:
        log = [json.loads(line) for line in f]
    curve = consolidation.attention_curve(log)
    result = {"model": model, "seed": seed, "task": task, "init_from": init_from,
              "config": dataclasses.asdict(config), "final": final,
              "consolidation": consolidation.consolidation_summary(curve),
              "curve": {"steps": curve["steps"].tolist(), "smoothed": curve["smoothed"].tolist(),
                        "eval_steps": curve["eval_steps"].tolist(),
                        "eval_fraction": curve["eval_fraction"].tolist()},
              "q_histograms": [r["q_histogram"] for r in log],
              "exposure": {k: v.tolist() for k, v in trainer.exposure.state_dict().items()},
              "seconds": time.time() - started}
    save_result(result_path, result)
    return result


def save_result(path: str, result: dict) -> None:
    """Write a run's result record atomically: a run with a result file is finished."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

def mean_std(values: List[float]) -> Dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
            else 0.0, "n": int(len(values))}


def separating_layer(row: Dict[str, dict]) -> int:
    """The routed layer that tells recurring from novel queries apart best, by the mean over
    seeds of P(attention | novel query) − P(attention | recurring query): where consolidation
    shows."""
    return max(routed_layers(row), key=lambda layer: row[f"attention/{layer}/novel"]["mean"]
               - row[f"attention/{layer}/recurring"]["mean"])


def aggregate(results: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per model: mean ± std over seeds of the final metrics and the consolidation numbers."""
    table = {}
    for model, runs in results.items():
        if not runs:
            continue
        for r in runs:   # from the stored curve, so the definition can change without retraining
            r["consolidation"] = consolidation.consolidation_summary(r["curve"])
        finals = [r["final"] for r in runs]
        row = {key: mean_std([f[key] for f in finals])
               for key in ("accuracy", "accuracy_recurring", "accuracy_novel", "dynamics_mse",
                           "oracle_mse", "attention_fraction", "attention_ops", "mean_q",
                           "mean_q_hat")
               if all(np.isfinite(f.get(key, np.nan)) for f in finals)}
        layer_keys = sorted(k for k in finals[0] if k.startswith("attention_fraction/"))
        row["attention_by_layer"] = [mean_std([f[k] for f in finals]) for k in layer_keys]
        for key in sorted(k for k in finals[0] if k.startswith(("attention/", "semantic/"))):
            row[key] = mean_std([f[key] for f in finals])
        for key in ("peak_attention", "final_attention", "fall_factor"):
            values = [r["consolidation"][key] for r in runs]
            if all(v is not None and np.isfinite(v) for v in values):
                row[key] = mean_std(values)
        transitions = [r["consolidation"]["transition_step"] for r in runs
                       if r["consolidation"]["transition_step"] is not None]
        if transitions:
            row["transition_step"] = mean_std(transitions)
        row["seeds"] = [r["seed"] for r in runs]
        table[model] = row
    return table


def summarize_and_write(plan_name: str, plan: ExperimentPlan, results: Dict[str, List[dict]],
                        transfer: Dict[str, Dict[str, List[dict]]], missing: List[str],
                        planned: int, args) -> dict:
    run = run_config("cram", plan.run_size, **dict(plan.overrides))
    data = run.data_config()
    table = aggregate(results)
    oracle = [r["final"]["oracle_mse"] for runs in results.values() for r in runs]
    summary = {"size": plan_name, "plan": dataclasses.asdict(plan),
               "run": dataclasses.asdict(run), "data": dataclasses.asdict(data),
               "command": f"python -m experiments.srcd --size {plan_name} "
                          f"--runs {args.runs}",
               "complete": not missing, "missing": missing, "planned": planned,
               "noise_floor": data.noise_std ** 2,
               "oracle_mse": float(np.mean(oracle)) if oracle else float("nan"),
               "ideal_attention": data.ideal_attention_fraction,
               "table1": {m: table[m] for m in TABLE1_MODELS if m in table},
               "ablations": {m: table[m] for m in ABLATIONS if m in table},
               "transfer": {task: {kind: aggregate({kind: runs})[kind]
                                   for kind, runs in kinds.items() if runs}
                            for task, kinds in transfer.items()},
               "notes": list(args.note or [])}
    os.makedirs(os.path.dirname(args.summary), exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    cram_runs = results.get("cram", [])
    if cram_runs:
        curves = [{k: np.array(v) for k, v in r["curve"].items()} for r in cram_runs]
        summary["consolidation"] = table["cram"]   # aggregate() refreshed r["consolidation"]
        consolidation.plot_attention(curves, cram_runs[0]["consolidation"],
                                os.path.join(args.figures, "srcd_attention.png"),
                                ideal=data.ideal_attention_fraction)
        log = [{"q_histogram": h} for h in cram_runs[0]["q_histograms"]]
        consolidation.plot_q_distribution(
            consolidation.q_distributions(log, cram_runs[0]["consolidation"]["transition_step"]),
            os.path.join(args.figures, "srcd_q_distribution.png"))
        # P(episodic | k) in the layer that tells recurring from novel queries apart, pooled
        # over seeds.
        layers = routed_layers(table["cram"])
        layer = separating_layer(table["cram"])
        episodic = np.concatenate([np.array(r["exposure"]["episodic"])[layers.index(layer)]
                                   for r in cram_runs])
        total = np.concatenate([np.array(r["exposure"]["total"]) for r in cram_runs])
        summary["power_law"] = {"layer": layer,
                                **consolidation.exposure_power_law(episodic, total)}
        consolidation.plot_power_law(summary["power_law"],
                                     os.path.join(args.figures, "srcd_power_law.png"))
    tmp = args.summary + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, args.summary)
    write_section(args.results_md, markdown_section(summary), SECTION_MARKERS, SECTION_HEADING)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="cpu", choices=sorted(PLANS))
    parser.add_argument("--runs", default="runs/srcd", help="directory of the per-run folders")
    parser.add_argument("--summary", default="results/srcd_summary.json")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--results-md", default="docs/RESULTS.md")
    parser.add_argument("--note", action="append",
                        help="a finding to list under Notes in RESULTS.md (repeatable)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: summarize the finished runs, list the others")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="train only these seeds (the other seeds' finished runs are "
                             "summarized): to share a plan between processes")
    args = parser.parse_args(argv)
    plan = PLANS[args.size]
    models = list(dict.fromkeys(TABLE1_MODELS + ABLATIONS))
    # Seed-major order, so that after the first pass every table has one seed; a seed's
    # transfer runs follow its SRCD runs (they start from its CRAM checkpoint).
    jobs = []
    for seed in range(plan.seeds):
        jobs += [("srcd", model, seed) for model in models]
        if seed < plan.transfer_seeds:
            jobs += [(task, "cram", seed) for task in TRANSFER_TASKS]
    results: Dict[str, List[dict]] = {m: [] for m in models}
    transfer = {task: {"scratch": [], "transfer": []} for task in TRANSFER_TASKS}
    names = [f"{m}_s{s}" if t == "srcd" else f"{t}_s{s}" for t, m, s in jobs]
    def finished(tag: str, seed: int) -> bool:
        return os.path.exists(os.path.join(run_dir(args.runs, tag, seed), "result.json"))

    missing = []
    for index, (task, model, seed) in enumerate(jobs):
        read_only = args.summarize_only or (args.seeds is not None and seed not in args.seeds)
        if task == "srcd":
            if read_only and not finished(model, seed):
                missing.append(names[index])
                continue
            results[model].append(train_one(plan, args.runs, model, seed))
        else:
            tags = (f"{task}_scratch", f"{task}_transfer")
            if read_only and not all(finished(tag, seed) for tag in tags):
                missing.append(names[index])
                continue
            source = os.path.join(run_dir(args.runs, "cram", seed), "checkpoint.pt")
            transfer[task]["scratch"].append(
                train_one(plan, args.runs, "cram", seed, task, tag=tags[0]))
            transfer[task]["transfer"].append(
                train_one(plan, args.runs, "cram", seed, task, init_from=source, tag=tags[1]))
        if not read_only:
            summarize_and_write(args.size, plan, results, transfer,
                                missing + names[index + 1:], len(jobs), args)
    return summarize_and_write(args.size, plan, results, transfer, missing, len(jobs), args)


if __name__ == "__main__":
    main()
