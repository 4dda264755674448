"""The broker as RFB client: the handshake with the VNC server (QEMU).

Usage (the I/O layer's loop)::

    client = RFBClient(password=secret, tls=have_tls_config)
    while True:
        event = client.next_event()
        sock.sendall(client.data_to_send())
        if event is NEED_DATA:
            client.receive_data(sock.recv(65536) or None)  # None: EOF
        elif isinstance(event, StartTLS):
            sock = wrap_tls(sock, verify=not event.anonymous)
            client.tls_established()
        elif isinstance(event, ServerInit):
            break                                      # forward raw from here on
    leftover = client.take_trailing_data()             # server bytes after ServerInit
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

from ._buffer import ReceiveBuffer
from ._des import vnc_auth_response
from ._errors import RFBProtocolError, RFBSecurityError, RFBUsageError, Side
from ._events import (
    NEED_DATA,
    Event,
    NeedData,
    PixelFormat,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    StartTLS,
    VersionNegotiated,
)
from ._state import UPSTREAM_TRANSITIONS, Machine, UpstreamState
from ._wire import (
    ANONYMOUS_SUBTYPES,
    CHALLENGE_LENGTH,
    SERVER_INIT_HEADER,
    SUPPORTED_SUBTYPES,
    U8,
    U32,
    VERSION_LENGTH,
    VNC_AUTH_SUBTYPES,
    SecurityType,
    VeNCryptSubtype,
    parse_version,
    version_message,
)

#: VeNCrypt subtypes tried by default, best first: only those with a verified
#: server certificate (X509*). Anonymous TLS (TLS*) must be asked for.
DEFAULT_VENCRYPT_SUBTYPES: Final = (VeNCryptSubtype.X509_VNC, VeNCryptSubtype.X509_NONE)
#: Default bound of the ServerInit name (QEMU sends at most 1024 bytes).
DEFAULT_MAX_NAME_LENGTH: Final = 4096
#: Default bound of a failure reason string.
DEFAULT_MAX_REASON_LENGTH: Final = 4096

_S = UpstreamState


class RFBClient:
    """The RFB client handshake, from ProtocolVersion to ServerInit (sans-I/O).

    *password* is the VNC password (``str`` is encoded as UTF-8; only the
    first 8 bytes count, as in every VNC implementation); without one, VNC
    authentication is never chosen. *shared* is the ClientInit shared flag
    the broker sends. *tls* says the I/O layer can run TLS when told to
    (:class:`StartTLS`); without it VeNCrypt is never chosen.
    *vencrypt_subtypes* are the acceptable VeNCrypt subtypes, best first
    (257, 258, 260, 261 are supported; the default takes only the X509 ones).

    Preference among the server's security types (RFB 3.7+): VeNCrypt (with
    *tls*), then VNC authentication (with a password), then None.

    Events, in order: :class:`VersionNegotiated`, :class:`SecurityTypeSelected`,
    :class:`StartTLS` (VeNCrypt only), :class:`SecuritySucceeded`,
    :class:`ServerInit`. Errors: :class:`RFBProtocolError` (``side`` SERVER),
    :class:`RFBSecurityError` for refusals, :class:`RFBUsageError`.
    """

    def __init__(
        self,
        *,
        password: bytes | str | None = None,
        shared: bool = True,
        tls: bool = False,
        vencrypt_subtypes: Sequence[int] = DEFAULT_VENCRYPT_SUBTYPES,
        max_name_length: int = DEFAULT_MAX_NAME_LENGTH,
        max_reason_length: int = DEFAULT_MAX_REASON_LENGTH,
    ) -> None:
        unsupported = [s for s in vencrypt_subtypes if s not in SUPPORTED_SUBTYPES]
        if unsupported:
            raise RFBUsageError(f"VeNCrypt subtypes {unsupported} are not supported")
        self._password = password.encode() if isinstance(password, str) else password
        self._shared = shared
        self._tls = tls
        self._subtypes = tuple(
            s for s in vencrypt_subtypes if self._password is not None or s not in VNC_AUTH_SUBTYPES
        )
        self._max_name = max_name_length
        self._max_reason = max_reason_length
        self._machine = Machine(UPSTREAM_TRANSITIONS, _S.PROTOCOL_VERSION, _S.FAILED)
        self._buffer = ReceiveBuffer()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._version = (0, 0)
        self._security_type: int | None = None
        self._subtype: int | None = None
        self._server_init: ServerInit | None = None

    def __repr__(self) -> str:  # never the password
        return f"<RFBClient {self.state.name}>"

    # --- public API ------------------------------------------------------------

    @property
    def state(self) -> UpstreamState:
        return self._machine.state

    @property
    def version(self) -> tuple[int, int] | None:
        """The RFB version in use, once negotiated."""
        return self._version if self._version != (0, 0) else None

    @property
    def server_init(self) -> ServerInit | None:
        """The server's ServerInit, once the handshake is done."""
        return self._server_init

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> None:
        """Feed bytes from the server; ``None`` means the server closed (as in
        wsproto; ``b""`` is just no data)."""
        if data is not None and not data:
            return
        if self.state is _S.CONNECTED:
            raise RFBUsageError("the handshake is done: forward the server's data raw")
        if self.state is _S.FAILED:
            raise RFBUsageError("the handshake failed; this RFBClient is unusable")
        if self.state is _S.TLS_HANDSHAKE:
            raise RFBUsageError("call tls_established() before feeding decrypted data")
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """The bytes to write to the server now (possibly empty); clears them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | NeedData:
        """The next handshake event, or :data:`NEED_DATA`."""
        if self._events:
            return self._events.popleft()
        state = self.state
        if state is _S.FAILED:
            raise RFBUsageError("the handshake failed; this RFBClient is unusable")
        if state is _S.CONNECTED or state is _S.TLS_HANDSHAKE:
            return NEED_DATA
        try:
            event = _READERS[state](self)
        except RFBProtocolError:
            self._machine.fail()
            raise
        if event is NEED_DATA and self._buffer.eof:
            self._machine.fail()
            raise RFBProtocolError(f"closed the connection while {state.value}", side=Side.SERVER)
        return event

    def tls_established(self) -> None:
        """The I/O layer finished the TLS handshake :class:`StartTLS` asked for;
        from now on feed the decrypted stream."""
        if self.state is not _S.TLS_HANDSHAKE:
            raise RFBUsageError(f"tls_established() without StartTLS (state {self.state.name})")
        assert self._subtype is not None
        self._machine.advance("tls-vnc-auth" if self._subtype in VNC_AUTH_SUBTYPES else "tls-none")

    def take_trailing_data(self) -> bytes:
        """After :class:`ServerInit`: the server's bytes already received beyond it
        (the start of the raw server-to-client stream, usually empty)."""
        if self.state is not _S.CONNECTED:
            raise RFBUsageError("take_trailing_data() before the handshake is done")
        return self._buffer.take_all()

    # --- readers: one per state, each returns an event or NEED_DATA --------------

    def _error(self, message: str) -> RFBProtocolError:
        return RFBProtocolError(message, side=Side.SERVER)

    def _refused(self, reason: str) -> RFBSecurityError:
        return RFBSecurityError(reason, side=Side.SERVER)

    def _read_version(self) -> Event | NeedData:
        data = self._buffer.take(VERSION_LENGTH)
        if data is None:
            return NEED_DATA
        offered = parse_version(data)
        if offered is None:
            raise self._error(f"malformed ProtocolVersion {data!r}")
        major, minor = offered
        if major > 3 or (major == 3 and minor >= 8):
            self._version = (3, 8)
        elif major == 3 and minor == 7:
            self._version = (3, 7)
        elif major == 3 and 3 <= minor <= 6:  # e.g. 3.5, a misreported 3.3 (RFC 6143 7.1.1)
            self._version = (3, 3)
        else:
            raise self._error(f"unsupported RFB version {major}.{minor}")
        self._out += version_message(self._version)
        self._machine.advance(f"rfb-{self._version[0]}.{self._version[1]}")
        return VersionNegotiated(offered, self._version)

    def _read_security_type(self) -> Event | NeedData:
        data = self._buffer.take(4)
        if data is None:
            return NEED_DATA
        (chosen,) = U32.unpack(data)
        if chosen == SecurityType.INVALID:
            self._machine.advance("failed")
            return self._read_failure_reason()
        if chosen == SecurityType.NONE:
            self._security_type = chosen
            self._machine.advance("none")
            self._send_client_init()
            self._events.append(SecuritySucceeded(chosen))
        elif chosen == SecurityType.VNC_AUTH:
            if self._password is None:
                raise self._refused("the server requires VNC authentication; no password is set")
            self._security_type = chosen
            self._machine.advance("vnc-auth")
        else:
            raise self._error(f"RFB 3.3 security type {chosen} (only 0, 1, 2 exist)")
        return SecurityTypeSelected(chosen, (chosen,))

    def _read_security_types(self) -> Event | NeedData:
        head = self._buffer.peek(1)
        if head is None:
            return NEED_DATA
        count = head[0]
        if count == 0:
            self._buffer.take(1)
            self._machine.advance("failed")
            return self._read_failure_reason()
        data = self._buffer.take(1 + count)
        if data is None:
            return NEED_DATA
        offered = tuple(data[1:])
        if SecurityType.VENCRYPT in offered and self._tls and self._subtypes:
            chosen, step = SecurityType.VENCRYPT, "vencrypt"
        elif SecurityType.VNC_AUTH in offered and self._password is not None:
            chosen, step = SecurityType.VNC_AUTH, "vnc-auth"
        elif SecurityType.NONE in offered:
            chosen = SecurityType.NONE
            step = "none-with-result" if self._version >= (3, 8) else "none"
        else:
            raise self._refused(self._no_common_type(offered))
        self._security_type = chosen
        self._out += U8.pack(chosen)
        self._machine.advance(step)
        if step == "none":  # RFB 3.7: no SecurityResult after None
            self._send_client_init()
            self._events.append(SecuritySucceeded(int(chosen)))
        return SecurityTypeSelected(int(chosen), offered)

    def _no_common_type(self, offered: tuple[int, ...]) -> str:
        why = []
        if SecurityType.VENCRYPT in offered and not self._tls:
            why.append("VeNCrypt needs TLS configured")
        elif SecurityType.VENCRYPT in offered:
            why.append("no acceptable VeNCrypt subtype without a password")
        if SecurityType.VNC_AUTH in offered and self._password is None:
            why.append("VNC authentication needs a password")
        hint = f" ({'; '.join(why)})" if why else ""
        return f"the server offers security types {list(offered)}, none usable{hint}"

    def _read_reason(self, limit_what: str) -> str | None:
        head = self._buffer.peek(4)
        if head is None:
            return None
        (length,) = U32.unpack(head)
        if length > self._max_reason:
            raise self._error(f"{limit_what} of {length} bytes (limit {self._max_reason})")
        data = self._buffer.take(4 + length)
        if data is None:
            return None
        return data[4:].decode("utf-8", errors="replace")

    def _read_failure_reason(self) -> Event | NeedData:
        reason = self._read_reason("a connection failure reason")
        if reason is None:
            return NEED_DATA
        self._machine.advance("read")
        raise self._refused(f"the server refused the connection: {reason}")

    def _read_challenge(self) -> Event | NeedData:
        challenge = self._buffer.take(CHALLENGE_LENGTH)
        if challenge is None:
            return NEED_DATA
        assert self._password is not None
        self._out += vnc_auth_response(self._password, challenge)
        self._machine.advance("responded")
        return self.next_event()

    def _read_vencrypt_version(self) -> Event | NeedData:
        data = self._buffer.take(2)
        if data is None:
            return NEED_DATA
        if (data[0], data[1]) < (0, 2):
            raise self._refused(f"the server offers VeNCrypt {data[0]}.{data[1]}; 0.2 is needed")
        self._out += b"\x00\x02"
        self._machine.advance("0.2")
        return self.next_event()

    def _read_vencrypt_version_ack(self) -> Event | NeedData:
        data = self._buffer.take(1)
        if data is None:
            return NEED_DATA
        if data[0] != 0:
            raise self._refused("the server refused VeNCrypt version 0.2")
        self._machine.advance("accepted")
        return self.next_event()

    def _read_vencrypt_subtypes(self) -> Event | NeedData:
        head = self._buffer.peek(1)
        if head is None:
            return NEED_DATA
        count = head[0]
        if count == 0:
            raise self._refused("the server offers no VeNCrypt subtype")
        data = self._buffer.take(1 + 4 * count)
        if data is None:
            return NEED_DATA
        offered = [U32.unpack_from(data, 1 + 4 * i)[0] for i in range(count)]
        for subtype in self._subtypes:
            if subtype in offered:
                break
        else:
            raise self._refused(
                f"the server offers VeNCrypt subtypes {offered}, none of {list(self._subtypes)}"
            )
        self._subtype = subtype
        self._out += U32.pack(subtype)
        self._machine.advance("chosen")
        return self.next_event()

    def _read_vencrypt_subtype_ack(self) -> Event | NeedData:
        data = self._buffer.take(1)
        if data is None:
            return NEED_DATA
        if data[0] != 1:
            raise self._refused(f"the server refused VeNCrypt subtype {self._subtype}")
        if len(self._buffer):
            raise self._error(f"sent {len(self._buffer)} bytes before the TLS handshake")
        self._machine.advance("accepted")
        assert self._subtype is not None
        return StartTLS(self._subtype, self._subtype in ANONYMOUS_SUBTYPES)

    def _read_security_result(self) -> Event | NeedData:
        data = self._buffer.take(4)
        if data is None:
            return NEED_DATA
        (status,) = U32.unpack(data)
        if status == 0:
            self._machine.advance("ok")
            self._send_client_init()
            assert self._security_type is not None
            return SecuritySucceeded(int(self._security_type), self._subtype)
        if self._version >= (3, 8):
            self._machine.advance("failed-with-reason")
            return self._read_result_reason()
        self._machine.advance("failed")
        raise self._refused("the server refused the authentication")

    def _read_result_reason(self) -> Event | NeedData:
        reason = self._read_reason("an authentication failure reason")
        if reason is None:
            return NEED_DATA
        self._machine.advance("read")
        raise self._refused(f"the server refused the authentication: {reason}")

    def _read_server_init(self) -> Event | NeedData:
        header = self._buffer.peek(SERVER_INIT_HEADER.size)
        if header is None:
            return NEED_DATA
        width, height, pixel_format, name_length = SERVER_INIT_HEADER.unpack(header)
        if name_length > self._max_name:
            raise self._error(f"a desktop name of {name_length} bytes (limit {self._max_name})")
        data = self._buffer.take(SERVER_INIT_HEADER.size + name_length)
        if data is None:
            return NEED_DATA
        init = ServerInit(
            width, height, PixelFormat.from_bytes(pixel_format), data[SERVER_INIT_HEADER.size :]
        )
        self._server_init = init
        self._machine.advance("read")
        return init

    def _send_client_init(self) -> None:
        self._out += U8.pack(1 if self._shared else 0)


_READERS = {
    _S.PROTOCOL_VERSION: RFBClient._read_version,
    _S.SECURITY_TYPE: RFBClient._read_security_type,
    _S.SECURITY_TYPES: RFBClient._read_security_types,
    _S.FAILURE_REASON: RFBClient._read_failure_reason,
    _S.VNC_CHALLENGE: RFBClient._read_challenge,
    _S.VENCRYPT_VERSION: RFBClient._read_vencrypt_version,
    _S.VENCRYPT_VERSION_ACK: RFBClient._read_vencrypt_version_ack,
    _S.VENCRYPT_SUBTYPES: RFBClient._read_vencrypt_subtypes,
    _S.VENCRYPT_SUBTYPE_ACK: RFBClient._read_vencrypt_subtype_ack,
    _S.SECURITY_RESULT: RFBClient._read_security_result,
    _S.SECURITY_RESULT_REASON: RFBClient._read_result_reason,
    _S.SERVER_INIT: RFBClient._read_server_init,
}
