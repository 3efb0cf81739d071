"""SRCD generator: determinism, streaming contract, statistics; transfer tasks; metrics (checked
against a count made in numpy) and exposure statistics."""
import itertools

import numpy as np
import pytest
import torch

from cram_ext.models.router import Path
from cram_ext.srcd import (IGNORE_INDEX, KEY_WRITE, OBSERVATION, QUERY, SRCDConfig, SRCDStream,
                           TransferConfig, batch_at, generate_sequence, generate_transfer_sequence,
                           pattern_values)
from cram_ext.srcd.exposure import PatternExposure
from cram_ext.srcd.metrics import add_sums, batch_sums, summarize
from cram_ext.train import Trainer, run_config

SMALL = SRCDConfig(seq_len=256)


def sequences(config, seed, count):
    bindings = pattern_values(config)
    return [generate_sequence(config, seed, i, bindings) for i in range(count)]


def test_same_seed_and_index_give_the_same_sequence_and_others_differ():
    a = generate_sequence(SMALL, seed=3, index=7)
    b = generate_sequence(SMALL, seed=3, index=7)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["gap"], generate_sequence(SMALL, seed=4, index=7)["gap"])
    assert not np.array_equal(a["gap"], generate_sequence(SMALL, seed=3, index=8)["gap"])


def test_stream_restarts_at_any_position_and_ranks_partition_it():
    whole = list(itertools.islice(iter(SRCDStream(SMALL, seed=1)), 8))
    tail = list(itertools.islice(iter(SRCDStream(SMALL, seed=1, start=3)), 5))
    for expected, got in zip(whole[3:], tail):
        np.testing.assert_array_equal(expected["key"], got["key"])
    rank0 = list(itertools.islice(iter(SRCDStream(SMALL, seed=1, rank=0, world_size=2)), 4))
    rank1 = list(itertools.islice(iter(SRCDStream(SMALL, seed=1, rank=1, world_size=2)), 4))
    for i in range(4):
        np.testing.assert_array_equal(rank0[i]["gap"], whole[2 * i]["gap"])
        np.testing.assert_array_equal(rank1[i]["gap"], whole[2 * i + 1]["gap"])


def test_batch_at_is_the_stream_cut_into_batches_and_split_over_ranks():
    batch = batch_at(SMALL, seed=2, step=1, batch_size=3)
    expected = sequences(SMALL, 2, 6)[3:]
    for row, sequence in enumerate(expected):
        np.testing.assert_array_equal(batch["gap"][row].numpy(), sequence["gap"])
    rank1 = batch_at(SMALL, seed=2, step=1, batch_size=2, rank=1, world_size=2)
    np.testing.assert_array_equal(rank1["key"][0].numpy(), sequences(SMALL, 2, 6)[5]["key"])


def test_query_rate_recurring_fraction_and_bindings():
    config = SRCDConfig(seq_len=512)
    bindings = pattern_values(config)
    n_queries = recurring = 0
    novel_values = {}
    for s in sequences(config, 0, 40):
        queries = s["token_type"] == QUERY
        n_queries += queries.sum()
        assert queries.sum() == round(0.05 * 512)
        assert (s["token_type"] == KEY_WRITE).sum() == queries.sum()
        keys = s["key"][queries]
        recurring += (keys < config.n_patterns).sum()
        # recurring keys answer with the dataset-wide binding
        rec = keys < config.n_patterns
        np.testing.assert_array_equal(s["target_class"][queries][rec], bindings[keys[rec]])
        np.testing.assert_array_equal(s["pattern"][queries][rec], keys[rec])
        assert (s["pattern"][queries][~rec] == -1).all()
        for key, value in zip(keys[~rec], s["target_class"][queries][~rec]):
            novel_values.setdefault(int(key), set()).add(int(value))
        assert (s["target_class"][~queries] == IGNORE_INDEX).all()
    assert abs(recurring / n_queries - 0.7) < 0.01
    # novel keys are re-bound per sequence: some key must have taken several values
    assert max(len(v) for v in novel_values.values()) > 1


