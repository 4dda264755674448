"""The broker's WebSocket server connection: bounded before the token, and while it lives.

:class:`BrokerConnection` is websockets' :class:`~websockets.asyncio.server.ServerConnection`
with what a hostile client must not be able to get around:

* **Before the request**, it is a pending connection of the broker's
  :class:`~broker.service._gate.ConnectionGate` (refused with 503 or 429 over a cap),
  and at most ``limits.max_request_head`` bytes of request line and headers are read
  (431 past that); a request websockets cannot parse is answered 400. It stops being
  pending once its handshake is over, whichever way.
* **Reading pauses while the outgoing buffer is full**, as well as while websockets'
  own queue of received messages is (one pause, two reasons). A client that sends but
  does not read can then make the broker hold no more than one read's worth of
  automatic replies (pongs to its pings, RFC 6455 5.5.2) beyond the buffer's
  high-water mark: what it sends next waits in its own socket.
* **A client that stops reading is cut**: when the outgoing buffer, above its
  high-water mark, has not shrunk at all in ``limits.write_timeout`` seconds (the
  transport's buffer and the kernel's send queue together: a client that reads slowly
  can take longer than that to drain megabytes of the kernel's alone),
  :attr:`on_stall` is called (the session runner ends the session as
  ``client_stalled``, 4108) and the connection is aborted; a close frame could not
  reach a client that does not read. A slow client (the buffer drains, slowly) is
  never cut. A client that leaves the keepalive ping (``proxy.ping_interval``)
  unanswered for as long, which websockets then closes with 1011, ends as
  ``client_stalled`` too.

With client certificates (``tls.client_ca``), the listener accepts plain TCP and each
connection starts TLS itself, so that a failed handshake is seen with the peer's address
(:mod:`broker.service._clientcert`): only a connection whose certificate is accepted
goes on, as if asyncio had done the handshake; one with a subject not accepted is
answered 403 before its request is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import sys
import termios
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets without its C extension
    from websockets.utils import apply_mask
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from broker.service._clientcert import NOT_ACCEPTED, ClientTLS
from broker.service._gate import (
    HEAD_TOO_LARGE,
    MALFORMED,
    ConnectionGate,
    GateRefusal,
    http_response,
)

#: The listener's name in logs and metrics.
LISTENER = "http"


@attrs.frozen
class ConnectionLimits:
    """What every :class:`BrokerConnection` of one broker is held to."""

    gate: ConnectionGate
    #: ``limits.max_request_head``.
    max_head: int
    #: ``limits.write_timeout``.
    write_timeout: float
    #: TLS with client certificates, done by each connection (None: the listener's
    #: own TLS, if any).
    client_tls: ClientTLS | None = None
    #: With worker processes: called with a connection and its whole request head (and
    #: whatever came with it) before websockets reads any of it; True when it passed the
    #: connection to another worker (:mod:`broker.service._workers`).
    pass_on: Callable[[BrokerConnection, bytes], bool] | None = None


class BrokerConnection(ServerConnection):
    """websockets' server connection with the broker's limits (see the module's notes)."""

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server,
        *,
        limits: ConnectionLimits,
        passed_from: tuple[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, server, **kwargs)
        self._limits = limits
        #: The client's address, for a connection another worker passed on (its TLS, if
        #: any, done there); None for one accepted here.
        self.passed_from = passed_from
        #: The request head read so far, while it may still be passed to another worker.
        self._head: bytearray | None = (
            bytearray() if limits.pass_on is not None and passed_from is None else None
        )
        #: The data path's frame tracking (:meth:`_frames_received`): bytes of the frame
        #: websockets is parsing still to give it, the start of a header split between
        #: reads, whether a fragmented message is under way; the largest message.
        self._to_websockets = 0
        self._partial_header = b""
        #: A binary frame arriving over several reads: its bytes, how many came, the
        #: size of its header.
        self._gathering: bytearray | None = None
        self._gathered = self._gathered_header = 0
        self._fragmented = False
        #: Whether the last buffer :meth:`get_buffer` gave was a gathered frame's rest.
        self._into_gathering = False
        most = protocol.max_message_size
        self._max_size = most if most is not None else 1 << 62
        self._peer = "?"
        self._pending = False
        self._refused = False
        self._head_bytes = 0
        #: Why reading is paused now: ``queue`` (websockets' own), ``write`` (ours).
        self._paused_for: set[str] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        #: True once the client was cut for not reading.
        self.stalled = False
        #: Called once, before a client that stopped reading is cut.
        self.on_stall: Callable[[], None] | None = None
        #: While a session's bytes are spliced (:mod:`broker.service._splice`): where
        #: whole binary messages go, and who is told when the client's buffer fills.
        self.splice: ClientSplice | None = None

    # --- TLS with client certificates ----------------------------------------------------

    @property
    def remote_address(self) -> Any:
        if self.passed_from is not None:
            return self.passed_from
        return super().remote_address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._limits.client_tls
        if tls is None or self.passed_from is not None:
            self._connected(transport)
            return
        raw = cast(asyncio.Transport, transport)
        # Nothing should be read before start_tls takes the transport over. uvloop starts
        # reading after connection_made whatever it did, so what arrives meanwhile (the
        # ClientHello) is kept by a protocol of its own and handed to TLS (_Preface).
        preface = _Preface(raw)
        raw.set_protocol(preface)
        raw.pause_reading()
        task = asyncio.get_running_loop().create_task(self._start_tls(raw, tls, preface))
        _handshakes.add(task)
        task.add_done_callback(_handshakes.discard)

    async def _start_tls(self, raw: asyncio.Transport, tls: ClientTLS, preface: _Preface) -> None:
        """The TLS handshake and the client certificate's check; then, if accepted, the
        connection as asyncio would have made it, with what arrived meanwhile."""
        peername = raw.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        if preface.lost or preface.eof:
            raw.abort()
            return
        held = _Held()
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(loop.start_tls(
            raw, held, tls.context, server_side=True,
            ssl_handshake_timeout=tls.handshake_timeout,
            ssl_shutdown_timeout=tls.shutdown_timeout,
        ))
        # start_tls's first step (the next callback) stops reading, sets the TLS protocol
        # and schedules its connection_made, then the resumption of reading; what the
        # preface read until then goes to TLS right after those, before anything more
        # can be read.
        loop.call_soon(loop.call_soon, preface.hand_over)
        try:
            transport = await starting
        except OSError as exc:  # ssl.SSLError, a timeout, a connection lost
            tls.certificates.handshake_failed(exc, LISTENER, peer)
            raw.abort()
            return
        if transport is None or held.lost:  # gone as the handshake ended
            raw.abort()
            return
        reason = tls.certificates.check(transport.get_extra_info("ssl_object"))
        if reason is not None:
            tls.certificates.refused(LISTENER, peer, reason)
            transport.write(http_response(403, NOT_ACCEPTED))
            transport.close()
            return
        transport.set_protocol(self)
        self._connected(transport)
        held.successor = self
        for data in held.data:
            self.data_received(data)
        if held.eof:
            self.eof_received()

    # --- before the request ------------------------------------------------------------

    def _connected(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Reads into the broker's buffers (get_buffer): the transport is given a buffered
        # protocol of the connection's own. uvloop reads into buffers only for a protocol
        # that is not also an asyncio.Protocol, as websockets' connection is.
        cast(asyncio.Transport, transport).set_protocol(_BufferedReads(self))
        self.recv_messages.pause = lambda: self._pause_reading("queue")
        self.recv_messages.resume = lambda: self._resume_reading("queue")
        peer = self.passed_from or transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        refusal = self._limits.gate.enter(self._peer, LISTENER)
        if refusal is not None:
            self._refuse(refusal)
        else:
            self._pending = True

    def _refuse(self, refusal: GateRefusal) -> None:
        self._refused = True
        self.transport.write(http_response(refusal.status, refusal.text))
        self.transport.close()

    def _leave(self) -> None:
        if self._pending:
            self._pending = False
            self._limits.gate.leave(self._peer, LISTENER)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._leave()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.request is None:  # a client sends nothing after its head before the 101
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_head:
                self._limits.gate.refused(HEAD_TOO_LARGE, LISTENER)
                self._refuse(HEAD_TOO_LARGE)
                return
            if self._head is not None:
                self._head += data
                if b"\r\n\r\n" not in self._head:
                    return
                data, self._head = bytes(self._head), None
                assert self._limits.pass_on is not None
                if self._limits.pass_on(self, data):
                    return
        elif self.protocol.state is OPEN:
            self._frames_received(memoryview(data))
            return
        super().data_received(data)

    # --- the data path: binary frames both ways without websockets' copies -------------

    # The transport reads into the broker's buffers (through _BufferedReads, an asyncio
    # BufferedProtocol, which uvloop and asyncio's loop both honour): the thread's one
    # read buffer, which every
    # connection shares (a read is handled whole before the loop reads anything else,
    # and nothing keeps a view of it), or the rest of a binary frame being gathered when
    # it is at least as large, read straight into place. A smaller rest is read with what
    # follows it, in one read, and copied (with 64 KiB messages: one read and one write
    # for every four messages). Before the WebSocket is open and after it closes, what is
    # read goes to data_received as bytes, as always.

    def get_buffer(self, sizehint: int) -> memoryview:
        gathering = self._gathering
        if (
            gathering is not None
            and len(gathering) - self._gathered >= _READ_SIZE
            and self.protocol.state is OPEN
        ):  # a large frame's rest: one read of its own, no copy
            self._into_gathering = True
            return memoryview(gathering)[self._gathered :]
        self._into_gathering = False
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_gathering:
            self._gathered += nbytes
            if self._gathered == len(self._gathering or b""):
                self._gathered_whole()
            self._flush_splice()
            return
        view = _read_buffer()[:nbytes]
        if self.request is not None and self.protocol.state is OPEN and not self._refused:
            self._frames_received(view)
        else:
            self.data_received(bytes(view))

    def _gathered_whole(self) -> None:
        buffer = self._gathering
        assert buffer is not None
        self._gathering = None
        self._binary_message(memoryview(buffer), 0, self._gathered_header, len(buffer))

    def _flush_splice(self) -> None:
        if self.splice is not None:
            self.splice.flush()

    def _frames_received(self, view: memoryview) -> None:
        """Split what arrived into frames: a masked binary frame that is a message of its
        own (FIN, no extension bits, within ``max_size``, no fragmented message under
        way) is unmasked into websockets' queue of received messages, as websockets
        itself would put it (or to the splice): straight out of *view* when it arrived
        whole (one copy), else gathered in a buffer of its size, its rest read straight
        into place. Every other frame (text, fragments, control frames, anything
        malformed) goes to websockets, which handles it as always. Frame boundaries are
        tracked here, so websockets is only ever fed from the start of a frame. *view*
        is not kept: it may be the read buffer."""
        size = len(view)
        pos = 0
        if self._to_websockets:  # the rest of a frame websockets got the start of
            taken = min(self._to_websockets, size)
            super().data_received(bytes(view[:taken]))
            self._to_websockets -= taken
            pos = taken
        elif self._gathering is not None:  # the rest of a binary frame being gathered
            buffer = self._gathering
            taken = min(len(buffer) - self._gathered, size)
            buffer[self._gathered : self._gathered + taken] = view[:taken]
            self._gathered += taken
            pos = taken
            if self._gathered < len(buffer):
                return
            self._gathered_whole()
        if self._partial_header and pos < size:
            view = memoryview(self._partial_header + bytes(view[pos:]))
            size, pos = len(view), 0
            self._partial_header = b""
        while pos < size:
            if self.protocol.state is not OPEN:  # closing: websockets takes the rest
                super().data_received(bytes(view[pos:]))
                break
            header = _frame_header(view, pos, size)
            if header is None:  # a header split between reads
                self._partial_header = bytes(view[pos:])
                break
            first, header_size, length = header
            end = pos + header_size + length
            if (
                first == _BINARY_FIN
                and header_size >= 6  # masked (RFC 6455 5.3: a client masks every frame)
                and length <= self._max_size
                and not self._fragmented
            ):
                if end > size:  # the rest comes with the next reads, straight into place
                    self._gathering = bytearray(end - pos)
                    self._gathering[: size - pos] = view[pos:]
                    self._gathered, self._gathered_header = size - pos, header_size
                    break
                self._binary_message(view, pos, header_size, end)
                pos = end
                continue
            opcode = first & 0x0F
            if opcode in (1, 2):
                self._fragmented = not first & 0x80
            elif opcode == 0 and first & 0x80:
                self._fragmented = False
            taken = min(end, size)
            super().data_received(bytes(view[pos:taken]))
            self._to_websockets = end - taken
            pos = taken
        self._flush_splice()

    def _binary_message(self, view: memoryview, pos: int, header_size: int, end: int) -> None:
        """The masked binary frame in *view* from *pos* to *end*, unmasked, as a message:
        to the splice when one is attached and no message waits before it in websockets'
        queue (order is kept), else into that queue."""
        start = pos + header_size
        payload = apply_mask(view[start:end], bytes(view[start - 4 : start]))  # the mask key
        splice = self.splice
        if splice is not None and not len(self.recv_messages.frames):
            splice.from_client(payload)
        else:
            self.recv_messages.put(Frame(Opcode.BINARY, payload))

    def write_binary(self, data: bytes | memoryview) -> bool:
        """Write *data* as one binary message now, without waiting (the caller keeps to
        the flow control: :attr:`paused`, or a splice's ``client_full``); False, with
        nothing written, when the connection is no longer open. The header is written
        beside the payload, which is not copied on uvloop (a vectored write) and copied
        once on asyncio's loop (its ``writelines`` joins)."""
        transport = self.transport
        if self.protocol.state is not OPEN or transport.is_closing():
            return False
        size = len(data)
        if size < 126:
            header = bytes((_BINARY_FIN, size))
        elif size < 65536:
            header = _HEADER_16.pack(_BINARY_FIN, 126, size)
        else:
            header = _HEADER_64.pack(_BINARY_FIN, 127, size)
        if size < _JOIN_BELOW:
            transport.write(header + data)
        else:
            transport.writelines((header, data))
        return True

    async def send_binary(self, data: bytes) -> None:
        """Send *data* as one binary message, as ``send`` does (the same flow control and
        errors) without building a websockets frame (:meth:`write_binary`)."""
        if not self.write_binary(data):
            await self.send(data)  # raises ConnectionClosed as websockets does
            return
        if self.paused:
            await self.drain()

    # --- the splice ----------------------------------------------------------------------

    def pause_for_console(self) -> None:
        """Stop reading from the client while the spliced console takes no more."""
        self._pause_reading("console")

    def resume_for_console(self) -> None:
        """Read from the client again: the spliced console drained."""
        self._resume_reading("console")

    def detach(self) -> asyncio.Transport:
        """Let go of the connection (passed to another worker): websockets sees it end
        before its request, quietly, and nothing more is written or closed; returns the
        transport, now without a protocol of its own."""
        transport = self.transport
        transport.pause_reading()  # what comes next stays in the socket, for the owner
        transport.set_protocol(_Detached())
        self.transport = _NullTransport(transport)
        self.connection_lost(None)
        return transport

    def send_data(self) -> None:
        """websockets ends a request it cannot parse (a body, a chunked request, a protocol
        other than HTTP/1.1) with the connection and no answer; answer 400 first."""
        problem = self.protocol.handshake_exc
        if (
            self.request is None
            and isinstance(problem, InvalidMessage)
            and not isinstance(problem.__cause__, EOFError)  # the client left: nobody to tell
            and not self._refused
        ):
            self._refused = True
            self._limits.gate.refused(MALFORMED, LISTENER)
            self.transport.write(http_response(MALFORMED.status, MALFORMED.text))
        super().send_data()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if _keepalive_failed(self) and not self.stalled:
            self._stall()  # no pong in time: a client that stopped reading, too
        super().connection_lost(exc)

    # --- flow control --------------------------------------------------------------------

    def _pause_reading(self, why: str) -> None:
        if not self._paused_for:
            self.transport.pause_reading()
        self._paused_for.add(why)

    def _resume_reading(self, why: str) -> None:
        self._paused_for.discard(why)
        if not self._paused_for and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._pause_reading("write")
        self._watch_drain(self._unsent())
        if self.splice is not None:
            self.splice.client_full()

    def _watch_drain(self, buffered: int) -> None:
        self._stall_timer = self.loop.call_later(
            self._limits.write_timeout, self._check_drain, buffered
        )

    def _unsent(self) -> int:
        """Bytes written and not yet taken by the client: the transport's buffer and the
        kernel's send queue (sent and not acknowledged, or not sent), which on loopback
        or a fast link holds megabytes: a client reading slowly may drain the kernel's
        part for longer than ``write_timeout`` before the transport's buffer moves."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None and _OUTQ is not None:
            with contextlib.suppress(OSError, ValueError):
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
        return unsent

    def _check_drain(self, buffered: int) -> None:
        """Still above the high-water mark after ``write_timeout``: a client whose buffer
        (the transport's and the kernel's) shrank meanwhile is slow, not stalled (nothing
        is added while writing is paused but small control frames); one whose buffer did
        not is cut."""
        now = self._unsent()
        if now < buffered:
            self._watch_drain(now)
        else:
            self._stalled()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._resume_reading("write")
        if self.splice is not None:
            self.splice.client_drained()

    def _stalled(self) -> None:
        self._stall_timer = None
        self._stall()
        self.transport.abort()

    def _stall(self) -> None:
        self.stalled = True
        if self.on_stall is not None:
            self.on_stall()


class ClientSplice(Protocol):
    """What a connection tells the splice its messages go to (:mod:`broker.service._splice`)."""

    def from_client(self, payload: bytes) -> None: ...

    def flush(self) -> None: ...

    def client_full(self) -> None: ...

    def client_drained(self) -> None: ...


class _BufferedReads(asyncio.BufferedProtocol):
    """A connection's transport's protocol: reads into the buffers the connection gives
    (:meth:`BrokerConnection.get_buffer`), everything else passed on to it."""

    __slots__ = ("connection",)

    def __init__(self, connection: BrokerConnection) -> None:
        self.connection = connection

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.connection.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.connection.buffer_updated(nbytes)

    def eof_received(self) -> None:
        self.connection.eof_received()  # None: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose connection moved on: ignores what it is told."""


class _NullTransport(asyncio.Transport):
    """What a detached connection writes to and closes: nothing (its real transport is
    someone else's now)."""

    def __init__(self, real: asyncio.Transport) -> None:
        super().__init__()
        self._info = {"peername": real.get_extra_info("peername"),
                      "sockname": real.get_extra_info("sockname")}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._info.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Preface(asyncio.Protocol):
    """The raw transport's protocol until start_tls takes it over: keeps what arrives
    (uvloop reads once connection_made returns, even paused) and reads no more."""

    def __init__(self, raw: asyncio.Transport) -> None:
        self.raw = raw
        self.data = bytearray()
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.raw.pause_reading()

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self) -> None:
        """Give what was read to the protocol that has the transport now (TLS's)."""
        protocol = self.raw.get_protocol()
        if not self.data or protocol is self or self.raw.is_closing():
            return
        data = bytes(self.data)
        self.data.clear()
        if not hasattr(protocol, "buffer_updated"):  # TLS's is a buffered protocol
            cast(asyncio.Protocol, protocol).data_received(data)
            return
        buffered = cast(asyncio.BufferedProtocol, protocol)
        view = memoryview(data)
        while view:
            buffer = memoryview(buffered.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            buffered.buffer_updated(size)
            view = view[size:]


class _Held(asyncio.Protocol):
    """What the TLS layer delivers before the connection takes it over: the handshake
    may end with the request's first bytes, an end of file or a lost connection (whose
    call, scheduled before the takeover, is passed on to the *successor*)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.successor: asyncio.Protocol | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.successor is not None:
            self.successor.connection_lost(exc)


#: The ioctl that reads a socket's send queue (Linux's SIOCOUTQ); None elsewhere.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None

#: The size of the read buffer: as much as asyncio's loop reads at once.
_READ_SIZE = 1024 * 1024
_local = threading.local()


def _read_buffer() -> memoryview:
    """The read buffer of the calling thread's event loop (see :meth:`get_buffer`)."""
    try:
        view: memoryview = _local.read_buffer
    except AttributeError:
        view = _local.read_buffer = memoryview(bytearray(_READ_SIZE))
    return view

#: FIN and the binary opcode: the first byte of a whole binary message's frame.
_BINARY_FIN = 0x82
_HEADER_2 = struct.Struct("!BB")
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
#: Below this many bytes a message and its header are joined into one write (one
#: segment on the wire); at and above it they are written side by side.
_JOIN_BELOW = 16 * 1024


def _frame_header(view: memoryview, pos: int, size: int) -> tuple[int, int, int] | None:
    """The frame header at *pos* in *view*: (first byte, header size with the mask,
    payload length); None when *view* ends before it does."""
    if size - pos < 2:
        return None
    first, second = _HEADER_2.unpack_from(view, pos)
    length = second & 0x7F
    header_size = 2
    if length == 126:
        header_size = 4
    elif length == 127:
        header_size = 10
    if second & 0x80:
        header_size += 4
    if size - pos < header_size:
        return None
    if length == 126:
        length = _LENGTH_16.unpack_from(view, pos + 2)[0]
    elif length == 127:
        length = _LENGTH_64.unpack_from(view, pos + 2)[0]
    return first, header_size, length


#: The TLS handshakes under way (a task the loop alone holds may be collected).
_handshakes: set[asyncio.Task[None]] = set()


def _keepalive_failed(connection: ServerConnection) -> bool:
    """Whether websockets closed *connection* because its keepalive ping got no pong
    within ``ping_timeout`` (it fails the connection with 1011 and this reason)."""
    sent = connection.protocol.close_sent
    return sent is not None and sent.code == 1011 and sent.reason == "keepalive ping timeout"
