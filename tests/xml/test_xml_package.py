"""broker.xml's names are found lazily: every name it lists is its module's object, and
importing the package (as building the ``xml`` commands' parsers does) loads no lxml."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import broker.xml as xml


def test_every_name_is_listed_once_with_its_source() -> None:
    assert len(xml.__all__) == len(set(xml.__all__))
    assert set(xml.__all__) == set(xml._SOURCES)


@pytest.mark.parametrize("name", sorted(xml._SOURCES))
def test_a_name_is_its_modules_object(name: str) -> None:
    source = importlib.import_module(xml._SOURCES[name])
    assert getattr(xml, name) is getattr(source, name)
    namespace: dict[str, object] = {}
    exec(f"from broker.xml import {name}", namespace)
    assert namespace[name] is getattr(source, name)
    assert name in dir(xml)


def test_the_type_checking_imports_are_the_table() -> None:
    """What type checkers see (the imports under TYPE_CHECKING) is what the package gives."""
    tree = ast.parse(Path(xml.__file__).read_text())
    block = next(
        node for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == xml._SOURCES


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Editor'"):
        xml.Editor  # noqa: B018
    with pytest.raises(ImportError):
        exec("from broker.xml import Editor", {})


def test_importing_the_package_and_its_commands_loads_no_lxml() -> None:
    code = (
        "import sys\n"
        "import broker.xml.cli\n"
        "print(sorted(m for m in ('lxml', 'libvirt', 'broker.xml._editor') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
