"""service.event_loop: uvloop or asyncio's own loop, chosen and run (broker.service._loop)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import anyio
import pytest

from broker.errors import CommandError
from broker.service._loop import choose_event_loop, running_loop_name

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def _ran_on(choice: str) -> tuple[str, type[asyncio.AbstractEventLoop]]:
    async def which() -> tuple[str, type[asyncio.AbstractEventLoop]]:
        return running_loop_name(), type(asyncio.get_running_loop())

    loop = choose_event_loop(choice)
    return anyio.run(which, backend="asyncio", backend_options=loop.backend_options)


def test_asyncio_is_the_standard_librarys_loop_whatever_the_policy() -> None:
    """The tests' policy may be uvloop's (--event-loop): asyncio still means asyncio's."""
    name, kind = _ran_on("asyncio")
    assert name == "asyncio"
    assert issubclass(kind, asyncio.SelectorEventLoop)


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_auto_and_uvloop_run_on_uvloop_when_installed(choice: str) -> None:
    assert choose_event_loop(choice).name == "uvloop"
    assert _ran_on(choice)[0] == "uvloop"


def test_without_uvloop_auto_is_asyncio_and_uvloop_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert choose_event_loop("auto").name == "asyncio"
    with pytest.raises(CommandError, match='event_loop = "uvloop": uvloop is not installed'):
        choose_event_loop("uvloop")


@pytest.mark.skipif(sys.platform != "linux", reason="uvloop is a dependency on Linux")
def test_uvloop_is_a_dependency_on_linux() -> None:
    assert HAVE_UVLOOP, "pip install 'console-broker[server]' installs uvloop on Linux"


@pytest.mark.anyio
async def test_the_tests_run_on_the_loop_they_were_asked_for(
    request: pytest.FixtureRequest, anyio_backend: object
) -> None:
    """--event-loop (tests/conftest.py) sets every asyncio loop of the test process."""
    wanted = choose_event_loop(request.config.getoption("event_loop")).name
    assert running_loop_name() == wanted

    async def elsewhere() -> str:
        return running_loop_name()

    assert await anyio.to_thread.run_sync(lambda: anyio.run(elsewhere)) == wanted


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
