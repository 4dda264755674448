"""The two side objects of a proxied SPICE channel connection (see ``_state`` for the
theory of operation and the transition tables).

``ClientSide`` faces the SPICE client (the broker plays the server), ``ServerSide``
faces QEMU (the broker plays the client). Both are sans-I/O, in h11's manner:

- ``receive_data(data)`` queues bytes from the peer (``b""`` means the peer closed);
- ``next_event()`` returns the next event, ``NEED_DATA`` or ``PAUSED``;
- ``send(event)`` returns the bytes to write to the peer.

Call ``next_event`` until it returns ``NEED_DATA`` (or ``PAUSED``) after every
``receive_data``; all events of one chunk are available at once, so the broker can act
on a :class:`Message` (register a session id, say) before it forwards the :class:`Data`
that precedes it.

Bounds: the sides copy only what a link step needs (a link message is at most 4096
bytes, as in spice-server), headers (6 or 18 bytes) and the two decoded bodies
(``MAIN_INIT``, ``DISPLAY_INIT``, at most 4096 bytes). Message bodies are never
buffered. While a side waits for the broker (``PAUSED``), its peer may not queue more
than ``max_pending`` bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ._constants import (
    AUTH_MECHANISM_SIZE,
    DISPLAY_INIT_SIZE,
    LINK_HEADER_SIZE,
    LINK_MESS_SIZE,
    LINK_REPLY_SIZE,
    LINK_RESULT_SIZE,
    MAGIC,
    MAIN_INIT_SIZE,
    MAX_LINK_SIZE,
    MSG_MAIN_INIT,
    MSGC_DISPLAY_INIT,
    TICKET_SIZE,
    ChannelType,
    CommonCap,
    LinkError,
)
from ._errors import Peer, SpiceProtocolError, SpiceUsageError
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
)
from ._framing import Decoder, MessageScanner
from ._state import (
    CLIENT_SIDE,
    FINAL_STATES,
    RECEIVING_STATES,
    SERVER_SIDE,
    State,
    Step,
    transition,
)
from ._wire import (
    WireError,
    build_auth_mechanism,
    build_display_init,
    build_link_message,
    build_link_reply,
    build_link_result,
    build_message,
    parse_auth_mechanism,
    parse_display_init,
    parse_link_header,
    parse_link_message_body,
    parse_link_reply_body,
    parse_link_result,
    parse_main_init,
)

#: Default bound of a client-to-server message body (SPICE clients send small messages;
#: usbredir, port and webdav data are the largest, well under this).
DEFAULT_MAX_CLIENT_MESSAGE = 1024 * 1024
#: Default bound of a server-to-client message body (an uncompressed 4K frame is 32 MiB).
DEFAULT_MAX_SERVER_MESSAGE = 64 * 1024 * 1024
#: Default bound of the bytes a peer may queue while the side waits for the broker.
DEFAULT_MAX_PENDING = 64 * 1024

_DISPLAY_INIT_DECODER: Decoder = (DISPLAY_INIT_SIZE, parse_display_init)
_MAIN_INIT_DECODER: Decoder = (MAIN_INIT_SIZE, parse_main_init)


class _Side:
    """What both sides share: the byte queue, the link-step reader, the message scanner."""

    _peer: Peer
    _table: dict[tuple[State, Step], State]

    def __init__(self, initial: State, *, max_message_size: int, max_pending: int) -> None:
        if max_message_size < 0 or max_pending < 0:
            raise SpiceUsageError("bounds cannot be negative")
        self._state = initial
        self.max_message_size = max_message_size
        self.max_pending = max_pending
        self._chunks: deque[bytes | memoryview] = deque()
        self._available = 0
        self._eof = False
        self._closed_clean = True
        self._events: deque[Event] = deque()
        self._pending_error: SpiceProtocolError | None = None
        self._error: SpiceProtocolError | None = None
        self._scanner: MessageScanner | None = None
        self._mini_header: bool | None = None
        self._link: LinkMessage | None = None
        self._reply: LinkReply | None = None

    # --- public state ---------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state (see ``_state``)."""
        return self._state

    @property
    def mini_header(self) -> bool | None:
        """Whether messages on this leg use the 6-byte mini header; ``None`` until both
        link messages are known."""
        return self._mini_header

    @property
    def at_boundary(self) -> bool:
        """Whether the peer's messages so far came whole: every byte received is scanned
        and ends between two messages (False before the link is done)."""
        return self._scanner is not None and not self._chunks and self._scanner.at_boundary

    @property
    def link(self) -> LinkMessage | None:
        """The channel's link message (the client's, as received or as sent to QEMU)."""
        return self._link

    @property
    def channel_type(self) -> ChannelType | None:
        return None if self._link is None else self._link.channel_type

    @property
    def reply(self) -> LinkReply | None:
        """The link reply (QEMU's as received, or as sent to the client after the
        auth-cap normalisation)."""
        return self._reply

    # --- input ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue *data* from the peer; ``b""`` says the peer closed its end."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise SpiceUsageError("receive_data after the end of the stream")
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._chunks.append(chunk)
        self._available += len(chunk)

    def available_events(self) -> list[Event]:
        """Every event available now: :meth:`next_event` until ``NEED_DATA`` or ``PAUSED``
        (not included), or up to and including :class:`ConnectionClosed`."""
        events: list[Event] = []
        while True:
            event = self.next_event()
            if event is NEED_DATA or event is PAUSED:
                return events
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events

    def next_event(self) -> Event | Wait:
        """The next event, or ``NEED_DATA`` / ``PAUSED``; raises
        :class:`SpiceProtocolError` when the peer broke the protocol."""
        if self._error is not None:
            raise self._error
        while True:
            if self._events:
                return self._events.popleft()
            if self._pending_error is not None:
                self._fail(self._pending_error)
            state = self._state
            if state is State.CLOSED:
                return ConnectionClosed(clean=self._closed_clean)
            if state in FINAL_STATES:  # REFUSED: the peer's bytes no longer matter
                self._chunks.clear()
                self._available = 0
                if self._eof:
                    return self._close(clean=True)
                return NEED_DATA
            if state not in RECEIVING_STATES:
                if self._eof:
                    return self._close(clean=False)
                if self._available > self.max_pending:
                    self._fail(
                        SpiceProtocolError(
                            f"sent {self._available} bytes while the link waited for the broker",
                            peer=self._peer,
                        )
                    )
                return PAUSED
            try:
                if state is State.MESSAGES:
                    progressed = self._scan_chunk()
                else:
                    event = self._link_step(state)
                    if event is not None:
                        return event
                    progressed = False
            except WireError as exc:
                self._fail(exc.for_peer(self._peer))
            if not progressed:
                if self._eof:
                    clean = self._available == 0 and (
                        self._scanner is None or self._scanner.at_boundary
                    )
                    return self._close(clean=clean)
                return NEED_DATA

    # --- internals ---------------------------------------------------------------

    def _fail(self, error: SpiceProtocolError) -> None:
        self._state = State.ERROR
        self._error = error
        self._events.clear()
        self._chunks.clear()
        self._available = 0
        raise error

    def _close(self, *, clean: bool) -> ConnectionClosed:
        self._state = State.CLOSED
        self._closed_clean = clean
        self._chunks.clear()
        self._available = 0
        return ConnectionClosed(clean=clean)

    def _do(self, step: Step) -> None:
        self._state = transition(self._table, self._state, step)

    def _check_send_data(self) -> None:
        """Data may go out in MESSAGES, and still after the peer closed its end
        following the link (writing then fails at the socket, not here)."""
        if not (self._state is State.CLOSED and self._scanner is not None):
            self._do(Step.SEND_DATA)

    def _peek(self, n: int) -> bytes:
        """Up to *n* queued bytes, not consumed."""
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def _take(self, n: int) -> bytes | None:
        """Exactly *n* queued bytes, consumed; ``None`` while fewer are queued."""
        if self._available < n:
            return None
        out = bytearray()
        while len(out) < n:
            chunk = self._chunks[0]
            need = n - len(out)
            if len(chunk) <= need:
                out += chunk
                self._chunks.popleft()
            else:
                out += chunk[:need]
                self._chunks[0] = memoryview(chunk)[need:]
        self._available -= n
        return bytes(out)

    def _read_link_unit(self, *, min_size: int) -> tuple[int, bytes] | None:
        """(minor, body) of a link header and its body, once all of it is queued; the
        header is checked as soon as it (or the magic) is in."""
        head = self._peek(LINK_HEADER_SIZE)
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise WireError(f"bad link magic {head[: len(MAGIC)]!r}", LinkError.INVALID_MAGIC)
        if len(head) < LINK_HEADER_SIZE:
            return None
        minor, size = parse_link_header(head, max_size=MAX_LINK_SIZE, min_size=min_size)
        unit = self._take(LINK_HEADER_SIZE + size)
        if unit is None:
            return None
        return minor, unit[LINK_HEADER_SIZE:]

    def _link_step(self, state: State) -> Event | None:
        raise NotImplementedError

    def _start_messages(self, decoders: dict[int, Decoder]) -> None:
        assert self._mini_header is not None
        self._scanner = MessageScanner(
            mini_header=self._mini_header,
            max_message_size=self.max_message_size,
            decoders=decoders,
        )

    def _scan_chunk(self) -> bool:
        """Scan the next queued chunk into events; False when none is queued."""
        if not self._chunks:
            return False
        assert self._scanner is not None
        chunk = self._chunks.popleft()
        self._available -= len(chunk)
        result = self._scanner.scan(chunk)
        self._events.extend(result.events)
        self._note(result.events)
        if result.error is not None:
            self._pending_error = result.error.for_peer(self._peer)
        return True

    def _note(self, events: Sequence[object]) -> None:
        """Hook: look at the events of a scanned chunk."""


