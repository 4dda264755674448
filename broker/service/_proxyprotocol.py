"""The PROXY protocol, version 1: the client's address from a front that relays TCP.

Theory of operation. A TCP relay (nginx's stream module with ``proxy_protocol on``)
cannot add ``X-Forwarded-For`` to bytes it does not parse; instead it opens every
connection to the broker with one line naming the client's connection, then relays the
client's bytes (HAProxy's specification, section 2.1:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt)::

    PROXY TCP4 203.0.113.7 10.0.2.11 51234 7001\\r\\n

The line is sent in the clear, before anything else, even where the relay then speaks
TLS to the broker (nginx's ``proxy_ssl on``).

:class:`ProxyHeaderParser` is sans-I/O: fed bytes with :meth:`~ProxyHeaderParser.receive_data`,
:meth:`~ProxyHeaderParser.next_event` returns one :class:`ProxyHeader` (the bytes after
the line in its ``rest``) or ``NEED_DATA``. It is strict, as the specification asks ("any
sequence which does not exactly match the protocol must be discarded and cause the
receiver to abort the connection"): ``PROXY``, one space, ``TCP4``, ``TCP6`` or ``UNKNOWN``,
then for TCP the source and destination addresses (of the family named, no leading
zeroes, no IPv6 zone) and ports (0-65535, no leading zeroes), each after exactly one
space, and CRLF; a lone CR or LF is an error. It never holds more than
:data:`MAX_LINE` bytes (the longest line the specification allows, CRLF included). After
``UNKNOWN`` anything up to the CRLF is ignored and the connection's own peer is the
client. A version 2 (binary) header is recognised by its signature and refused as such;
anything else that does not start like ``PROXY `` is refused at once, without waiting for
more. Every refusal is a :class:`ProxyHeaderError` with a sentence for the log; calling
the parser after its header was returned is a ``RuntimeError``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Final

import attrs

#: The longest version 1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6
#: addresses and two 5-digit ports).
MAX_LINE: Final = 107
#: The first 12 bytes of every version 2 header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_PREFIX = b"PROXY "
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
#: What an address may be made of: IPv4's digits and dots, IPv6's hex digits and colons.
_ADDRESS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")


class _Wait(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Wait.NEED_DATA


class ProxyHeaderError(Exception):
    """The peer sent no valid PROXY protocol v1 header; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@attrs.frozen
class ProxyHeader:
    """A complete PROXY protocol v1 header."""

    #: ``TCP4``, ``TCP6`` or ``UNKNOWN``.
    family: str
    #: The client's address (canonical text; an IPv4-mapped IPv6 address as
    #: ``::ffff:a.b.c.d``); None for ``UNKNOWN``.
    source: str | None = None
    #: The address the client connected to (the relay's); None for ``UNKNOWN``.
    destination: str | None = None
    #: The client's port; None for ``UNKNOWN``.
    source_port: int | None = None
    #: The port the client connected to; None for ``UNKNOWN``.
    destination_port: int | None = None
    #: Bytes received after the header's CRLF (the relayed connection's first bytes).
    rest: bytes = attrs.field(default=b"", repr=lambda b: f"<{len(b)} bytes>")

    def client(self, peer: str) -> str:
        """The client's address: the header's source, or *peer* (the TCP peer) for
        ``UNKNOWN``."""
        return peer if self.source is None else self.source


class ProxyHeaderParser:
    """Parses the PROXY protocol v1 header that opens a connection (see the module's
    notes); feed with :meth:`receive_data`."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    def receive_data(self, data: bytes) -> None:
        """Queue bytes from the peer (``b""``: the peer closed)."""
        if self._done:
            raise RuntimeError("the PROXY header was parsed already")
        if not data:
            raise ProxyHeaderError("the connection closed before its PROXY header was complete")
        self._buffer += data

    def next_event(self) -> ProxyHeader | _Wait:
        """The header once its line is complete, else ``NEED_DATA``."""
        if self._done:
            raise RuntimeError("the PROXY header was parsed already")
        buffer = self._buffer
        start = bytes(buffer[: len(V2_SIGNATURE)])
        if start and V2_SIGNATURE.startswith(start):
            if len(start) < len(V2_SIGNATURE):
                return NEED_DATA
            raise ProxyHeaderError("PROXY v2 not supported: send version 1 (text)")
        if not _PREFIX.startswith(bytes(buffer[: len(_PREFIX)])):
            raise ProxyHeaderError(f"no PROXY header: the connection starts with {_first(buffer)}")
        end = buffer.find(b"\n", 0, MAX_LINE)
        if end < 0:
            if b"\r" in buffer[: MAX_LINE - 1][:-1]:
                raise ProxyHeaderError("a CR without LF in the PROXY header")
            if len(buffer) >= MAX_LINE:
                raise ProxyHeaderError(f"PROXY header too long: no CRLF in {MAX_LINE} bytes")
            return NEED_DATA
        if buffer[end - 1 : end] != b"\r":
            raise ProxyHeaderError("the PROXY header must end with CRLF, not a lone LF")
        line = bytes(buffer[: end - 1])
        if b"\r" in line:
            raise ProxyHeaderError("a CR without LF in the PROXY header")
        header = _header(line[len(_PREFIX) :], bytes(buffer[end + 1 :]))
        self._done = True
        self._buffer = bytearray()
        return header


def _first(data: bytes | bytearray) -> str:
    """What a connection that is no PROXY header starts with, for the log."""
    if data[:1] == b"\x16":
        return "a TLS handshake"
    word = bytes(data[:16]).split(b" ", 1)[0]
    if word and all(0x21 <= byte < 0x7F for byte in word):
        return f"{word.decode()!r}"
    return "binary data"


def _header(fields: bytes, rest: bytes) -> ProxyHeader:
    """The header of the line's *fields* (after ``PROXY ``, before CRLF)."""
    family, _, addresses = fields.partition(b" ")
    if family == b"UNKNOWN":
        return ProxyHeader("UNKNOWN", rest=rest)
    if family not in (b"TCP4", b"TCP6"):
        shown = family[:16].decode("ascii", "replace")
        raise ProxyHeaderError(f"unknown PROXY protocol family {shown!r} (TCP4, TCP6, UNKNOWN)")
    parts = addresses.split(b" ")
    if len(parts) != 4:
        raise ProxyHeaderError(
            f"a {family.decode()} PROXY header needs exactly: source and destination "
            "address, source and destination port, one space apart"
        )
    source, destination = (_address(family, text) for text in parts[:2])
    source_port, destination_port = (_port(text) for text in parts[2:])
    return ProxyHeader(family.decode(), source, destination, source_port, destination_port,
                       rest)


def _address(family: bytes, text: bytes) -> str:
    """The canonical text of an address of *family*; ProxyHeaderError if it is not one."""
    try:
        if not _ADDRESS.fullmatch(text):
            raise ValueError(text)
        ip = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        shown = text[:45].decode("ascii", "replace")
        raise ProxyHeaderError(f"{shown!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv4Address):
        if family != b"TCP4":
            raise ProxyHeaderError(f"address family mismatch: TCP6 with an IPv4 address ({ip})")
        return str(ip)
    if family != b"TCP6":
        raise ProxyHeaderError(f"address family mismatch: TCP4 with an IPv6 address ({ip})")
    mapped = ip.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def _port(text: bytes) -> int:
    """A port (0-65535, no leading zero); ProxyHeaderError if *text* is not one."""
    if _PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    shown = text[:8].decode("ascii", "replace")
    raise ProxyHeaderError(f"{shown!r} is not a port (0-65535, no leading zero)")
