"""What the core hands a protocol plugin: a :class:`Session`.

A session is one client connection (a WebSocket) and one connected console
endpoint, with the token's claims and a logger bound to the session's
context. The core owns both ends: when the plugin's handler returns (or
raises, or the core ends the session: VM stopped, idle, shutdown), the core
closes the WebSocket with the right code and closes every endpoint it opened.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio.abc
import attrs
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from broker.service._pump import DEFAULT_READ_SIZE, ClientClosed, PumpEnd, Traffic, pump

if TYPE_CHECKING:
    from broker.service._presence import Seat
    from broker.tokens import Claims  # tokens imports jwt: not on the client side


@attrs.frozen
class Endpoint:
    """A connected console: a byte stream to the VM's VNC/SPICE server or serial port."""

    stream: anyio.abc.ByteStream
    #: How it was reached: ``fd`` (virDomainOpenGraphicsFD), ``tcp``, ``unix``,
    #: ``websocket`` (QEMU's own WebSocket port, as bytes), ``stream`` (a libvirt
    #: console stream).
    kind: str
    #: For the log, e.g. ``graphics #0`` or ``127.0.0.1:5901``.
    description: str

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.stream.aclose()


class ClientChannel(typing.Protocol):
    """The client side of a session, whatever carries it (a WebSocket, a CONNECT tunnel):
    whole messages in, whole messages out. Every method raises :class:`ClientClosed`
    once the client has gone."""

    @property
    def subprotocol(self) -> str | None:
        """The negotiated WebSocket subprotocol (None: none, or a tunnel)."""
        ...

    @property
    def request_headers(self) -> Mapping[str, str]:
        """The request's headers (empty for a tunnel)."""
        ...

    async def receive(self) -> bytes:
        """The next message's payload as bytes (a text message's UTF-8)."""
        ...

    async def receive_message(self) -> bytes | str:
        """The next message: bytes for a binary message, str for a text message."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one binary message, waiting while the client is slow."""
        ...

    async def send_text(self, text: str) -> None:
        """Send one text message, waiting while the client is slow."""
        ...


class WebSocketChannel:
    """The client side of a session: a WebSocket, as whole messages.

    :meth:`receive` returns text and binary messages alike as bytes (terminals send
    keys as text); :meth:`receive_message` tells them apart (str for text).
    :meth:`send` sends a binary message and :meth:`send_text` a text message, each
    waiting while the client's write buffer is above its high-water mark. All raise
    :class:`ClientClosed` once the client has gone: a handler that lets it escape ends
    its session as ``client_closed``. The same interface serves a tunnel through the
    CONNECT listener (:class:`TunnelChannel`), which carries bytes only.
    """

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        #: The broker's connections send binary messages on their own data path
        #: (``BrokerConnection.send_binary``); any other with websockets' ``send``.
        self._send_binary: Callable[[bytes], Awaitable[None]] = getattr(
            connection, "send_binary", connection.send
        )

    @property
    def subprotocol(self) -> str | None:
        return self.connection.subprotocol

    @property
    def request_headers(self) -> Mapping[str, str]:
        request = self.connection.request
        return request.headers if request is not None else {}

    async def receive(self) -> bytes:
        """The next message's payload, text messages as their UTF-8 bytes."""
        try:
            return await self.connection.recv(decode=False)
        except ConnectionClosed:
            raise ClientClosed from None

    async def receive_message(self) -> bytes | str:
        """The next message: bytes for a binary message, str for a text message."""
        try:
            return await self.connection.recv()
        except ConnectionClosed:
            raise ClientClosed from None

    async def send(self, data: bytes) -> None:
        """Send *data* as one binary message, waiting while the client is slow."""
        try:
            await self._send_binary(data)
        except ConnectionClosed:
            raise ClientClosed from None

    async def send_text(self, text: str) -> None:
        """Send *text* as one text message, waiting while the client is slow."""
        try:
            await self.connection.send(text)
        except ConnectionClosed:
            raise ClientClosed from None


