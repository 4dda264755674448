"""The broker as RFB server: the handshake with the VNC client (noVNC).

The broker offers RFB 3.8 and the None security type only: the console token
already authenticated the user, and the VM's own VNC secret never reaches the
client. Usage::

    server = RFBServer()                 # its ProtocolVersion is in data_to_send()
    while True:
        ws.send(server.data_to_send())
        event = server.next_event()
        if event is NEED_DATA:
            server.receive_data(ws.recv())
        elif isinstance(event, HandshakeRejected):
            ws.send(server.data_to_send()); ws.close(); return
        elif isinstance(event, ClientInit):
            server.send_server_init(upstream_server_init)
            ws.send(server.data_to_send())
            break
    forward = flt.filter_data(server.take_trailing_data())  # usually b""
"""

from __future__ import annotations

from collections import deque

from ._buffer import ReceiveBuffer
from ._errors import RFBProtocolError, RFBUsageError, Side
from ._events import (
    NEED_DATA,
    ClientInit,
    Event,
    HandshakeRejected,
    NeedData,
    SecurityTypeSelected,
    ServerInit,
    VersionNegotiated,
)
from ._state import DOWNSTREAM_TRANSITIONS, DownstreamState, Machine
from ._wire import U8, U32, VERSION_LENGTH, SecurityType, parse_version, version_message

_S = DownstreamState
_NONE = int(SecurityType.NONE)
_OFFERED = (_NONE,)


