"""Running sessions: from an admitted request to a closed client and closed endpoints.

:class:`SessionRunner` holds what the broker knows of its open sessions (by domain, for
lifecycle events and shutdown), the groups of ``multi_connection`` protocols, and the
shared consoles. :meth:`SessionRunner.run` takes a session's slot in the limits, opens
its console endpoint, awaits the protocol plugin's handler inside a cancel scope the
broker can cancel with a reason (VM stopped, idle, shutting down, hypervisor lost), and
whichever way the handler ends, closes the client with the reason's close code, closes
the endpoints and releases the slot. Admission (tokens, origin, limits checked, the
resolver's target) happens before, in :mod:`broker.service._app`.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import time
from typing import Any

import anyio
import attrs
import structlog
from websockets.protocol import State

from broker.config import Config
from broker.hookspecs import Protocol
from broker.service._audit import AuditLog
from broker.service._connection import BrokerConnection
from broker.service._libvirt import Resolver, Target
from broker.service._limits import SessionCounts
from broker.service._metrics import Metrics
from broker.service._presence import Presence, Seat
from broker.service._pump import Traffic
from broker.service._refusals import (
    CLIENT_CLOSED,
    CLIENT_STALLED,
    CONSOLE_CLOSED,
    CONSOLE_UNREACHABLE,
    IDLE_TIMEOUT,
    INTERNAL_ERROR,
    REPLAYED_TOKEN,
    SHUTDOWN,
    Refusal,
    Refused,
)
from broker.service._session import (
    Endpoint,
    EndpointRequest,
    Session,
    SessionGroup,
    SessionHandler,
    TunnelChannel,
    WebSocketChannel,
)
from broker.service._shared import SharedEndpoints
from broker.tokens import Claims

_log = structlog.get_logger("broker.service")
#: How long a session whose console closed waits for libvirt to report a stop (QEMU
#: closes its sockets as it dies; libvirt reports the stop when it has cleaned up,
#: measured 1.2 s after ``virDomainDestroy`` began on the test bed).
_STOP_SETTLE = 2.0
#: How long a closed console waits, at most, for libvirt to tell whether its VM stopped,
#: and how often meanwhile it asks (a console closed while its VM runs ends then as
#: ``console_closed``).
_STOP_WAIT = 4.0
_STOP_POLL = 0.5


@attrs.frozen
class Pending:
    """A checked WebSocket request waiting for its upgrade."""

    protocol: Protocol
    handler: SessionHandler
    claims: Claims
    target: Target
    client: str
    started: float
    #: The group a connection of a ``multi_connection`` protocol joins (its token was
    #: used up by the group's first connection), else None.
    group: SessionGroup | None = None


class Live:
    """An open session as the broker tracks it: how to end it, why it ended, and what an
    operator sees of it (``console-broker sessions``, the audit log)."""

    def __init__(
        self,
        session_id: str,
        domain: str,
        kind: str,
        *,
        protocol: str = "",
        domain_name: str = "",
        client: str = "",
        claims: Claims | None = None,
        traffic: Traffic | None = None,
        group: SessionGroup | None = None,
        joined: bool = False,
    ) -> None:
        self.session_id = session_id
        self.domain = domain
        self.kind = kind
        self.protocol = protocol
        self.domain_name = domain_name
        self.client = client
        self.claims = claims
        self.traffic = traffic if traffic is not None else Traffic()
        #: The group of a ``multi_connection`` session (its connections' byte counts).
        self.group = group
        #: True for a connection that joined its group: part of the group's first
        #: session, not a session of its own.
        self.joined = joined
        #: When it opened (seconds since the epoch).
        self.started = time.time()
        self.scope = anyio.CancelScope()
        self.ending: Refusal | None = None
        self.ended = anyio.Event()

    @property
    def session(self) -> str:
        """The id of the session it belongs to: its own, or its group's first
        connection's."""
        if self.joined and self.group is not None:
            return self.group.session_id
        return self.session_id

    def bytes(self) -> tuple[int, int]:
        """Bytes to the client and to the console so far, over the group's open
        connections too."""
        counts = [self.traffic]
        if self.group is not None:
            counts.extend(t for t in self.group.traffic if t is not self.traffic)
        return sum(t.to_client for t in counts), sum(t.to_console for t in counts)

    def end(self, ending: Refusal) -> None:
        if self.ending is None:
            self.ending = ending
        self.ended.set()
        self.scope.cancel()


