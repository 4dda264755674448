"""The errors the RFB layer raises, and nothing else.

Two kinds, as in h11: :class:`RFBProtocolError` when a peer broke the protocol
(or offered nothing the broker can accept), and :class:`RFBUsageError` when the
code driving a parser called it wrongly. A protocol error ends the session; a
usage error is a bug in the caller. Both derive from :class:`RFBError`.
"""

from __future__ import annotations

import enum


class Side(enum.Enum):
    """Which peer an :class:`RFBProtocolError` is about."""

    #: The VNC server the broker connects to (QEMU).
    SERVER = "server"
    #: The VNC client that connected to the broker (noVNC in the browser).
    CLIENT = "client"


class RFBError(Exception):
    """Base class of every error of the RFB layer."""


class RFBProtocolError(RFBError):
    """The peer on *side* broke the protocol: malformed or unknown data, a
    length over the documented bound, or the connection closed mid-element.

    The parser that raised it is unusable afterwards; close both connections.
    """

    def __init__(self, message: str, *, side: Side) -> None:
        super().__init__(f"{side.value}: {message}")
        self.side = side
        self.detail = message


class RFBSecurityError(RFBProtocolError):
    """The security handshake ended without a usable, authenticated connection.

    The peer refused (a failed SecurityResult, a failed connection with its
    reason string) or offered nothing the broker accepts (no common security
    type or VeNCrypt subtype, a password needed but none configured).
    :attr:`reason` is the peer's reason string when it sent one, else ours;
    it never contains a secret.
    """

    def __init__(self, reason: str, *, side: Side) -> None:
        super().__init__(reason, side=side)
        self.reason = reason


class RFBUsageError(RFBError):
    """The API was misused: a method called in a state where it means nothing
    (data after the end of the stream, ``tls_established()`` before
    ``StartTLS``, feeding the handshake after it finished, ...)."""