class TunnelChannel(WebSocketChannel):
    """The client side of a session reached through the HTTP CONNECT listener: the
    tunnel's byte stream, read in chunks of at most *read_size* bytes (``connection``
    is None, ``subprotocol`` None, ``request_headers`` empty). A send that cannot finish
    within *write_timeout* seconds (the client stopped reading) calls :attr:`on_stall`
    and ends the client as :class:`ClientClosed`."""

    def __init__(
        self, stream: anyio.abc.ByteStream, first: bytes, read_size: int,
        write_timeout: float = 30.0,
    ) -> None:
        self.connection = None  # type: ignore[assignment]
        self.stream = stream
        self._first = first
        self._read_size = read_size
        self._write_timeout = write_timeout
        #: True once the client's side of the tunnel has ended.
        self.closed = False
        #: True once the client was cut for not reading.
        self.stalled = False
        #: Called once, before a client that stopped reading is cut.
        self.on_stall: Callable[[], None] | None = None

    @property
    def subprotocol(self) -> str | None:
        return None

    @property
    def request_headers(self) -> Mapping[str, str]:
        return {}

    async def receive(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        try:
            return await self.stream.receive(self._read_size)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            self.closed = True
            raise ClientClosed from None

    async def receive_message(self) -> bytes | str:
        """A tunnel carries bytes only: :meth:`receive`."""
        return await self.receive()

    async def send_text(self, text: str) -> None:
        """A tunnel carries bytes only: *text* as UTF-8."""
        await self.send(text.encode())

    async def send(self, data: bytes) -> None:
        try:
            with anyio.fail_after(self._write_timeout):
                await self.stream.send(data)
        except TimeoutError:
            self.closed = self.stalled = True
            if self.on_stall is not None:
                self.on_stall()
            raise ClientClosed from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.closed = True
            raise ClientClosed from None


class SessionGroup:
    """The connections of one token of a ``multi_connection`` protocol.

    The first connection (the one that used the token up) opens the group; the core
    admits further connections bearing the same token into it while that first
    connection's session lives, at most :attr:`max_connections` at a time. ``data`` is
    the plugin's: what its connections share (SPICE keeps the session's connection id
    there).
    """

    #: Connections of one group open at once (the first included).
    max_connections = 32

    def __init__(self, jti: str, session_id: str) -> None:
        #: The token's ``jti``.
        self.jti = jti
        #: The id of the first connection's session.
        self.session_id = session_id
        #: The plugin's shared state.
        self.data: dict[str, Any] = {}
        #: Connections open now.
        self.connections = 1
        #: True once the first connection's session ended: no connection joins any more.
        self.closed = False
        #: The byte counts of the open connections (the idle timeout reads them all).
        self.traffic: list[Traffic] = []
        #: The session's place among its console's sessions (its first connection's);
        #: every connection of the group gets it as ``session.seat``.
        self.seat: Seat | None = None


@attrs.frozen
class EndpointRequest:
    """What :meth:`broker.hookspecs.Protocol.open_endpoint` gets: the admitted session's
    token and domain, to open its console with."""

    #: The token's verified claims (``domain_uuid``, ``device``, ``view_only``, ...).
    claims: Claims
    #: The domain's name, when the resolver told it.
    domain_name: str
    #: The resolver's handle on the domain: a ``libvirt.virDomain`` (call libvirt in a
    #: worker thread: ``anyio.to_thread.run_sync``), or None for a resolver that is not
    #: libvirt.
    domain_handle: Any = attrs.field(eq=False, repr=False)
    #: A logger bound to the session.
    log: Any = attrs.field(eq=False, repr=False)


@attrs.frozen
class Session:
    """One console session, as a protocol plugin's handler receives it."""

    #: A short random id, in every log line of the session.
    id: str
    #: The protocol (the path's and the token's).
    protocol: str
    #: The console of the domain the protocol attaches to (``vnc``, ``spice``, ``serial``).
    console: str
    #: The token's verified claims (domain UUID, rights, jti, ...).
    claims: Claims
    #: The client: a WebSocket (or a :class:`TunnelChannel` through HTTP CONNECT).
    client: ClientChannel
    #: The console endpoint, connected before the handler is called; None for a protocol
    #: whose ``endpoint`` is ``none``.
    endpoint: Endpoint | None
    #: A structlog logger bound to session, domain, protocol and client.
    log: Any
    #: Byte counts and last activity; :func:`pump` keeps them, and the idle timeout reads them.
    traffic: Traffic
    #: Opens another connection to the same console (SPICE opens one per channel).
    #: The core closes it with the session.
    open_endpoint: Callable[[], Awaitable[Endpoint]]
    #: The client's address (IP) as the broker sees it.
    client_address: str
    #: The domain's name, when libvirt told it.
    domain_name: str = ""
    #: The resolver's handle on the domain: a ``libvirt.virDomain`` with the libvirt
    #: resolver (for what a plugin must ask libvirt itself, such as a display password
    #: from the secure XML; call libvirt in a worker thread), or None.
    domain_handle: Any = attrs.field(default=None, eq=False, repr=False)
    #: Size of one read from the console (``proxy.read_size``).
    read_size: int = DEFAULT_READ_SIZE
    #: Time the plugin's own protocol handshake may take (``limits.handshake_timeout``).
    handshake_timeout: float = 10.0
    #: The group of a ``multi_connection`` protocol's session, else None.
    group: SessionGroup | None = attrs.field(default=None, eq=False, repr=False)
    #: True for a connection that joined its group (not the one that used the token up).
    joined: bool = False
    #: Its place among the live sessions of its console (a :class:`Seat`; a group's
    #: connections share their first's): who else is there, and whether its input goes
    #: to the console now (:attr:`Seat.may_input`). None outside a broker (tests).
    seat: Seat | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def console_endpoint(self) -> Endpoint:
        """:attr:`endpoint`, for a protocol that has one (TypeError for one that has none)."""
        if self.endpoint is None:
            raise TypeError(f"protocol {self.protocol!r} sessions have no console endpoint")
        return self.endpoint

    @property
    def view_only(self) -> bool:
        """The token grants viewing only: the plugin must drop the client's input."""
        return self.claims.view_only

    @property
    def may_input(self) -> bool:
        """Whether the client's input goes to the console now: :attr:`Seat.may_input`
        (full rights, and the holder of the console's input in ``single`` mode), or the
        token's rights without a seat. Read it as each message is filtered."""
        if self.seat is None:
            return not self.claims.view_only
        return self.seat.may_input


#: What a protocol's ``session_handler`` returns: runs one session to its end.
SessionHandler: TypeAlias = Callable[[Session], Awaitable[None]]


async def raw_proxy(session: Session) -> None:
    """A session handler that proxies bytes both ways, unchanged, until one side ends.

    The built-in plugins use it until they parse their protocols; a plugin
    that needs no protocol logic returns it from ``console_broker_session_handler``.
    """
    end = await pump(
        session.client,
        session.console_endpoint.stream,
        traffic=session.traffic,
        read_size=session.read_size,
    )
    session.log.debug("session.pump_ended", side=end.value)


__all__ = [
    "ClientChannel",
    "ClientClosed",
    "Endpoint",
    "EndpointRequest",
    "PumpEnd",
    "Session",
    "SessionGroup",
    "SessionHandler",
    "TunnelChannel",
    "WebSocketChannel",
    "raw_proxy",
]