def test_every_queried_key_was_written_earlier_with_its_value():
    for s in sequences(SMALL, 5, 30):
        for t in np.flatnonzero(s["token_type"] == QUERY):
            writes = np.flatnonzero((s["token_type"][:t] == KEY_WRITE) & (s["key"][:t] == s["key"][t]))
            assert len(writes) == 1
            assert s["value"][writes[0]] == s["target_class"][t]
        assert len(set(s["key"][s["token_type"] == QUERY].tolist())) == SMALL.n_queries


def test_dynamics_follow_the_recursion_with_the_configured_noise():
    config = SRCDConfig(seq_len=512)
    residuals, oracle_errors = [], []
    for s in sequences(config, 9, 20):
        v, gap = s["target_value"].astype(np.float64), s["gap"].astype(np.float64)
        drift = config.beta * np.sin(config.omega * gap[1:])
        residuals.append(v[1:] - config.decay * v[:-1] - drift)
        mask = s["dynamics_mask"]
        oracle_errors.append((s["oracle_value"] - v)[mask])
        observed = s["token_type"] == OBSERVATION
        # the model sees the last value observed strictly before t
        last = np.flatnonzero(observed[:300])[-1]
        nxt = 300 + np.flatnonzero(observed[300:])[0]
        assert s["last_value"][nxt] == pytest.approx(v[last])
    residuals = np.concatenate(residuals)
    assert np.std(residuals) == pytest.approx(config.noise_std, rel=0.05)
    # the Bayes predictor's MSE sits at the noise floor, slightly above it after skipped values
    oracle_mse = np.mean(np.concatenate(oracle_errors) ** 2)
    assert config.noise_std ** 2 <= oracle_mse < 1.3 * config.noise_std ** 2


def test_gaps_are_clipped_pareto():
    gaps = np.concatenate([s["gap"] for s in sequences(SMALL, 1, 40)])
    assert gaps.min() >= 0.1 - 1e-6 and gaps.max() <= 1000.0
    # Pareto(α=1.5, x_m=0.1): median = 0.1 · 2^(1/1.5)
    assert np.median(gaps) == pytest.approx(0.1 * 2 ** (1 / 1.5), rel=0.05)


def test_ideal_attention_fraction_and_config_errors():
    assert SRCDConfig().ideal_attention_fraction == pytest.approx(0.015, abs=0.001)
    with pytest.raises(ValueError, match="no query"):
        SRCDConfig(seq_len=8)
    with pytest.raises(ValueError, match="patterns"):
        SRCDConfig(seq_len=2048, n_patterns=20)
    with pytest.raises(ValueError, match="recurring_fraction"):
        SRCDConfig(recurring_fraction=1.5)


@pytest.mark.parametrize("task", ["copy", "recall", "recurring_recall"])
def test_transfer_tasks_query_only_keys_written_before(task):
    config = TransferConfig(task=task, n_items=10, source=SMALL)
    s = generate_transfer_sequence(config, seed=0, index=4)
    queries = np.flatnonzero(s["token_type"] == QUERY)
    assert len(queries) == 10
    for t in queries:
        (write,) = np.flatnonzero((s["token_type"][:t] == KEY_WRITE) & (s["key"][:t] == s["key"][t]))
        assert s["value"][write] == s["target_class"][t]
    recurring = s["pattern"][queries] >= 0
    if task == "recurring_recall":   # half the items are SRCD's recurring bindings
        assert recurring.sum() == 5
        np.testing.assert_array_equal(s["key"][queries][recurring], s["pattern"][queries][recurring])
        np.testing.assert_array_equal(s["target_class"][queries][recurring],
                                      pattern_values(SMALL)[s["pattern"][queries][recurring]])
    else:
        assert not recurring.any()
    assert (s["key"][queries][~recurring] >= SMALL.n_patterns).all()
    if task == "copy":
        np.testing.assert_array_equal(s["key"][queries], s["key"][:10])
    with pytest.raises(ValueError, match="unknown transfer task"):
        TransferConfig(task="sort")


