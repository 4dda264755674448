"""The two errors of the SPICE layer: a peer broke the protocol, or the caller misused the API.

Nothing else escapes the parsers: the fuzz tests feed arbitrary bytes and accept
only :class:`SpiceProtocolError`.
"""

from __future__ import annotations

import enum

from ._constants import LinkError


class Peer(enum.Enum):
    """Which end of a proxied SPICE channel connection."""

    CLIENT = "client"
    SERVER = "server"


class SpiceError(Exception):
    """Base class of the errors below; catch one of them, not this."""


class SpiceProtocolError(SpiceError):
    """*peer* sent something the SPICE protocol (or a configured bound) does not allow.

    The connection cannot continue: the side object is in its error state and
    raises this error again on every further :meth:`next_event`.

    *link_error* is set when the error happened while the client was linking:
    it is the ``SPICE_LINK_ERR_*`` that spice-server itself would answer
    (``INVALID_MAGIC``, ``VERSION_MISMATCH``, ``INVALID_DATA``,
    ``CHANNEL_NOT_AVAILABLE``), so the broker can send
    ``build_link_error_reply(exc.link_error)`` before closing. It is ``None``
    otherwise.
    """

    def __init__(self, message: str, *, peer: Peer, link_error: LinkError | None = None) -> None:
        super().__init__(f"{peer.value}: {message}")
        self.peer = peer
        self.link_error = link_error


class SpiceUsageError(SpiceError):
    """The caller used the API wrongly: sent an event the state does not allow, built a
    message from invalid values, fed data after the end of the stream, and so on. A bug
    in the broker, never the peer's doing."""
