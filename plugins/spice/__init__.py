"""The built-in SPICE plugin: spice-html5 in the browser, remote-viewer natively."""

from __future__ import annotations

from broker import Protocol, hookimpl

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
