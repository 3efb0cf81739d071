"""Tests for cram_ext.redundancy (attention-redundancy probe).

The probe math and the streaming pipeline are tested with a small pure-PyTorch
model registered through the adapter interface; the Hugging Face hooks and the
command line need ``transformers`` and are skipped without it.
"""

import json
import math

import pytest
import torch
from torch import nn

from cram_ext import redundancy as rd
from cram_ext.redundancy import cli, taps


def _fit_and_score(x_train, y_train, x_test, y_test, ridge=1e-6):
    train = rd.ProbeStatistics(x_train.shape[1], y_train.shape[1])
    test = rd.ProbeStatistics(x_test.shape[1], y_test.shape[1])
    train.update(x_train, y_train)
    test.update(x_test, y_test)
    weights = rd.fit_ridge(train, ridge)
    return rd.explained_fraction(rd.residual_energy(test, weights), test.yy)


@pytest.mark.parametrize("layer_normed", [False, True])
def test_probe_recovers_exact_affine_map(layer_normed):
    # LayerNorm outputs make XᵀX (with bias column) singular; the ridge must cope.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=g, dtype=torch.float64)
    if layer_normed:
        x = nn.functional.layer_norm(x, (12,))
    matrix = torch.randn(12, 7, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    y = x @ matrix + bias
    r = _fit_and_score(x[:2000], y[:2000], x[2000:], y[2000:])
    assert abs(r - 1.0) < 1e-6


def test_probe_finds_nothing_in_independent_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40_000, 16, generator=g, dtype=torch.float64)
    y = torch.randn(40_000, 8, generator=g, dtype=torch.float64)
    r = _fit_and_score(x[:20_000], y[:20_000], x[20_000:], y[20_000:])
    assert abs(r) < 0.05


def test_moment_expansion_matches_direct_residual():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    y = torch.randn(500, 3, generator=g, dtype=torch.float64) + x[:, :3] ** 2
    stats = rd.ProbeStatistics(6, 3)
    stats.update(x, y)
    weights = rd.fit_ridge(stats, 1e-3)
    predicted = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1) @ weights
    direct = ((y - predicted) ** 2).sum(0)
    torch.testing.assert_close(rd.residual_energy(stats, weights), direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rd.centered_energy(stats), ((y - y.mean(0)) ** 2).sum(0), rtol=1e-10, atol=1e-10)


def test_negative_ridge_is_rejected():
    stats = rd.ProbeStatistics(2, 1)
    stats.update(torch.randn(10, 2), torch.randn(10, 1))
    with pytest.raises(ValueError, match="ridge"):
        rd.fit_ridge(stats, -1.0)


# --------------------------------------------------------------------------
# A pure-PyTorch model with a registered adapter
# --------------------------------------------------------------------------


class PrefixMeanLayer(nn.Module):
    """Pre-norm 'attention' with uniform causal weights: each token averages the values of its prefix."""

    def __init__(self, width, n_heads):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.n_heads = n_heads

    def forward(self, hidden):
        values = self.value(self.norm(hidden))
        counts = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        return self.out(values.cumsum(dim=1) / counts)


