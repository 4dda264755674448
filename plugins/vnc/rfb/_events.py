"""Events of the two handshakes, and the values they carry.

Every event is a frozen attrs class: a value, compared by its fields, safe to
log (no event ever holds a password or a challenge response). The messages of
the client-to-server stream after the handshake are in ``_messages``.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

from ._wire import PIXEL_FORMAT, SERVER_INIT_HEADER


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event()`` when no complete element is buffered: feed more
#: with ``receive_data()`` (after writing out ``data_to_send()``).
NEED_DATA: Final = NeedData.NEED_DATA


class Event:
    """Base class of every event of the RFB layer."""

    __slots__ = ()


@attrs.frozen
class ConnectionClosed(Event):
    """The peer ended its stream (``receive_data(None)``) at a point where the
    protocol allows it: between two client messages."""


@attrs.frozen
class PixelFormat:
    """A PIXEL_FORMAT (RFC 6143 section 7.4)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @classmethod
    def from_bytes(cls, data: bytes) -> PixelFormat:
        """Parse the 16 bytes of a PIXEL_FORMAT (padding ignored)."""
        bpp, depth, big, true, rmax, gmax, bmax, rsh, gsh, bsh = PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, big != 0, true != 0, rmax, gmax, bmax, rsh, gsh, bsh)

    def to_bytes(self) -> bytes:
        """The 16 bytes of this PIXEL_FORMAT (flags as 0/1, zero padding)."""
        return PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )


@attrs.frozen
class VersionNegotiated(Event):
    """The ProtocolVersion exchange is done.

    ``peer_version`` is what the peer sent, ``version`` the one in use, as
    (major, minor): (3, 3), (3, 7) or (3, 8).
    """

    peer_version: tuple[int, int]
    version: tuple[int, int]


@attrs.frozen
class SecurityTypeSelected(Event):
    """A security type was chosen: by the broker among the server's
    ``offered`` types (RFBClient), or by the client among the broker's
    (RFBServer). With RFB 3.3 the server decides and ``offered`` holds that
    one type."""

    security_type: int
    offered: tuple[int, ...]


@attrs.frozen
class StartTLS(Event):
    """VeNCrypt agreed on a TLS subtype: the I/O layer must now run a TLS
    handshake (as the client) on the connection to the server, then call
    ``RFBClient.tls_established()`` and feed only decrypted bytes from then on.

    ``data_to_send()`` is empty at this point and nothing of the server's is
    buffered. ``anonymous`` is true for the TLS* subtypes (anonymous
    Diffie-Hellman, no certificate to verify) and false for the X509* ones,
    whose server certificate the I/O layer must verify against its CA.
    """

    subtype: int
    anonymous: bool


@attrs.frozen
class SecuritySucceeded(Event):
    """The server accepted the security handshake (SecurityResult OK, or, for
    the None type in RFB 3.3/3.7, its mere selection). The broker has sent
    ClientInit. ``subtype`` is the VeNCrypt subtype, if any."""

    security_type: int
    subtype: int | None = None


@attrs.frozen
class ServerInit(Event):
    """The server's ServerInit (RFC 6143 section 7.3.2): the framebuffer's
    size and pixel format, and the desktop's name (raw bytes; RFB names are
    usually UTF-8 or Latin-1: see :attr:`name_text`).

    RFBClient returns it as its last event; give it (or an ``attrs.evolve``-d
    copy) to ``RFBServer.send_server_init`` to pass it on to the client.
    """

    width: int
    height: int
    pixel_format: PixelFormat
    name: bytes

    @property
    def name_text(self) -> str:
        """The name decoded as UTF-8, invalid sequences replaced."""
        return self.name.decode("utf-8", errors="replace")

    def to_bytes(self) -> bytes:
        """This ServerInit as sent on the wire."""
        header = SERVER_INIT_HEADER.pack(
            self.width, self.height, self.pixel_format.to_bytes(), len(self.name)
        )
        return header + self.name


@attrs.frozen
class ClientInit(Event):
    """The client's ClientInit (RFC 6143 section 7.3.1). The broker applies its
    own shared policy toward the server; this is what the client asked for."""

    shared: bool


@attrs.frozen
class HandshakeRejected(Event):
    """``RFBServer.reject()`` took effect: the refusal (with ``reason`` where the
    client's version has room for it) is in ``data_to_send()``; write it out and
    close the connection."""

    reason: str
