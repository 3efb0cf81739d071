"""The evaluation command: a checkpoint on the test stream, routing by token kind per layer."""
import numpy as np
import torch

from cram_ext import evaluate, train
from cram_ext.models.router import Path
from cram_ext.srcd.generator import KEY_WRITE
from cram_ext.srcd.metrics import routed_layers, token_kinds
from cram_ext.train import RunConfig, Trainer


def test_evaluate_reports_routing_by_kind_on_the_test_stream(tmp_path, capsys):
    train.main(["--config", "cram", "--size", "tiny", "--steps", "4", "--out", str(tmp_path)])
    capsys.readouterr()
    metrics = evaluate.main([str(tmp_path / "checkpoint.pt"), "--batches", "2",
                             "--json", str(tmp_path / "metrics.json"), "--by-pattern",
                             "--other-paths"])
    printed = capsys.readouterr().out
    assert "attention | recurring" in printed and "attention fraction" in printed
    assert "predicted loss working/episodic/semantic, measured loss working/episodic/semantic" \
        in printed

    # The same numbers by hand: inference routing on batches 0 and 1 of the test stream.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    trainer = Trainer(RunConfig(**state["config"]), None, show_progress=False)
    trainer.model.load_state_dict(state["model"])
    trainer.model.eval()
    counts = {}
    with torch.no_grad():
        for i in range(2):
            batch = trainer.batch(i, trainer.config.data_seed + evaluate.TEST_SEED_OFFSET)
            output = trainer.model(batch)
            for layer, record in enumerate(output.layers):
                for kind, mask in token_kinds(batch).items():
                    ran, total = counts.get((layer, kind), (0, 0))
                    attended = (record.routing.choice == Path.EPISODIC) & mask
                    counts[layer, kind] = (ran + int(attended.sum()), total + int(mask.sum()))
    for (layer, kind), (ran, total) in counts.items():
        if total:
            assert metrics[f"attention/{layer}/{kind}"] == ran / total
    assert routed_layers(metrics) == [0, 1]
    # --by-pattern: one line per recurring pattern, its query counts adding up to the total
    table = [line for line in printed[printed.index("pattern  queries"):].splitlines()[1:]
             if "non-query tokens" not in line]
    assert sum(int(line.split()[1]) for line in table) == counts[0, "recurring"][1]
    # its measured losses come from passes that change one layer's recurring queries only
    recurring = token_kinds(batch)["recurring"]
    paths = evaluate.forced_paths(output, 1, recurring, Path.SEMANTIC)
    assert (paths[1][recurring] == Path.SEMANTIC).all()
    assert torch.equal(paths[1][~recurring], output.layers[1].routing.choice[~recurring])
    assert torch.equal(paths[0], output.layers[0].routing.choice)
    assert all(len(line.split(",")) == 1 + 2 * 2 for line in table)   # 2 layers: P, 2 triples
    # before it, per layer: the recurring queries that attend, binned by their loss off attention
    for layer in (0, 1):
        line = next(l for l in printed.splitlines() if l.startswith(f"L{layer}: "))
        attending, of = (int(v) for v in line.split()[1:4:2])
        assert (attending, of) == counts[layer, "recurring"]
        bins = [int(cell.split()[-1]) for cell in line.split("(nats): ")[1].split(", ")]
        assert len(bins) == len(evaluate.OFF_ATTENTION_LOSS_EDGES) + 1 and sum(bins) == attending
    # --other-paths: per layer, the MSE as routed (the metric's) and with the layer's
    # non-query, non-attending tokens all on one memory; batch 1 of the test stream by hand
    lines = {int(l[1]): l for l in printed.splitlines() if "non-query tokens" in l}
    assert sorted(lines) == [0, 1]
    assert f"as routed {metrics['dynamics_mse']:.4f}" in lines[0]
    sums = {path: 0.0 for path in (Path.WORKING, Path.SEMANTIC)}
    predicted, observed, predicted_rows = torch.zeros(3), 0.0, 0.0
    with torch.no_grad():
        for i in range(2):
            batch = trainer.batch(i, trainer.config.data_seed + evaluate.TEST_SEED_OFFSET)
            output = trainer.model(batch)
            rows = token_kinds(batch)["other"] & (output.layers[1].routing.choice != Path.EPISODIC)
            mask = batch["dynamics_mask"]
            observed += float(mask.sum())
            predicted += output.layers[1].routing.predicted_loss[rows & mask].sum(0)
            predicted_rows += float((rows & mask).sum())
            for path in sums:
                out = trainer.model(batch, paths=evaluate.forced_paths(output, 1, rows, path))
                sums[path] += float((out.next_value - batch["target_value"])[mask].pow(2).sum())
    assert f"working memory {sums[Path.WORKING] / observed:.4f}" in lines[1]
    assert f"semantic memory {sums[Path.SEMANTIC] / observed:.4f}" in lines[1]
    mean = predicted / predicted_rows
    assert lines[1].endswith(f"{mean[Path.WORKING]:.4f} / {mean[Path.SEMANTIC]:.4f}")
    # a stream neither training (data_seed) nor in-training evaluation reads
    assert evaluate.TEST_SEED_OFFSET != train.EVAL_SEED_OFFSET


