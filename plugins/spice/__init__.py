"""The built-in SPICE plugin: spice-html5 in the browser, remote-viewer natively."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

if TYPE_CHECKING:
    from broker.service import SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="spice",
    title="SPICE",
    description=(
        "The VM's display, input, clipboard, audio and USB over SPICE: spice-html5 in the "
        "browser, or remote-viewer with a .vv file."
    ),
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """The SPICE display, agent channel, USB redirection and video (see broker_spice._xml)."""
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