def plugin_refusal(exc: Exception) -> Refused | None:
    """The :class:`Refused` a session handler raised to end its session with a reason
    (also from inside task groups), or None for any other error."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(Refused)
        if matched is not None and rest is None:
            return plugin_refusal(matched.exceptions[0])
    return None


#: What a console's stream raises once its other end has gone.
_CONSOLE_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                 ConnectionError)


def console_gone(exc: BaseException) -> bool:
    """Whether *exc* (or every exception of a group) says the console's end went away: a
    handler that let it escape ends its session as if it had returned (the core then
    tells a stopped VM from a closed console)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(console_gone(inner) for inner in exc.exceptions)
    return isinstance(exc, _CONSOLE_GONE)


class SessionRunner:
    """The broker's open sessions (see the module's notes)."""

    def __init__(
        self, config: Config, metrics: Metrics, resolver: Resolver, counts: SessionCounts
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._resolver = resolver
        self._counts = counts
        #: Consoles of ``shared_console`` protocols, open while a session uses them.
        self.shared = SharedEndpoints()
        #: The open sessions, by domain UUID.
        self.lives: dict[str, set[Live]] = {}
        #: Groups of ``multi_connection`` sessions, by token jti, while their first lives.
        self.groups: dict[str, SessionGroup] = {}
        #: The claims of each open session by its token's jti (a group's first
        #: connection): what a handoff handle is issued for.
        self.by_token: dict[str, Claims] = {}
        #: Every open session's place among its console's (a group's first connection).
        self.presence = Presence()
        #: The seat of each open session by its token's jti: what a control channel
        #: joins.
        self.seats: dict[str, Seat] = {}
        #: The input mode of each protocol with presence (``Protocol.input_mode``).
        self.input_modes: dict[str, str] = {}
        #: How long closing a WebSocket may take.
        self.close_timeout = max(0.1, min(5.0, config.limits.shutdown_grace))
        #: True once the broker is shutting down: a session opening now ends at once.
        self.closing = False
        #: Where each session's audit line goes when it ends (``[audit]``).
        self.audit = AuditLog()

    @property
    def count(self) -> int:
        return sum(len(lives) for lives in self.lives.values())

    def end_domain(self, domain_uuid: str, ending: Refusal) -> int:
        """End every session on *domain_uuid* with *ending*; how many there were."""
        lives = list(self.lives.get(domain_uuid, ()))
        for live in lives:
            live.end(ending)
        return len(lives)

    def sessions(self) -> list[Live]:
        """Every open session (a group's first connection; its joined connections are
        part of it), oldest first."""
        found = [live for lives in self.lives.values() for live in lives if not live.joined]
        return sorted(found, key=lambda live: live.started)

    def end_sessions(self, ids: set[str], ending: Refusal) -> list[Live]:
        """End the sessions whose ids are in *ids* (with their joined connections) with
        *ending*; the sessions ended (their first connections)."""
        ended: list[Live] = []
        for lives in list(self.lives.values()):
            for live in list(lives):
                if live.session in ids:
                    live.end(ending)
                    if not live.joined:
                        ended.append(live)
        return ended

    def end_all(self, ending: Refusal, *, kind: str | None = None) -> None:
        """End every session (of endpoint *kind* only, if given) with *ending*."""
        for lives in list(self.lives.values()):
            for live in list(lives):
                if kind is None or live.kind == kind:
                    live.end(ending)

    async def close(
        self, connection: BrokerConnection | TunnelChannel, refusal: Refusal
    ) -> None:
        if isinstance(connection, TunnelChannel):  # a tunnel has no close code: just close
            with anyio.CancelScope(shield=True), contextlib.suppress(
                OSError, anyio.BrokenResourceError, anyio.ClosedResourceError
            ):
                await connection.stream.aclose()
            return
        with anyio.move_on_after(self.close_timeout, shield=True):
            await connection.close(refusal.close_code, refusal.text)

    async def _open(self, pending: Pending, endpoints: list[Endpoint]) -> Endpoint:
        endpoint = await self._resolver.open(pending.target)
        endpoints.append(endpoint)
        return endpoint

    async def _open_first(
        self, pending: Pending, endpoints: list[Endpoint], log: Any
    ) -> Endpoint | None:
        """The session's endpoint, as its protocol says (:attr:`Protocol.endpoint`)."""
        protocol = pending.protocol
        if protocol.endpoint == "none":
            return None
        try:
            with anyio.fail_after(self.config.limits.handshake_timeout):
                if protocol.endpoint == "plugin":
                    target = pending.target
                    endpoint = await protocol.open_endpoint(EndpointRequest(
                        pending.claims, target.domain_name, target.handle, log
                    ))
                    if not isinstance(endpoint, Endpoint):
                        raise TypeError(
                            f"{type(protocol).__name__}.open_endpoint() returned {endpoint!r}, "
                            "not a broker.service.Endpoint"
                        )
                    endpoints.append(endpoint)
                    return endpoint
                if pending.protocol.shared_console:
                    target = pending.target
                    key = (pending.protocol.name, target.domain_uuid, target.plan)
                    endpoint = await self.shared.acquire(key, lambda: self._resolver.open(target))
                    endpoints.append(endpoint)
                    return endpoint
                return await self._open(pending, endpoints)
        except TimeoutError:
            raise Refused(CONSOLE_UNREACHABLE, "opening the console timed out") from None

    async def run(
        self, connection: BrokerConnection | TunnelChannel, pending: Pending
    ) -> None:
        claims, target, protocol = pending.claims, pending.target, pending.protocol
        domain, client = claims.domain_uuid, pending.client
        session_id = secrets.token_hex(6)
        members = pending.group
        joined = members is not None
        log = _log.bind(
            session=session_id, domain=domain, domain_name=target.domain_name,
            protocol=protocol.name, client=client, jti=claims.jti,
        )
        if members is not None:
            log = log.bind(group=members.session_id)
            if members.closed:
                await self.close(connection, REPLAYED_TOKEN)
                return
            members.connections += 1
        elif protocol.multi_connection:
            members = SessionGroup(claims.jti, session_id)
            self.groups[claims.jti] = members
        try:
            if not joined:
                self._counts.acquire(domain, client)
        except Refused as exc:
            self._end_group(members, joined)
            self.metrics.refusals.labels(exc.refusal.reason).inc()
            log.info("request.refused", reason=exc.refusal.reason, detail=exc.detail,
                     code=exc.refusal.close_code)
            await self.close(connection, exc.refusal)
            return
        endpoints: list[Endpoint] = []
        live: Live | None = None
        seat: Seat | None = None
        traffic = Traffic(
            client_counter=self.metrics.bytes.labels(protocol.name, "to_client"),
            console_counter=self.metrics.bytes.labels(protocol.name, "to_console"),
        )
        ending: Refusal | None = None
        opened_at = time.monotonic()
        if members is not None:
            members.traffic.append(traffic)
        try:
            try:
                endpoint = await self._open_first(pending, endpoints, log)
            except Refused as exc:
                self.metrics.refusals.labels(exc.refusal.reason).inc()
                log.info("request.refused", reason=exc.refusal.reason, detail=exc.detail,
                         code=exc.refusal.close_code)
                await self.close(connection, exc.refusal)
                return
            live = Live(
                session_id, domain, endpoint.kind if endpoint is not None else "none",
                protocol=protocol.name, domain_name=target.domain_name, client=client,
                claims=claims, traffic=traffic, group=members, joined=joined,
            )
            self.lives.setdefault(domain, set()).add(live)
            if not joined:
                self.by_token[claims.jti] = claims
                seat = self.presence.join(
                    domain=domain, console=protocol.console, id=session_id,
                    protocol=protocol.name, full=not claims.view_only, address=client,
                    name=claims.name, mode=self.input_modes.get(protocol.name),
                )
                self.seats[claims.jti] = seat
                if members is not None:
                    members.seat = seat
            elif members is not None:
                seat = members.seat
            connection.on_stall = functools.partial(live.end, CLIENT_STALLED)
            if self.closing:
                live.end(SHUTDOWN)

            async def open_endpoint() -> Endpoint:
                if protocol.endpoint == "console":
                    return await self._open(pending, endpoints)
                if protocol.endpoint == "plugin":
                    more = await protocol.open_endpoint(EndpointRequest(
                        claims, target.domain_name, target.handle, log
                    ))
                    endpoints.append(more)
                    return more
                raise TypeError(f"protocol {protocol.name!r} has no console endpoint")

            session = Session(
                id=session_id,
                protocol=protocol.name,
                console=protocol.console,
                claims=claims,
                client=(
                    connection
                    if isinstance(connection, TunnelChannel)
                    else WebSocketChannel(connection)
                ),
                endpoint=endpoint,
                log=log,
                traffic=traffic,
                open_endpoint=open_endpoint,
                client_address=client,
                domain_name=target.domain_name,
                domain_handle=target.handle,
                read_size=self.config.proxy.read_size,
                handshake_timeout=self.config.limits.handshake_timeout,
                group=members,
                joined=joined,
                seat=seat,
            )
            handshake = time.monotonic() - pending.started
            self.metrics.sessions.labels(protocol.name).inc()
            self.metrics.sessions_active.labels(protocol.name).inc()
            self.metrics.handshake.labels(protocol.name).observe(handshake)
            opened_at = time.monotonic()
            log.info(
                "session.opened",
                endpoint=endpoint.description if endpoint is not None else None,
                endpoint_kind=endpoint.kind if endpoint is not None else "none",
                view_only=claims.view_only, subprotocol=connection.subprotocol,
                joined=joined, handshake_ms=round(handshake * 1000, 2), name=claims.name,
            )
            try:
                with live.scope:
                    async with anyio.create_task_group() as group:
                        if self.config.limits.idle_timeout > 0:
                            group.start_soon(self._idle_watch, live, traffic, members)
                        await pending.handler(session)
                        group.cancel_scope.cancel()
            finally:
                self.metrics.sessions_active.labels(protocol.name).dec()
        except Exception as exc:
            refused = plugin_refusal(exc)
            if refused is None and console_gone(exc):
                # the console's end broke under the handler: as if it had returned
                log.debug("session.console_gone", error=type(exc).__name__)
            elif refused is None:
                log.exception("session.failed")
                ending = INTERNAL_ERROR
            else:
                log.info("session.ended_by_plugin", reason=refused.refusal.reason,
                         detail=refused.detail, code=refused.refusal.close_code)
                ending = refused.refusal
        finally:
            if not joined and seat is not None:  # out of its console's presence at once
                seat.leave()
                if self.seats.get(claims.jti) is seat:
                    del self.seats[claims.jti]
            with anyio.CancelScope(shield=True):
                for opened in endpoints:
                    if not await self.shared.release(opened):
                        await opened.aclose()
            if live is not None:
                if live.ending is None and ending is None:
                    if (
                        not connection.closed
                        if isinstance(connection, TunnelChannel)
                        else connection.state is State.OPEN
                    ):
                        ending = await self._console_ending(live)
                    else:
                        ending = CLIENT_CLOSED
                ending = live.ending or ending or CONSOLE_CLOSED
                self._forget(live)
                if not joined and self.by_token.get(claims.jti) is claims:
                    del self.by_token[claims.jti]
                await self.close(connection, ending)
                log.info(
                    "session.closed", reason=ending.reason, code=ending.close_code,
                    bytes_to_client=traffic.to_client, bytes_to_console=traffic.to_console,
                    duration=round(time.monotonic() - opened_at, 3),
                )
                self.metrics.sessions_closed.labels(protocol.name, ending.reason).inc()
                if not joined:
                    self.audit.session_ended(live, ending)
            elif ending is INTERNAL_ERROR:
                await self.close(connection, ending)
            self._end_group(members, joined)
            if members is not None:
                members.traffic = [t for t in members.traffic if t is not traffic]
            if not joined:
                self._counts.release(domain, client)

    def _end_group(self, group: SessionGroup | None, joined: bool) -> None:
        if group is None:
            return
        if joined:
            group.connections -= 1
        else:
            group.closed = True
            if self.groups.get(group.jti) is group:
                del self.groups[group.jti]

    async def _console_ending(self, live: Live) -> Refusal:
        """Why the console closed: QEMU closes its sockets as it dies, a moment before
        libvirt reports the stop (seconds on a loaded host); wait for that, asking libvirt
        now and then, at most :data:`_STOP_WAIT` seconds in all."""
        deadline = time.monotonic() + _STOP_WAIT
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_STOP_SETTLE):
                await live.ended.wait()
            while live.ending is None and time.monotonic() < deadline:
                with anyio.move_on_after(_STOP_SETTLE):
                    found = await self._resolver.ending_for(live.domain)
                    if found is not None:
                        return found
                with anyio.move_on_after(_STOP_POLL):
                    await live.ended.wait()
        return live.ending or CONSOLE_CLOSED

    def _forget(self, live: Live) -> None:
        lives = self.lives.get(live.domain)
        if lives is not None:
            lives.discard(live)
            if not lives:
                del self.lives[live.domain]

    async def _idle_watch(
        self, live: Live, traffic: Traffic, members: SessionGroup | None = None
    ) -> None:
        """End *live* once idle; a group's connections are idle only when all of them are
        (a SPICE cursor channel is quiet while the display channel streams)."""
        idle = self.config.limits.idle_timeout
        while True:
            last = traffic.last_activity
            if members is not None:
                last = max([last, *(t.last_activity for t in members.traffic)])
            remaining = last + idle - time.monotonic()
            if remaining <= 0:
                live.end(IDLE_TIMEOUT)
                return
            await anyio.sleep(remaining)