def test_evaluate_fused_and_composed_layers_agree(tmp_path, capsys):
    # a narrow router and a low price, so that after 4 steps many tokens still attend
    train.main(["--config", "cram", "--size", "tiny", "--steps", "4", "--router-width", "32",
                "--lambda-episodic", "1", "--out", str(tmp_path)])
    checkpoint = str(tmp_path / "checkpoint.pt")
    fused = evaluate.main([checkpoint, "--batches", "2", "--fused"])
    composed = evaluate.main([checkpoint, "--batches", "2", "--no-fused"])
    capsys.readouterr()
    np.testing.assert_equal(fused, composed)   # NaN (no query attended) equals NaN
    assert any(fused[f"attention/{layer}/{kind}"] > 0 for layer in (0, 1)
               for kind in ("recurring", "novel", "other"))


def test_evaluate_retrieval_errors_match_a_count_by_hand(tmp_path, capsys):
    # a narrow router and a low price, so that after 4 steps some queries attend and some do not
    train.main(["--config", "cram", "--size", "tiny", "--steps", "4", "--router-width", "32",
                "--lambda-episodic", "1", "--out", str(tmp_path)])
    capsys.readouterr()
    evaluate.main([str(tmp_path / "checkpoint.pt"), "--batches", "2", "--retrieval-errors"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
             if " queries: " in line}

    trainer, _ = evaluate.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    trainer.model.eval()
    for kind in ("recurring", "novel"):
        wrong = not_attended = other_value = 0
        per_class = torch.zeros(trainer.model.config.n_values, dtype=torch.long)
        queries = 0
        with torch.no_grad():
            for i in range(2):
                batch = trainer.batch(i, trainer.config.data_seed + evaluate.TEST_SEED_OFFSET)
                output = trainer.model(batch)
                answers = output.value_logits.argmax(-1)
                attended = sum((r.routing.choice == Path.EPISODIC).long() for r in output.layers)
                mask = token_kinds(batch)[kind]
                queries += int(mask.sum())
                misses = mask & (answers != batch["target_class"])
                wrong += int(misses.sum())
                not_attended += int((misses & (attended == 0)).sum())
                per_class += torch.bincount(batch["target_class"][misses],
                                            minlength=len(per_class))
                for b, t in misses.nonzero().tolist():
                    earlier = torch.arange(t)
                    other = (batch["token_type"][b, earlier] == KEY_WRITE) \
                        & (batch["key"][b, earlier] != batch["key"][b, t])
                    other_value += int((batch["value"][b, earlier][other] == answers[b, t]).any())
        assert wrong > 0 and not_attended < wrong   # the counts below can tell the cases apart
        line = lines[kind]
        assert line.startswith(f"{kind} queries: {wrong} of {queries} answered wrongly; "
                               f"{not_attended} of them attended in no layer, {other_value} named")
        unbound = torch.ones(len(per_class), dtype=torch.bool)
        unbound[torch.as_tensor(trainer.bindings)] = False
        assert f"bound to {int(per_class[unbound].sum())} wrong of " in line
        worst = line.split("(wrong / queried): ")[1].split(", ")
        assert len(worst) == min(evaluate.RETRIEVAL_ERROR_CLASSES, int((per_class > 0).sum()))
        listed = [int(cell.split()[1].strip("()").split("/")[0]) for cell in worst]
        assert listed == sorted(per_class.tolist(), reverse=True)[:len(worst)]


def test_evaluate_retrieval_errors_count_dense_attention_as_attended(tmp_path, capsys):
    train.main(["--config", "transformer", "--size", "tiny", "--steps", "2",
                "--out", str(tmp_path)])
    capsys.readouterr()
    evaluate.main([str(tmp_path / "checkpoint.pt"), "--batches", "2", "--retrieval-errors"])
    lines = [line for line in capsys.readouterr().out.splitlines() if " queries: " in line]
    assert len(lines) == 2
    for line in lines:   # every layer attends every token: no error comes from skipping it
        wrong = int(line.split(": ")[1].split()[0])
        assert wrong > 0 and " 0 of them attended in no layer" in line
