"""The built-in serial plugin: the VM's serial console as a terminal in the browser.

Sessions share one libvirt console stream per console (``shared_console``):
a fan-out hub (:mod:`broker_serial._hub`) sends every client the output, lets
one writer type, replays the scrollback to clients that attach and records
the console when asked. The page is xterm.js; the protocol and its control
messages are in docs/serial.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker import Protocol, hookimpl

from ._config import console_broker_config_tables as console_broker_config_tables
from ._control import SUBPROTOCOL

if TYPE_CHECKING:
    import argparse

    from broker.config import Config
    from broker.hookspecs import Page
    from broker.service import SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="serial",
    title="Serial console",
    description="The VM's serial console through libvirt, shared by several clients: "
    "xterm.js in the browser, or any WebSocket client.",
    subprotocols=(SUBPROTOCOL, "binary"),
    shared_console=True,
    view_only=True,
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """A pty serial port and its console (see broker_serial._xml)."""
    if protocol != PROTOCOL.name:
        return None
    from ._xml import xml_edit

    return xml_edit(options)


@hookimpl
def console_broker_session_handler(protocol: str, config: Config) -> SessionHandler | None:
    """Each broker gets its own hubs (one per shared console stream)."""
    if protocol != PROTOCOL.name:
        return None
    from ._serve import Hubs, Settings

    return Hubs(Settings.from_config(config)).serve


@hookimpl
def console_broker_page(protocol: str, path: str, config: Config) -> Page | None:
    """The xterm.js page and its assets (see broker_serial._page)."""
    if protocol != PROTOCOL.name:
        return None
    from ._page import page

    return page(path, config.http.assets_dir)


@hookimpl
def console_broker_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``console-broker recordings``."""
    from ._cli import register

    register(subparsers)
