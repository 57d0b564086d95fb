"""The tree keeps its shape: no import cycle, small folders, small modules. The layering itself
(which part may import which) is import-linter's contracts in pyproject.toml, run by make lint."""

from __future__ import annotations

import ast
from pathlib import Path

import lastseen

PACKAGE = Path(lastseen.__file__).parent
MAX_LINES = 450
MAX_MODULES = 15


def _module(path: Path) -> str:
    parts = ["lastseen", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The lastseen modules ``path`` imports, wherever the import stands (a function body or an
    ``if TYPE_CHECKING:`` block included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def _graph(root: Path) -> dict[str, set[str]]:
    paths = {_module(path): path for path in root.rglob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    """No module imports, even only for type checking, one that imports it back."""
    assert _cycles(_graph(PACKAGE)) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check above finds a cycle through a type-checking import, so it cannot pass by
    missing one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_folders_and_modules_stay_small() -> None:
    """No folder of the package holds more than 15 modules, and no module passes 450 lines."""
    crowded = {
        str(folder.relative_to(PACKAGE)): count
        for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir())]
        if (count := len([p for p in folder.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES
    }
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert (crowded, long) == ({}, {})


def test_the_package_has_no_loose_modules() -> None:
    """Beside the package's version and ``python -m lastseen``, every module lives in the part
    of the tree it belongs to."""
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