class ClientSide(_Side):
    """The broker's end facing a SPICE client; the broker plays the SPICE server.

    Events from ``next_event``: :class:`LinkMessage`, then (after the broker sent a
    ``LinkReply`` with OK) :class:`ClientTicket`, then (after a ``LinkResult`` with
    OK) :class:`Data` and :class:`Message`, plus :class:`DisplayInit` on a display
    channel; :class:`ConnectionClosed` at the end.

    ``send`` takes :class:`LinkReply` (forwarded from QEMU, or a refusal),
    :class:`LinkResult`, then :class:`Data` (forwarded from ``ServerSide``).

    *max_message_size* bounds a client message body (a larger one is a
    :class:`SpiceProtocolError`); *max_pending* bounds what the client may send while
    the link waits for the broker.
    """

    _peer = Peer.CLIENT
    _table = CLIENT_SIDE

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_CLIENT_MESSAGE,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        super().__init__(
            State.AWAIT_LINK, max_message_size=max_message_size, max_pending=max_pending
        )
        self._display_init: DisplayInit | None = None

    @property
    def display_init(self) -> DisplayInit | None:
        """The client's ``DISPLAY_INIT`` once it passed whole (display channels)."""
        return self._display_init

    @property
    def auth_selection(self) -> bool:
        """Whether the client sends an auth mechanism word before its ticket: it does
        when its link message has ``PROTOCOL_AUTH_SELECTION`` (spice-server's rule)."""
        return self._link is not None and self._link.has_common_cap(
            CommonCap.PROTOCOL_AUTH_SELECTION
        )

    def _link_step(self, state: State) -> Event | None:
        if state is State.AWAIT_LINK:
            unit = self._read_link_unit(min_size=LINK_MESS_SIZE)
            if unit is None:
                return None
            link = parse_link_message_body(unit[1], unit[0])
            self._link = link
            self._do(Step.RECV_LINK)
            return link
        assert state is State.AWAIT_TICKET
        mechanism_size = AUTH_MECHANISM_SIZE if self.auth_selection else 0
        data = self._take(mechanism_size + TICKET_SIZE)
        if data is None:
            return None
        mechanism = parse_auth_mechanism(data[:mechanism_size]) if mechanism_size else None
        self._do(Step.RECV_TICKET)
        return ClientTicket(auth_mechanism=mechanism)  # the ticket bytes are dropped here

    def send(self, event: LinkReply | LinkResult | Data) -> bytes | memoryview:
        """The bytes to write to the client for *event*.

        A ``LinkReply`` with OK goes out with its common caps normalised, because the
        broker, not QEMU, authenticates the client: ``AUTH_SASL`` cleared,
        ``AUTH_SPICE`` set, and ``PROTOCOL_AUTH_SELECTION`` set exactly when the client
        asked for it (so every client sends the ticket the way the broker reads it).
        ``MINI_HEADER`` and the channel caps pass unchanged.
        """
        if isinstance(event, LinkReply):
            if event.error is not LinkError.OK:
                self._do(Step.SEND_REPLY_REFUSED)
                self._reply = event
                return build_link_reply(event)
            after = transition(self._table, self._state, Step.SEND_REPLY_OK)
            assert self._link is not None
            common = caps_with(event.common_caps, CommonCap.AUTH_SASL, False)
            common = caps_with(common, CommonCap.AUTH_SPICE)
            common = caps_with(common, CommonCap.PROTOCOL_AUTH_SELECTION, self.auth_selection)
            reply = LinkReply(
                error=event.error,
                public_key=event.public_key,
                common_caps=common,
                channel_caps=event.channel_caps,
            )
            data = build_link_reply(reply)  # may refuse the values: before any change
            self._state = after
            self._reply = reply
            self._mini_header = self._link.has_common_cap(
                CommonCap.MINI_HEADER
            ) and reply.has_common_cap(CommonCap.MINI_HEADER)
            return data
        if isinstance(event, LinkResult):
            if event.error is not LinkError.OK:
                self._do(Step.SEND_RESULT_REFUSED)
                return build_link_result(event.error)
            self._do(Step.SEND_RESULT_OK)
            decoders: dict[int, Decoder] = {}
            if self.channel_type is ChannelType.DISPLAY:
                decoders[MSGC_DISPLAY_INIT] = _DISPLAY_INIT_DECODER
            self._start_messages(decoders)
            return build_link_result(event.error)
        if isinstance(event, Data):
            self._check_send_data()
            return event.data
        raise SpiceUsageError(f"ClientSide cannot send {type(event).__name__}")

    def _note(self, events: Sequence[object]) -> None:
        if self._display_init is None:
            for event in events:
                if isinstance(event, DisplayInit):
                    self._display_init = event
                    break


