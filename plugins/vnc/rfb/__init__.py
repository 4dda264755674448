"""The sans-I/O RFB (VNC) protocol layer of the VNC plugin.

No sockets, no event loop: plain objects fed bytes that return events and the
bytes to send, in the manner of h11 and wsproto. The broker speaks RFB twice
per session (theory of operation: ``_state``; the whole story: docs/rfb.md):

* :class:`RFBClient` faces the VNC server (QEMU): version, security (None, VNC
  authentication, VeNCrypt with TLS done by the I/O layer on
  :class:`StartTLS`), ClientInit, ServerInit.
* :class:`RFBServer` faces the VNC client (noVNC): RFB 3.8, security None,
  ClientInit, and the ServerInit obtained from the server.
* :class:`ClientMessageFilter` frames every client-to-server message after
  the handshake, drops input in view-only sessions, and ends the session on
  anything it cannot parse. The server-to-client stream is forwarded raw.

Errors: :class:`RFBProtocolError` (a peer broke the protocol; ``side`` says
which; :class:`RFBSecurityError` for refused or impossible authentication)
and :class:`RFBUsageError` (the API was misused).
"""

from __future__ import annotations

from ._client import DEFAULT_VENCRYPT_SUBTYPES, RFBClient
from ._des import vnc_auth_response
from ._errors import RFBError, RFBProtocolError, RFBSecurityError, RFBUsageError, Side
from ._events import (
    NEED_DATA,
    ClientInit,
    ConnectionClosed,
    Event,
    HandshakeRejected,
    NeedData,
    PixelFormat,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    StartTLS,
    VersionNegotiated,
)
from ._filter import (
    DEFAULT_MAX_CUT_TEXT,
    DEFAULT_MAX_ENCODINGS,
    DEFAULT_MAX_SCREENS,
    ClientMessageFilter,
)
from ._messages import (
    XVP,
    ClientCutText,
    ClientFence,
    ClientMessage,
    EnableContinuousUpdates,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    QEMUAudio,
    QEMUExtendedKeyEvent,
    Screen,
    SetDesktopSize,
    SetEncodings,
    SetPixelFormat,
)
from ._server import RFBServer
from ._state import DownstreamState, FilterState, UpstreamState
from ._wire import STRIPPED_ENCODINGS, ClientMessageType, Encoding, SecurityType, VeNCryptSubtype

__all__ = [
    "DEFAULT_MAX_CUT_TEXT",
    "DEFAULT_MAX_ENCODINGS",
    "DEFAULT_MAX_SCREENS",
    "DEFAULT_VENCRYPT_SUBTYPES",
    "NEED_DATA",
    "STRIPPED_ENCODINGS",
    "XVP",
    "ClientCutText",
    "ClientFence",
    "ClientInit",
    "ClientMessage",
    "ClientMessageFilter",
    "ClientMessageType",
    "ConnectionClosed",
    "DownstreamState",
    "EnableContinuousUpdates",
    "Encoding",
    "Event",
    "FilterState",
    "FramebufferUpdateRequest",
    "HandshakeRejected",
    "KeyEvent",
    "NeedData",
    "PixelFormat",
    "PointerEvent",
    "QEMUAudio",
    "QEMUExtendedKeyEvent",
    "RFBClient",
    "RFBError",
    "RFBProtocolError",
    "RFBSecurityError",
    "RFBServer",
    "RFBUsageError",
    "Screen",
    "SecuritySucceeded",
    "SecurityType",
    "SecurityTypeSelected",
    "ServerInit",
    "SetDesktopSize",
    "SetEncodings",
    "SetPixelFormat",
    "Side",
    "StartTLS",
    "UpstreamState",
    "VeNCryptSubtype",
    "VersionNegotiated",
    "vnc_auth_response",
]
