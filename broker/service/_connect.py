"""HTTP CONNECT for native clients: a sans-I/O request parser and the session handle.

Native SPICE clients (remote-viewer, anything built on libspice) reach the broker
through an HTTP proxy: one ``CONNECT host:port HTTP/1.x`` per channel connection. The
broker is that proxy; the *host* field carries a **session handle** derived from the
token, never a VM address, and the *port* says whether TLS runs inside the tunnel
(:data:`TLS_PORT`): :func:`handle_for_token` encodes the token in lower-case
base32 (GLib lower-cases the host it sends), split into DNS-sized labels;
:func:`token_for_handle` undoes it. The handle is as secret as the token.

:class:`ConnectParser` is fed bytes and returns one :class:`ConnectRequest` or
``NEED_DATA``. It reads at most :data:`MAX_HEAD` bytes of request head and at most
:data:`MAX_HEADERS` header lines; anything else is a :class:`ConnectError` carrying the
HTTP status to answer (400, 405, 431, 505).
"""

from __future__ import annotations

import base64
import enum
from typing import Final

import attrs

#: The longest request head (request line and headers) read.
MAX_HEAD = 8192
#: The most header lines read.
MAX_HEADERS = 32
#: The target port that means "TLS inside the tunnel": the broker answers the client's
#: TLS handshake with its own certificate (``[tls]``). A broker with TLS tunnels only
#: this port; one without, only the others (their number is not used).
TLS_PORT: Final = 443
#: The port client files of a broker without TLS name (any but :data:`TLS_PORT`).
PLAIN_PORT: Final = 5900
#: The characters of one handle label (DNS labels are at most 63).
_LABEL = 60


class _Wait(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Wait.NEED_DATA


class ConnectError(Exception):
    """The client broke HTTP CONNECT; ``status`` is the answer (400, 405, 431, 505)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@attrs.frozen
class ConnectRequest:
    """A complete CONNECT request head."""

    #: The target's host field (lower-cased).
    host: str
    #: The target's port.
    port: int
    #: Bytes the client sent after the head (the tunnel's first bytes).
    rest: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


class ConnectParser:
    """Parses one CONNECT request head; feed with :meth:`receive_data`."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    def receive_data(self, data: bytes) -> None:
        """Queue bytes from the client (``b""``: the client closed)."""
        if self._done:
            raise RuntimeError("the request was parsed already")
        if not data:
            raise ConnectError(400, "the client closed before its request was complete")
        self._buffer += data

    def next_event(self) -> ConnectRequest | _Wait:
        """The request once its head is complete, else ``NEED_DATA``."""
        if self._done:
            raise RuntimeError("the request was parsed already")
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise ConnectError(431, "request head too large")
            return NEED_DATA
        if end + 4 > MAX_HEAD:
            raise ConnectError(431, "request head too large")
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + 4 :])
        self._done = True
        self._buffer.clear()
        lines = head.split(b"\r\n")
        if len(lines) - 1 > MAX_HEADERS:
            raise ConnectError(431, "too many header lines")
        host, port = _request_line(lines[0])
        for line in lines[1:]:
            if b":" not in line or line[:1] in (b" ", b"\t"):
                raise ConnectError(400, "malformed header line")
        return ConnectRequest(host, port, rest)


#: Why a connection that opens with a PROXY protocol header is refused by a listener
#: that does not expect one.
UNEXPECTED_PROXY_HEADER = (
    "a PROXY protocol header (a relay's proxy_protocol on), but "
    "listen.connect_proxy_protocol is off"
)


def _request_line(line: bytes) -> tuple[str, int]:
    if line.startswith(b"PROXY "):
        raise ConnectError(400, UNEXPECTED_PROXY_HEADER)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise ConnectError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise ConnectError(505, "HTTP/1.0 or HTTP/1.1 only")
    if method != b"CONNECT":
        raise ConnectError(405, "this listener only tunnels (CONNECT)")
    host, sep, port = target.rpartition(b":")
    if not sep or not host or not port.isdigit() or len(port) > 5:
        raise ConnectError(400, "the target must be host:port")
    try:
        text = host.decode("ascii")
    except UnicodeDecodeError:
        raise ConnectError(400, "the target must be ASCII") from None
    number = int(port)
    if not 0 < number < 65536:
        raise ConnectError(400, "the target's port is out of range")
    return text.lower(), number


def handle_for_token(token: str) -> str:
    """The session handle that stands for *token* in a CONNECT target's host field."""
    encoded = base64.b32encode(token.encode("ascii")).decode().rstrip("=").lower()
    return ".".join(encoded[i : i + _LABEL] for i in range(0, len(encoded), _LABEL))


def token_for_handle(handle: str) -> str:
    """The token a handle stands for; ValueError if *handle* is not one."""
    encoded = handle.replace(".", "").upper()
    if not encoded or len(encoded) > 8192:
        raise ValueError("not a session handle")
    encoded += "=" * (-len(encoded) % 8)
    try:
        return base64.b32decode(encoded).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a session handle") from None
