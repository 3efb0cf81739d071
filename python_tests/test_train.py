"""Training loop: per-step log, atomic checkpoints, bit-exact resume, DDP with 2 gloo processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cram_ext import train
from cram_ext.train import run_config

TINY = ["--size", "tiny", "--steps", "6"]
LOGGED = {"step", "loss/total", "loss/retrieval", "loss/dynamics", "loss/routing",
          "loss/consolidation", "loss/q_regression", "accuracy", "dynamics_mse",
          "attention_fraction", "attention/0/recurring", "attention/1/novel",
          "attention/1/other", "mean_q", "mean_q_hat", "explore_rate", "lr", "q_histogram"}


def read_log(directory):
    with open(os.path.join(directory, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_run_logs_every_step_and_checkpoints_atomically(tmp_path):
    final = train.main(["--config", "cram", *TINY, "--out", str(tmp_path)])
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(LOGGED <= set(r) for r in log)
    assert "eval" in log[2] and "eval" in log[5] and "eval" not in log[0]
    assert json.dumps(log[-1]["eval"], sort_keys=True) == json.dumps(final, sort_keys=True)  # NaN too
    assert log[0]["explore_rate"] == pytest.approx(0.1) and log[-1]["explore_rate"] < 0.1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "log.jsonl"]   # no .tmp left over
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 6 and checkpoint["config"]["model"] == "cram"


def test_a_step_reads_few_values_back_from_its_tensors(monkeypatch):
    """Each read of a tensor's value waits for a GPU: a training step's metrics come back in one
    copy each (sums, losses, routing, q histogram), not one per entry (about 70 before)."""
    trainer = train.Trainer(run_config("cram", "tiny"), None, show_progress=False)
    trainer.train_step()
    package = os.path.dirname(train.__file__) + os.sep
    reads = []
    for name in ("__float__", "__bool__", "__int__", "item", "tolist", "numpy"):
        def read(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):   # the package's reads, not torch's own
                reads.append((_name, caller))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    trainer.train_step()
    # The model reads 4 (key_mask's check in each of the two forwards, two branches of
    # `losses`): the lower bound shows the hook sees reads at all.
    assert 4 <= len(reads) <= 8, reads


@pytest.mark.parametrize("model, flags", [("cram", []), ("seqboat", []),
                                          ("cram", ["--router-average-steps", "3"])])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, model, flags):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(["--config", model, *TINY, *flags, "--out", str(straight)])
    train.main(["--config", model, *TINY, *flags, "--out", str(split), "--stop-at", "4"])
    # a crash after step 4's checkpoint loses the log lines written after it; resume redoes them
    with open(split / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "stale": True}) + "\n")
    train.main(["--config", model, *TINY, *flags, "--out", str(split), "--resume"])
    assert read_log(split) == read_log(straight)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    np.testing.assert_array_equal(a["exposure"]["total"], b["exposure"]["total"])
    if flags:   # training moved the routers' averages, a step behind the predictors
        for name, tensor in a["model"].items():
            if "predict_loss_average" in name:
                live = a["model"][name.replace("predict_loss_average", "predict_loss")]
                assert not torch.equal(tensor, live), name
        assert any("predict_loss_average.2.bias" in name for name in a["model"])


@pytest.mark.parametrize("flags", [[], ["--router-average-steps", "3"]])
def test_transfer_starts_from_a_checkpoint_and_keeps_the_frozen_parts(tmp_path, flags):
    train.main(["--config", "cram", *TINY, *flags, "--out", str(tmp_path / "source")])
    source = torch.load(tmp_path / "source" / "checkpoint.pt", weights_only=False)["model"]
    train.main(["--config", "cram", *TINY, *flags, "--task", "recurring_recall", "--seed", "1",
                "--init-from", str(tmp_path / "source" / "checkpoint.pt"),
                "--freeze-routing", "true", "--freeze-encoder", "true", "--out", str(tmp_path / "to")])
    moved = torch.load(tmp_path / "to" / "checkpoint.pt", weights_only=False)["model"]
    frozen = [name for name in moved if name.startswith("encoder.")
              or any(part in name for part in (".semantic.", ".router.", ".q_predictor."))]
    assert {name.split(".")[0] for name in frozen} == {"encoder", "layers"}
    assert all(torch.equal(moved[name], source[name]) for name in frozen)
    for trained in ("working.in_proj.weight", "episodic.qkv.weight", "ffn.0.weight"):
        assert not torch.equal(moved[f"layers.0.{trained}"], source[f"layers.0.{trained}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="device cuda: torch sees no CUDA GPU"):
        train.main(["--config", "cram", *TINY, "--device", "cuda", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        train.main(["--config", "cram", *TINY, "--device", "tpu", "--out", str(tmp_path)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["cram", "transformer"])
def test_training_on_cuda_resumes_and_evaluates_on_the_cpu(tmp_path, model):
    """A run on the GPU (the kernels' CUDA paths in training: exploration, probes, the router's
    regression), resumed there from its checkpoint, whose model then evaluates on the CPU."""
    from cram_ext.evaluate import load_checkpoint
    cuda = ["--config", model, *TINY, "--device", "cuda", "--out", str(tmp_path)]
    train.main([*cuda, "--stop-at", "3"])
    final = train.main([*cuda, "--resume"])
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss/total"]) for r in log)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["model"]["encoder.type_embedding.weight"].is_cuda
    assert len(checkpoint["cuda_rng"]) == 1
    straight = tmp_path / "straight"
    train.main(["--config", model, *TINY, "--device", "cuda", "--out", str(straight)])
    # Resumed as if never stopped (the GPU's atomics add in any order, nothing more).
    assert [r["loss/total"] for r in log] == pytest.approx(
        [r["loss/total"] for r in read_log(straight)], rel=1e-3)
    trainer, _ = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    on_cpu = trainer.evaluate()
    # The same held-out batches: the CPU and CUDA kernels round differently, nothing more.
    assert on_cpu["accuracy"] == pytest.approx(final["accuracy"], abs=0.05)
    assert on_cpu["dynamics_mse"] == pytest.approx(final["dynamics_mse"], rel=0.05)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown size"):
        run_config("cram", size="huge")
    with pytest.raises(ValueError, match="unknown model"):
        run_config("gpt")


def test_torchrun_trains_with_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", "-m", "cram_ext.train", "--config", "cram",
               "--size", "tiny", "--steps", "4", "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    # the two ranks drew different routing noise: their RNG states differ
    assert not torch.equal(checkpoint["rng"][0], checkpoint["rng"][1])
    # both ranks' recurring queries count in the exposure statistics
    config = run_config("cram", "tiny")
    queries = round(0.05 * config.seq_len)
    assert checkpoint["exposure"]["seen"].sum() == 4 * 2 * config.batch_size * round(0.7 * queries)


def test_the_ctode_working_memory_is_a_run_option():
    config = run_config("cram", "tiny", working="ctode").model_config()
    assert {spec.working for spec in config.layers} == {"ctode"}
    jamba = run_config("jamba", "tiny", n_layers=8, working="ctode").model_config()
    assert [spec.working for spec in jamba.layers].count(None) == 1   # the attention layer
    with pytest.raises(ValueError, match="working memory"):
        run_config("cram", "tiny", working="lstm").model_config()


def test_flags_override_any_scalar_model_setting():
    args = train.parse_args(["--lambda-episodic", "0.5", "--use-q-reward", "false", "--d-model",
                             "32"])
    settings = {name: getattr(args, name) for name in train.FLAG_SETTINGS
                if getattr(args, name) is not None}
    config = run_config("cram", "cpu", **settings).model_config()
    assert (config.lambda_episodic, config.use_q_reward, config.d_model) == (0.5, False, 32)
    assert config.episodic_cost_start == train.CPU_MODEL["episodic_cost_start"]
