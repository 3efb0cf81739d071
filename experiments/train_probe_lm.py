"""Track attention redundancy R while a small language model trains.

The CRAM paper reports that R rises (0.52 → 0.72) while a GPT-2 124M model
trains from scratch, i.e. attention becomes *more* predictable from the
current token's state, not less.  This script tests that claim on a budget
that fits a laptop CPU:

* corpus: the ``.py`` sources of the running Python's standard library
  (no download), split **by file** into training files and held-out files;
* tokeniser: raw UTF-8 bytes (vocabulary 256);
* model: a small GPT-2 (``transformers.GPT2LMHeadModel``) trained from
  scratch with AdamW;
* at each checkpoint step the model is saved, its held-out loss is
  recorded, and R is measured with
  :func:`cram_ext.redundancy.measure_redundancy` on held-out
  files only (the probe itself is fitted and scored on disjoint windows of
  that held-out text).

Outputs: a JSON file with every checkpoint's report, a plot of R against
step, a heatmap of the final checkpoint, and, under ``--run-dir``, the saved
checkpoints plus ``heldout.txt`` so that the command-line tool can
re-measure any checkpoint::

    python -m experiments.train_probe_lm --run-dir runs/redundancy_probe_lm --threads 1 \\
        --out-json docs/results/redundancy_probe_lm_training.json \\
        --plot docs/figures/redundancy_probe_lm_training.png \\
        --heatmap docs/figures/redundancy_probe_lm_heatmap.png
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from cram_ext.plotting import pyplot
from cram_ext.redundancy import RedundancyReport, batched, measure_redundancy, save_heatmap, token_windows, write_json


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files (third-party site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def split_by_file(files: Sequence[Path], heldout_percent: int) -> tuple[list[Path], list[Path]]:
    """Assign each file to training or held-out by a hash of its name.

    A hash of the path (rather than a random draw) keeps the split identical
    across runs and machines with the same Python version.
    """
    train, heldout = [], []
    for path in files:
        bucket = zlib.crc32(str(path.relative_to(path.anchor)).encode()) % 100
        (heldout if bucket < heldout_percent else train).append(path)
    return train, heldout


def read_utf8_corpus(files: Sequence[Path]) -> bytes:
    """Concatenate the files that are valid UTF-8, one newline between files."""
    parts = []
    for path in files:
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    return b"".join(parts)


def as_ids(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def build_model(args: argparse.Namespace):
    """A byte-level GPT-2 with the requested shape and no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256,
        n_positions=args.context,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def random_windows(ids: torch.Tensor, context: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random slices of ``context`` consecutive ids."""
    starts = torch.randint(0, ids.numel() - context + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + context] for s in starts.tolist()])


def next_byte_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats); Hugging Face LMs shift the labels themselves."""
    return model(input_ids=windows, labels=windows).loss


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_bits_per_byte(model, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy in bits on fixed held-out windows."""
    model.eval()
    losses = [next_byte_loss(model, w).item() for w in windows.split(16)]
    return sum(losses) / len(losses) / math.log(2)


def measure_checkpoint(model, probe_ids: torch.Tensor, args: argparse.Namespace, step: int) -> RedundancyReport:
    """R of ``model`` on the first ``--probe-tokens`` held-out bytes."""
    windows = token_windows([probe_ids], args.context, args.probe_tokens // args.context)
    report = measure_redundancy(
        model,
        batched(windows, 16),
        ridge=args.ridge,
        holdout_every=args.holdout_every,
        model_name=f"byte-gpt2 step {step}",
    )
    return report


def plot_r_vs_step(records: list[dict], path: str) -> None:
    """R (overall and by thirds) and held-out loss against training step."""
    plt = pyplot()
    steps = [r["step"] for r in records]
    summaries = [r["redundancy"]["summary"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [s["overall_r"] for s in summaries], "k-o", label="R overall (paper's definition)")
    for third, color in (("early", "tab:blue"), ("middle", "tab:green"), ("late", "tab:red")):
        ax.plot(steps, [s["thirds_r"][third] for s in summaries], "-", color=color, alpha=0.8, label=f"R {third} layers")
    ax.plot(steps, [s["overall_r_centered"] for s in summaries], "k--", alpha=0.6, label="R centered (variance denominator)")
    ax.set_xscale("symlog", linthresh=min((s for s in steps if s > 0), default=1))
    ax.set_xlabel("training step (log scale above the first checkpoint)")
    ax.set_ylabel("held-out R")
    ax.set_ylim(min(0.0, *(s["overall_r_centered"] for s in summaries)) - 0.02, 1.0)
    loss_axis = ax.twinx()
    loss_axis.plot(steps, [r["heldout_bits_per_byte"] for r in records], ":", color="gray", marker="x", label="held-out bits/byte")
    loss_axis.set_ylabel("held-out bits per byte", color="gray")
    handles = ax.get_legend_handles_labels()
    extra = loss_axis.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower right")
    ax.set_title("Attention redundancy while training a byte-level GPT-2 on Python stdlib sources", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_probe_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/redundancy_probe_lm", help="checkpoints and held-out text go here")
    parser.add_argument("--out-json", required=True)
    parser.add_argument("--plot", help="PNG of R against step")
    parser.add_argument("--heatmap", help="PNG heatmap of the last checkpoint's per-head R")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--checkpoints", default="0,25,50,125,250,500,1000,1500,2000", help="comma-separated steps; the last is the training length")
    parser.add_argument("--heldout-percent", type=int, default=10, help="share of files held out from training")
    parser.add_argument("--probe-tokens", type=int, default=131_072, help="held-out bytes used for the probe")
    parser.add_argument("--holdout-every", type=int, default=5)
    parser.add_argument("--ridge", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m experiments.train_probe_lm", *(sys.argv[1:] if argv is None else argv)])
    args.checkpoint_steps = sorted({int(s) for s in args.checkpoints.split(",")})
    if args.checkpoint_steps[0] < 0:
        parser.error("checkpoint steps must be non-negative")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_files, heldout_files = split_by_file(stdlib_sources(), args.heldout_percent)
    train_ids = as_ids(read_utf8_corpus(train_files))
    heldout_bytes = read_utf8_corpus(heldout_files)
    (run_dir / "heldout.txt").write_bytes(heldout_bytes)
    heldout_ids = as_ids(heldout_bytes)
    needed = args.probe_tokens + 64 * args.context
    if heldout_ids.numel() < needed:
        raise SystemExit(f"held-out text has {heldout_ids.numel()} bytes; need {needed}: raise --heldout-percent or lower --probe-tokens")
    probe_ids = heldout_ids[: args.probe_tokens]
    loss_ids = heldout_ids[args.probe_tokens :]
    loss_windows = random_windows(loss_ids, args.context, 64, torch.Generator().manual_seed(args.seed + 1))
    print(f"corpus: {len(train_files)} training files ({train_ids.numel()} bytes), "
          f"{len(heldout_files)} held-out files ({heldout_ids.numel()} bytes)", flush=True)

    model = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total_steps = args.checkpoint_steps[-1]
    records, recent_losses, started = [], [], time.time()
    for step in range(total_steps + 1):
        if step in args.checkpoint_steps:
            record, report = _checkpoint(model, step, recent_losses, probe_ids, loss_windows, args, run_dir, started)
            records.append(record)
            write_json(_results(args, train_files, heldout_files, train_ids, heldout_ids, records), args.out_json)
            recent_losses = []
        if step == total_steps:
            break
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args.warmup, args.lr)
        batch = random_windows(train_ids, args.context, args.batch_size, generator)
        loss = next_byte_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses.append(loss.item())

    if args.plot:
        plot_r_vs_step(records, args.plot)
    if args.heatmap:
        save_heatmap(report, args.heatmap, title=f"byte-level GPT-2, step {records[-1]['step']}: held-out R per head")
    return 0


def _checkpoint(model, step, recent_losses, probe_ids, loss_windows, args, run_dir, started) -> tuple[dict, RedundancyReport]:
    """Save the model, measure loss and R, print a summary line; return the JSON record and the report."""
    model.save_pretrained(run_dir / f"step_{step:05d}")
    bits = heldout_bits_per_byte(model, loss_windows)
    report = measure_checkpoint(model, probe_ids, args, step)
    train_bits = sum(recent_losses) / len(recent_losses) / math.log(2) if recent_losses else None
    thirds = report.thirds()
    print(
        f"step {step:5d}  {time.time() - started:7.0f}s  held-out {bits:.3f} bits/byte  R {report.overall:.3f} "
        f"(early {thirds['early']:.3f} middle {thirds['middle']:.3f} late {thirds['late']:.3f})  "
        f"R_centered {report.overall_centered:.3f}",
        flush=True,
    )
    record = {
        "step": step,
        "seconds": time.time() - started,
        "train_bits_per_byte": train_bits,
        "heldout_bits_per_byte": bits,
        "redundancy": report.to_dict(),
    }
    return record, report


def _results(args, train_files, heldout_files, train_ids, heldout_ids, records) -> dict:
    settings = {k: v for k, v in vars(args).items() if k not in ("checkpoint_steps", "command")}
    return {
        "command": args.command,
        "settings": settings,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "corpus": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "train_files": len(train_files),
            "heldout_files": len(heldout_files),
            "train_bytes": train_ids.numel(),
            "heldout_bytes": heldout_ids.numel(),
        },
        "checkpoints": records,
    }


if __name__ == "__main__":
    sys.exit(main())
