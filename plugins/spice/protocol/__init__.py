"""The sans-I/O SPICE layer of the SPICE plugin: link, ticket, framing, policy, guard.

No sockets and no event loop in here: feed bytes, get events, send events, get bytes
(see docs/spice-protocol.md). One channel connection (main, display, inputs, ...) is
proxied with two side objects::

    client = ClientSide()          # faces the SPICE client; the broker plays the server
    server = ServerSide()          # faces QEMU; the broker plays the client

    client.receive_data(chunk)     # b"" when the client closed
    event = client.next_event()    # LinkMessage -> policy, binding, open the backend
    server.send(event)             # -> bytes for QEMU (or client.send(LinkReply(error=...)))
    ...                            # LinkReply -> client.send(reply)
                                   # ClientTicket -> server.send(Ticket(encrypt_ticket(...)))
                                   # LinkResult -> client.send(result)
                                   # Data -> the other side's send(data), bytes unchanged
    server.close_guard()           # bytes to write before closing a display backend

Errors: :class:`SpiceProtocolError` (a peer broke the protocol; ``.peer`` says which,
``.link_error`` what spice-server would answer during the link) and
:class:`SpiceUsageError` (the broker misused the API).
"""

from __future__ import annotations

from ._connection import (
    DEFAULT_MAX_CLIENT_MESSAGE,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SERVER_MESSAGE,
    ClientSide,
    ServerSide,
    ensure_same_framing,
)
from ._constants import (
    INPUT_MOTION_ACK_BUNCH,
    MSG_INPUTS_MOUSE_MOTION_ACK,
    MSG_MAIN_INIT,
    MSG_PING,
    MSG_SET_ACK,
    MSGC_ACK,
    MSGC_ACK_SYNC,
    MSGC_DISPLAY_INIT,
    MSGC_MAIN_AGENT_DATA,
    MSGC_MAIN_AGENT_START,
    MSGC_MAIN_AGENT_TOKEN,
    MSGC_MAIN_ATTACH_CHANNELS,
    MSGC_MAIN_MOUSE_MODE_REQUEST,
    MSGC_PONG,
    AuthMechanism,
    ChannelType,
    CommonCap,
    LinkError,
)
from ._errors import Peer, SpiceError, SpiceProtocolError, SpiceUsageError
from ._events import (
    NEED_DATA,
    PAUSED,
    ClientTicket,
    ConnectionClosed,
    Data,
    DisplayInit,
    Event,
    LinkMessage,
    LinkReply,
    LinkResult,
    MainInit,
    Message,
    Ticket,
    Wait,
    caps_with,
    has_cap,
)
from ._filter import (
    INPUTS_DROPPED,
    INPUTS_MOTIONS,
    INPUTS_PRESSES,
    VIEW_ONLY_MAIN_DROPPED,
    MessageFilter,
)
from ._framing import MessageScanner
from ._policy import VIEW_ONLY_CHANNELS, ChannelPolicy
from ._state import State
from ._ticket import MAX_PASSWORD_BYTES, decrypt_ticket, encrypt_ticket, load_ticket_key
from ._wire import (
    build_display_init,
    build_link_error_reply,
    build_link_message,
    build_link_reply,
    build_link_result,
    build_main_init,
    build_message,
    parse_link_message,
    parse_link_reply,
)

__all__ = [
    "DEFAULT_MAX_CLIENT_MESSAGE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SERVER_MESSAGE",
    "INPUTS_DROPPED",
    "INPUTS_MOTIONS",
    "INPUTS_PRESSES",
    "INPUT_MOTION_ACK_BUNCH",
    "MAX_PASSWORD_BYTES",
    "MSGC_ACK",
    "MSGC_ACK_SYNC",
    "MSGC_DISPLAY_INIT",
    "MSGC_MAIN_AGENT_DATA",
    "MSGC_MAIN_AGENT_START",
    "MSGC_MAIN_AGENT_TOKEN",
    "MSGC_MAIN_ATTACH_CHANNELS",
    "MSGC_MAIN_MOUSE_MODE_REQUEST",
    "MSGC_PONG",
    "MSG_INPUTS_MOUSE_MOTION_ACK",
    "MSG_MAIN_INIT",
    "MSG_PING",
    "MSG_SET_ACK",
    "NEED_DATA",
    "PAUSED",
    "VIEW_ONLY_CHANNELS",
    "VIEW_ONLY_MAIN_DROPPED",
    "AuthMechanism",
    "ChannelPolicy",
    "ChannelType",
    "ClientSide",
    "ClientTicket",
    "CommonCap",
    "ConnectionClosed",
    "Data",
    "DisplayInit",
    "Event",
    "LinkError",
    "LinkMessage",
    "LinkReply",
    "LinkResult",
    "MainInit",
    "Message",
    "MessageFilter",
    "MessageScanner",
    "Peer",
    "ServerSide",
    "SpiceError",
    "SpiceProtocolError",
    "SpiceUsageError",
    "State",
    "Ticket",
    "Wait",
    "build_display_init",
    "build_link_error_reply",
    "build_link_message",
    "build_link_reply",
    "build_link_result",
    "build_main_init",
    "build_message",
    "caps_with",
    "decrypt_ticket",
    "encrypt_ticket",
    "ensure_same_framing",
    "has_cap",
    "load_ticket_key",
    "parse_link_message",
    "parse_link_reply",
]
