"""The README's Python examples run as written (in order, sharing one namespace, as a reader
pasting them into one session would)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run():
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(examples) >= 2
    namespace = {}
    for index, code in enumerate(examples):
        exec(compile(code, f"README example {index}", "exec"), namespace)
