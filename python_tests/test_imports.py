"""What `import cram_ext` costs: the package and its training, model, SRCD and redundancy
modules import without the optional plotting and Hugging Face dependencies, and drawing
without matplotlib says which extra to install."""
import subprocess
import sys

import pytest

MODULES = ["cram_ext", "cram_ext.train", "cram_ext.models", "cram_ext.srcd",
           "cram_ext.srcd.consolidation", "cram_ext.redundancy", "cram_ext.redundancy.cram_models"]
OPTIONAL = ["matplotlib", "transformers"]


def test_importing_the_package_loads_no_optional_dependency():
    code = (f"import importlib, sys\nfor name in {MODULES!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_drawing_without_matplotlib_names_the_extra(monkeypatch):
    from cram_ext.plotting import pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "cram_ext\[plot\]"'):
        pyplot()