class RFBServer:
    """The RFB server handshake, from ProtocolVersion to ServerInit (sans-I/O).

    Accepts clients speaking RFB 3.3 (also 3.4/3.5, read as 3.3), 3.7 and 3.8.
    Events, in order: :class:`VersionNegotiated`, :class:`SecurityTypeSelected`,
    :class:`ClientInit`, then (after :meth:`send_server_init`) nothing more:
    further client bytes belong to the :class:`ClientMessageFilter`.
    :class:`HandshakeRejected` follows :meth:`reject`. Errors:
    :class:`RFBProtocolError` (``side`` CLIENT), :class:`RFBUsageError`.
    """

    def __init__(self) -> None:
        self._machine = Machine(DOWNSTREAM_TRANSITIONS, _S.PROTOCOL_VERSION, _S.FAILED)
        self._buffer = ReceiveBuffer()
        self._out = bytearray(version_message((3, 8)))
        self._events: deque[Event] = deque()
        self._version = (0, 0)
        self._reject_reason: str | None = None

    def __repr__(self) -> str:
        return f"<RFBServer {self.state.name}>"

    @property
    def state(self) -> DownstreamState:
        return self._machine.state

    @property
    def version(self) -> tuple[int, int] | None:
        """The RFB version in use, once the client sent its own."""
        return self._version if self._version != (0, 0) else None

    @property
    def can_reject(self) -> bool:
        """Whether :meth:`reject` may still be called (until the client's
        security type is answered)."""
        return self.state in (_S.PROTOCOL_VERSION, _S.SECURITY_CHOICE)

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> None:
        """Feed bytes from the client; ``None`` means the client closed (as in
        wsproto; ``b""`` is just no data)."""
        if data is not None and not data:
            return
        if self.state is _S.CONNECTED:
            raise RFBUsageError("the handshake is done: feed client data to the filter")
        if self.state is _S.FAILED:
            raise RFBUsageError("the handshake failed; this RFBServer is unusable")
        if self.state is _S.REJECTED:
            return  # the connection is being closed; whatever comes is moot
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now (possibly empty); clears them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | NeedData:
        """The next handshake event, or :data:`NEED_DATA`."""
        if self._events:
            return self._events.popleft()
        state = self.state
        if state is _S.FAILED:
            raise RFBUsageError("the handshake failed; this RFBServer is unusable")
        if state in (_S.SERVER_INIT, _S.CONNECTED, _S.REJECTED):
            return NEED_DATA
        try:
            if state is _S.PROTOCOL_VERSION:
                self._read_version()
            elif state is _S.SECURITY_CHOICE:
                self._read_security_choice()
            else:
                self._read_client_init()
        except RFBProtocolError:
            self._machine.fail()
            raise
        if self._events:
            return self._events.popleft()
        if self._buffer.eof:
            self._machine.fail()
            raise RFBProtocolError(f"closed the connection while {state.value}", side=Side.CLIENT)
        return NEED_DATA

    def reject(self, reason: str) -> None:
        """Refuse the client, with *reason* where its RFB version has room for
        one: a failed connection (3.3, 3.7, 3.8) if the client's version has not
        been answered yet, else a failed SecurityResult (3.8) or a bare close
        (3.7). The refusal goes out as soon as possible; :class:`HandshakeRejected`
        follows. Call it when the server side failed, e.g. with the
        :class:`RFBSecurityError`'s reason."""
        if not self.can_reject:
            raise RFBUsageError(f"too late to reject the client (state {self.state.name})")
        if self.state is _S.PROTOCOL_VERSION:
            self._reject_reason = reason  # sent once the client's version is known
        else:
            if self._version >= (3, 8):
                self._out += U32.pack(1) + _string(reason)
            self._machine.advance("rejected")
            self._events.append(HandshakeRejected(reason))

    def send_server_init(self, init: ServerInit) -> None:
        """Send *init* (normally the server's, from RFBClient) after :class:`ClientInit`."""
        if self.state is not _S.SERVER_INIT:
            raise RFBUsageError(f"send_server_init() before ClientInit (state {self.state.name})")
        self._out += init.to_bytes()
        self._machine.advance("sent")

    def take_trailing_data(self) -> bytes:
        """After :class:`ClientInit`: the client's bytes already received beyond
        it, the start of its message stream (for the ClientMessageFilter)."""
        if self.state not in (_S.SERVER_INIT, _S.CONNECTED):
            raise RFBUsageError("take_trailing_data() before ClientInit")
        return self._buffer.take_all()

    # --- readers -------------------------------------------------------------

    def _read_version(self) -> None:
        data = self._buffer.take(VERSION_LENGTH)
        if data is None:
            return
        offered = parse_version(data)
        if offered is None:
            raise RFBProtocolError(f"malformed ProtocolVersion {data!r}", side=Side.CLIENT)
        major, minor = offered
        if major == 3 and minor in (3, 4, 5):  # 3.4, 3.5: misreported 3.3 (RFC 6143 7.1.1)
            version = (3, 3)
        elif major == 3 and minor in (7, 8):
            version = (3, minor)
        else:
            raise RFBProtocolError(f"unsupported RFB version {major}.{minor}", side=Side.CLIENT)
        self._version = version
        self._events.append(VersionNegotiated(offered, version))
        if self._reject_reason is not None:
            # A failed connection: no security types, then the reason (RFC 6143 7.1.2).
            failed = U32.pack(0) if version == (3, 3) else U8.pack(0)
            self._out += failed + _string(self._reject_reason)
            self._machine.advance("rejected")
            self._events.append(HandshakeRejected(self._reject_reason))
        elif version == (3, 3):
            self._out += U32.pack(_NONE)
            self._machine.advance("rfb-3.3")
            self._events.append(SecurityTypeSelected(_NONE, _OFFERED))
        else:
            self._out += U8.pack(len(_OFFERED)) + bytes(_OFFERED)
            self._machine.advance(f"rfb-3.{minor}")

    def _read_security_choice(self) -> None:
        data = self._buffer.take(1)
        if data is None:
            return
        if data[0] != _NONE:
            raise RFBProtocolError(
                f"chose security type {data[0]}, which was not offered", side=Side.CLIENT
            )
        if self._version >= (3, 8):
            self._out += U32.pack(0)  # SecurityResult OK
        self._machine.advance("none")
        self._events.append(SecurityTypeSelected(_NONE, _OFFERED))

    def _read_client_init(self) -> None:
        data = self._buffer.take(1)
        if data is None:
            return
        self._machine.advance("read")
        self._events.append(ClientInit(data[0] != 0))


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return U32.pack(len(data)) + data
