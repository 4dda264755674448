"""``console-broker open`` for VNC: a native VNC viewer on a local port, bridged to the
broker's WebSocket.

The broker speaks RFB 3.8 with security None toward its clients (the token is the
authentication), so any VNC viewer works unchanged: remote-viewer (Debian's
virt-viewer, the default), TigerVNC (``--viewer 'xtigervncviewer {host}::{port}'``).

One console is one WebSocket: the token is used by the first :meth:`connect`, which
happens once the local port listens and the viewer is found, before the viewer starts
when the command starts it (a refused token is then said at once, before any window
opens; the broker's first RFB bytes are read then too, so that a refusal after the
upgrade is said at once as well), and when the first connection arrives with
``--no-viewer`` (the broker gives a client ``limits.handshake_timeout`` to finish RFB's
handshake, and a user starting a viewer by hand may take longer). The local listener
takes that first connection only and closes. The command ends when the viewer
disconnects or exits, or when the broker closes (its reason said on stderr).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    import anyio.abc
    from websockets.asyncio.client import ClientConnection

    from broker.api import LocalListener, NativeClient

#: The viewer started without ``--viewer``, and its Debian package.
DEFAULT_VIEWER = ("remote-viewer", "vnc://{host}:{port}")
VIEWER_PACKAGE = "virt-viewer"
#: Seconds the broker has to send its first RFB bytes once the WebSocket is open.
VERSION_TIMEOUT = 30.0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def first_connection(
    listener: LocalListener, viewer: anyio.abc.Process | None
) -> anyio.abc.SocketStream | None:
    """The first connection to *listener*, or None when *viewer* exits before one came."""
    accepted: list[anyio.abc.SocketStream] = []

    async def accept() -> None:
        accepted.append(await listener.accept())
        group.cancel_scope.cancel()

    async def watch(process: anyio.abc.Process) -> None:
        await process.wait()
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(accept)
        if viewer is not None:
            group.start_soon(watch, viewer)
    return accepted[0] if accepted else None


async def server_version(client: NativeClient, ws: ClientConnection) -> bytes:
    """The broker's first RFB bytes (its ProtocolVersion, sent as soon as the session
    opens), read before the viewer starts; :class:`OpenError` with the broker's reason
    when it closes instead (a refusal after the upgrade, ``http.refusals = "close"``)."""
    from websockets.exceptions import ConnectionClosed

    from broker.api import OpenError

    try:
        with anyio.fail_after(VERSION_TIMEOUT):
            message = await ws.recv()
    except ConnectionClosed:
        raise OpenError(client.close_text(ws)) from None
    except TimeoutError:
        raise OpenError(
            f"the broker sent no RFB greeting within {VERSION_TIMEOUT:g} s"
        ) from None
    return message if isinstance(message, bytes) else message.encode()


async def open_vnc(client: NativeClient) -> int:
    """The VNC console of ``client``'s token in a native viewer; the exit status."""
    from broker.api import BridgeEnd

    ws: ClientConnection | None = None
    try:
        async with await client.local_listener() as listener:
            client.check_viewer(DEFAULT_VIEWER, VIEWER_PACKAGE)  # before the token is used
            first = b""
            if client.start_viewer:
                ws = await client.connect()
                first = await server_version(client, ws)
            viewer = await client.run_viewer(
                DEFAULT_VIEWER, VIEWER_PACKAGE, host=_url_host(listener.host),
                port=listener.port,
            )
            if viewer is None:
                client.status(f"waiting for a VNC viewer on {listener.address}")
            stream = await first_connection(listener, viewer)
        if stream is None:
            assert viewer is not None
            client.status(f"the viewer exited (status {viewer.returncode}) before it connected")
            return 1
        try:
            if ws is None:
                ws = await client.connect()
            elif first:
                await stream.send(first)
        except BaseException:
            await stream.aclose()
            raise
        client.status("connected: the viewer shows the console")
        end = await client.bridge(stream, ws)
        if end is BridgeEnd.BROKER:
            client.status(client.close_text(ws))
            return 0 if ws.close_code == 1000 else 1
        client.status("the viewer disconnected")
        return 0
    finally:
        if ws is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await ws.close()