def test_batch_sums_count_what_one_forward_did_token_by_token():
    """Each entry of `batch_sums` against the same count made in numpy from the batch and the
    model's output, for a trained-from-scratch model in training mode (exploration: every
    path taken somewhere)."""
    trainer = Trainer(run_config("cram", "tiny"), None, show_progress=False)
    batch = trainer.batch(0, 0)
    with torch.no_grad():
        output = trainer.model(batch, step=200)
    sums = batch_sums(batch, output, len(output.layers))
    b = {name: t.numpy() for name, t in batch.items()}
    queries = b["target_class"] != IGNORE_INDEX
    recurring, novel = queries & (b["pattern"] >= 0), queries & (b["pattern"] < 0)
    correct = (output.value_logits.argmax(-1).numpy() == b["target_class"]) & queries
    observed = b["dynamics_mask"]
    expected = {"queries": queries.sum(), "correct": correct.sum(),
                "recurring_queries": recurring.sum(), "novel_queries": novel.sum(),
                "recurring_correct": (correct & recurring).sum(),
                "novel_correct": (correct & novel).sum(), "observations": observed.sum(),
                "tokens": queries.size, "token_layers": queries.size * len(output.layers)}
    errors = (output.next_value.numpy().astype(np.float64) - b["target_value"]) ** 2
    expected["dynamics_se"] = errors[observed].sum()
    q_sum = q_count = 0.0
    kinds = {"recurring": recurring, "novel": novel, "other": ~queries}
    for index, record in enumerate(output.layers):
        rows = record.attention_rows.numpy()
        expected[f"attention_rows/{index}"] = rows.sum()
        q_sum += record.q.numpy().astype(np.float64)[rows].sum()
        q_count += rows.sum()
        choice = record.routing.choice.numpy()
        for kind, mask in kinds.items():
            expected[f"tokens/{index}/{kind}"] = mask.sum()
            expected[f"attention/{index}/{kind}"] = (rows & mask).sum()
            expected[f"semantic/{index}/{kind}"] = ((choice == Path.SEMANTIC) & mask).sum()
    expected["q_sum"], expected["q_count"] = q_sum, q_count
    assert all(0 < expected[f"attention_rows/{i}"] < queries.size for i in range(2))
    for key, value in expected.items():
        assert sums[key] == pytest.approx(float(value), rel=1e-5), key


def test_summarize_divides_the_accumulated_sums():
    first = {"queries": 4.0, "correct": 3.0, "tokens": 10.0, "token_layers": 20.0,
             "attention_rows/0": 1.0, "attention_tokens/0": 10.0,
             "attention_rows/1": 3.0, "attention_tokens/1": 10.0}
    total = add_sums(add_sums({}, first), {**first, "correct": 1.0})
    metrics = summarize(total)
    assert metrics["accuracy"] == pytest.approx(4 / 8)
    assert metrics["attention_fraction"] == pytest.approx(8 / 40)
    assert metrics["attention_fraction/1"] == pytest.approx(6 / 20)
    assert metrics["attention_ops"] == pytest.approx(8 / 40)
    assert np.isnan(metrics["dynamics_mse"])


def test_pattern_exposure_bins_queries_by_times_seen():
    exposure = PatternExposure(n_patterns=3, n_layers=2)
    exposure.update(np.array([0, 0, 0, 1]), np.array([[1, 0, 1, 1], [0, 0, 1, 0]]))
    # pattern 0 seen for the 1st, 2nd, 3rd time: bins ⌊log2 k⌋ = 0, 1, 1
    assert exposure.total[0, :2].tolist() == [1, 2]
    assert exposure.episodic[0, 0, :2].tolist() == [1, 1]     # layer 0
    assert exposure.episodic[1, 0, :2].tolist() == [0, 1]     # layer 1
    assert exposure.episodic[:, 1, 0].tolist() == [1, 0]
    assert exposure.seen.tolist() == [3, 1, 0]
