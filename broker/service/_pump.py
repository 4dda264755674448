"""Moving bytes between a WebSocket client and a console, both ways, with backpressure.

Theory of operation. In the general case :func:`pump` runs two tasks in one task group:

* console -> client: ``stream.receive(read_size)`` then ``client.send(data)``;
* client -> console: ``client.receive()``, the session's filter (``to_console``), if
  any, then ``stream.send(data)``.

Each task awaits its send before it reads again, so a side that drains slowly
stops the reads from the other: nothing is read from the console faster than
the client takes it (the WebSocket send waits while the connection's write
buffer is above its high-water mark), and nothing is read from the client
faster than the console takes it (the client's frames queue up to
``max_queue`` in the WebSocket connection, which then stops reading the
socket). In flight per direction: one chunk of at most *read_size* bytes plus
the two transports' bounded buffers.

When the client is the broker's own WebSocket connection and the console the broker's
own socket stream (the fd, tcp, tls and unix endpoints), the two are spliced instead
(:mod:`broker.service._splice`): each side's read callback writes to the other side's
transport, with the same bounds, and only messages websockets queues (text,
fragmented) go through a task. Callers see no difference but the speed.

Reads are large (256 KiB by default: as much as the kernel has, in one
message) and data is passed on as the object the read returned, without
copies of its own. When either side ends, the group is cancelled: the other
task stops at once and :func:`pump` returns which side ended first.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc
import attrs

if TYPE_CHECKING:
    from broker.service._connection import BrokerConnection
    from broker.service._sockstream import SocketConsole

#: Default size of one read from the console (one WebSocket message at most).
DEFAULT_READ_SIZE = 256 * 1024


class ClientClosed(Exception):
    """The client side of a session is gone (closed, or the connection broke)."""


class MessageChannel(Protocol):
    """The client side as :func:`pump` sees it: whole messages in, bytes out."""

    async def receive(self) -> bytes:
        """The next message's payload; :class:`ClientClosed` when the client has gone."""
        ...

    async def send(self, data: bytes) -> None:
        """Send *data* as one binary message, waiting while the client is slow."""
        ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@attrs.define
class Traffic:
    """Bytes moved by one session, and when bytes last moved (``time.monotonic``).

    Plugins that move bytes themselves (a protocol handshake) call
    :meth:`count_to_client` / :meth:`count_to_console`, so that the session's
    byte counts and idle timeout stay right.
    """

    to_client: int = 0
    to_console: int = 0
    last_activity: float = attrs.field(factory=time.monotonic)
    #: Metric counters the counts also go to (set by the broker).
    client_counter: _Counter | None = attrs.field(default=None, repr=False)
    console_counter: _Counter | None = attrs.field(default=None, repr=False)

    def count_to_client(self, size: int) -> None:
        self.to_client += size
        self.last_activity = time.monotonic()
        if self.client_counter is not None:
            self.client_counter.inc(size)

    def count_to_console(self, size: int) -> None:
        self.to_console += size
        self.last_activity = time.monotonic()
        if self.console_counter is not None:
            self.console_counter.inc(size)

    def touch(self) -> None:
        """Activity that moved no bytes (input a filter dropped): not idle."""
        self.last_activity = time.monotonic()


class PumpEnd(enum.Enum):
    """Which side ended a :func:`pump`."""

    CLIENT_CLOSED = "client_closed"
    CONSOLE_CLOSED = "console_closed"


_CONSOLE_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


async def pump(
    client: MessageChannel,
    stream: anyio.abc.ByteStream,
    *,
    traffic: Traffic | None = None,
    read_size: int = DEFAULT_READ_SIZE,
    to_console: Callable[[bytes], bytes] | None = None,
) -> PumpEnd:
    """Proxy bytes between *client* and *stream* until one side ends; return which.

    *stream* is any anyio byte stream (a socket to QEMU, a libvirt console
    stream). It is not closed here: the session's owner closes both sides.
    *to_console*, if given, is called with each message from the client, in order, and
    returns the bytes to send to the console (empty: nothing; it may keep state across
    messages); an exception it raises ends the pump and is raised from it. Errors other
    than one side ending (a bug) propagate.
    """
    if read_size < 1:
        raise ValueError("read_size must be positive")
    count = traffic if traffic is not None else Traffic()
    # Here, not at the top: the splice needs the server's modules, and this module is
    # imported where only the client is installed.
    from broker.service._splice import spliceable

    pair = spliceable(client, stream)
    if pair is not None:
        return await _spliced(*pair, client, count, read_size, to_console)
    ended: list[PumpEnd] = []
    failure: list[Exception] = []

    async def console_to_client(scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await stream.receive(read_size)
                count.count_to_client(len(data))
                await client.send(data)
        except _CONSOLE_ERRORS:
            ended.append(PumpEnd.CONSOLE_CLOSED)
        except ClientClosed:
            ended.append(PumpEnd.CLIENT_CLOSED)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(console_to_client, group.cancel_scope)
        group.start_soon(_client_to_console, client, stream, count, to_console, ended,
                         failure, group.cancel_scope)
    if failure:
        raise failure[0]
    return ended[0] if ended else PumpEnd.CONSOLE_CLOSED


async def _client_to_console(
    client: MessageChannel,
    stream: anyio.abc.ByteStream,
    count: Traffic,
    to_console: Callable[[bytes], bytes] | None,
    ended: list[PumpEnd],
    failure: list[Exception],
    scope: anyio.CancelScope,
) -> None:
    """The client's messages to the console, one at a time, until either side ends or
    *to_console* raises (kept in *failure*)."""
    try:
        while True:
            payload = await client.receive()
            if to_console is None:
                data = payload
            else:
                try:
                    data = to_console(payload)
                except Exception as exc:  # the filter refused the client's bytes
                    failure.append(exc)
                    break
            if data:
                count.count_to_console(len(data))
                await stream.send(data)
            elif payload:  # input a filter dropped (view-only) is still the user at work
                count.touch()
    except ClientClosed:
        ended.append(PumpEnd.CLIENT_CLOSED)
    except _CONSOLE_ERRORS:
        ended.append(PumpEnd.CONSOLE_CLOSED)
    scope.cancel()


async def _spliced(
    connection: BrokerConnection,
    console: SocketConsole,
    client: MessageChannel,
    count: Traffic,
    read_size: int,
    to_console: Callable[[bytes], bytes] | None,
) -> PumpEnd:
    """:func:`pump` with the two sockets spliced (:mod:`broker.service._splice`): this
    task takes the messages that still come through the connection's queue, and the
    splice's end cancels it (no task of its own: idle sessions are many)."""
    from broker.service._splice import Splice

    ended: list[PumpEnd] = []
    failure: list[Exception] = []
    with anyio.CancelScope() as scope:
        splice = Splice(
            connection, console,
            count_to_client=count.count_to_client, count_to_console=count.count_to_console,
            touch=count.touch, read_size=read_size, to_console=to_console,
            on_end=scope.cancel,
        )
        try:
            splice.attach()
            await _client_to_console(client, console, count, to_console, ended, failure, scope)
        finally:
            splice.detach()
    if failure:
        raise failure[0]
    if splice.error is not None:
        raise splice.error
    if ended:
        return ended[0]
    return PumpEnd.CLIENT_CLOSED if splice.client_gone else PumpEnd.CONSOLE_CLOSED
