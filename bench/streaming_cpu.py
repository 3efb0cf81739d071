"""CPU benchmark of streaming decoding: tokens/s of `CRAMModel.step` against a dense Transformer
of the same width decoding over its KV cache with SDPA, and against re-running the full forward
for every new token; memory per stream beside each. Writes bench/results/streaming_cpu.md.

    python bench/streaming_cpu.py --checkpoint runs/cram/checkpoint.pt

Each case starts from a state as it stands `context` tokens into a stream, built directly (not
decoded: the Transformer's cache holds `context` random keys and values; CRAM's episodic buffer
holds the written entries of such a prefix, 5% of its tokens up to memory_size), then times
`--steps` decoding steps on SRCD test-stream tokens. One torch thread.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from cram_ext.models import CRAMModel, memory, model_config
from cram_ext.models.router import Path
from cram_ext.srcd import SRCDConfig, batch_at

WRITE_RATE = 0.05  # SRCD's query rate: each query has one write before it


def cram_model(d_model, n_heads, checkpoint, attention_fraction):
    """The trained checkpoint if it has this width; else an untrained CRAM whose routers send
    `attention_fraction` of the tokens of a sample stream to attention (random loss predictors,
    the episodic bias set at that quantile)."""
    if checkpoint:
        state = torch.load(checkpoint, weights_only=False)
        overrides = state["config"]["model_overrides"]
        if overrides.get("d_model") == d_model:
            model = CRAMModel(model_config(state["config"]["model"], **overrides))
            model.load_state_dict(state["model"])
            return model.eval(), "trained"
    torch.manual_seed(0)
    model = CRAMModel(model_config("cram", d_model=d_model, n_heads=n_heads, n_layers=2)).eval()
    batch = sample_tokens(4, 1024, 0)
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            layer.router.predict_loss[-1].weight.normal_(0, 1.0)
            scores = model(batch).layers[index].routing.scores
            margin = scores[..., Path.EPISODIC] - scores[..., [Path.WORKING, Path.SEMANTIC]].amin(-1)
            layer.router.predict_loss[-1].bias[Path.EPISODIC] -= torch.quantile(
                margin.flatten(), attention_fraction).item()
    return model, f"untrained, routers biased to {100 * attention_fraction:.1f}% attention"


def sample_tokens(batch_size, length, offset):
    data = SRCDConfig(seq_len=length)
    return batch_at(data, seed=2_000_003 + offset, step=0, batch_size=batch_size)


def state_at(model, batch_size, context):
    """A streaming state as it stands `context` tokens into a stream."""
    g = torch.Generator().manual_seed(0)
    state = model.init_state(batch_size, capacity=context + 64)
    for layer in state.layers:
        if layer.working is not None:
            layer.working.normal_(0, 0.1, generator=g)
        cache = layer.attention
        if cache is not None:
            cache.keys.normal_(generator=g)
            cache.values.normal_(generator=g)
            held = context if cache.memory_size is None else min(cache.memory_size,
                                                                  round(WRITE_RATE * context))
            cache.lengths.fill_(held)
    state.position = context
    return state


def sdpa_cached_attention(q, k_cache, v_cache, k, v, cache_seqlens, route, key_mask):
    """The dense baseline's decoding attention: append, then SDPA over the filled cache (every
    sequence of the batch has the same length, so the cache is one slice)."""
    length = int(cache_seqlens[0])
    n = q.shape[2]
    k_cache[:, :, length:length + n] = k
    v_cache[:, :, length:length + n] = v
    keys, values = k_cache[:, :, :length + n], v_cache[:, :, :length + n]
    mask = None if n == 1 else torch.ones(n, length + n, dtype=torch.bool).tril(length)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


@torch.no_grad()
def time_steps(model, batch_size, context, steps):
    """tokens/s over `steps` steps (every stream's token counted), the fraction of (token,
    layer) pairs that attended, and the state's bytes per stream."""
    tokens = sample_tokens(batch_size, steps + 129, 1)
    state = state_at(model, batch_size, context)
    model.step({k: v[:, 0] for k, v in tokens.items()}, state)  # warm-up
    attended, layers = 0, 0
    start = time.perf_counter()
    for t in range(1, steps + 1):
        output, state = model.step({k: v[:, 128 + t - 1] for k, v in tokens.items()}, state)
        for record in output.layers:
            if record.attention_rows is not None:
                attended += int(record.attention_rows.sum())
                layers += batch_size
    elapsed = time.perf_counter() - start
    return batch_size * steps / elapsed, attended / max(1, layers), state.nbytes() / batch_size


