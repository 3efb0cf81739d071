"""Attention redundancy: how much of attention a linear probe can predict.

For every layer and token the CRAM paper fits a linear probe ``â = W·h + b``
from the hidden state ``h`` that the attention sublayer reads (after its
pre-norm) to the sublayer's output ``a``, and reports, on held-out tokens::

    R = 1 − Σ‖a − â‖² / Σ‖a‖²

R near 1 means most of what attention writes into the residual stream is a
fixed linear function of the current token's own state, i.e. it did not
need to look at other tokens.  This package measures R for a whole layer
(the output after the output projection) and for every head (that head's
slice of the input to the output projection).

How it is measured
------------------
* Activations are captured with forward hooks while token windows stream
  through the model (eval mode, no grad).
* The probe is ridge regression solved in closed form.  Only second
  moments are kept, in float64: ``XᵀX``, ``XᵀY`` and the per-column
  ``Σ y²`` (``X`` carries a bias column), so memory does not grow with the
  number of tokens.  One solve per layer serves the layer and all of its
  heads at once, because a least-squares fit separates by output column.
* Windows are split into probe-fitting and held-out sets (every k-th
  window is held out).  The held-out error is streamed too:
  ``Σ‖y − Wᵀx‖² = Σ‖y‖² − 2·tr(Wᵀ XᵀY) + tr(Wᵀ XᵀX W)`` needs only the
  held-out set's second moments.
* The ridge penalty is ``ridge × mean(diag XᵀX)`` on the weights (not on the
  bias).  It must be positive for LayerNorm models: LayerNorm outputs lie
  on a hyperplane, so ``XᵀX`` with a bias column is exactly singular.
* Besides the paper's R, the report carries ``R_centered``, whose
  denominator is the held-out variance ``Σ‖a − ā‖²``.  The bias column
  alone already earns ``Σ‖ā‖²`` of the paper's R, so ``R_centered`` tells
  how much of R comes from the token-dependent part of the probe.

Modules
-------
``probe``
    the probe's algebra: streamed second moments, the ridge fit, held-out R;
``taps``
    where a model's attention is: per-architecture adapters and the forward
    hooks that capture activations;
``measure``
    ``measure_redundancy`` (stream token windows through a model) and its
    ``RedundancyReport``, token sources, the heatmap and JSON output;
``cli``
    ``python -m cram_ext.redundancy`` / ``cram-redundancy`` for Hugging Face
    causal LMs;
``cram_models``
    the same measurement for this package's SRCD models
    (``python -m cram_ext.redundancy.cram_models``).

Everything here needs only PyTorch to import; loading Hugging Face models needs
the ``analysis`` extra (``pip install "cram_ext[analysis]"``), drawing a heatmap
matplotlib (the ``plot`` extra, included in ``analysis``).
"""
from .measure import (RedundancyReport, batched, encode_bytes, load_token_ids, measure_redundancy,
                      model_device, read_text_token_chunks, save_heatmap, token_windows,
                      write_json)
from .probe import (LayerScores, ProbeSplits, ProbeStatistics, centered_energy,
                    explained_fraction, fit_ridge, residual_energy, score_layer)
from .taps import (ActivationRecorder, AttentionTaps, Tap, UnsupportedArchitectureError,
                   attention_taps, register_adapter)

__all__ = ["RedundancyReport", "batched", "encode_bytes", "load_token_ids", "measure_redundancy",
           "model_device", "read_text_token_chunks", "save_heatmap", "token_windows", "write_json",
           "LayerScores", "ProbeSplits", "ProbeStatistics", "centered_energy",
           "explained_fraction", "fit_ridge", "residual_energy", "score_layer",
           "ActivationRecorder", "AttentionTaps", "Tap", "UnsupportedArchitectureError",
           "attention_taps", "register_adapter"]
