"""The console socket stream (broker.service._sockstream): bounded reading and writing,
ends, cancellation, against real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from broker.service import _sockstream
from broker.service._sockstream import SocketConsole, open_socket, open_tcp, open_unix

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[SocketConsole, socket.socket]]:
    """A SocketConsole and the plain socket at its other end (the console)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    stream = await open_socket(ours)
    try:
        yield stream, theirs
    finally:
        await stream.aclose()
        theirs.close()


async def _fill(sock: socket.socket, total: int) -> int:
    """Write up to *total* bytes into *sock* without blocking; what went in."""
    sent = 0
    chunk = b"x" * 65536
    while sent < total:
        try:
            sent += sock.send(chunk[: total - sent])
        except BlockingIOError:
            await anyio.sleep(0.01)
            try:
                sent += sock.send(chunk[: total - sent])
            except BlockingIOError:
                return sent
    return sent


async def test_reading_stops_at_the_limit_until_the_consumer_takes_data() -> None:
    async with _pair() as (stream, console):
        sent = await _fill(console, 8 * _sockstream.READ_LIMIT)
        await anyio.sleep(0.2)
        protocol = stream._protocol
        # the stream read no further than its limit and one read beyond; the rest waits
        # in the kernel's buffers, so the console's writes stopped
        assert protocol.reading_paused
        assert protocol.buffered <= _sockstream.READ_LIMIT + 256 * 1024
        assert sent < 8 * _sockstream.READ_LIMIT
        received = 0
        while received < sent:
            received += len(await stream.receive(1 << 20))
        assert received == sent and not protocol.reading_paused


async def test_a_large_chunk_is_split_to_max_bytes() -> None:
    async with _pair() as (stream, console):
        console.send(b"abcdef")
        await anyio.sleep(0.05)
        assert await stream.receive(4) == b"abcd"
        assert await stream.receive(4) == b"ef"


async def test_writing_waits_while_the_console_does_not_read() -> None:
    async with _pair() as (stream, console):
        block = b"y" * 65536
        written = 0
        with anyio.move_on_after(1.0) as waited:
            while True:
                written += len(block)  # handed over at once; send waits after that
                await stream.send(block)
        assert waited.cancelled_caught  # send blocked: the console took nothing
        buffered = stream._transport.get_write_buffer_size()
        assert buffered <= _sockstream.WRITE_HIGH + len(block)
        drained = 0
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(stream.send, b"z")
                while drained < written + 1:
                    try:
                        drained += len(console.recv(1 << 20))
                    except BlockingIOError:
                        await anyio.sleep(0.01)
        assert drained == written + 1


async def test_the_ends() -> None:
    async with _pair() as (stream, console):
        console.send(b"last words")
        console.shutdown(socket.SHUT_WR)
        assert await stream.receive() == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
    async with _pair() as (stream, console):
        console.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        console.close()  # a reset
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await stream.receive()
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(3):
                await stream.send(b"x")
                await anyio.sleep(0.05)
    async with _pair() as (stream, _console):
        await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")


async def test_a_cancelled_receive_leaves_the_stream_usable() -> None:
    async with _pair() as (stream, console):
        with anyio.move_on_after(0.1):
            await stream.receive()
        console.send(b"later")
        with anyio.fail_after(5):
            assert await stream.receive() == b"later"


async def test_tcp_and_unix_connections(tmp_path: anyio.Path) -> None:
    async def echo(client: anyio.abc.ByteStream) -> None:
        async with client:
            await client.send(await client.receive())

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    path = str(tmp_path / "console.sock")
    unix = await anyio.create_unix_listener(path)
    async with tcp, unix, anyio.create_task_group() as group:
        group.start_soon(tcp.serve, echo)
        group.start_soon(unix.serve, echo)
        stream = await open_tcp("127.0.0.1", port)
        assert stream.extra(anyio.abc.SocketAttribute.remote_address) == ("127.0.0.1", port)
        await stream.send(b"over tcp")
        assert await stream.receive() == b"over tcp"
        await stream.aclose()
        stream = await open_unix(path)
        assert stream.extra(anyio.abc.SocketAttribute.remote_address, None) is None
        await stream.send(b"over unix")
        assert await stream.receive() == b"over unix"
        await stream.aclose()
        group.cancel_scope.cancel()
    with pytest.raises(OSError):
        await open_tcp("127.0.0.1", port)  # nobody listens any more
