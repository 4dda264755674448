"""The RFB layer's state machines, as transition tables.

Theory of operation
-------------------
A VNC session through the broker is two RFB connections glued together::

    browser (noVNC) --RFB--> [RFBServer | ClientMessageFilter] broker [RFBClient] --RFB--> QEMU

* Toward QEMU the broker is an RFB *client* (:class:`UpstreamState`): it reads
  the ProtocolVersion, negotiates security (None, VNC authentication, or
  VeNCrypt whose TLS the I/O layer performs when told to), reads the
  SecurityResult, sends ClientInit and reads ServerInit.
* Toward the browser the broker is an RFB *server* (:class:`DownstreamState`):
  it offers RFB 3.8 with the None security type only (the token already
  authenticated the user), reads ClientInit and sends the ServerInit it got
  from QEMU.
* After both handshakes the client-to-server stream goes through the filter
  (:class:`FilterState`) one message at a time, so policy (view-only) can be
  enforced; the server-to-client stream is forwarded raw and never parsed.

Each parser reads one protocol element at a time, never more than that
element's documented maximum, decides what it was (a *step*: a short string
such as ``"rfb-3.8"`` or ``"vnc-auth"``) and looks (state, step) up in its
table below to find the next state. A pair missing from a table is a bug in
the parser (``AssertionError``), never the peer's doing: a peer's mistakes are
detected before the lookup and raised as ``RFBProtocolError``. Any state may
also go to ``FAILED`` when an error is raised; after that every call is a
usage error.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)


class UpstreamState(enum.Enum):
    """The broker as RFB client, facing the VNC server (RFBClient)."""

    PROTOCOL_VERSION = "awaiting the server's ProtocolVersion"
    SECURITY_TYPE = "awaiting the server's security type (RFB 3.3)"
    SECURITY_TYPES = "awaiting the server's security types"
    FAILURE_REASON = "awaiting the reason the server refused the connection"
    VNC_CHALLENGE = "awaiting the VNC authentication challenge"
    VENCRYPT_VERSION = "awaiting the server's VeNCrypt version"
    VENCRYPT_VERSION_ACK = "awaiting the server's VeNCrypt version acknowledgement"
    VENCRYPT_SUBTYPES = "awaiting the server's VeNCrypt subtypes"
    VENCRYPT_SUBTYPE_ACK = "awaiting the server's VeNCrypt subtype acknowledgement"
    TLS_HANDSHAKE = "awaiting the I/O layer's TLS handshake"
    SECURITY_RESULT = "awaiting the server's SecurityResult"
    SECURITY_RESULT_REASON = "awaiting the reason the server's authentication failed"
    SERVER_INIT = "awaiting the server's ServerInit"
    CONNECTED = "handshake done"
    FAILED = "failed"


UPSTREAM_TRANSITIONS: Final[Mapping[UpstreamState, Mapping[str, UpstreamState]]] = {
    UpstreamState.PROTOCOL_VERSION: {
        "rfb-3.3": UpstreamState.SECURITY_TYPE,
        "rfb-3.7": UpstreamState.SECURITY_TYPES,
        "rfb-3.8": UpstreamState.SECURITY_TYPES,
    },
    UpstreamState.SECURITY_TYPE: {
        "none": UpstreamState.SERVER_INIT,  # 3.3: no SecurityResult after None
        "vnc-auth": UpstreamState.VNC_CHALLENGE,
        "failed": UpstreamState.FAILURE_REASON,
    },
    UpstreamState.SECURITY_TYPES: {
        "none": UpstreamState.SERVER_INIT,  # 3.7: no SecurityResult after None
        "none-with-result": UpstreamState.SECURITY_RESULT,  # 3.8
        "vnc-auth": UpstreamState.VNC_CHALLENGE,
        "vencrypt": UpstreamState.VENCRYPT_VERSION,
        "failed": UpstreamState.FAILURE_REASON,
    },
    UpstreamState.FAILURE_REASON: {"read": UpstreamState.FAILED},
    UpstreamState.VNC_CHALLENGE: {"responded": UpstreamState.SECURITY_RESULT},
    UpstreamState.VENCRYPT_VERSION: {"0.2": UpstreamState.VENCRYPT_VERSION_ACK},
    UpstreamState.VENCRYPT_VERSION_ACK: {"accepted": UpstreamState.VENCRYPT_SUBTYPES},
    UpstreamState.VENCRYPT_SUBTYPES: {"chosen": UpstreamState.VENCRYPT_SUBTYPE_ACK},
    UpstreamState.VENCRYPT_SUBTYPE_ACK: {"accepted": UpstreamState.TLS_HANDSHAKE},
    UpstreamState.TLS_HANDSHAKE: {
        "tls-none": UpstreamState.SECURITY_RESULT,
        "tls-vnc-auth": UpstreamState.VNC_CHALLENGE,
    },
    UpstreamState.SECURITY_RESULT: {
        "ok": UpstreamState.SERVER_INIT,
        "failed-with-reason": UpstreamState.SECURITY_RESULT_REASON,  # 3.8
        "failed": UpstreamState.FAILED,  # 3.3, 3.7
    },
    UpstreamState.SECURITY_RESULT_REASON: {"read": UpstreamState.FAILED},
    UpstreamState.SERVER_INIT: {"read": UpstreamState.CONNECTED},
    UpstreamState.CONNECTED: {},
    UpstreamState.FAILED: {},
}


class DownstreamState(enum.Enum):
    """The broker as RFB server, facing the VNC client (RFBServer)."""

    PROTOCOL_VERSION = "awaiting the client's ProtocolVersion"
    SECURITY_CHOICE = "awaiting the client's security type"
    CLIENT_INIT = "awaiting the client's ClientInit"
    SERVER_INIT = "awaiting send_server_init()"
    CONNECTED = "handshake done"
    REJECTED = "rejected"
    FAILED = "failed"


DOWNSTREAM_TRANSITIONS: Final[Mapping[DownstreamState, Mapping[str, DownstreamState]]] = {
    DownstreamState.PROTOCOL_VERSION: {
        "rfb-3.3": DownstreamState.CLIENT_INIT,  # security type None sent as a u32
        "rfb-3.7": DownstreamState.SECURITY_CHOICE,
        "rfb-3.8": DownstreamState.SECURITY_CHOICE,
        "rejected": DownstreamState.REJECTED,  # reject() pending when the version came
    },
    DownstreamState.SECURITY_CHOICE: {
        "none": DownstreamState.CLIENT_INIT,  # 3.8 with SecurityResult OK, 3.7 without
        "rejected": DownstreamState.REJECTED,
    },
    DownstreamState.CLIENT_INIT: {"read": DownstreamState.SERVER_INIT},
    DownstreamState.SERVER_INIT: {"sent": DownstreamState.CONNECTED},
    DownstreamState.CONNECTED: {},
    DownstreamState.REJECTED: {},
    DownstreamState.FAILED: {},
}


class FilterState(enum.Enum):
    """The client-to-server message stream after the handshake (ClientMessageFilter)."""

    MESSAGES = "parsing client messages"
    CLOSED = "the client ended its stream"
    FAILED = "failed"


FILTER_TRANSITIONS: Final[Mapping[FilterState, Mapping[str, FilterState]]] = {
    FilterState.MESSAGES: {"message": FilterState.MESSAGES, "eof": FilterState.CLOSED},
    FilterState.CLOSED: {},
    FilterState.FAILED: {},
}


class Machine(Generic[S]):
    """A current state and the table that moves it."""

    __slots__ = ("failed", "state", "table")

    def __init__(self, table: Mapping[S, Mapping[str, S]], initial: S, failed: S) -> None:
        self.table = table
        self.state = initial
        self.failed = failed

    def advance(self, step: str) -> S:
        """Move on *step*; a step the table does not allow is a parser bug."""
        try:
            self.state = self.table[self.state][step]
        except KeyError:
            raise AssertionError(f"no transition from {self.state} on {step!r}") from None
        return self.state

    def fail(self) -> None:
        self.state = self.failed
