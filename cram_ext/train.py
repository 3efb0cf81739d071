"""Train a CRAM model or a baseline on SRCD.

    python -m cram_ext.train --config cram --size cpu --out runs/cram
    torchrun --nproc_per_node 2 -m cram_ext.train --config cram --size tiny --out runs/ddp

`--config` names the model (see `cram_ext.models.config`), `--size` the run preset (`tiny` for
tests, `cpu` for this project's CPU experiments, `paper` for the paper's setting, a GPU run);
flags override single settings of the preset, of the run (`--steps`, `--lr`, ...) or of the model
(`--d-model`, `--semantic-rank`, ...: `RunConfig.model_overrides`, passed to `model_config`).
Each step appends one JSON line to `<out>/log.jsonl` (losses, training accuracy, attention
fraction, per layer and token kind the fraction that ran attention, mean q and q̂, exploration
rate, learning rate; evaluation metrics every `--eval-every` steps); the progress bar shows the
training accuracy, the attention fraction, per routed layer P(attention | recurring / novel
query) and the task loss (`task_loss`). Checkpoints (`<out>/checkpoint.pt`) are written
atomically and hold everything a bit-exact resume needs: model, optimizer, scheduler, every
rank's RNG states, the pattern-exposure statistics and the step, which is also the data stream's
position (bit-exact on the CPU; on CUDA the kernels' backwards sum some gradients with atomics,
so a GPU run repeats itself only to rounding).
`--device cuda` trains on the GPU (one per process under torchrun, by LOCAL_RANK); data is
generated on the CPU and moved, so a run's stream is the same on either device. Under torchrun
the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .distributed import all_gather, all_reduce_sums, init_distributed, shutdown, world
from .models import MODEL_NAMES, CRAMModel, ModelConfig, model_config
from .models.config import MODELS
from .srcd.exposure import (PatternExposure, concatenate_routing, q_histogram,
                            recurring_query_routing)
from .srcd.generator import SRCDConfig, batch_at, pattern_values
from .srcd.metrics import add_sums, batch_sums, routed_layers, summarize
from .srcd.transfer import TransferConfig, transfer_batch_at

EVAL_SEED_OFFSET = 1_000_003   # evaluation stream: same bindings, sequences never trained on

# The model settings of the CPU experiments, passed to `model_config` (n_layers and ModelConfig
# fields). A preset or a command-line flag overrides any of them.
CPU_MODEL: Dict[str, Any] = dict(
    n_layers=2, d_model=64, n_heads=2, explore_steps=400,
    # Every token attends for 125 steps, so attention has learned to retrieve before the
    # router judges it (after a 100-step warm-up some seeds lost their novel queries), and the
    # router has 275 steps to learn which recurring keys semantic memory answers (after a
    # 200-step warm-up 5.5% of recurring queries still attended at step 400, against 3.3% after
    # 150 steps). The paths are chosen by the routers' 10-step average: observations stay on
    # one memory, not moved with every step of the regression (docs/RESULTS.md, "a router that
    # decides by an average": ten seeds, 2.8% of recurring queries attending at step 400 and the
    # dynamics MSE of every seed within 5% of the best baseline).
    episodic_cost_start=125, episodic_cost_ramp=100, router_average_steps=10,
    # What takes recurring queries off attention by step 400 (docs/RESULTS.md, "Consolidation
    # by step 400"): a semantic memory wide enough to learn the rare patterns' bindings in time
    # (rank 128 at the base lr; the paper's is d_model // 16 = 4 at 0.1×), a router wide enough
    # to learn per key what semantic memory answers (512 hidden units), attention priced at 2
    # nats (at 1, the router's estimates for rare keys, slow to fall, kept them attending), and
    # the attention projections at 3× the base lr, so that novel queries are answered by then.
    semantic_rank=128, semantic_lr_mult=1.0, router_width=512, lambda_episodic=2.0,
    episodic_lr_mult=3.0)


@dataclass(frozen=True)
class RunConfig:
    """A training run: the model and its settings, data, optimisation and bookkeeping."""

    model: str = "cram"
    model_overrides: Dict[str, Any] = field(default_factory=lambda: dict(CPU_MODEL))
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    working: str = "scan"         # working memory of the layers that have one: scan or ctode
    seed: int = 0                 # model initialisation and routing noise
    data_seed: int = 0            # the training stream (bindings come from binding_seed)
    binding_seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    task: str = "srcd"            # "srcd" or a transfer task ("copy", "recall")
    init_from: str = ""           # start from this checkpoint's model weights (transfer)
    freeze_routing: bool = False  # keep semantic memory, router and q̂ predictor fixed
    freeze_encoder: bool = False  # keep the input encoder fixed (layer 0's router reads it)
    threads: int = 1
    device: str = "cpu"           # "cpu" or "cuda"

    def model_config(self) -> ModelConfig:
        config = model_config(self.model, **self.model_overrides)
        if self.working != "scan":
            layers = tuple(dataclasses.replace(spec, working=self.working) if spec.working
                           else spec for spec in config.layers)
            config = dataclasses.replace(config, layers=layers)
        return config

    def data_config(self) -> SRCDConfig:
        return SRCDConfig(seq_len=self.seq_len, binding_seed=self.binding_seed)


RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig)
                     if f.name not in ("model", "model_overrides"))
# What a command-line flag can override: a run setting, or a model setting (CPU_MODEL's and
# every scalar ModelConfig field).
MODEL_SETTINGS = tuple(dict.fromkeys(
    (*CPU_MODEL, *(f.name for f in dataclasses.fields(ModelConfig)
                   if f.name != "name" and isinstance(f.default, (bool, int, float, str))))))
FLAG_SETTINGS = RUN_SETTINGS + MODEL_SETTINGS

# Each preset sets RunConfig fields and model settings (CPU_MODEL's names) by name.
SIZES: Dict[str, dict] = {
    # Seconds on one CPU thread: for tests.
    "tiny": dict(n_layers=2, d_model=32, n_heads=2, seq_len=64, batch_size=4, steps=6,
                 warmup_steps=2, eval_every=3, eval_batches=1, checkpoint_every=3,
                 explore_steps=6, episodic_cost_start=2,
                 episodic_cost_ramp=2),
    # The CPU experiments (the RunConfig defaults): N=128, d=64, 2 layers, 400 steps, with the
    # settings of CPU_MODEL that make consolidation fit in 400 steps.
    "cpu": dict(),
    # The paper's setting (GPU): d=512, 8 layers, N=2048, batch 32, 10K steps, lr 3e-4,
    # semantic rank d/16 = 32 at 0.1× lr; a router of d_model units, λ_E 1, attention at lr.
    "paper": dict(n_layers=8, d_model=512, n_heads=8, seq_len=2048, batch_size=32, steps=10_000,
                  lr=3e-4, warmup_steps=500, explore_steps=5000,
                  episodic_cost_start=1000, episodic_cost_ramp=1000, semantic_rank=None,
                  semantic_lr_mult=0.1, router_width=None, lambda_episodic=1.0,
                  episodic_lr_mult=1.0, eval_every=250, eval_batches=8,
                  checkpoint_every=500),
}


def run_config(model: str, size: str = "cpu", **settings) -> RunConfig:
    """The preset `size` for `model`, with any RunConfig field or model setting overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_NAMES)}")
    settings = {**SIZES[size], **settings}
    run = {name: value for name, value in settings.items() if name in RUN_SETTINGS}
    overrides = {name: value for name, value in settings.items() if name not in RUN_SETTINGS}
    return RunConfig(model=model, model_overrides={**CPU_MODEL, **overrides}, **run)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def training_device(name: str) -> torch.device:
    """The device of this process: the CPU, or under torchrun the GPU of its LOCAL_RANK (among
    the GPUs it sees: a launcher may show each process only its own)."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() "
                         "is False); train with --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def attention_by_kind(record: dict) -> Dict[str, str]:
    """P(attention | recurring query) and P(attention | novel query), per routed layer, for the
    progress bar: `rec`/`nov` followed by one value per layer."""
    layers = routed_layers(record)
    return {kind[:3]: "/".join(f"{record[f'attention/{layer}/{kind}']:.2f}" for layer in layers)
            for kind in ("recurring", "novel") if layers}


def task_loss(record: dict) -> float:
    """The retrieval and dynamics terms of a step's loss: what the progress bar shows. The total
    adds the router's regression and the consolidation loss, which once recurring queries have
    left attention is measured on novel queries only (whose retrievals semantic memory cannot
    predict) and grows with the scale of their attention outputs, from about 2 at 400 steps of
    the cpu preset to 40-75 at 4000 (docs/RESULTS.md): as a progress signal it would read as
    divergence."""
    return record["loss/retrieval"] + record["loss/dynamics"]


def lr_lambda(config: RunConfig):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    """Owns the model, optimizer, data position and logs of one run (one per process)."""

    def __init__(self, config: RunConfig, out_dir: Optional[str], show_progress: bool = True):
        self.config, self.out_dir = config, out_dir
        self.rank, self.world_size = world()
        self.device = training_device(config.device)
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.data = config.data_config()
        self.bindings = pattern_values(self.data)
        self.model = CRAMModel(config.model_config())
        if config.init_from:
            self.model.load_state_dict(torch.load(config.init_from, map_location="cpu",
                                                  weights_only=False)["model"])
        if config.freeze_routing:
            for layer in self.model.layers:
                for part in (layer.semantic, layer.router, layer.q_predictor):
                    if part is not None:
                        part.requires_grad_(False)
        if config.freeze_encoder:
            self.model.encoder.requires_grad_(False)
        self.model.to(self.device)
        torch.manual_seed(config.seed * 1009 + 1 + self.rank)   # routing noise, per rank
        self.ddp = (DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True) if self.world_size > 1 else None)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(config.lr, config.weight_decay), betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.exposure = PatternExposure(
            self.data.n_patterns, sum(spec.has_router for spec in self.model.config.layers))
        self.step = 0
        self.show_progress = show_progress and self.rank == 0
        if out_dir and self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.out_dir, "checkpoint.pt") if self.out_dir else None

    @property
    def log_path(self) -> Optional[str]:
        return os.path.join(self.out_dir, "log.jsonl") if self.out_dir else None

    # -- data -----------------------------------------------------------------------------------
    def batch(self, step: int, seed: int):
        c = self.config
        if c.task == "srcd":
            batch = batch_at(self.data, seed, step, c.batch_size, self.rank, self.world_size,
                             self.bindings)
        else:
            transfer = TransferConfig(task=c.task, source=self.data)
            batch = transfer_batch_at(transfer, seed, step, c.batch_size, self.rank,
                                      self.world_size)
        return {name: t.to(self.device) for name, t in batch.items()}

    # -- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        self.model.train()
        batch = self.batch(self.step, self.config.data_seed)
        forward = self.ddp if self.ddp is not None else self.model
        output = forward(batch, step=self.step)
        losses = self.model.losses(batch, output, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.optimizer.step()
        if not self.config.freeze_routing:   # a frozen router keeps the paths it chose
            self.model.update_router_averages()
        self.scheduler.step()

        patterns, episodic = concatenate_routing(all_gather(recurring_query_routing(batch, output)))
        self.exposure.update(patterns, episodic)
        sums = batch_sums(batch, output, len(self.model.layers))
        values = torch.stack([value.detach() for value in losses.values()]).tolist()  # one read
        sums.update({f"loss/{name}": value for name, value in zip(losses, values)})
        sums = all_reduce_sums(sums)
        metrics = summarize(sums)
        record = {"step": self.step + 1,
                  **{k: v / self.world_size for k, v in sums.items() if k.startswith("loss/")},
                  "accuracy": metrics["accuracy"], "dynamics_mse": metrics["dynamics_mse"],
                  "attention_fraction": metrics["attention_fraction"],
                  "mean_q": metrics["mean_q"], "mean_q_hat": metrics["mean_q_hat"],
                  **{k: v for k, v in metrics.items() if k.startswith("attention/")},
                  "explore_rate": self.model.config.explore_rate(self.step),
                  "lr": self.scheduler.get_last_lr()[0], "q_histogram": q_histogram(output)}
        self.step += 1
        return record

    @torch.no_grad()
    def evaluate(self, n_batches: Optional[int] = None,
                 seed_offset: int = EVAL_SEED_OFFSET) -> dict:
        """Metrics with inference routing (no exploration) on held-out sequences: those of the
        stream `data_seed + seed_offset`, which training never reads."""
        self.model.eval()
        sums: Dict[str, float] = {}
        for i in range(n_batches or self.config.eval_batches):
            batch = self.batch(i, self.config.data_seed + seed_offset)
            add_sums(sums, batch_sums(batch, self.model(batch), len(self.model.layers)))
        return summarize(all_reduce_sums(sums))

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        rng_states = all_gather(torch.get_rng_state())
        # Routing noise on a GPU comes from its own generator.
        cuda_rng_states = (all_gather(torch.cuda.get_rng_state(self.device))
                           if self.device.type == "cuda" else None)
        if self.rank != 0 or not self.checkpoint_path:
            return
        state = {"step": self.step, "config": dataclasses.asdict(self.config),
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng_states,
                 "cuda_rng": cuda_rng_states,
                 "exposure": self.exposure.state_dict(), "world_size": self.world_size}
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self, path: str) -> None:
        # Onto the CPU: load_state_dict moves the weights and optimizer state to the
        # parameters' device, except AdamW's step counters, which on a GPU would cost a sync
        # per tensor and step.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} processes; "
                             f"resume with the same number (got {self.world_size})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][self.rank].cpu())
        if self.device.type == "cuda":
            if not state.get("cuda_rng"):
                raise ValueError(f"{path} was written by a CPU run: resume it with --device cpu")
            torch.cuda.set_rng_state(state["cuda_rng"][self.rank].cpu(), self.device)
        self.exposure.load_state_dict(state["exposure"])
        self.step = state["step"]
        if self.rank == 0 and self.log_path and os.path.exists(self.log_path):
            # Drop what was logged after the checkpoint: those steps are about to be redone.
            with open(self.log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(kept)

    # -- the loop -------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.rank == 0 and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Trains up to `stop_at` (default: the configured number of steps); returns the last
        evaluation."""
        c = self.config
        last_eval = {}
        end = min(c.steps, stop_at if stop_at is not None else c.steps)
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.show_progress,
                   desc=c.model, dynamic_ncols=True)
        while self.step < end:
            record = self.train_step()
            if self.step % c.eval_every == 0 or self.step == c.steps:
                last_eval = self.evaluate()
                record["eval"] = last_eval
            self.log(record)
            if self.checkpoint_path and (self.step % c.checkpoint_every == 0 or self.step == end):
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(acc=f"{record['accuracy']:.3f}",
                            attn=f"{record['attention_fraction']:.3f}",
                            **attention_by_kind(record), task=f"{task_loss(record):.3f}")
        bar.close()
        return last_eval


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    models = "\n".join(f"  {name:<22} {named.description}" for name, named in MODELS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"models (--config):\n{models}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cram", choices=MODEL_NAMES, help="model name")
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES), help="run preset")
    parser.add_argument("--out", default=None, help="run directory (log, checkpoint)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt if it exists")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this step (the schedule still spans --steps)")
    defaults = {**vars(ModelConfig()), **vars(RunConfig()), **CPU_MODEL}
    for name in FLAG_SETTINGS:
        kind = type(defaults[name])
        parser.add_argument("--" + name.replace("_", "-"),
                            type=parse_bool if kind is bool else kind,
                            default=None, help=f"override the preset's {name}")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = {name: getattr(args, name) for name in FLAG_SETTINGS
                if getattr(args, name) is not None}
    config = run_config(args.config, args.size, **settings)
    init_distributed(training_device(config.device))  # a clear error first, without a GPU
    trainer = Trainer(config, args.out)
    if args.resume and trainer.checkpoint_path and os.path.exists(trainer.checkpoint_path):
        trainer.load_checkpoint(trainer.checkpoint_path)
    final = trainer.fit(stop_at=args.stop_at)
    if trainer.rank == 0 and final:
        print(json.dumps({k: final[k] for k in ("accuracy", "dynamics_mse", "oracle_mse",
                                                "attention_fraction")}))
    shutdown()
    return final


if __name__ == "__main__":
    main()
