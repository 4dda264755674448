"""The built-in serial plugin: the VM's serial console as a terminal in the browser."""

from __future__ import annotations

from broker import Protocol, hookimpl

PROTOCOL = Protocol(
    name="serial",
    title="Serial console",
    description="The VM's serial console through libvirt: xterm.js in the browser.",
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]
