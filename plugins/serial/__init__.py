"""The built-in serial plugin: the VM's serial console as a terminal in the browser."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

if TYPE_CHECKING:
    from broker.service import SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="serial",
    title="Serial console",
    description="The VM's serial console through libvirt: xterm.js in the browser.",
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
def console_broker_session_handler(protocol: str) -> SessionHandler | None:
    """For now the bytes go through unchanged (:func:`broker.service.raw_proxy`)."""
    if protocol != PROTOCOL.name:
        return None
    from broker.service import raw_proxy

    return raw_proxy
