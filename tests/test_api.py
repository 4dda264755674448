"""broker.api, the plugin API: every name it lists is the core's object, found lazily."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import broker.api as api


def test_every_name_is_listed_once_with_its_source() -> None:
    assert len(api.__all__) == len(set(api.__all__))
    assert set(api.__all__) == set(api._SOURCES)


@pytest.mark.parametrize("name", sorted(api._SOURCES))
def test_a_name_is_the_core_object(name: str) -> None:
    source = importlib.import_module(api._SOURCES[name])
    assert getattr(api, name) is getattr(source, name)
    namespace: dict[str, object] = {}
    exec(f"from broker.api import {name}", namespace)
    assert namespace[name] is getattr(source, name)
    assert name in dir(api)


def test_the_type_checking_imports_are_the_table() -> None:
    """What type checkers see (the imports under TYPE_CHECKING) is what the module gives."""
    tree = ast.parse(Path(api.__file__).read_text())
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
    assert seen == api._SOURCES


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'SessionRunner'"):
        api.SessionRunner  # noqa: B018
    with pytest.raises(ImportError):
        exec("from broker.api import Broker", {})


def test_importing_the_api_loads_only_what_is_used() -> None:
    """A plugin that declares its protocols loads neither the service nor the XML
    editor (the libvirt hook and ``console-broker xml`` load every plugin)."""
    code = (
        "import sys\n"
        "from broker.api import Protocol, hookimpl\n"
        "heavy = ('broker.service', 'broker.xml', 'broker.config', 'broker.tokens')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
