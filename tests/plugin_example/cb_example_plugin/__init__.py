"""A minimal third-party console-broker plugin.

It registers through the ``console_broker`` entry-point group exactly as the
built-in plugins do, and declares one protocol. It is installed into the test
environment by console-broker's tests, which check that it is listed, called
and removed again by CONSOLE_BROKER_DISABLE_PLUGINS.
"""

from __future__ import annotations

from broker import Protocol, hookimpl

PROTOCOL = Protocol(
    name="raw",
    title="Raw bytes",
    description="The console's bytes as they are, for scripts and tests.",
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]
