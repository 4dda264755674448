"""The built-in VNC plugin: noVNC in the browser and native VNC viewers."""

from __future__ import annotations

from broker import Protocol, hookimpl

PROTOCOL = Protocol(
    name="vnc",
    title="VNC (RFB)",
    description="The VM's display over RFB: noVNC in the browser, or a native VNC viewer.",
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]
