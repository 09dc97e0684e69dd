"""The package's import graph: no circles between modules, no private names across them.

Every ``import`` and ``from ... import`` in src/meprop, at any depth (imports inside functions
count: they make a circle as much as top-level ones), read with ``ast``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "meprop"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import in ``path``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None) if sub in mods else (target, alias.name))
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
    return [(m, n) for m, n in out if m in mods]


def graph() -> dict[str, set[str]]:
    mods = modules()
    # (a package's __init__ only re-exports: edges to it would make every module a circle)
    return {
        m: {t for t, _ in imports(m, p, mods) if t != "meprop" and t != m}
        for m, p in mods.items()
        if m != "meprop"
    }


def find_circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk of ``g`` meets (each as a path back to its start)."""
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return circles


def test_find_circles_finds_them():
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles():
    circles = find_circles(graph())
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_private_names_across_modules():
    mods = modules()
    bad = [
        f"{m} takes {n} from {t}"
        for m, p in mods.items()
        for t, n in imports(m, p, mods)
        if n is not None and n.startswith("_") and not n.startswith("__") and t != m
    ]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize(
    "module",
    [
        "meprop.ops",
        "meprop.experiments.report",
        "meprop.lstm",
        "meprop.lstm_prune",
        "meprop.reference",
        "meprop.kernels.native",
        "meprop.kernels.pool",
    ],
)
def test_graph_sees_the_edges(module):
    # the check reads real imports (guards against a parser that finds nothing)
    assert graph()[module]


# The two rooms: the library (meprop) and its experiments (meprop.experiments).
EXPERIMENTS = "meprop.experiments"


def _in_experiments(module: str) -> bool:
    return module == EXPERIMENTS or module.startswith(EXPERIMENTS + ".")


def test_library_imports_nothing_of_the_experiments():
    mods = modules()
    bad = [
        f"{m} imports {t}"
        for m, p in mods.items()
        if not _in_experiments(m)
        for t, _ in imports(m, p, mods)
        if _in_experiments(t)
    ]
    assert not bad, "; ".join(bad)


def test_experiments_use_the_library_by_its_absolute_public_names():
    # (relative imports stay inside the experiments; the library is reached as ``meprop.X``,
    # never through a private module)
    bad = []
    for m, p in modules().items():
        if not _in_experiments(m):
            continue
        depth = len(m.split(".")) - (1 if p.name == "__init__.py" else 2)  # packages below
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > depth:
                bad.append(f"{m}: from {'.' * node.level}{node.module or ''} (relative, leaves)")
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                parts = name.split(".")
                if parts[0] == "meprop" and any(s.startswith("_") for s in parts[1:]):
                    bad.append(f"{m}: import {name} (private)")
    assert not bad, "; ".join(bad)


def test_the_two_rooms_checks_see_both_sides():
    mods = modules()
    assert any(_in_experiments(m) for m in mods) and "meprop.ops" in mods
    # an experiments module does import the library (so the direction test reads real edges)
    assert "meprop.checkpoint" in graph()["meprop.experiments.train"]


# Code a newcomer can read: outside the kernels, no file over 600 lines and no function over 60
# (docstring included).
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def long_code(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if "kernels" in path.relative_to(root).parts:
            continue
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            out.append(f"{path.relative_to(root)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}: {node.name} is {n} lines")
    return out


def test_no_long_files_or_functions():
    too_long = long_code()
    assert not too_long, "; ".join(too_long)


def test_long_code_finds_them(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n" + "y = 1\n" * 600)
    assert long_code(tmp_path) == ["m.py: 671 lines", "m.py: f is 71 lines"]