class ServerSide(_Side):
    """The broker's end facing QEMU's SPICE server; the broker plays the SPICE client.

    ``send`` takes :class:`LinkMessage`, then (after a ``LinkReply`` with OK)
    :class:`Ticket`, then :class:`Data` (forwarded from ``ClientSide``).

    Events from ``next_event``: :class:`LinkReply`, :class:`LinkResult`, then
    :class:`Data` and :class:`Message`, plus :class:`MainInit` on a main channel;
    :class:`ConnectionClosed` at the end.

    The side also follows the messages it sends, for :meth:`close_guard`.
    """

    _peer = Peer.SERVER
    _table = SERVER_SIDE

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_SERVER_MESSAGE,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        super().__init__(State.LINK_DUE, max_message_size=max_message_size, max_pending=max_pending)
        self._result: LinkError | None = None
        self._main_init: MainInit | None = None
        self._outgoing: MessageScanner | None = None
        self._ticket_sent = False
        self._display_init_sent = False
        self._display_init_confirmed = False

    @property
    def public_key(self) -> bytes | None:
        """The server's ticket key (DER) from an OK link reply."""
        if self._reply is None or not self._reply.public_key:
            return None
        return self._reply.public_key

    @property
    def main_init(self) -> MainInit | None:
        """The main channel's ``MAIN_INIT``, once it passed whole."""
        return self._main_init

    @property
    def session_id(self) -> int | None:
        """``MAIN_INIT.session_id``: the connection id of the session's other channels."""
        return None if self._main_init is None else self._main_init.session_id

    @property
    def display_init_sent(self) -> bool:
        """Whether a whole ``DISPLAY_INIT`` went to the server (display channels)."""
        return self._display_init_sent

    @property
    def display_init_confirmed(self) -> bool:
        """Whether the server sent a message after a whole ``DISPLAY_INIT`` went out.

        Measured on this project's test bed: QEMU's display channel sends nothing at
        all before ``DISPLAY_INIT`` and ``SET_ACK`` within milliseconds after it, so any
        server message after it shows the server has processed it.
        """
        return self._display_init_confirmed

    @property
    def safe_to_close(self) -> bool:
        """Whether closing this connection now cannot trip QEMU 7.2's display crash.

        True unless this is a display channel whose ticket went to the server, that
        the server neither refused nor closed, and whose ``DISPLAY_INIT`` the server has
        not confirmed yet (:attr:`display_init_confirmed`). Measured on this
        project's test bed: a ``DISPLAY_INIT`` written right before the close is not
        enough (the VM crashed in 5 runs out of 5); waiting for the server's first
        display message after it is (the VM survived in every run).
        """
        return (
            self.channel_type is not ChannelType.DISPLAY
            or not self._ticket_sent
            or self._result_refused
            or self._state is State.CLOSED
            or self._display_init_confirmed
        )

    @property
    def auth_selection(self) -> bool:
        """Whether the ticket goes after an auth mechanism word (the link message sent
        asked for ``PROTOCOL_AUTH_SELECTION``; spice-server decides on that alone)."""
        return self._link is not None and self._link.has_common_cap(
            CommonCap.PROTOCOL_AUTH_SELECTION
        )

    def send(self, event: LinkMessage | Ticket | Data) -> bytes | memoryview:
        """The bytes to write to the server for *event*."""
        if isinstance(event, LinkMessage):
            after = transition(self._table, self._state, Step.SEND_LINK)
            data = build_link_message(event)  # may refuse the values: before any change
            self._state = after
            self._link = event
            return data
        if isinstance(event, Ticket):
            self._do(Step.SEND_TICKET)
            self._ticket_sent = True
            assert self._mini_header is not None
            # DISPLAY_INIT's type (101) is another message's on every other channel
            # (the inputs channel's KEY_DOWN, the main channel's CLIENT_INFO)
            display = self.channel_type is ChannelType.DISPLAY
            self._outgoing = MessageScanner(
                mini_header=self._mini_header,
                max_message_size=0xFFFFFFFF,
                decoders={MSGC_DISPLAY_INIT: _DISPLAY_INIT_DECODER} if display else {},
            )
            prefix = build_auth_mechanism() if self.auth_selection else b""
            return prefix + event.encrypted
        if isinstance(event, Data):
            self._check_send_data()
            self._track_outgoing(event.data)
            return event.data
        raise SpiceUsageError(f"ServerSide cannot send {type(event).__name__}")

    def _track_outgoing(self, data: bytes | memoryview) -> None:
        if self._outgoing is None:
            raise SpiceUsageError("the stream to the server is broken by an earlier send")
        result = self._outgoing.scan(data)
        if result.error is not None or self._outgoing.header_held:
            self._outgoing = None  # no longer known: the guard cannot help any more
            why = result.error if result.error is not None else "it ends inside a header"
            raise SpiceUsageError(f"Data sent to the server is not a valid message stream: {why}")
        if any(isinstance(event, DisplayInit) for event in result.events):
            self._display_init_sent = True

    def close_guard(self, init: DisplayInit | None = None) -> bytes:
        """The bytes to write to the server before closing this connection.

        QEMU 7.2's SPICE server crashes the VM when a display channel closes before
        ``SPICE_MSGC_DISPLAY_INIT`` and the session's main channel closes later
        (measured on this project's test bed, 5 times out of 5). For a display channel
        whose ticket went to the server and that has not carried a whole
        ``DISPLAY_INIT``, this returns zero bytes completing the message in progress
        (if any) and a broker-built ``DISPLAY_INIT`` (*init*, default
        :class:`DisplayInit`); otherwise ``b""``. Calling it again returns ``b""``.

        Write the bytes, then keep reading from the server (feeding this side) until
        :attr:`safe_to_close` or a timeout of a few seconds, then close.
        """
        if (
            self.channel_type is not ChannelType.DISPLAY
            or self._outgoing is None  # no ticket sent: the server never linked us
            or self._display_init_sent
            or self._result_refused
        ):
            return b""
        assert self._mini_header is not None
        pad = bytes(self._outgoing.body_remaining)
        message = build_message(
            MSGC_DISPLAY_INIT,
            build_display_init(init),
            mini_header=self._mini_header,
            serial=self._outgoing.last_serial + 1,
        )
        out = pad + message
        self._outgoing.scan(out)
        self._display_init_sent = True
        return out

    @property
    def _result_refused(self) -> bool:
        return self._result is not None and self._result is not LinkError.OK

    def _link_step(self, state: State) -> Event | None:
        if state is State.AWAIT_REPLY:
            unit = self._read_link_unit(min_size=LINK_REPLY_SIZE)
            if unit is None:
                return None
            reply = parse_link_reply_body(unit[1])
            self._reply = reply
            if reply.error is not LinkError.OK:
                self._do(Step.RECV_REPLY_REFUSED)
                return reply
            assert self._link is not None
            self._mini_header = self._link.has_common_cap(
                CommonCap.MINI_HEADER
            ) and reply.has_common_cap(CommonCap.MINI_HEADER)
            self._do(Step.RECV_REPLY_OK)
            return reply
        assert state is State.AWAIT_RESULT
        data = self._take(LINK_RESULT_SIZE)
        if data is None:
            return None
        result = parse_link_result(data)
        self._result = result
        if result is not LinkError.OK:
            self._do(Step.RECV_RESULT_REFUSED)
            return LinkResult(result)
        self._do(Step.RECV_RESULT_OK)
        decoders: dict[int, Decoder] = {}
        if self.channel_type is ChannelType.MAIN:
            decoders[MSG_MAIN_INIT] = _MAIN_INIT_DECODER
        self._start_messages(decoders)
        return LinkResult(result)

    def _note(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, MainInit):
                self._main_init = event
            elif isinstance(event, Message) and self._display_init_sent:
                self._display_init_confirmed = True


def ensure_same_framing(client: ClientSide, server: ServerSide) -> None:
    """Raise :class:`SpiceUsageError` unless both legs frame messages alike.

    The broker forwards message bytes unchanged, so the client leg and the server leg
    must agree on the mini header. They do when the ``MINI_HEADER`` bit is forwarded
    unchanged in both link messages (the default); call this once both are linked if
    the broker rewrites caps.
    """
    if client.mini_header is None or server.mini_header is None:
        raise SpiceUsageError("both legs must have exchanged link messages first")
    if client.mini_header != server.mini_header:
        raise SpiceUsageError(
            "the client leg and the server leg disagree on the mini header: forward the "
            "MINI_HEADER capability unchanged"
        )


__all__ = [
    "DEFAULT_MAX_CLIENT_MESSAGE",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SERVER_MESSAGE",
    "NEED_DATA",
    "PAUSED",
    "ClientSide",
    "ServerSide",
    "ensure_same_framing",
]
