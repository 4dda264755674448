"""Fixtures of the VNC real-stack tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from vncstack import Served


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A ``console-broker serve`` per test module; no VNC password may reach its log."""
    broker = Served(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_secret_logged("secret")