def per_token_cost(model, batch_size, contexts, steps, repeats=3):
    """CRAM's step tokens/s at each context, fastest of `repeats` rounds that visit the contexts
    in turn (so a change of load on a shared machine hits them alike): flat where the step
    reads no more as the stream grows."""
    best = dict.fromkeys(contexts, 0.0)
    for _ in range(repeats):
        for context in contexts:
            best[context] = max(best[context], time_steps(model, batch_size, context, steps)[0])
    return best


@torch.no_grad()
def full_forward_per_token(model, batch_size, lengths, reps):
    """Seconds of one full forward over L tokens, for each L: re-running the forward for every
    new token costs that per token."""
    seconds = {}
    for length in lengths:
        batch = sample_tokens(batch_size, length, 2)
        model(batch)
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            model(batch)
            best = min(best, time.perf_counter() - start)
        seconds[length] = best
    return seconds


def extrapolate(seconds, length):
    """The least-squares line a + b·L through the measured forward times, at `length`: a lower
    bound, since the routed attention rows of a forward cost more than linearly in L."""
    xs = torch.tensor(list(seconds), dtype=torch.float64)
    ys = torch.tensor(list(seconds.values()), dtype=torch.float64)
    basis = torch.stack([torch.ones_like(xs), xs], 1)
    coef = torch.linalg.lstsq(basis, ys[:, None]).solution[:, 0]
    return float(coef[0] + coef[1] * length)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="", help="a trained CRAM checkpoint (d_model 64)")
    parser.add_argument("--attention-fraction", type=float, default=0.01,
                        help="attention fraction the untrained CRAM's routers are biased to")
    parser.add_argument("--steps", type=int, default=16, help="timed steps of the Transformer")
    parser.add_argument("--cram-steps", type=int, default=128, help="timed steps of CRAM")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every decoding case, in turn; the fastest is reported")
    parser.add_argument("--forward-lengths", default="256,512,1024,2048",
                        help="lengths the full forward is timed at (then extrapolated)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                             "streaming_cpu.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    forward_lengths = [int(x) for x in args.forward_lengths.split(",")]

    lines = []
    for d_model, n_heads in ((64, 2), (256, 4)):
        cram, provenance = cram_model(d_model, n_heads, args.checkpoint, args.attention_fraction)
        torch.manual_seed(0)
        dense = CRAMModel(model_config("transformer", d_model=d_model, n_heads=n_heads,
                                       n_layers=2)).eval()
        lines += [f"### d_model={d_model}, {n_heads} heads, 2 layers; CRAM {provenance}", "",
                  "| batch | context | CRAM step tok/s | CRAM attention | CRAM MiB/stream | "
                  "Transformer SDPA tok/s | Transformer MiB/stream | CRAM speed-up | "
                  "Transformer (routed kvcache kernel) tok/s | full forward per token tok/s "
                  "(extrapolated) | speed-up over re-running |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        notes = []
        for batch_size in (1, 8):
            forward_seconds = full_forward_per_token(cram, batch_size, forward_lengths, reps=2)
            measured = ", ".join(f"L={length}: {1e3 * s:.0f} ms" for length, s in
                                 forward_seconds.items())
            notes.append(f"Full CRAM forward, batch {batch_size} (fastest of 2): {measured}.")
            for context in (8192, 32768):
                cram_tps = kernel_tps = sdpa_tps = 0.0
                for _ in range(args.rounds):  # alternating, so a change of load hits all alike
                    tps, fraction, cram_bytes = time_steps(cram, batch_size, context,
                                                           args.cram_steps)
                    cram_tps = max(cram_tps, tps)
                    tps, _, dense_bytes = time_steps(dense, batch_size, context, args.steps)
                    kernel_tps = max(kernel_tps, tps)
                    original = memory.cached_attention_op
                    memory.cached_attention_op = sdpa_cached_attention
                    try:
                        sdpa_tps = max(sdpa_tps, time_steps(dense, batch_size, context,
                                                            args.steps)[0])
                    finally:
                        memory.cached_attention_op = original
                rerun_tps = batch_size / extrapolate(forward_seconds, context)
                row = (f"| {batch_size} | {context // 1024}K | {cram_tps:.0f} | "
                       f"{100 * fraction:.2f}% | {cram_bytes / 2**20:.2f} | {sdpa_tps:.0f} | "
                       f"{dense_bytes / 2**20:.1f} | {cram_tps / sdpa_tps:.1f}× | "
                       f"{kernel_tps:.0f} | {rerun_tps:.2f} | {cram_tps / rerun_tps:.0f}× |")
                print(row, flush=True)
                lines.append(row)
        lines += ["", *notes, ""]
        contexts = (2048, 8192, 32768)
        lines += [f"Per-token cost against the context, d_model={d_model}: CRAM step tok/s "
                  f"(fastest of {args.rounds} rounds of {args.cram_steps} steps; the buffer holds "
                  "102 / 410 / 512 written entries, full at 32K)", "",
                  "| batch | " + " | ".join(f"{c // 1024}K" for c in contexts) + " |",
                  "| --- |" + " --- |" * len(contexts)]
        for batch_size in (1, 8):
            cost = per_token_cost(cram, batch_size, contexts, args.cram_steps, args.rounds)
            lines.append(f"| {batch_size} | " + " | ".join(f"{cost[c]:.0f}" for c in contexts)
                         + " |")
            print(lines[-1], flush=True)
        lines.append("")

    command = " ".join(["python", *sys.argv]) if argv is None else "python bench/streaming_cpu.py"
    header = [
        "# Streaming decoding on the CPU", "",
        "Command (repository root, extension built by `bash scripts/setup.sh`):", "",
        f"    {command}", "",
        "tokens/s counts every stream's token (batch × steps / time), one torch thread, "
        f"the fastest of {args.rounds} rounds that run every decoding case of a row in turn. "
        "CRAM: `CRAMModel.step` (per layer one `cram_step`: the scan step, the routing decision "
        "and attention for the routed rows over its episodic buffer of written entries, at most "
        "memory_size = 512). Transformer: the "
        "`transformer` configuration of the same width and depth, `step` with its attention "
        "replaced by an append and `F.scaled_dot_product_attention` over the filled KV cache "
        "(SDPA column), and as it ships, through routed_attention_with_kvcache with every row "
        "routed. The states start `context` tokens into a stream, built directly (random "
        "caches of that length, CRAM's buffer holding 5% of the context in written entries, "
        "at most 512), then the timed steps read SRCD test-stream tokens. CRAM attention: the "
        "fraction of (token, layer) pairs that ran attention in the timed steps. MiB/stream: "
        "scan states plus key/value caches (a Transformer cache sized to the context). The "
        "full forward is measured only at short lengths and extrapolated (least-squares "
        "line in L, a lower bound) to the context: re-running it per token costs one forward per "
        "token "
        "(and at 32K the forward would refuse the sequence: it writes more entries than "
        "memory_size). Few steps per case: compare within a row.", ""]
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
