"""No import cycle among broker's modules.

Counted are the imports a module runs when it is imported: its top-level statements
(also inside top-level ``if``, ``try``, ``with`` and class bodies), but not those in
functions, nor those under ``if TYPE_CHECKING:``. Such a cycle makes the import order
matter (a name missing from a half-imported module); an import inside a function is how
a module may use one that imports it. The other boundaries (a plugin imports only
``broker.api``, the core no plugin) are import-linter's contracts in pyproject.toml,
checked by ``tox -e type``; import-linter counts every import, so cycles are here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import broker

BROKER = Path(broker.__file__).parent


def package_modules(directory: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every module of the package in *directory*."""
    found = {}
    for path in sorted(directory.rglob("*.py")):
        parts = [package, *path.relative_to(directory).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_run(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among *body* that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _type_checking(node.test):
                yield from _imports_run(node.body)
            yield from _imports_run(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _imports_run(block)
            for handler in node.handlers:
                yield from _imports_run(handler.body)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _imports_run(node.body)


def module_imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of *modules* it imports when it is imported."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in _imports_run(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from package import name` imports the module package.name when there is one
            targets += [f"{base}.{alias.name}" for alias in node.names]
        graph[name] = {t for t in map(known, targets) if t is not None and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of *graph* (its first module repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                return [*path[path.index(imported) :], imported]
            if imported not in done and (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_broker_has_no_import_cycle() -> None:
    modules = package_modules(BROKER, "broker")
    assert "broker.service._app" in modules  # the walk found the subpackages
    cycle = find_cycle(module_imports(modules))
    assert cycle is None, "import cycle in broker: " + " -> ".join(cycle or [])


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (
            {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "import pkg.a\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        (
            {
                "__init__.py": "from pkg.sub import x\n",
                "sub/__init__.py": "",
                "sub/x.py": "try:\n    from .. import y\nexcept ImportError:\n    pass\n",
                "y.py": "class C:\n    from pkg.sub import x\n",
            },
            ["pkg.sub.x", "pkg.y", "pkg.sub.x"],
        ),
        (
            {
                "__init__.py": "",
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n",
                "b.py": "import os\ndef f():\n    from pkg import a\nfrom pkg.a import name\n",
            },
            None,
        ),
    ],
    ids=["direct", "relative-nested", "type-checking-and-function-level"],
)
def test_the_cycle_check_sees_what_runs_at_import(
    tmp_path: Path, files: dict[str, str], cycle: list[str] | None
) -> None:
    modules = package_modules(write(tmp_path / "pkg", files), "pkg")
    assert find_cycle(module_imports(modules)) == cycle
