"""The broker's event loop (``service.event_loop``): uvloop's, or asyncio's own.

The broker runs on anyio's asyncio backend either way; the choice is only which loop
implementation runs it. uvloop (libuv's loop, in C) takes fewer CPU cycles per event,
which is most of what the broker's proxy path costs; it is a dependency of the
``server`` extra on Linux, so ``auto`` means uvloop wherever it is installed and
asyncio's loop elsewhere. ``asyncio`` always means the standard library's selector
loop, whatever event loop policy the process has set.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable
from typing import Any

import attrs

from broker.errors import CommandError

#: ``service.event_loop``'s values.
CHOICES = ("auto", "uvloop", "asyncio")


@attrs.frozen
class EventLoop:
    """An event loop chosen by ``service.event_loop``: its name and what makes one."""

    #: ``uvloop`` or ``asyncio``.
    name: str
    #: The loop implementation's version (uvloop's), else Python's.
    version: str
    factory: Callable[[], asyncio.AbstractEventLoop] = attrs.field(repr=False)

    @property
    def backend_options(self) -> dict[str, Any]:
        """What :func:`anyio.run` takes (with ``backend="asyncio"``) to run on this loop."""
        return {"loop_factory": self.factory}


def _uvloop() -> EventLoop | None:
    try:
        import uvloop
    except ImportError:
        return None
    return EventLoop("uvloop", importlib.metadata.version("uvloop"), uvloop.new_event_loop)


def _asyncio() -> EventLoop:
    import platform

    return EventLoop("asyncio", platform.python_version(), asyncio.SelectorEventLoop)


def choose_event_loop(choice: str) -> EventLoop:
    """The loop for ``service.event_loop`` = *choice*; :class:`CommandError` when it
    names uvloop and uvloop is not installed."""
    if choice not in CHOICES:
        raise ValueError(f"service.event_loop: not one of {', '.join(CHOICES)}: {choice!r}")
    if choice == "asyncio":
        return _asyncio()
    loop = _uvloop()
    if loop is not None:
        return loop
    if choice == "uvloop":
        raise CommandError(
            'service.event_loop = "uvloop": uvloop is not installed (pip install uvloop, '
            'or choose "auto" or "asyncio")'
        )
    return _asyncio()


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the implementation of the running event loop."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"
