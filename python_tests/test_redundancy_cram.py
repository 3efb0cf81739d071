"""Attention redundancy of CRAMModel: the adapter's hooks capture the episodic attention path,
sequence-index feeding reaches the right SRCD sequences, and the checkpoint command runs."""
import json

import pytest
import torch
import torch.nn.functional as F

from cram_ext import redundancy as rd
from cram_ext.redundancy import cram_models as cm
from cram_ext.models import CRAMModel, model_config
from cram_ext.srcd import SRCDConfig, batch_at
from cram_ext.train import Trainer, run_config

torch.set_num_threads(1)
DATA = SRCDConfig(seq_len=64)


def tiny(name, **overrides):
    torch.manual_seed(0)
    return CRAMModel(model_config(name, d_model=32, n_heads=2, **overrides)).eval()


def manual_episodic(episodic, x):
    """Causal multi-head attention written out: qkv → softmax(qkᵀ/√d_head) v → out_proj.
    Returns (concatenated head outputs, out_proj output)."""
    batch, length, d_model = x.shape
    q, k, v = (t.view(batch, length, episodic.n_heads, -1).transpose(1, 2)
               for t in (x @ episodic.qkv.weight.T).chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    heads = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
    heads = heads.transpose(1, 2).reshape(batch, length, d_model)
    return heads, heads @ episodic.out_proj.weight.T


@pytest.mark.parametrize("name, measured", [("transformer", [0, 1]), ("jamba", [1])])
def test_hooks_capture_the_episodic_attention_path(name, measured):
    model = tiny(name)
    feeder = cm.SRCDSequenceFeeder(model, DATA, seed=7)
    architecture, taps = rd.attention_taps(feeder)
    assert architecture == "cram" and len(taps) == len(measured)
    assert cm.attention_layers(model) == measured

    indices = next(cm.sequence_index_batches(3, DATA.seq_len, batch_size=3, first=10))
    with torch.no_grad(), rd.ActivationRecorder(taps) as recorder:
        feeder(indices)
        captured = recorder.take()

    # Recompute every layer's input from the SRCD batch the indices name, then the attention.
    batch = batch_at(DATA, seed=7, step=0, batch_size=13)     # sequences 0..12 of stream 7
    batch = {k: v[10:13] for k, v in batch.items()}
    with torch.no_grad():
        x = model.encoder(batch)
        inputs = []
        for layer in model.layers:
            inputs.append(x)
            x, _ = layer(x, batch["gap"], model.key_mask(batch), model.routing_prices())
        for (pre, out, heads), i in zip(captured, measured):
            manual_heads, manual_out = manual_episodic(model.layers[i].episodic, inputs[i])
            torch.testing.assert_close(pre, inputs[i])
            torch.testing.assert_close(heads, manual_heads, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out, manual_out, rtol=1e-4, atol=1e-5)


def test_models_without_dense_attention_are_refused_with_a_reason():
    for name in ("mamba", "cram"):
        with pytest.raises(rd.UnsupportedArchitectureError, match="no dense attention layer"):
            rd.attention_taps(tiny(name))
    assert cm.cram_adapter(torch.nn.Linear(2, 2)) is None


def test_index_rows_must_name_one_sequence():
    feeder = cm.SRCDSequenceFeeder(tiny("transformer"), DATA, seed=0)
    rows = torch.arange(DATA.seq_len)[None]
    with pytest.raises(ValueError, match="repeat one sequence index"):
        feeder.batch(rows)
    with pytest.raises(ValueError, match="sequence indices"):
        feeder.batch(torch.zeros(1, DATA.seq_len + 1, dtype=torch.long))


def test_token_subsets_partition_the_tokens_and_all_matches_the_report():
    model = tiny("transformer")
    feeder = cm.SRCDSequenceFeeder(model, DATA, seed=3)
    batches = lambda: cm.sequence_index_batches(30, DATA.seq_len, batch_size=8)
    report = rd.measure_redundancy(feeder, batches())
    subsets = cm.measure_token_subsets(feeder, batches())
    assert subsets["all"]["layer_r"] == pytest.approx(report.layer_r, abs=1e-9)
    assert subsets["all"]["heldout_tokens"] == [report.heldout_tokens] * 2
    parts = [subsets[name]["heldout_tokens"][0] for name in ("observation", "key_write", "query")]
    assert sum(parts) == report.heldout_tokens
    # Held-out sequences are 4, 9, ..., 29 of stream 3: count their queries directly.
    heldout = batch_at(DATA, seed=3, step=0, batch_size=30)["token_type"][4::5]
    assert parts[2] == int((heldout == 2).sum())


def test_routed_layers_keep_only_the_rows_that_ran_attention():
    model = tiny("cram")
    torch.manual_seed(0)
    with torch.no_grad():   # random loss predictions: the routers attend some rows, not all
        for layer in model.layers:
            torch.nn.init.normal_(layer.router.predict_loss[-1].weight, std=2.0)
    feeder = cm.SRCDSequenceFeeder(model, DATA, seed=0)
    subsets = cm.measure_token_subsets(feeder, cm.sequence_index_batches(10, DATA.seq_len, 10))
    with torch.no_grad():
        output = model(feeder.batch(next(cm.sequence_index_batches(10, DATA.seq_len, 10))))
    ran = [int(r.attention_rows.sum()) for r in output.layers]
    counted = [a + b for a, b in zip(subsets["all"]["train_tokens"], subsets["all"]["heldout_tokens"])]
    assert counted == ran and 0 < sum(ran) < 2 * 10 * DATA.seq_len


def _tiny_checkpoint(tmp_path, model):
    trainer = Trainer(run_config(model, "tiny"), str(tmp_path / model), show_progress=False)
    trainer.fit(stop_at=1)          # one step, then a checkpoint at the stop
    return tmp_path / model / "checkpoint.pt"


def test_command_line_end_to_end(tmp_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path, "transformer")
    out_json, heatmap = tmp_path / "r.json", tmp_path / "r.png"
    assert cm.main(["--checkpoint", str(checkpoint), "--sequences", "25", "--batch-size", "4",
                    "--no-progress", "--token-subsets", "--out-json", str(out_json),
                    "--heatmap", str(heatmap)]) == 0
    assert "overall" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every 5th of the 25 sequences (64 tokens each) is held out.
    assert (report["train_tokens"], report["heldout_tokens"]) == (20 * 64, 5 * 64)
    assert len(report["layer_r"]) == 2 and all(len(h) == 2 for h in report["head_r"])
    assert all(r <= 1 for r in report["layer_r"])
    assert report["extra"]["data_seed"] == cm.HELDOUT_SEED_OFFSET
    assert report["token_subsets"]["all"]["layer_r"] == pytest.approx(report["layer_r"], abs=1e-9)

    # The command's numbers are the library's on the same held-out stream.
    model, config = cm.load_checkpoint(checkpoint)
    direct = rd.measure_redundancy(
        cm.SRCDSequenceFeeder(model, config.data_config(), cm.HELDOUT_SEED_OFFSET),
        cm.sequence_index_batches(25, config.seq_len, batch_size=25))
    assert report["layer_r"] == pytest.approx(direct.layer_r, abs=1e-9)
    flat = [r for layer in report["head_r_centered"] for r in layer]
    assert flat == pytest.approx([r for layer in direct.head_r_centered for r in layer], abs=1e-9)


def test_command_line_explains_a_model_without_attention(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path, "mamba")
    with pytest.raises(SystemExit, match="no dense attention layer"):
        cm.main(["--checkpoint", str(checkpoint), "--sequences", "10", "--no-progress"])
    with pytest.raises(SystemExit, match="no episodic attention layer"):
        cm.main(["--checkpoint", str(checkpoint), "--sequences", "10", "--token-subsets"])
    with pytest.raises(SystemExit, match="training or evaluation stream"):
        cm.main(["--checkpoint", str(checkpoint), "--sequences", "10", "--data-seed", "0"])
