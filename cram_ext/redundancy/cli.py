"""Attention redundancy R of a Hugging Face causal LM, from the command line::

    python -m cram_ext.redundancy --model gpt2 --local-files-only \\
        --text corpus.txt --out-json r.json --heatmap r.png

(also installed as ``cram-redundancy``; ``--help`` lists all options).
``--local-files-only`` (or ``HF_HUB_OFFLINE=1``) loads only from the local
Hugging Face cache or a local directory.  Loading models needs the
``analysis`` extra: ``pip install "cram_ext[analysis]"``.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .measure import (batched, encode_bytes, load_token_ids, measure_redundancy,
                      read_text_token_chunks, save_heatmap, token_windows, write_json)
from .taps import UnsupportedArchitectureError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cram_ext.redundancy",
        description="Measure attention redundancy R (held-out linear-probe fit of attention outputs) of a causal LM.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model name or local directory")
    parser.add_argument("--local-files-only", action="store_true", help="never download (also implied by HF_HUB_OFFLINE=1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="UTF-8 text file to stream through the model")
    source.add_argument("--token-ids", help=".npy or .pt file of token ids")
    parser.add_argument("--tokenizer", help="tokenizer name/path for --text (default: the model's), or 'bytes' for UTF-8 byte ids")
    parser.add_argument("--context", type=int, help="window length in tokens (default: model context, at most 1024)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, default=262_144, help="stop after this many tokens")
    parser.add_argument("--holdout-every", type=int, default=5, help="hold out every k-th window for scoring")
    parser.add_argument("--ridge", type=float, default=1e-6, help="ridge penalty relative to mean(diag XᵀX)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype (statistics are always float64)")
    parser.add_argument("--out-json", help="write the report as JSON here")
    parser.add_argument("--heatmap", help="save a layer × head heatmap PNG here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.context is not None and args.context < 1:
        parser.error("--context must be positive")
    return args


def _offline(args: argparse.Namespace) -> bool:
    return args.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _require_transformers():
    try:
        import transformers
    except ImportError as error:
        raise SystemExit('loading Hugging Face models needs transformers: pip install "cram_ext[analysis]"') from error
    return transformers


def load_model(name: str, *, local_files_only: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """Load a causal LM by name or path, in eval mode on ``device``."""
    transformers = _require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=local_files_only, dtype=dtype)
    return model.to(device).eval()


def _text_encoder(args: argparse.Namespace, offline: bool) -> Callable[[str], torch.Tensor]:
    if args.tokenizer == "bytes":
        return encode_bytes
    transformers = _require_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=offline)

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    return encode


def _default_context(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, 1024)
    raise SystemExit("the model's context length is unknown; pass --context")


def _checked_against_vocab(chunks: Iterable[torch.Tensor], vocab_size: int) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        if chunk.numel() and (chunk.min() < 0 or chunk.max() >= vocab_size):
            raise SystemExit(f"token ids must lie in [0, {vocab_size}) for this model; found {chunk.min()}..{chunk.max()}")
        yield chunk


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m cram_ext.redundancy`` / ``cram-redundancy``."""
    args = _parse_args(argv)
    offline = _offline(args)
    model = load_model(args.model, local_files_only=offline, device=args.device, dtype=_DTYPES[args.dtype])
    context = args.context or _default_context(model)
    if args.text is not None:
        chunks = read_text_token_chunks(args.text, _text_encoder(args, offline))
    else:
        chunks = iter([load_token_ids(args.token_ids)])
    chunks = _checked_against_vocab(chunks, model.get_input_embeddings().num_embeddings)
    max_windows = max(1, args.max_tokens // context)
    batches = batched(token_windows(chunks, context, max_windows), args.batch_size)
    try:
        report = measure_redundancy(
            model,
            batches,
            ridge=args.ridge,
            holdout_every=args.holdout_every,
            model_name=args.model,
            progress_total=max_windows * context,
            progress=not args.no_progress,
        )
    except (ValueError, UnsupportedArchitectureError) as error:
        raise SystemExit(f"error: {error}") from error
    report.extra["source"] = args.text or args.token_ids
    print(report.format_table())
    if args.out_json:
        write_json(report.to_dict(), args.out_json)
    if args.heatmap:
        save_heatmap(report, args.heatmap)
    return 0
