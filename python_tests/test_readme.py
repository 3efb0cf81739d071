"""The README's Python examples run as written (in order, sharing one namespace, as a reader
pasting them into one session would), and its commands name modules that exist."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(examples) >= 2
    namespace = {}
    for index, code in enumerate(examples):
        exec(compile(code, f"README example {index}", "exec"), namespace)


def test_readme_commands_name_modules_of_this_repository():
    # `python -m X` and `torchrun ... -m X` lines, run from the repository root
    modules = re.findall(r"-m ((?:cram_ext|examples|experiments)(?:\.\w+)*)", README.read_text())
    assert "examples.srcd_demo" in modules      # the main job
    root = README.parent
    for module in modules:
        path = root / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