class PrefixMeanModel(nn.Module):
    def __init__(self, vocab=64, width=16, n_heads=4, n_layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(PrefixMeanLayer(width, n_heads) for _ in range(n_layers))

    def forward(self, ids):
        hidden = self.embed(ids)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return hidden


def _prefix_mean_adapter(model):
    if not isinstance(model, PrefixMeanModel):
        return None
    return [
        rd.AttentionTaps(rd.Tap(l.norm, "output"), rd.Tap(l.out, "output"), rd.Tap(l.out, "input"), l.n_heads)
        for l in model.layers
    ]


@pytest.fixture
def prefix_mean_model(monkeypatch):
    monkeypatch.setattr(taps, "_ADAPTERS", dict(taps._ADAPTERS))
    rd.register_adapter("prefix-mean", _prefix_mean_adapter)
    torch.manual_seed(0)
    return PrefixMeanModel().double()


def _random_windows(count, length, vocab=64, seed=3):
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def test_streaming_estimate_equals_single_batch(prefix_mean_model):
    windows = _random_windows(60, 16)
    streamed = rd.measure_redundancy(prefix_mean_model, windows.split(1), ridge=1e-4)
    at_once = rd.measure_redundancy(prefix_mean_model, [windows], ridge=1e-4)
    assert streamed.train_tokens == at_once.train_tokens == 48 * 16
    assert streamed.heldout_tokens == at_once.heldout_tokens == 12 * 16
    for field in ("layer_r", "layer_r_centered", "head_r", "head_r_centered"):
        a = torch.tensor(getattr(streamed, field), dtype=torch.float64)
        b = torch.tensor(getattr(at_once, field), dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_attention_without_mixing_is_fully_redundant(prefix_mean_model):
    # With one-token windows the prefix mean is the token's own value: an affine map of the normed state.
    report = rd.measure_redundancy(prefix_mean_model, [_random_windows(2000, 1)], ridge=1e-9)
    assert report.architecture == "prefix-mean"
    assert min(report.layer_r) > 1 - 1e-6
    assert min(r for layer in report.head_r for r in layer) > 1 - 1e-6


def test_report_summary_is_consistent(prefix_mean_model):
    report = rd.measure_redundancy(prefix_mean_model, [_random_windows(40, 8)], ridge=1e-4)
    assert len(report.head_r) == 3 and all(len(row) == 4 for row in report.head_r)
    assert math.isclose(report.overall, sum(report.layer_r) / 3)
    assert report.thirds() == {"early": report.layer_r[0], "middle": report.layer_r[1], "late": report.layer_r[2]}
    assert math.isclose(sum(report.head_shares().values()), 1.0)
    assert "overall" in report.format_table()
    json.dumps(report.to_dict())


def test_unsupported_architecture_is_named():
    with pytest.raises(rd.UnsupportedArchitectureError, match="Sequential"):
        rd.measure_redundancy(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 1, dtype=torch.long)])


def test_too_little_text_is_reported(prefix_mean_model):
    with pytest.raises(ValueError, match="too little text"):
        rd.measure_redundancy(prefix_mean_model, [_random_windows(3, 8)], holdout_every=5)
    with pytest.raises(ValueError, match="too little text"):
        rd.measure_redundancy(prefix_mean_model, [_random_windows(5, 2)], holdout_every=5)


def test_windows_cover_the_stream_in_order():
    chunks = [torch.arange(0, 7), torch.arange(7, 20), torch.arange(20, 23)]
    windows = list(rd.token_windows(chunks, 5))
    assert torch.equal(torch.cat(windows), torch.arange(20))
    assert len(list(rd.token_windows(chunks, 5, max_windows=2))) == 2
    shapes = [b.shape for b in rd.batched(windows, 3)]
    assert shapes == [torch.Size([3, 5]), torch.Size([1, 5])]


def test_text_is_read_in_line_aligned_chunks(tmp_path):
    text = "".join(f"line {i} ✓\n" for i in range(500)) + "tail"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    ids = torch.cat(list(rd.read_text_token_chunks(path, rd.encode_bytes, chunk_chars=100)))
    assert bytes(ids.tolist()) == text.encode("utf-8")


# --------------------------------------------------------------------------
# Hugging Face models
# --------------------------------------------------------------------------


