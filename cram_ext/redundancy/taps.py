"""Where a model's attention is: the capture points of the redundancy probe.

Architectures: adapters
-----------------------
An *adapter* is a function ``adapter(model) -> list[AttentionTaps] | None``
returning one :class:`AttentionTaps` per layer, or ``None`` when the model
is not its kind.  Each ``AttentionTaps`` names three :class:`Tap` points
(a module plus whether to capture its first input or its output) and the
number of heads:

``pre_attention``
    the hidden state the attention sublayer reads (GPT-2: ``ln_1`` output);
``attention_output``
    what the sublayer adds to the residual stream (GPT-2: ``attn.c_proj``
    output);
``per_head``
    the concatenated head outputs before the output projection (GPT-2:
    ``attn.c_proj`` input), split into ``n_heads`` equal slices.

Built in: ``gpt2`` (``transformer.h[i].ln_1 / .attn.c_proj``) and
``llama`` (``model.layers[i].input_layernorm / .self_attn.o_proj``, which
also covers Mistral, Qwen2 and other models laid out the same way).  A model
from this package registers its own adapter with::

    from cram_ext.redundancy import AttentionTaps, Tap, register_adapter

    def cram_adapter(model):
        if not isinstance(model, MyModel):
            return None
        return [AttentionTaps(Tap(block.norm1, "output"),
                              Tap(block.attn.out_proj, "output"),
                              Tap(block.attn.out_proj, "input"),
                              block.attn.n_heads)
                for block in model.blocks]

    register_adapter("cram", cram_adapter)

Models that are not Hugging Face models are called as ``model(token_ids)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """A capture point: the first positional input or the output of ``module``."""

    module: nn.Module
    side: Literal["input", "output"]


@dataclass(frozen=True)
class AttentionTaps:
    """Where one layer's probe input and targets are captured (see the module docstring)."""

    pre_attention: Tap
    attention_output: Tap
    per_head: Tap
    n_heads: int


Adapter = Callable[[nn.Module], Optional[list[AttentionTaps]]]
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, adapter: Adapter) -> None:
    """Make ``adapter`` available to :func:`attention_taps` (later names are tried later)."""
    _ADAPTERS[name] = adapter


class UnsupportedArchitectureError(ValueError):
    """No registered adapter recognises the model."""


def attention_taps(model: nn.Module) -> tuple[str, list[AttentionTaps]]:
    """Return (adapter name, per-layer taps) from the first adapter that accepts ``model``."""
    for name, adapter in _ADAPTERS.items():
        taps = adapter(model)
        if taps:
            return name, taps
    raise UnsupportedArchitectureError(
        f"no attention adapter for {type(model).__name__}; known adapters: {', '.join(_ADAPTERS)}. "
        "Register one with cram_ext.redundancy.register_adapter (see cram_ext.redundancy.taps)."
    )


def _gpt2_adapter(model: nn.Module) -> Optional[list[AttentionTaps]]:
    """GPT-2 family: ``transformer.h[i]`` (or ``h[i]`` on the bare GPT2Model)."""
    body = getattr(model, "transformer", model)
    blocks = getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList) or not all(
        hasattr(b, "ln_1") and hasattr(getattr(b, "attn", None), "c_proj") for b in blocks
    ):
        return None
    return [
        AttentionTaps(Tap(b.ln_1, "output"), Tap(b.attn.c_proj, "output"), Tap(b.attn.c_proj, "input"), b.attn.num_heads)
        for b in blocks
    ]


def _llama_adapter(model: nn.Module) -> Optional[list[AttentionTaps]]:
    """Llama/Mistral layout: ``model.layers[i].input_layernorm / .self_attn.o_proj``."""
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    config = getattr(model, "config", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(config, "num_attention_heads"):
        return None
    if not all(hasattr(l, "input_layernorm") and hasattr(getattr(l, "self_attn", None), "o_proj") for l in layers):
        return None
    return [
        AttentionTaps(
            Tap(l.input_layernorm, "output"),
            Tap(l.self_attn.o_proj, "output"),
            Tap(l.self_attn.o_proj, "input"),
            config.num_attention_heads,
        )
        for l in layers
    ]


register_adapter("gpt2", _gpt2_adapter)
register_adapter("llama", _llama_adapter)


class ActivationRecorder:
    """Context manager that keeps the latest tensor seen at each layer's taps.

    After a forward pass, ``recorder.take()[layer]`` is
    ``(pre_attention, attention_output, heads)``.
    """

    def __init__(self, taps: Sequence[AttentionTaps]):
        self.taps = list(taps)
        self._latest: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "ActivationRecorder":
        for layer, taps in enumerate(self.taps):
            for role in ("pre_attention", "attention_output", "per_head"):
                self._handles.append(self._hook(getattr(taps, role), (layer, role)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, tap: Tap, key: tuple[int, str]) -> torch.utils.hooks.RemovableHandle:
        if tap.side not in ("input", "output"):
            raise ValueError(f"Tap.side must be 'input' or 'output', got {tap.side!r}")

        def keep(module, inputs, output):
            value = inputs[0] if tap.side == "input" else output
            self._latest[key] = (value[0] if isinstance(value, (tuple, list)) else value).detach()

        return tap.module.register_forward_hook(keep)

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer ``(pre_attention, attention_output, heads)`` of the last forward pass.

        The tensors are forgotten once taken, so a tap that a later pass
        fails to reach is reported instead of silently reusing old values.
        """
        roles = ("pre_attention", "attention_output", "per_head")
        missing = [(layer, role) for layer in range(len(self.taps)) for role in roles if (layer, role) not in self._latest]
        if missing:
            raise RuntimeError(f"the forward pass did not reach taps {missing}; check the adapter")
        layers = [tuple(self._latest[(layer, role)] for role in roles) for layer in range(len(self.taps))]
        self._latest.clear()
        return layers
