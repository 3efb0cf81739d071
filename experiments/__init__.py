"""Scripts that regenerate this repository's results (`docs/RESULTS.md`, `docs/figures/`,
`results/`); run them from the repository root, e.g. `python -m experiments.srcd --size cpu`."""
