"""Evaluate a trained SRCD model on a stream no training run sees, with inference routing.

    python -m cram_ext.evaluate runs/cram/checkpoint.pt
    python -m cram_ext.evaluate runs/cram/checkpoint.pt --batches 32 --json routing.json
    python -m cram_ext.evaluate runs/cram/checkpoint.pt --by-pattern     # per recurring pattern
    python -m cram_ext.evaluate runs/cram/checkpoint.pt --other-paths    # observations' paths
    python -m cram_ext.evaluate runs/cram/checkpoint.pt --retrieval-errors  # wrong answers

Prints retrieval accuracy (recurring / novel keys), the dynamics MSE beside the Bayes
predictor's, the attention fraction, and per layer with a router the fraction of each token kind
(recurring query, novel query, every other token) that ran attention and that went to semantic
memory: where consolidation shows (recurring queries leave attention, novel ones keep it).
`--by-pattern` adds, per recurring pattern and routed layer, how often its queries attended and
the loss the router predicts for each path: which bindings have been consolidated; and per layer
the attending recurring queries binned by the loss they would have off attention.
`--other-paths` adds, per routed layer with semantic memory, the dynamics MSE with every
non-query token that does not attend there sent to working memory, and to semantic memory: what
the router's split of observations and writes between the two costs.
`--retrieval-errors` adds, per query kind, what the wrong answers have in common: no layer
attended, another binding's value named, low confidence, a few value classes.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List

import numpy as np
import torch

from .models.router import Path
from .srcd.generator import KEY_WRITE
from .srcd.metrics import TOKEN_KINDS, routed_layers, token_kinds
from .train import RunConfig, Trainer

# Sequences of the test stream: the same bindings as training, a seed offset no training or
# in-training evaluation stream uses.
TEST_SEED_OFFSET = 2_000_003
# Test batches a measurement reads. At the cpu preset 16 batches hold 512 novel queries, whose
# accuracy then has a binomial std of about 0.4 points: as wide as the margins it is judged by.
TEST_BATCHES = 64

# Edges (nats) of the bins `--by-pattern` sorts attending recurring queries into by their measured
# loss off attention: below the first, attention was not needed; above the last (the default
# λ_E), semantic and working memory do not answer them yet.
OFF_ATTENTION_LOSS_EDGES = (0.5, 1.0)
# Value classes `--retrieval-errors` lists, most errors first.
RETRIEVAL_ERROR_CLASSES = 5


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


@torch.no_grad()
def pattern_routing(trainer, n_batches: int) -> List[str]:
    """Per recurring pattern, most queried first: its test queries and, per routed layer,
    P(attention), the router's mean predicted loss of each path and the mean loss measured when
    the pattern's queries take that path in that layer (the other tokens and layers as routed),
    as text lines: which bindings have been consolidated, and whether the router knows. Before
    the table, per routed layer, the recurring queries that attend, counted by the loss they
    measure on the best other path (bins at OFF_ATTENTION_LOSS_EDGES): those a perfect router
    would move off attention, and those no router could yet."""
    model = trainer.model.eval()
    attended: Dict[int, List[torch.Tensor]] = {}   # pattern → (queries, layers) decisions
    predicted: Dict[int, List[torch.Tensor]] = {}  # pattern → (queries, layers, paths)
    measured: Dict[int, List[torch.Tensor]] = {}   # pattern → (queries, layers, paths)
    for i in range(n_batches):
        batch = trainer.batch(i, trainer.config.data_seed + TEST_SEED_OFFSET)
        output = model(batch)
        routed = [index for index, r in enumerate(output.layers) if r.routing is not None]
        routings = [output.layers[index].routing for index in routed]
        queries = token_kinds(batch)["recurring"]
        choice = torch.stack([r.choice[queries] == Path.EPISODIC for r in routings], -1)
        loss = torch.stack([r.predicted_loss[queries] for r in routings], 1)
        taken = torch.stack([torch.stack([
            model.token_losses(batch, model(batch, paths=forced_paths(output, index, queries,
                                                                      path)))[queries]
            for path in model.layers[index].router.paths], -1) for index in routed], 1)
        for row, pattern in enumerate(batch["pattern"][queries].tolist()):
            attended.setdefault(pattern, []).append(choice[row].float())
            predicted.setdefault(pattern, []).append(loss[row])
            measured.setdefault(pattern, []).append(taken[row])
    if not attended:
        return ["no recurring query was routed"]
    paths = "/".join(p.name.lower() for p in model.layers[0].router.paths)
    n_layers = len(next(iter(attended.values()))[0])
    lines = off_attention_loss_lines(torch.cat([torch.stack(a) for a in attended.values()]).bool(),
                                     torch.cat([torch.stack(m) for m in measured.values()]),
                                     model.layers[0].router.paths)
    lines += ["pattern  queries  " + "  ".join(
        f"L{l}: P(attention), predicted loss {paths}, measured loss {paths}"
        for l in range(n_layers))]
    for pattern in sorted(attended, key=lambda p: -len(attended[p])):
        p_attention = torch.stack(attended[pattern]).mean(0)
        mean_predicted = torch.stack(predicted[pattern]).mean(0)
        mean_measured = torch.stack(measured[pattern]).mean(0)
        cells = [f"{p_attention[l]:.2f}, " + "/".join(f"{v:.2f}" for v in mean_predicted[l])
                 + ", " + "/".join(f"{v:.2f}" for v in mean_measured[l])
                 for l in range(n_layers)]
        lines.append(f"{pattern:<7}  {len(attended[pattern]):<7}  " + "  ".join(cells))
    return lines


def off_attention_loss_lines(attended: torch.Tensor, measured: torch.Tensor, paths) -> List[str]:
    """Per layer, the queries that attend (`attended` (queries, layers)) counted by the lowest loss
    measured on a path other than attention (`measured` (queries, layers, paths))."""
    others = [i for i, p in enumerate(paths) if p != Path.EPISODIC]
    best_other = measured[..., others].min(-1).values
    bounds = OFF_ATTENTION_LOSS_EDGES
    labels = ([f"< {bounds[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(bounds, bounds[1:])]
              + [f">= {bounds[-1]:g}"])
    lines = []
    for layer in range(attended.shape[1]):
        rows = attended[:, layer]
        bins = torch.bucketize(best_other[rows, layer], torch.tensor(bounds), right=True)
        lines.append(f"L{layer}: {int(rows.sum())} of {len(rows)} recurring queries attend; "
                     "lowest loss measured off attention (nats): "
                     + ", ".join(f"{label} {int(n)}" for label, n
                                 in zip(labels, bins.bincount(minlength=len(labels)))))
    return lines


@torch.no_grad()
def other_token_paths(trainer, n_batches: int) -> List[str]:
    """Per routed layer with semantic memory, as text lines: the share of non-query tokens that
    take semantic memory there, and the dynamics MSE as routed, with every non-query token that
    does not attend there sent to working memory, and with all of them sent to semantic memory
    (the other layers as routed); beside them, the loss the router predicts for those of them
    that are observations on either path."""
    model = trainer.model.eval()
    paths = (Path.WORKING, Path.SEMANTIC)
    sums: Dict[tuple, float] = defaultdict(float)
    layers = [index for index, layer in enumerate(model.layers)
              if layer.router is not None and Path.SEMANTIC in layer.router.paths]
    for i in range(n_batches):
        batch = trainer.batch(i, trainer.config.data_seed + TEST_SEED_OFFSET)
        output = model(batch)
        observed = batch["dynamics_mask"]
        sums["observed"] += float(observed.sum())
        sums["routed"] += float(model.token_losses(batch, output)[observed].sum())
        other = token_kinds(batch)["other"]
        for index in layers:
            choice = output.layers[index].routing.choice
            rows = other & (choice != Path.EPISODIC)
            sums[index, "rows"] += float(rows.sum())
            sums[index, "semantic"] += float((rows & (choice == Path.SEMANTIC)).sum())
            predicted = output.layers[index].routing.predicted_loss[rows & observed]
            sums[index, "predicted"] += float((rows & observed).sum())
            for path in paths:
                sums[index, "predicted", path] += float(predicted[:, path].sum())
                forced = model(batch, paths=forced_paths(output, index, rows, path))
                sums[index, path] += float(model.token_losses(batch, forced)[observed].sum())
    n = sums["observed"]
    return [f"L{index}: {sums[index, 'semantic'] / max(1.0, sums[index, 'rows']):.2f} of the "
            f"non-query tokens take semantic memory; dynamics MSE as routed "
            f"{sums['routed'] / n:.4f}, all on working memory {sums[index, Path.WORKING] / n:.4f}, "
            f"all on semantic memory {sums[index, Path.SEMANTIC] / n:.4f}; the router's mean "
            f"predicted loss of these observations on working / semantic memory "
            + " / ".join(f"{sums[index, 'predicted', path] / max(1.0, sums[index, 'predicted']):.4f}"
                         for path in paths) for index in layers]


@torch.no_grad()
def retrieval_errors(trainer, n_batches: int) -> List[str]:
    """Per query kind, as text lines: the queries answered wrongly, those that attended in no
    layer, those whose answer is the value of another binding written earlier in the sequence
    (attention read the wrong entry), the median confidence (top softmax probability) of right
    and wrong answers, the errors on values that no recurring pattern is bound to (the rarest
    targets in training), and the value classes with the most errors: a routing error, a
    retrieval of the wrong entry, or a value the read-out does not yet name."""
    model = trainer.model.eval()
    counts: Dict[tuple, int] = defaultdict(int)
    confidence: Dict[tuple, List[float]] = defaultdict(list)
    chance: Dict[str, float] = defaultdict(float)
    n_values = trainer.model.config.n_values
    bound = set(trainer.bindings.tolist())   # the values of recurring patterns
    for i in range(n_batches):
        batch = trainer.batch(i, trainer.config.data_seed + TEST_SEED_OFFSET)
        output = model(batch)
        probabilities, answers = output.value_logits.softmax(-1).max(-1)
        attended = torch.zeros_like(answers, dtype=torch.bool)
        for record in output.layers:   # routed and dense attention alike, as the metrics count
            if record.attention_rows is not None:
                attended |= record.attention_rows
        written = batch["token_type"] == KEY_WRITE
        kinds = token_kinds(batch)
        for kind in ("recurring", "novel"):
            for b, t in kinds[kind].nonzero().tolist():
                target, answer = int(batch["target_class"][b, t]), int(answers[b, t])
                right = answer == target
                counts[kind, "queries"] += 1
                counts[kind, "class", target] += 1
                counts[kind, "unbound"] += int(target not in bound)
                confidence[kind, right].append(float(probabilities[b, t]))
                if right:
                    continue
                counts[kind, "wrong"] += 1
                counts[kind, "wrong class", target] += 1
                counts[kind, "wrong unbound"] += int(target not in bound)
                counts[kind, "not attended"] += int(not attended[b, t])
                others = written[b, :t] & (batch["key"][b, :t] != batch["key"][b, t])
                other_values = set(batch["value"][b, :t][others].tolist()) - {target}
                counts[kind, "another binding"] += int(answer in other_values)
                # A wrong answer drawn at random names one of them this often.
                chance[kind] += len(other_values) / (n_values - 1)
    lines = []
    for kind in ("recurring", "novel"):
        if not counts[kind, "queries"]:
            continue
        wrong = counts[kind, "wrong"]
        worst = sorted((key[2] for key in counts if key[:2] == (kind, "wrong class")),
                       key=lambda c: -counts[kind, "wrong class", c])[:RETRIEVAL_ERROR_CLASSES]
        median = lambda values: f"{np.median(values):.2f}" if values else "-"  # noqa: E731
        lines.append(
            f"{kind} queries: {wrong} of {counts[kind, 'queries']} answered wrongly; "
            f"{counts[kind, 'not attended']} of them attended in no layer, "
            f"{counts[kind, 'another binding']} named another binding's value "
            f"({chance[kind]:.1f} if wrong answers were random); median "
            f"confidence right / wrong {median(confidence[kind, True])} / "
            f"{median(confidence[kind, False])}; on values no recurring pattern is bound to "
            f"{counts[kind, 'wrong unbound']} wrong of {counts[kind, 'unbound']} queried; "
            f"most errors by value class (wrong / queried): "
            + (", ".join(f"{c} ({counts[kind, 'wrong class', c]}/{counts[kind, 'class', c]})"
                         for c in worst) or "-"))
    return lines


def forced_paths(output, layer: int, rows: torch.Tensor, path: Path) -> List[torch.Tensor]:
    """Every routed layer's choices in `output`, with `rows` (batch, L) sent to `path` in layer
    `layer`: the paths of a pass that changes only that."""
    paths = [None if r.routing is None else r.routing.choice.clone() for r in output.layers]
    paths[layer][rows] = int(path)
    return paths


def load_checkpoint(path: str, **model_overrides):
    """(a Trainer holding the model of checkpoint `path`, the checkpoint) with any model setting
    overridden (for example fused=False). The model is evaluated on the CPU, wherever it was
    trained."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = {**state["config"], "device": "cpu"}
    config["model_overrides"] = {**config["model_overrides"], **model_overrides}
    trainer = Trainer(RunConfig(**config), None, show_progress=False)
    trainer.model.load_state_dict(state["model"])
    return trainer, state


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint.pt written by cram_ext.train")
    parser.add_argument("--batches", type=int, default=TEST_BATCHES,
                        help="test batches (of the run's batch size)")
    parser.add_argument("--json", default=None, help="also write the metrics here")
    parser.add_argument("--by-pattern", action="store_true",
                        help="also print routing and predicted losses per recurring pattern")
    parser.add_argument("--other-paths", action="store_true",
                        help="also print, per layer, the dynamics MSE with the non-query tokens "
                             "all on working memory and all on semantic memory")
    parser.add_argument("--retrieval-errors", action="store_true",
                        help="also print, per query kind, what the wrongly answered queries "
                             "have in common")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="routed scan layers through cram_forward, or through the separate "
                             "ops (--no-fused); default: the checkpoint's setting")
    args = parser.parse_args(argv)

    trainer, state = load_checkpoint(args.checkpoint,
                                     **({} if args.fused is None else {"fused": args.fused}))
    metrics = trainer.evaluate(args.batches, seed_offset=TEST_SEED_OFFSET)
    print(f"{args.checkpoint} (step {state['step']}), {args.batches} test batches")
    print("\n".join(summary_lines(metrics)))
    if args.by_pattern:
        print("\n".join(pattern_routing(trainer, args.batches)))
    if args.other_paths:
        print("\n".join(other_token_paths(trainer, args.batches)))
    if args.retrieval_errors:
        print("\n".join(retrieval_errors(trainer, args.batches)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


if __name__ == "__main__":
    main()