def _tiny_gpt2(seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None)
    config.update(overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()


def _manual_gpt2_attention(block, hidden, n_heads):
    """Recompute one GPT-2 attention sublayer from its weights: (normed input, output, head outputs)."""
    normed = block.ln_1(hidden)
    batch, length, width = normed.shape
    q, k, v = block.attn.c_attn(normed).split(width, dim=-1)
    split = lambda t: t.view(batch, length, n_heads, width // n_heads).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // n_heads)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    heads = (weights @ split(v)).transpose(1, 2).reshape(batch, length, width)
    return normed, block.attn.c_proj(heads), heads


@torch.no_grad()
def test_gpt2_hooks_capture_the_attention_sublayer():
    model = _tiny_gpt2()
    name, taps = rd.attention_taps(model)
    assert name == "gpt2" and len(taps) == 2 and taps[0].n_heads == 4
    ids = _random_windows(3, 16, vocab=256)
    with rd.ActivationRecorder(taps) as recorder:
        hidden_states = model(ids, output_hidden_states=True).hidden_states
        captured = recorder.take()
    for layer, block in enumerate(model.transformer.h):
        expected = _manual_gpt2_attention(block, hidden_states[layer], 4)
        for got, want in zip(captured[layer], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="did not reach"):
        recorder.take()


def test_llama_layout_is_supported():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    report = rd.measure_redundancy(model, [_random_windows(10, 16)])
    assert report.architecture == "llama"
    assert len(report.head_r) == 2 and all(len(row) == 4 for row in report.head_r)


def test_command_line_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    model = _tiny_gpt2(seed=1)
    model.save_pretrained(tmp_path / "model")
    text = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    out_json, heatmap = tmp_path / "r.json", tmp_path / "r.png"
    argv = [
        "--model", str(tmp_path / "model"), "--local-files-only", "--text", str(tmp_path / "corpus.txt"),
        "--tokenizer", "bytes", "--context", "32", "--max-tokens", "4096", "--batch-size", "8",
        "--out-json", str(out_json), "--heatmap", str(heatmap), "--no-progress",
    ]
    assert cli.main(argv) == 0
    result = json.loads(out_json.read_text())
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ids = rd.encode_bytes(text)[: 4096].view(-1, 32)
    direct = rd.measure_redundancy(model, ids.split(8))
    assert result["train_tokens"] == direct.train_tokens and result["heldout_tokens"] == direct.heldout_tokens
    torch.testing.assert_close(torch.tensor(result["head_r"]), torch.tensor(direct.head_r), rtol=0, atol=1e-6)
    assert math.isclose(result["summary"]["overall_r"], direct.overall, abs_tol=1e-6)


def test_command_line_token_ids_and_short_input(tmp_path):
    numpy = pytest.importorskip("numpy")
    _tiny_gpt2().save_pretrained(tmp_path / "model")
    numpy.save(tmp_path / "ids.npy", _random_windows(1, 32 * 4, vocab=256).numpy())
    base = ["--model", str(tmp_path / "model"), "--local-files-only", "--no-progress"]
    with pytest.raises(SystemExit, match="too little text"):
        cli.main(base + ["--token-ids", str(tmp_path / "ids.npy"), "--context", "32"])
    numpy.save(tmp_path / "bad.npy", numpy.array([1, 2, 999]))
    with pytest.raises(SystemExit, match=r"\[0, 256\)"):
        cli.main(base + ["--token-ids", str(tmp_path / "bad.npy"), "--context", "1"])


def test_training_corpus_split_keeps_files_apart():
    from experiments import train_probe_lm

    files = train_probe_lm.stdlib_sources()
    train, heldout = train_probe_lm.split_by_file(files, heldout_percent=10)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(files)
    assert 0.03 < len(heldout) / len(files) < 0.2
    assert train_probe_lm.split_by_file(files, heldout_percent=10) == (train, heldout)


def test_command_line_uses_the_model_tokenizer(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    text = "".join(f"for item_{i} in range({i}):\n    total += item_{i}\n" for i in range(300))
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(
        [text], tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    )
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    _tiny_gpt2(vocab_size=320).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(text)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out_json = tmp_path / "r.json"
    argv = ["--model", str(tmp_path / "model"), "--text", str(tmp_path / "corpus.txt"), "--context", "16",
            "--max-tokens", "100000", "--out-json", str(out_json), "--no-progress"]
    assert cli.main(argv) == 0
    windows = len(tokenizer(text)["input_ids"]) // 16
    result = json.loads(out_json.read_text())
    assert result["train_tokens"] + result["heldout_tokens"] == windows * 16
