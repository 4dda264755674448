"""The built-in serial plugin: the VM's serial console as a terminal in the browser.

Sessions share one libvirt console stream per console (``shared_console``):
a fan-out hub (:mod:`broker_serial._hub`) sends every client the output, lets
one writer type, replays the scrollback to clients that attach and records
the console when asked. The page is xterm.js; the protocol and its control
messages are in docs/serial.md. ``console-broker open`` attaches a terminal
(:mod:`broker_serial._terminal`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api import OpenOption, Protocol, hookimpl

from ._config import console_broker_config_tables as console_broker_config_tables
from ._control import SUBPROTOCOL

if TYPE_CHECKING:
    from broker.api import (
        ConsoleEdit,
        EditOptions,
        Finding,
        NativeClient,
        Page,
        PluginContext,
        RecordingKind,
        SessionHandler,
    )

    from ._serve import Hubs

class Serial(Protocol):
    """The ``serial`` protocol and what it does."""

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        """A pty serial port and its console (see broker_serial._xml)."""
        from ._xml import xml_edit

        return xml_edit(options)

    def session_handler(self, context: PluginContext) -> SessionHandler:
        """Each broker gets its own hubs (one per shared console stream)."""
        return hubs_of(context).serve

    def page(self, path: str, context: PluginContext) -> Page | None:
        """The xterm.js page and its assets (see broker_serial._page)."""
        from ._page import page

        return page(path, context.config.http.assets_dir)

    def doctor(self, context: PluginContext) -> list[Finding]:
        """xterm.js and its fit addon in the assets directory (see broker_serial._doctor)."""
        from ._doctor import findings

        return findings(context)

    async def open_client(self, client: NativeClient) -> int:
        """``console-broker open``: the console in this terminal, or on a local port with
        ``--listen`` (see broker_serial._terminal; nothing of the server side loads)."""
        from ._terminal import open_serial

        return await open_serial(client)


def hubs_of(context: PluginContext) -> Hubs:
    """The hubs of the broker *context* belongs to, made on first use."""
    from ._serve import Hubs, Settings

    hubs: Hubs | None = context.state.get("hubs")
    if hubs is None:
        hubs = context.state["hubs"] = Hubs(Settings.from_config(context.config))
    return hubs


PROTOCOL = Serial(
    name="serial",
    title="Serial console",
    description="The VM's serial console through libvirt, shared by several clients: "
    "xterm.js in the browser, or any WebSocket client.",
    subprotocols=(SUBPROTOCOL, "binary"),
    shared_console=True,
    view_only=True,
    open_options=(
        OpenOption(
            "--take",
            "take the keyboard when attaching, from whichever client has it (a full token)",
        ),
    ),
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_recording_kinds() -> list[RecordingKind]:
    """asciicast v2 files; the core lists, prunes and serves them (docs/recordings.md)."""
    from ._recording import KIND

    return [KIND]
