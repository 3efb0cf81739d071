"""Analysis tools for transformer language models.

``cram_ext.analysis.redundancy``
    Measures how much of each attention sublayer's output a linear probe can
    predict from the hidden state the sublayer reads (the CRAM paper's
    attention-redundancy ratio R).  Usable as a library
    (``measure_redundancy``) and as ``python -m cram_ext.analysis.redundancy``.

``cram_ext.analysis.train_probe_lm``
    Trains a small GPT-2-shaped byte-level model on the Python standard
    library's sources and tracks R across training checkpoints.

These modules need only PyTorch to import; loading Hugging Face models needs
the ``analysis`` extra (``pip install cram_ext[analysis]``).
"""
