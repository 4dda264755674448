"""QEMU's own WebSocket port (VNC ``websocket`` mode) as an anyio byte stream.

The broker is a WebSocket client of QEMU and offers the ``binary``
subprotocol; messages become bytes and bytes become binary messages, so a
session handler treats this endpoint like any other byte stream.
"""

from __future__ import annotations

import anyio
import anyio.abc
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake


class WebSocketByteStream(anyio.abc.ByteStream):
    """A connected WebSocket client seen as a byte stream."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self._pending = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            try:
                self._pending = await self._connection.recv(decode=False)
            except ConnectionClosedOK:
                raise anyio.EndOfStream from None
            except ConnectionClosed as exc:
                raise anyio.BrokenResourceError(str(exc)) from None
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self._connection.send(item)
        except ConnectionClosed as exc:
            raise anyio.BrokenResourceError(str(exc)) from None

    async def send_eof(self) -> None:
        raise NotImplementedError("a WebSocket cannot be half-closed")

    async def aclose(self) -> None:
        await self._connection.close()


async def connect_websocket_endpoint(
    host: str, port: int, *, timeout: float = 10.0
) -> WebSocketByteStream:
    """Connect to QEMU's WebSocket server at *host*:*port*; OSError if that fails."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        connection = await connect(
            f"ws://{netloc}/",
            subprotocols=["binary"],  # type: ignore[list-item]
            compression=None,
            open_timeout=timeout,
            max_size=None,
            ping_interval=None,
        )
    except (InvalidHandshake, TimeoutError) as exc:
        raise OSError(f"WebSocket handshake with {netloc} failed: {exc}") from None
    return WebSocketByteStream(connection)
