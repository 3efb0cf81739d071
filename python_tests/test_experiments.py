"""The experiment drivers and examples outside the package: the RESULTS.md section writer, the
consolidation experiment's records, and every script starting from the repository root both as
a module and as a file."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments.srcd_report import (SECTION_BEGIN, SECTION_END, SECTION_HEADING,
                                     SECTION_MARKERS, write_section)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["experiments/srcd.py", "experiments/consolidation.py", "experiments/train_probe_lm.py", "examples/srcd_demo.py",
           "examples/attention_demo.py"]


def test_results_section_replaces_only_the_text_between_its_markers(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Kernels\n\nkernel table\n")
    write_section(str(path), f"{SECTION_BEGIN}\nfirst\n{SECTION_END}", SECTION_MARKERS,
                  SECTION_HEADING)
    text = path.read_text()
    assert text.startswith("# Results\n\n## Kernels\n\nkernel table\n")
    assert "## SRCD: CRAM vs baselines" in text and "first" in text
    path.write_text(text + "\n## Later section\n\nkept\n")
    write_section(str(path), f"{SECTION_BEGIN}\nsecond\n{SECTION_END}", SECTION_MARKERS,
                  SECTION_HEADING)
    text = path.read_text()
    assert "second" in text and "first" not in text
    assert text.count("## SRCD: CRAM vs baselines") == 1
    assert "kernel table" in text and text.endswith("## Later section\n\nkept\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_start_as_modules_and_as_files(script):
    module = script[:-len(".py")].replace("/", ".")
    for command in ([sys.executable, "-m", module, "--help"], [sys.executable, script, "--help"]):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "usage:" in result.stdout


def _variant_run(seed: int, recurring: list, semantic: bool = True) -> dict:
    """A consolidation run record with an in-training curve of P(attention | recurring query)
    in layer 0 and a test evaluation at its last value."""
    def record(value: float) -> dict:
        metrics = {"accuracy": 1.0, "accuracy_recurring": 1.0, "accuracy_novel": 0.99,
                   "dynamics_mse": 0.012, "oracle_mse": 0.011, "attention_fraction": value / 10,
                   "attention/0/recurring": value, "attention/0/novel": 1.0,
                   "attention/0/other": 0.0}
        if semantic:
            metrics["semantic/0/recurring"] = 1.0 - value
        return metrics
    return {"seed": seed, "test": record(recurring[-1]),
            "curve": {"steps": [100 * i for i in range(len(recurring))],
                      "eval": [record(value) for value in recurring]}}


def test_settled_below_is_where_the_curve_stays_under_the_level():
    from experiments.consolidation import settled_below
    assert settled_below(_variant_run(0, [0.5, 0.05, 0.3, 0.08, 0.02]), 0, 0.1) == 300
    assert settled_below(_variant_run(0, [0.5, 0.05, 0.3]), 0, 0.1) is None
    assert settled_below(_variant_run(0, [0.05, 0.02]), 0, 0.1) == 0


def test_variants_section_has_a_row_per_model_and_step_count(tmp_path):
    from argparse import Namespace
    from experiments.consolidation import VARIANT_MARKERS, summarize_variants
    args = Namespace(figures=str(tmp_path / "figures"), results_md=str(tmp_path / "RESULTS.md"))
    variants = {"cram": {1200: [_variant_run(0, [0.5, 0.04]), _variant_run(1, [0.5, 0.08])]},
                "ablate_no_semantic": {1200: [_variant_run(0, [0.5, 0.2, 0.3], semantic=False)]}}
    summary = summarize_variants(variants, ["ablate_no_semantic_1200_s1"], args)
    assert summary["by_model"]["cram"]["1200"]["attention/0/recurring"]["mean"] == (
        pytest.approx(0.06))
    assert summary["recurring_attention_settled_below_0.1"] == {
        "cram": {"1200": [100, 100]}, "ablate_no_semantic": {"1200": [None]}}
    text = (tmp_path / "RESULTS.md").read_text()
    section = text[text.index(VARIANT_MARKERS[0]):text.index(VARIANT_MARKERS[1])]
    row = "| cram | 1200 | 0, 1 | 100.0 ± 0.0% / 99.0 ± 0.0% | 0.060 ± 0.028 | 1.000 | 0.940 |"
    assert row in section
    assert "| ablate_no_semantic | 1200 | 0 |" in section and "| – | " in section
    assert "**Partial**: not yet run: ablate_no_semantic_1200_s1." in section
    assert (tmp_path / "figures" / "consolidation_variants.png").exists()


def test_finished_run_measured_on_other_test_batches_is_measured_again(tmp_path, monkeypatch):
    from cram_ext import evaluate, train
    from experiments import consolidation
    directory = tmp_path / consolidation.run_name("cram", 400, 0)
    train.main(["--config", "cram", "--size", "tiny", "--steps", "4", "--out", str(directory)])
    stale = {"model": "cram", "steps": 400, "seed": 0, "test": {"accuracy": -1.0}}
    (directory / "result.json").write_text(json.dumps(stale))
    monkeypatch.setattr(consolidation, "TEST_BATCHES", 2)

    result = consolidation.train_one(str(tmp_path), "cram", 400, 0)
    expected = evaluate.main([str(directory / "checkpoint.pt"), "--batches", "2"])
    assert result["test_batches"] == 2
    np.testing.assert_equal(result["test"], expected)   # NaN where no query ran attention
    np.testing.assert_equal(json.loads((directory / "result.json").read_text()), result)
    # Measured on as many batches as asked: read, not measured again.
    monkeypatch.setattr(consolidation, "load_checkpoint", None)
    np.testing.assert_equal(consolidation.train_one(str(tmp_path), "cram", 400, 0), result)
