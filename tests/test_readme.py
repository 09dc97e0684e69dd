"""The README and docs/*.md are executable: their Python blocks run, their links resolve.

A ```python block is meant to run and is run here (moving it between pages keeps it tested);
a ```py block is an illustration that needs more than one process (torch.distributed) and is
only shown.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, '-' for ' '."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '#' comments in code
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page: Path) -> list[str]:
    """Relative link targets of the page (no URLs, no in-page anchors)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_readme_has_a_quickstart():
    assert python_blocks(README), "README.md lost its python quickstart"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page):
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_to_files(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        assert file.is_file(), f"{page.name}: link to {target!r}, which is not a file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: no heading for {target!r}"


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_stays_short():
    # details belong in docs/*.md, linked from the README
    assert len(README.read_text().splitlines()) <= 250


def test_readme_api_names_every_export_field_and_mode():
    # the API section: every name meprop exports, every MePropConfig field and selection mode
    import dataclasses

    import meprop
    from meprop.config import MODES

    text = README.read_text()
    api = text[text.index("## API") : text.index("## Documentation")]
    missing = [n for n in meprop.__all__ if not re.search(rf"[`. ]{re.escape(n)}[`(]", api)]
    missing += [f"MePropConfig.{f.name}" for f in dataclasses.fields(meprop.MePropConfig)
                if f"{f.name}=" not in api]  # fmt: skip
    missing += [f"mode {m!r}" for m in MODES if f"`{m}`" not in api]
    assert not missing, f"README's API section leaves out {missing}"


def reproduce_commands(page: Path) -> list[str]:
    """Every ``meprop reproduce ...`` command of the page with flags: in inline code (which may
    wrap over lines) and in code blocks (comments and line continuations dropped)."""
    text = page.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`]*meprop reproduce [^`]+)`", prose)  # (after env settings too)
    found = [" ".join(c[c.index("meprop reproduce ") :].split()) for c in spans]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "meprop reproduce " in line:
                found.append(line[line.index("meprop reproduce ") :].split("#")[0].strip())
    return found


COMMAND_PAGES = [*PAGES, ROOT / "docs" / "results" / "README.md"]


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_reproduce_commands_select_rows(page):
    """A command a page gives to rebuild a table parses and selects at least one row: a
    renamed row or group fails here, not in a reader's terminal."""
    import shlex

    from meprop.experiments.cli import build_parser
    from meprop.experiments.reproduce import select_rows

    parser = build_parser()
    for command in reproduce_commands(page):
        argv = shlex.split(command)[1:]
        args = parser.parse_args(argv)
        assert select_rows(args), f"{page.name}: {command!r} selects no row"


def test_a_command_that_selects_nothing_is_refused():
    from meprop.experiments.cli import build_parser
    from meprop.experiments.reproduce import UsageError, select_rows

    parser = build_parser()
    for argv, words in [
        (["pos", "--groups", "main", "--rows", "random-k"], "--rows random-k: matches no row"),
        (["pos", "--groups", "nosuch"], "--groups nosuch: no such group"),
        (["tta", "--epochs", "3"], "--epochs"),
    ]:
        with pytest.raises(UsageError, match=words):
            select_rows(parser.parse_args(["reproduce", *argv]))
