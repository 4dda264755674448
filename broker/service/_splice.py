"""The pump's fast case: a session's bytes moved in the read callbacks, without tasks.

When the client is a WebSocket of the broker's own listener (:class:`BrokerConnection`)
and the console a socket of the broker's own stream (:class:`SocketConsole`),
:func:`broker.service.pump` splices them: what one side's transport reads is written to
the other's transport in the same callback. A message costs no queue, no future and no
task switch; the two tasks of the general case spent most of the broker's time per
message on those (docs/benchmarks.md, "What changed, and what is left").

* **Console to client.** Each read is written as binary messages of at most
  ``read_size`` bytes (memoryview slices: no copy) with
  :meth:`BrokerConnection.write_binary`.
* **Client to console.** Each whole binary message the connection unmasks
  (:meth:`BrokerConnection._binary_message`) goes through the session's *to_console*
  filter, if any, to the console's transport: the messages one read held in one
  (vectored) write, once the read is handled (:meth:`Splice.flush`). A message that
  websockets handles (text, fragmented) still goes through its queue, and so does a
  binary message arriving while one waits there: the pump's one task takes those in
  order, so the console gets every message in the order the client sent them.
* **Backpressure both ways, as in the general case.** The console's transport above its
  high-water mark stops the reading of the client's socket until it drains (the
  connection's reading pauses for ``console``, beside its own reasons); the client's
  above ``proxy.write_buffer`` stops the reading of the console's socket. In flight per
  direction: one read and the two transports' bounded buffers. A client that stops
  reading is still cut after ``limits.write_timeout`` by the connection itself.
* **Ending.** The console's end of file or loss ends the splice as ``console_closed``;
  the client's close (websockets' close handshake, a lost connection) ends the pump's
  task as ``client_closed``; an exception from *to_console* ends it and is raised from
  :func:`pump`. :meth:`Splice.detach` (always, on the way out, cancelled or not) gives
  both sides back their usual state: bytes read after it wait in the console stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from broker.service._connection import BrokerConnection
from broker.service._sockstream import SocketConsole


class Splice:
    """One session's two sockets spliced (see the module's notes)."""

    def __init__(
        self,
        connection: BrokerConnection,
        console: SocketConsole,
        *,
        count_to_client: Callable[[int], None],
        count_to_console: Callable[[int], None],
        touch: Callable[[], None],
        read_size: int,
        to_console: Callable[[bytes], bytes] | None,
        on_end: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._console = console.protocol
        self._console_transport = console.transport
        self._count_to_client = count_to_client
        self._count_to_console = count_to_console
        self._touch = touch
        self._read_size = read_size
        self._to_console = to_console
        self._pending: list[bytes] = []  # from the client, written by flush()
        self._pending_size = 0
        #: Whether the console's transport writes a list without joining it first
        #: (uvloop's, Python 3.12's own): else a join would copy a read's worth each time.
        self._vectored = type(console.transport).writelines is not asyncio.WriteTransport.writelines
        self._console_paused = False  # the console's reading, stopped by the splice
        self._client_paused = False  # the client's reading, stopped by the splice
        self._on_end = on_end
        #: True once the splice ended (and *on_end* was called); :attr:`client_gone` /
        #: :attr:`error` say why.
        self.ended = False
        self.client_gone = False
        self.error: BaseException | None = None

    # --- attaching ----------------------------------------------------------------------

    def attach(self) -> None:
        """Start: what the console sent before is written to the client first."""
        console = self._console
        while console.chunks and not self.ended:
            chunk = console.chunks.popleft()
            console.taken(len(chunk))
            self.from_console(chunk)
        if self.ended:
            return
        if console.eof or console.closed:
            self.console_ended()
            return
        self._connection.splice = self
        console.splice = self
        if self._connection.paused:  # the client's buffer is full already
            self.client_full()

    def detach(self) -> None:
        """Stop splicing; each side as the general case expects it (what was taken from
        the client is written first)."""
        self.flush()
        if self._connection.splice is self:
            self._connection.splice = None
        if self._console.splice is self:
            self._console.splice = None
        if self._client_paused:
            self._client_paused = False
            self._connection.resume_for_console()
        if self._console_paused:
            self._console_paused = False
            if not self._console.closed and not self._console.reading_paused:
                self._console_transport.resume_reading()

    def _end(self) -> None:
        self.detach()  # which writes what was taken first
        if not self.ended:
            self.ended = True
            self._on_end()

    # --- console to client --------------------------------------------------------------

    def from_console(self, data: bytes) -> None:
        size = len(data)
        connection = self._connection
        if size <= self._read_size:
            written = connection.write_binary(data)
        else:
            view = memoryview(data)
            written = all(
                connection.write_binary(view[start : start + self._read_size])
                for start in range(0, size, self._read_size)
            )
        if not written:  # the client is closing: its task sees why
            self.client_gone = True
            self._end()
            return
        self._count_to_client(size)

    def client_full(self) -> None:
        if not self._console_paused and not self._console.closed:
            self._console_paused = True
            self._console_transport.pause_reading()

    def client_drained(self) -> None:
        if self._console_paused:
            self._console_paused = False
            if not self._console.closed:
                self._console_transport.resume_reading()

    def console_ended(self) -> None:
        self._end()

    # --- client to console --------------------------------------------------------------

    def from_client(self, payload: bytes) -> None:
        if self._to_console is not None:
            try:
                data = self._to_console(payload)
            except Exception as exc:  # the filter refused the client's bytes
                self.error = exc
                self._end()
                return
        else:
            data = payload
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
        elif payload:  # input a filter dropped (view-only) is still the user at work
            self._touch()

    def flush(self) -> None:
        """Write and count what :meth:`from_client` took from one read: one (vectored)
        write for the messages a read held, not one each."""
        pending = self._pending
        if not pending:
            return
        self._count_to_console(self._pending_size)
        if not self._console.closed:
            transport = self._console_transport
            if len(pending) > 1 and self._vectored:
                transport.writelines(pending)
            else:
                for data in pending:
                    transport.write(data)
        pending.clear()
        self._pending_size = 0

    def console_full(self) -> None:
        if not self._client_paused:
            self._client_paused = True
            self._connection.pause_for_console()

    def console_drained(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._connection.resume_for_console()


def spliceable(client: object, stream: object) -> tuple[BrokerConnection, SocketConsole] | None:
    """The connection and console to splice for a pump between *client* and *stream*:
    the core's own WebSocket channel (not a subclass or a plugin's wrapper, which may do
    more per message) on the broker's connection, and the broker's console socket."""
    from broker.service._session import WebSocketChannel  # the session module imports pump

    if type(client) is not WebSocketChannel or not isinstance(stream, SocketConsole):
        return None
    connection = client.connection
    if not isinstance(connection, BrokerConnection):
        return None
    return connection, stream


__all__ = ["Splice", "spliceable"]
