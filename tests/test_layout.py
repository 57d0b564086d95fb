"""The layout keeps its promises: the service never depends on the tools that exercise it."""

from __future__ import annotations

import ast
from pathlib import Path

import lastseen

PACKAGE = Path(lastseen.__file__).parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_service_module_imports_devtools() -> None:
    """Only cli.py, which offers the tools as commands, imports lastseen.devtools: the service
    (everything else outside devtools/) runs without them."""
    devtools = PACKAGE / "devtools"
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imports(path) if name.startswith("lastseen.devtools")
        )
        for path in PACKAGE.rglob("*.py")
        if devtools not in path.parents and path.name != "cli.py"
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_an_import_of_devtools(tmp_path: Path) -> None:
    """The check above finds both forms of import, so it cannot pass by missing them."""
    module = tmp_path / "m.py"
    module.write_text("import lastseen.devtools.demo\nfrom lastseen.devtools import bench\n")
    assert {"lastseen.devtools.demo", "lastseen.devtools.bench"} <= _imports(module)
