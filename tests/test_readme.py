"""The README is executable: its Python blocks run, and the CLI it names exists."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quickstart():
    assert python_blocks(), "README.md lost its python quickstart"


def test_readme_python_blocks_run():
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
