"""The built-in VNC plugin: noVNC in the browser and native VNC viewers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

if TYPE_CHECKING:
    from broker.service import SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="vnc",
    title="VNC (RFB)",
    description="The VM's display over RFB: noVNC in the browser, or a native VNC viewer.",
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """The VNC display, listening as the mode asks (see broker_vnc._xml)."""
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
