"""The broker service: the listener, sessions, and what protocol plugins get.

For plugin authors: a protocol's ``session_handler`` returns a coroutine
function that receives a :class:`Session`; :func:`pump` moves bytes
between its client and its endpoint with backpressure, and :func:`raw_proxy`
is a complete handler that does only that. docs/service.md describes the
service, docs/plugins.md the hooks.
"""

from broker.service._presence import PresenceState, Seat, Viewer
from broker.service._pump import (
    DEFAULT_READ_SIZE,
    ClientClosed,
    MessageChannel,
    PumpEnd,
    Traffic,
    pump,
)
from broker.service._refusals import ENDINGS, PLUGIN_CODES, REFUSALS, Refusal, Refused
from broker.service._session import (
    ClientChannel,
    Endpoint,
    EndpointRequest,
    Session,
    SessionGroup,
    SessionHandler,
    TunnelChannel,
    WebSocketChannel,
    raw_proxy,
)
from broker.service._tls import ConsoleTLS

__all__ = [
    "DEFAULT_READ_SIZE",
    "ENDINGS",
    "PLUGIN_CODES",
    "REFUSALS",
    "ClientChannel",
    "ClientClosed",
    "ConsoleTLS",
    "Endpoint",
    "EndpointRequest",
    "MessageChannel",
    "PresenceState",
    "PumpEnd",
    "Refusal",
    "Refused",
    "Seat",
    "Session",
    "SessionGroup",
    "SessionHandler",
    "Traffic",
    "TunnelChannel",
    "Viewer",
    "WebSocketChannel",
    "pump",
    "raw_proxy",
]
