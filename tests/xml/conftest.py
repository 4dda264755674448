"""Fixtures for the domain XML tests: the corpus, the plugin manager, a CLI runner."""

from __future__ import annotations

import io
import sys

import pytest
from xmlhelpers import CliRunner, Run

from broker.cli import main
from broker.plugins import PluginManager


@pytest.fixture(scope="session")
def manager() -> PluginManager:
    """The built-in plugins, loaded through the entry points as in production."""
    return PluginManager(disabled=())


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]) -> CliRunner:
    """Run ``console-broker ARGS`` in-process, with *stdin* bytes on standard input."""

    def run(*args: str, stdin: bytes = b"") -> Run:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = main(list(args))
        out, err = capsysbinary.readouterr()
        return Run(status, out, err.decode())

    return run
