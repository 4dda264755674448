"""One SPICE channel connection through the broker: link, policy, ticket, proxy, guard.

Theory of operation. A SPICE session is several connections, one per channel; each
reaches the broker as its own WebSocket with the session's token, and the core runs
each as a session of its own sharing one :class:`broker.api.SessionGroup`
(``Protocol.multi_connection``). The first connection used the token up: it must
link the main channel with connection id 0. Every later one must link another
channel with the connection id QEMU gave the main channel (``MAIN_INIT.session_id``,
kept in the group's data), and its channel type must pass the session's
:class:`~broker_spice.protocol.ChannelPolicy` (view-only, ``spice.deny_channels``).
A refused link is answered by the broker itself, with the link error spice-server
would send, and the connection ends ``channel_refused``.

The console endpoint the core opened for the connection (``openGraphicsFD`` in fd
mode, TCP in tcp mode) gets the client's link message. QEMU's ticket is answered by
the broker: an empty password where the broker's socket skips authentication (fd
mode), else the display password from the domain's secure XML. The client's own
ticket is read and dropped: it never reaches QEMU and the client never learns the
password.

Then both directions are forwarded unchanged, through the layer's side objects (which
bound headers and track ``DISPLAY_INIT``), with one exception: on a view-only
session's main channel the client's agent and mouse-mode messages
(:data:`~broker_spice.protocol.VIEW_ONLY_MAIN_DROPPED`) are dropped whole by a
:class:`~broker_spice.protocol.MessageFilter` (clipboard, file transfer and monitor
configuration never reach the guest). With ``spice.input = "single"``, a full-rights
session's inputs channel drops its keyboard and mouse messages
(:data:`~broker_spice.protocol.INPUTS_DROPPED`) while another session holds the
display's input (``session.may_input``, asked as each message's header passes); a
press while nobody holds it claims it. The server acknowledges mouse motions in
bunches and clients stop moving the pointer while too many are unacknowledged, so the
broker acknowledges the motions it dropped itself (a ``MOUSE_MOTION_ACK`` per bunch,
put between two of the server's messages; under the mini header, which every current
client uses). Every other connection forwards its chunks as
they come. However the connection ends, the backend is
closed through the guard: a display channel whose client never sent ``DISPLAY_INIT``
gets the broker's own, and the broker waits (at most :data:`GUARD_TIMEOUT`) for QEMU to
confirm it before closing, so a vanished client cannot crash the VM.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
import structlog
from lxml import etree

from broker.api import (
    CLIENT_PROTOCOL_ERROR,
    CONSOLE_AUTH_FAILED,
    CONSOLE_PROTOCOL_ERROR,
    ClientClosed,
    Refused,
    Session,
)

from ._refusals import CHANNEL_REFUSED
from .protocol import (
    INPUT_MOTION_ACK_BUNCH,
    INPUTS_DROPPED,
    INPUTS_MOTIONS,
    INPUTS_PRESSES,
    MSG_INPUTS_MOUSE_MOTION_ACK,
    NEED_DATA,
    PAUSED,
    VIEW_ONLY_MAIN_DROPPED,
    ChannelPolicy,
    ChannelType,
    ClientSide,
    ClientTicket,
    ConnectionClosed,
    Data,
    Event,
    LinkError,
    LinkMessage,
    LinkReply,
    LinkResult,
    MainInit,
    MessageFilter,
    Peer,
    ServerSide,
    SpiceProtocolError,
    Ticket,
    build_message,
    encrypt_ticket,
    ensure_same_framing,
)

#: How long the guard waits for QEMU to confirm a display channel's DISPLAY_INIT.
GUARD_TIMEOUT = 5.0
#: The group data key holding the session's connection id (``MAIN_INIT.session_id``).
SESSION_ID = "spice.session_id"
_PASSWORD = "spice.password"  # noqa: S105 - a dict key, not a password

_log = structlog.get_logger("broker.spice")
_CONSOLE_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                   OSError)


def policy_for(session: Session, deny: tuple[str, ...]) -> ChannelPolicy:
    """The channel policy of *session*: view-only from its token, *deny* from the config."""
    return ChannelPolicy(
        view_only=session.view_only, deny=[ChannelType[name.upper()] for name in deny]
    )


def _bytes(data: bytes | memoryview) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def spice_password(xml: str) -> str:
    """The SPICE display password (``passwd``) of a domain's secure XML, or ``""``."""
    root = etree.fromstring(xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
    graphics = root.find("devices/graphics[@type='spice']")
    return "" if graphics is None else graphics.get("passwd", "")


def _refused(exc: SpiceProtocolError) -> Refused:
    reason = CLIENT_PROTOCOL_ERROR if exc.peer is Peer.CLIENT else CONSOLE_PROTOCOL_ERROR
    return Refused(reason, str(exc))


class ChannelProxy:
    """One SPICE channel connection: a client WebSocket and its own console endpoint."""

    def __init__(self, session: Session, policy: ChannelPolicy) -> None:
        self.session = session
        self.policy = policy
        self.stream = session.console_endpoint.stream
        self.client = ClientSide()
        self.server = ServerSide()
        self.group_data: dict[str, Any] = (
            session.group.data if session.group is not None else {}
        )
        self.log = session.log
        self._pending: list[Event] = []
        #: What the client was sent so far ends between two messages (the inputs
        #: channel of a watching session puts motion acknowledgements there).
        self._client_boundary = False
        #: Held while bytes go to the client, where acknowledgements may be put (the
        #: inputs channel of a session that may watch only).
        self._to_client = anyio.Lock()
        #: Mouse motions the broker dropped and acknowledged, in bunches.
        self._acked = 0
        #: The filter of the client's messages, once linked (None: none).
        self._drop: MessageFilter | None = None

    # --- reading events -------------------------------------------------------------

    async def _client_event(self) -> Event:
        while not self._pending:
            try:
                data = await self.session.client.receive()
            except ClientClosed:
                data = b""
            self.client.receive_data(data)
            self._pending.extend(self.client.available_events())
        return self._pending.pop(0)

    async def _server_event(self) -> Event:
        while True:
            event = self.server.next_event()
            if event is not NEED_DATA and event is not PAUSED:
                return event
            if event is PAUSED:
                raise Refused(CONSOLE_PROTOCOL_ERROR, "the console waits for the broker")
            try:
                data = await self.stream.receive(self.session.read_size)
            except _CONSOLE_ERRORS:
                data = b""
            self.server.receive_data(data)

    # --- the link -------------------------------------------------------------------

    def _admit(self, link: LinkMessage) -> LinkError:
        session = self.session
        if not session.joined and link.channel_type is not ChannelType.MAIN:
            return LinkError.BAD_CONNECTION_ID  # a session starts with its main channel
        if session.joined and link.channel_type is ChannelType.MAIN:
            return LinkError.PERMISSION_DENIED  # one main channel per session
        return self.policy.check(link, session_id=self.group_data.get(SESSION_ID))

    async def _password(self) -> str:
        if self.session.console_endpoint.kind == "fd":
            return ""  # openGraphicsFD(SKIPAUTH): QEMU checks no password on this socket
        if _PASSWORD not in self.group_data:
            handle = self.session.domain_handle
            if handle is None:
                self.group_data[_PASSWORD] = ""
            else:
                import libvirt

                xml = await anyio.to_thread.run_sync(
                    handle.XMLDesc, libvirt.VIR_DOMAIN_XML_SECURE
                )
                self.group_data[_PASSWORD] = spice_password(xml)
        return str(self.group_data[_PASSWORD])

    async def link(self) -> bool:
        """Link the channel on both sides; False when a peer left during the link."""
        session = self.session
        link = await self._client_event()
        if isinstance(link, ConnectionClosed):
            return False
        if not isinstance(link, LinkMessage):  # pragma: no cover - the table forbids it
            raise Refused(CLIENT_PROTOCOL_ERROR, f"unexpected {type(link).__name__}")
        channel = link.channel_type.name.lower()
        self.log = self.log.bind(channel=channel, channel_id=link.channel_id)
        answer = self._admit(link)
        if answer is not LinkError.OK:
            await session.client.send(_bytes(self.client.send(LinkReply(error=answer))))
            self.log.info("spice.channel_refused", error=answer.name.lower(),
                          connection_id=link.connection_id)
            raise Refused(CHANNEL_REFUSED, f"{channel}: {answer.name.lower()}")
        await self.stream.send(_bytes(self.server.send(link)))
        reply = await self._server_event()
        if isinstance(reply, ConnectionClosed):
            return False
        assert isinstance(reply, LinkReply)
        await session.client.send(_bytes(self.client.send(reply)))
        if reply.error is not LinkError.OK:
            self.log.info("spice.link_refused_by_console", error=reply.error.name.lower())
            return False
        ticket = await self._client_event()
        if not isinstance(ticket, ClientTicket):  # the client left during the link
            return False
        password = await self._password()
        encrypted = encrypt_ticket(reply.public_key, password)
        await self.stream.send(_bytes(self.server.send(Ticket(encrypted))))
        result = await self._server_event()
        if isinstance(result, ConnectionClosed):
            return False
        assert isinstance(result, LinkResult)
        await session.client.send(_bytes(self.client.send(result)))
        if result.error is not LinkError.OK:
            self.log.warning("spice.console_auth_failed", error=result.error.name.lower())
            raise Refused(CONSOLE_AUTH_FAILED, f"{channel}: {result.error.name.lower()}")
        ensure_same_framing(self.client, self.server)
        self.log.info("spice.channel_linked", connection_id=link.connection_id,
                      mini_header=self.server.mini_header)
        return True

    # --- messages -------------------------------------------------------------------

    def _view_only_filter(self) -> MessageFilter | None:
        """The filter of a view-only session's main channel; ``None`` elsewhere."""
        if not self.policy.view_only or self.client.channel_type is not ChannelType.MAIN:
            return None
        assert self.client.mini_header is not None
        return MessageFilter(VIEW_ONLY_MAIN_DROPPED, mini_header=self.client.mini_header)

    def _input_filter(self) -> MessageFilter | None:
        """The filter of the inputs channel of a session whose console's input one
        session at a time holds; ``None`` elsewhere."""
        seat = self.session.seat
        if seat is None or not seat.single or self.client.channel_type is not ChannelType.INPUTS:
            return None
        assert self.client.mini_header is not None
        return MessageFilter(INPUTS_DROPPED, mini_header=self.client.mini_header,
                             gate=self._watching)

    def _watching(self, msg_type: int) -> bool:
        """Whether an input message of *msg_type* is dropped now: the session does not
        hold the input, and this is no press that claims it while nobody does."""
        if self.session.may_input:
            return False
        seat = self.session.seat
        return not (msg_type in INPUTS_PRESSES and seat is not None and seat.claim())

    @property
    def _gated(self) -> bool:
        """Whether this is a watching-capable inputs channel (its filter has a gate)."""
        return self._drop is not None and self._drop.gate is not None

    async def _acknowledge(self) -> None:
        """Acknowledge the client's dropped mouse motions, a bunch at a time, where what
        it was sent ends between two messages (else after the server's next message)."""
        drop = self._drop
        if drop is None or not drop.mini_header:  # a full header: a serial to fit in,
            return  # not done (no current client uses the full header)
        motions = sum(drop.dropped.get(msg_type, 0) for msg_type in INPUTS_MOTIONS)
        owed = motions // INPUT_MOTION_ACK_BUNCH - self._acked
        if owed <= 0:
            return
        async with self._to_client:
            if not self._client_boundary:
                return
            ack = build_message(MSG_INPUTS_MOUSE_MOTION_ACK, mini_header=True)
            out = _bytes(self.client.send(Data(ack * owed)))
            self.session.traffic.count_to_client(len(out))
            await self.session.client.send(out)
            self._acked += owed

    def _filtered(self, drop: MessageFilter, event: Data) -> Data | None:
        known = len(drop.dropped)
        out = drop.feed(event.data)
        if len(drop.dropped) > known:  # logged once per message type
            what = "spice.view_only_dropped" if drop.gate is None else "spice.input_dropped"
            for msg_type in list(drop.dropped)[known:]:
                self.log.info(what, message_type=msg_type)
        if not out:  # dropped messages are still the user at work: not idle
            self.session.traffic.last_activity = time.monotonic()
            return None
        return event if out is event.data else Data(out)

    async def _client_to_server(self, scope: anyio.CancelScope) -> None:
        session = self.session
        events, self._pending = self._pending, []
        events += self.client.available_events()  # what the client sent right after its ticket
        if self._drop is None:
            self._drop = self._filter()
        drop = self._drop
        try:
            while True:
                for event in events:
                    if isinstance(event, Data):
                        kept = event if drop is None else self._filtered(drop, event)
                        if drop is not None and drop.gate is not None:
                            await self._acknowledge()
                        if kept is None:
                            continue
                        out = _bytes(self.server.send(kept))
                        session.traffic.count_to_console(len(out))
                        await self.stream.send(out)
                    elif isinstance(event, ConnectionClosed):
                        return
                try:
                    data = await session.client.receive()
                except ClientClosed:
                    data = b""
                self.client.receive_data(data)
                events = self.client.available_events()
        except _CONSOLE_ERRORS:
            return
        except SpiceProtocolError as exc:
            raise _refused(exc) from None
        finally:
            scope.cancel()

    async def _server_to_client(self, scope: anyio.CancelScope) -> None:
        session = self.session
        try:
            events = self.server.available_events()  # what came with the link result
            while True:
                for event in events:  # act before forwarding (the session binding)
                    if isinstance(event, MainInit) and not session.joined:
                        self.group_data[SESSION_ID] = event.session_id
                        self.log.info("spice.session_bound")
                if self._gated:  # acknowledgements may be put between two chunks
                    async with self._to_client:
                        self._client_boundary = False
                        if not await self._to_client_events(events):
                            return
                        self._client_boundary = self.server.at_boundary
                    await self._acknowledge()
                elif not await self._to_client_events(events):
                    return
                try:
                    data = await self.stream.receive(session.read_size)
                except _CONSOLE_ERRORS:
                    data = b""
                self.server.receive_data(data)
                events = self.server.available_events()
        except ClientClosed:
            return
        except SpiceProtocolError as exc:
            raise _refused(exc) from None
        finally:
            scope.cancel()

    async def _to_client_events(self, events: list[Event]) -> bool:
        """Forward the server's *events* to the client; False at its end."""
        session = self.session
        for event in events:
            if isinstance(event, Data):
                out = _bytes(self.client.send(event))
                session.traffic.count_to_client(len(out))
                await session.client.send(out)
            elif isinstance(event, ConnectionClosed):
                return False
        return True

    def _filter(self) -> MessageFilter | None:
        return self._view_only_filter() or self._input_filter()

    async def forward(self) -> None:
        self._drop = self._filter()
        async with anyio.create_task_group() as group:
            group.start_soon(self._client_to_server, group.cancel_scope)
            group.start_soon(self._server_to_client, group.cancel_scope)

    # --- the guard ------------------------------------------------------------------

    def _safe(self) -> bool:
        return self.server.safe_to_close

    async def close_guarded(self) -> None:
        """Make closing the backend harmless to the VM (see the module's docstring)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(GUARD_TIMEOUT):
            if self.server.safe_to_close:
                return
            guard = self.server.close_guard()
            if guard:
                self.log.info("spice.guard_sent", bytes=len(guard))
                with contextlib.suppress(*_CONSOLE_ERRORS):
                    await self.stream.send(guard)
            while True:
                if self._safe():
                    break
                try:
                    data = await self.stream.receive(self.session.read_size)
                except _CONSOLE_ERRORS:
                    return
                try:
                    self.server.receive_data(data)
                    events = self.server.available_events()
                except SpiceProtocolError:
                    return
                if any(isinstance(event, ConnectionClosed) for event in events):
                    return
            self.log.info("spice.guard_confirmed")


async def run_channel(session: Session, policy: ChannelPolicy) -> None:
    """The session handler's body for one channel connection."""
    proxy = ChannelProxy(session, policy)
    try:
        with anyio.fail_after(session.handshake_timeout):
            linked = await proxy.link()
        if linked:
            await proxy.forward()
    except SpiceProtocolError as exc:
        raise _refused(exc) from None
    except TimeoutError:
        raise Refused(CLIENT_PROTOCOL_ERROR, "the SPICE link took too long") from None
    finally:
        await proxy.close_guarded()
