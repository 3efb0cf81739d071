"""Runnable demonstrations of cram_ext, e.g. `python -m examples.srcd_demo`."""
