"""The streaming evaluation command: a checkpoint reads long test streams token by token."""
import dataclasses
import json

import torch

from cram_ext import evaluate, stream_eval, train
from cram_ext.srcd.generator import batch_at
from cram_ext.srcd.metrics import batch_sums, summarize
from cram_ext.train import RunConfig, Trainer


def test_stream_eval_reports_what_forward_gives_on_the_test_stream(tmp_path, capsys):
    train.main(["--config", "cram", "--size", "tiny", "--steps", "2", "--out", str(tmp_path)])
    capsys.readouterr()
    metrics = stream_eval.main([str(tmp_path / "checkpoint.pt"), "--length", "300", "--streams",
                                "2", "--prefill", "40", "--no-progress",
                                "--json", str(tmp_path / "stream.json")])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "attention fraction" in printed
    assert json.loads((tmp_path / "stream.json").read_text())["accuracy"] == metrics["accuracy"]
    assert metrics["tokens_per_s"] > 0 and metrics["state_bytes_per_stream"] > 0

    # The same streams through the full forward (they write fewer entries than memory_size).
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    trainer = Trainer(RunConfig(**state["config"]), None, show_progress=False)
    trainer.model.load_state_dict(state["model"])
    model = trainer.model.eval()
    batch = batch_at(dataclasses.replace(trainer.data, seq_len=300),
                     trainer.config.data_seed + evaluate.TEST_SEED_OFFSET, 0, 2,
                     bindings=trainer.bindings)
    with torch.no_grad():
        full = summarize(batch_sums(batch, model(batch), len(model.layers)))
    for key in ("accuracy", "accuracy_recurring", "accuracy_novel", "attention_fraction",
                "attention/0/novel"):
        assert metrics[key] == full[key], key
    torch.testing.assert_close(metrics["dynamics_mse"], full["dynamics_mse"])

    # A stream longer than one SRCD sequence: consecutive test sequences, the state carried on.
    streams = stream_eval.test_streams(trainer, 500, 2, segment=300)
    assert streams["gap"].shape == (2, 500)
    assert torch.equal(streams["key"][1, :300], batch_at(
        dataclasses.replace(trainer.data, seq_len=300),
        trainer.config.data_seed + evaluate.TEST_SEED_OFFSET, 0, 4,
        bindings=trainer.bindings)["key"][2])
    long = stream_eval.main([str(tmp_path / "checkpoint.pt"), "--length", "500", "--segment",
                             "300", "--no-progress"])
    assert 0 <= long["accuracy"] <= 1
