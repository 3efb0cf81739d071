"""The experiment drivers and examples outside the package: the RESULTS.md section writer, and
every script starting from the repository root both as a module and as a file."""
import pathlib
import subprocess
import sys

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
