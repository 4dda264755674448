"""A minimal third-party console-broker plugin: raw bytes to a domain's consoles.

It registers through the ``console_broker`` entry-point group exactly as the
built-in plugins do, and uses nothing but hooks: it declares two protocols
that attach to consoles the built-in plugins provision (``raw-vnc``: the VNC
display, ``raw-serial``: the serial console) and serves their sessions with
its own handler, built on the core's :func:`broker.api.pump`, and a page. It is
installed into the test environment by console-broker's tests, which check
that it is listed, called, serves sessions and is removed again by
CONSOLE_BROKER_DISABLE_PLUGINS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api import Page, Protocol, hookimpl

if TYPE_CHECKING:
    from broker.api import PluginContext, Session

async def handle(session: Session) -> None:
    """Proxy the bytes unchanged, logging through the session's bound logger."""
    from broker.api import pump

    endpoint = session.console_endpoint
    session.log.info("example.session", console=session.console, endpoint=endpoint.kind)
    end = await pump(
        session.client,
        endpoint.stream,
        traffic=session.traffic,
        read_size=session.read_size,
    )
    session.log.info("example.session_ended", side=end.value)


#: The page ``/console/raw-vnc/`` serves (a plain marker, for tests).
PAGE = b"<!doctype html><title>raw</title><p>cb-example-plugin page</p>\n"


class RawVNC(Protocol):
    """Raw bytes of the VNC display, with a page of its own."""

    def page(self, path: str, context: PluginContext) -> Page | None:
        return Page(PAGE) if path == "" else None


RAW_VNC = RawVNC(
    name="raw-vnc",
    title="Raw VNC bytes",
    description="The VNC display's bytes as they are, for scripts and tests.",
    console="vnc",
    handler=handle,
)
RAW_SERIAL = Protocol(
    name="raw-serial",
    title="Raw serial bytes",
    description="The serial console's bytes as they are, for scripts and tests.",
    console="serial",
    handler=handle,
)
PROTOCOLS = {p.name: p for p in (RAW_VNC, RAW_SERIAL)}


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return list(PROTOCOLS.values())
