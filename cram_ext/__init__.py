"""cram_ext: adaptive attention for PyTorch.

`routed_attention` runs softmax attention only for the query rows a router selected (a drop-in
for `scaled_dot_product_attention`); `selective_scan` is Mamba's selective scan with per-token
time gaps. Both have CPU and CUDA kernels and autograd; `cram_ext.reference` holds their
pure-PyTorch definitions. `cram_forward` is one CRAM layer's paths fused into one op (scan,
routing decision, attention for the routed rows only, semantic adapter, mix), and
`cram_step` its one-token decoding step against a scan state and a key/value cache.
"""
from . import reference
from .ops import routed_attention, selective_scan
from .ops import routed_attention_with_kvcache, selective_state_update
from .ops import CramForwardOutput, CramStepOutput, cram_forward, cram_step

__all__ = ["routed_attention", "selective_scan", "reference", "cram_forward", "CramForwardOutput",
           "routed_attention_with_kvcache", "selective_state_update", "cram_step",
           "CramStepOutput"]
__version__ = "0.1.0"
