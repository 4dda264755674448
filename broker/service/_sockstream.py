"""The console end of a session on a socket (fd, tcp, tls and unix endpoints), for speed.

anyio's own socket stream pauses the transport's reading after every ``receive`` and
resumes it before the next one: two ``epoll_ctl`` calls and more event-loop iterations
per message, which was measured as about half of the latency the broker adds on top of
websockify's (docs/benchmarks.md). :class:`SocketConsole` is an anyio
:class:`~anyio.abc.ByteStream` over an asyncio protocol that keeps reading while it has
room, with the same bounds both ways:

* reading: the chunks the transport reads are queued as they are (no copy); once more
  than :data:`READ_LIMIT` bytes wait, the transport stops reading until the consumer
  has taken them below half of it. Nothing is read from the console faster than the
  session passes it on.
* writing: ``send`` hands the bytes to the transport (which sends at once what the
  socket takes) and waits only while the transport's buffer is above
  :data:`WRITE_HIGH` (asyncio's ``pause_writing``/``resume_writing``).

It runs on anyio's asyncio backend (the broker's), on either event loop: asyncio's own
or uvloop (whose transports are not subclasses of :class:`asyncio.Transport`, but
behave as one).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

#: Bytes read from the console and not yet taken before the transport stops reading.
READ_LIMIT = 512 * 1024
#: Bytes waiting in the transport's write buffer above which ``send`` waits.
WRITE_HIGH = 256 * 1024


class _ConsoleProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.reading_paused = False
        self.eof = False
        self.lost: BaseException | None = None
        self.closed = False
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        #: While a session's bytes are spliced (:mod:`broker.service._splice`): what is
        #: read goes there as it arrives instead of into :attr:`chunks`.
        self.splice: ConsoleSplice | None = None

    # --- the transport's calls --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.splice is not None:
            self.splice.from_console(data)
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_LIMIT and not self.reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        if self.splice is not None:
            self.splice.console_ended()
        return False  # close the transport: a console that stops sending is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake_reader()
        self._wake_writer()
        if self.splice is not None:
            self.splice.console_ended()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
        if self.splice is not None:
            self.splice.console_full()

    def resume_writing(self) -> None:
        self._wake_writer()
        if self.splice is not None:
            self.splice.console_drained()

    # --- the stream's waits -----------------------------------------------------------

    def _wake_reader(self) -> None:
        waiter, self._readable = self._readable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readable(self) -> None:
        if self._readable is not None:
            raise anyio.BusyResourceError("receiving")
        self._readable = asyncio.get_running_loop().create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    async def writable(self) -> None:
        waiter = self._writable
        if waiter is not None:
            await asyncio.shield(waiter)

    def failed(self) -> bool:
        return self.closed and self.lost is not None

    def taken(self, size: int) -> None:
        self.buffered -= size
        if self.reading_paused and self.buffered <= READ_LIMIT // 2 and not self.closed:
            assert self.transport is not None
            self.transport.resume_reading()
            self.reading_paused = False


class ConsoleSplice(Protocol):
    """What a console socket tells the splice its bytes go to (:mod:`broker.service._splice`)."""

    def from_console(self, data: bytes) -> None: ...

    def console_ended(self) -> None: ...

    def console_full(self) -> None: ...

    def console_drained(self) -> None: ...


class SocketConsole(anyio.abc.ByteStream):
    """A connected console socket (see the module's notes); from the ``open_*`` functions."""

    def __init__(self, transport: asyncio.Transport, protocol: _ConsoleProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False

    @property
    def transport(self) -> asyncio.Transport:
        """The socket's transport (for :mod:`broker.service._splice`)."""
        return self._transport

    @property
    def protocol(self) -> _ConsoleProtocol:
        """The socket's protocol (for :mod:`broker.service._splice`)."""
        return self._protocol

    async def receive(self, max_bytes: int = 65536) -> bytes:
        protocol = self._protocol
        if self._closing:
            raise anyio.ClosedResourceError
        if not protocol.chunks:
            if not protocol.eof and not protocol.closed:
                await protocol.readable()
            if not protocol.chunks:
                if self._closing:
                    raise anyio.ClosedResourceError
                if protocol.lost is not None:
                    raise anyio.BrokenResourceError from protocol.lost
                raise anyio.EndOfStream
        chunk = protocol.chunks.popleft()
        if len(chunk) > max_bytes:
            protocol.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        protocol.taken(len(chunk))
        return chunk

    async def send(self, item: bytes) -> None:
        protocol = self._protocol
        if self._closing:
            raise anyio.ClosedResourceError
        if protocol.closed or self._transport.is_closing():
            raise anyio.BrokenResourceError from protocol.lost
        self._transport.write(item)
        await protocol.writable()
        if protocol.failed():  # the connection broke while the buffer drained
            raise anyio.BrokenResourceError from protocol.lost

    async def send_eof(self) -> None:
        if self._transport.can_write_eof():
            self._transport.write_eof()

    async def aclose(self) -> None:
        self._closing = True
        self._transport.close()
        self._protocol._wake_reader()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        info = self._transport.get_extra_info
        attributes: dict[Any, Callable[[], Any]] = {
            SocketAttribute.raw_socket: lambda: info("socket"),
            SocketAttribute.local_address: lambda: info("sockname"),
        }
        sock = info("socket")
        if sock is not None:
            attributes[SocketAttribute.family] = lambda: sock.family
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                attributes[SocketAttribute.remote_address] = lambda: info("peername")
        return attributes


async def _connected(
    opening: Callable[[Callable[[], _ConsoleProtocol]], Any],
) -> SocketConsole:
    transport, protocol = await opening(_ConsoleProtocol)
    return SocketConsole(transport, protocol)


async def open_tcp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> SocketConsole:
    """A TCP connection to a console; with *ssl_context*, TLS, the certificate verified
    as the context says (for *server_hostname*, else *host*, where it checks names)."""
    loop = asyncio.get_running_loop()
    if ssl_context is None:
        return await _connected(lambda factory: loop.create_connection(factory, host, port))
    return await _connected(
        lambda factory: loop.create_connection(
            factory, host, port, ssl=ssl_context, server_hostname=server_hostname or host
        )
    )


async def open_unix(path: str) -> SocketConsole:
    """A connection to a console's UNIX socket."""
    loop = asyncio.get_running_loop()
    return await _connected(lambda factory: loop.create_unix_connection(factory, path))


async def open_socket(sock: socket.socket) -> SocketConsole:
    """A console socket connected already (``openGraphicsFD``); closed with the stream."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    return await _connected(lambda factory: loop.create_connection(factory, sock=sock))
