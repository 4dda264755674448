"""The resolver: from a token's domain and console to a connected endpoint, through libvirt.

Theory of operation. One libvirt connection per broker, driven by libvirt's
event loop on the broker's own asyncio loop (libvirtaio, registered inside
the running loop before the connection opens: registered anywhere else, it
binds another loop and stream callbacks never fire). Over it:

* lifecycle events: a domain that stops, crashes or is undefined has its
  sessions ended (``vm_stopped``, ``domain_undefined``) as soon as libvirt
  says so;
* the close callback and keepalive: a lost connection is re-opened with
  exponential backoff (0.5 s doubling to 30 s); meanwhile new sessions are
  refused ``hypervisor_unavailable`` and ``/healthz`` answers 503. Sessions on
  a graphics socket survive (the socket goes straight to QEMU); sessions on
  a console stream end (``hypervisor_lost``). After reconnecting, the
  domains with sessions are checked again, for stops missed meanwhile.

libvirt calls that wait on libvirtd (opening the connection, looking a
domain up, its live XML, openGraphicsFD, openConsole) run in worker threads
(at most :data:`MAX_THREADS` at once), with libvirt's event loop made safe for
that (:mod:`broker.service._eventloop`). Measured on the test bed (TCG guest,
local libvirtd), on the loop thread: lookupByUUIDString 0.25 ms, isActive
0.2 ms, XMLDesc 0.26 ms, openGraphicsFD 2.2 ms median (p90 3.9 ms, max 13 ms);
a thread hop adds some 0.1 ms. The calls are cheap when libvirtd is idle, but
openGraphicsFD and openConsole wait for the domain's job lock, which another
job (a snapshot, a migration, a destroy) can hold for seconds: on the loop
thread, that would stall every session of the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs
import libvirt
import structlog
from lxml import etree

from broker.screenshots import Capture, capture
from broker.service._eventloop import register_event_loop
from broker.service._lvstream import LibvirtByteStream
from broker.service._plan import EndpointPlan, plan_endpoint
from broker.service._refusals import (
    CONSOLE_AUTH_FAILED,
    CONSOLE_BUSY,
    CONSOLE_UNREACHABLE,
    DOMAIN_UNDEFINED,
    HYPERVISOR_UNAVAILABLE,
    UNKNOWN_DOMAIN,
    VM_NOT_RUNNING,
    VM_STOPPED,
    Refusal,
    Refused,
)
from broker.service._session import Endpoint
from broker.service._sockstream import open_socket, open_tcp, open_unix
from broker.service._tls import ConsoleTLS, tls_error
from broker.service._wsendpoint import connect_websocket_endpoint
from broker.tokens import Claims

_log = structlog.get_logger("broker.libvirt")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_KEEPALIVE_INTERVAL = 5
_KEEPALIVE_COUNT = 3
#: Worker threads making libvirt calls at once.
MAX_THREADS = 16


@attrs.frozen
class Target:
    """A console of a running domain, resolved but not yet opened."""

    domain_uuid: str
    domain_name: str
    #: How to open the console; None for a protocol that opens its own endpoint or has
    #: none (only the domain was resolved: it exists and runs).
    plan: EndpointPlan | None
    #: The libvirt domain object (None for resolvers that are not libvirt).
    handle: Any = attrs.field(default=None, eq=False, repr=False)
    #: TLS to the console (a ``tls`` plan), from the protocol's plugin.
    tls: ConsoleTLS | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def console_plan(self) -> EndpointPlan:
        """:attr:`plan`, for a target resolved with a console."""
        if self.plan is None:
            raise ValueError("the target was resolved without a console")
        return self.plan


class ResolverEvents(Protocol):
    """What the broker wants to hear from its resolver."""

    def domain_gone(self, domain_uuid: str, ending: Refusal) -> None:
        """The domain stopped or was undefined: end its sessions with *ending*."""

    def connection_lost(self) -> None:
        """The hypervisor connection is gone (console streams went with it)."""

    def connection_restored(self) -> None:
        """The connection is back: stops may have been missed meanwhile."""


class Resolver(Protocol):
    """The boundary between the broker and the hypervisor (tests put a fake here)."""

    @property
    def available(self) -> bool:
        """Whether the hypervisor is reachable now (``/healthz``)."""
        ...

    def health(self) -> dict[str, object]:
        """Facts for ``/healthz``'s JSON body."""
        ...

    async def run(
        self, events: ResolverEvents, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Keep the hypervisor connection up until cancelled."""
        ...

    async def target(
        self, claims: Claims, console: str | None, tls: ConsoleTLS | None = None
    ) -> Target:
        """Resolve *console* (None: only the domain) of the token's domain, or raise
        :class:`Refused`; *tls*:
        the protocol's TLS to consoles with a TLS port of their own."""
        ...

    async def open(self, target: Target) -> Endpoint:
        """Open a connection to *target*, or raise :class:`Refused`."""
        ...

    async def ending_for(self, domain_uuid: str) -> Refusal | None:
        """Why sessions on the domain must end now (stopped, undefined), or None."""
        ...

    def capture_screenshot(self, target: Target, *, max_bytes: int) -> Capture:
        """The screen of *target*'s domain as the hypervisor sends it, at most *max_bytes*.
        Blocking: called in a worker thread. Raises
        :class:`~broker.screenshots.ScreenshotError` or :class:`Refused`."""
        ...


_CONNECTION_ERRORS = (
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INTERNAL_ERROR,
)

_STOPPING_EVENTS: dict[int, Refusal] = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED: VM_STOPPED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: VM_STOPPED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: DOMAIN_UNDEFINED,
}


def _state(dom: Any) -> tuple[bool, str, str]:
    """(active, live XML or "", name) of a domain, in one trip to a worker thread."""
    active = bool(dom.isActive())
    return active, dom.XMLDesc(0) if active else "", dom.name()


#: libvirt's domain states (``virDomainState``) in words, for the operator page.
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
#: Domains listed at most (the operator page's list).
MAX_DOMAINS = 2000


@attrs.frozen
class DomainInfo:
    """A domain as the operator page lists it."""

    uuid: str
    name: str
    #: libvirt's state in words (``running``, ``shut off``, ...).
    state: str
    #: Whether it runs (its consoles can be opened).
    active: bool
    #: The consoles its console-broker metadata records (``xml enable``), by name.
    consoles: frozenset[str]


def _consoles_of(xml: str) -> frozenset[str]:
    """The consoles a domain XML's metadata records, whose device the domain has."""
    from broker.xml import XmlError, read_consoles

    try:
        root = etree.fromstring(
            xml.encode(),
            etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False),
        )
        records = read_consoles(root)
    except (etree.XMLSyntaxError, XmlError):
        return frozenset()
    return frozenset(name for name, record in records.items() if record.index is not None)


def _domain_infos(conn: Any) -> list[DomainInfo]:
    """Every domain of *conn* (at most :data:`MAX_DOMAINS`), by name; one that goes away
    meanwhile is left out."""
    found: list[DomainInfo] = []
    for dom in conn.listAllDomains(0)[:MAX_DOMAINS]:
        try:
            state = dom.state()[0]
            found.append(DomainInfo(
                uuid=dom.UUIDString(), name=dom.name(), state=_STATES.get(state, "unknown"),
                active=bool(dom.isActive()), consoles=_consoles_of(dom.XMLDesc(0)),
            ))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return sorted(found, key=lambda info: (info.name, info.uuid))


def _unless_unsupported(function: Callable[..., Any], *args: Any) -> None:
    """Call *function*; a driver that does not support it is fine."""
    try:
        function(*args)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


async def _connect_tls(target: Target) -> anyio.abc.ByteStream:
    """A TLS connection to a ``tls`` plan's port, the console's certificate verified."""
    plan, tls = target.console_plan, target.tls
    assert plan.host is not None and plan.port is not None and tls is not None
    context, name = tls.for_address(plan.host)
    try:
        return await open_tcp(plan.host, plan.port, ssl_context=context, server_hostname=name)
    except ssl.SSLError as exc:
        reason = CONSOLE_AUTH_FAILED if isinstance(exc, ssl.SSLCertVerificationError) else (
            CONSOLE_UNREACHABLE
        )
        raise Refused(reason, f"{plan.describe()}: TLS: {tls_error(exc)}") from None


class LibvirtResolver:
    """:class:`Resolver` over one libvirt connection at *uri*."""

    def __init__(self, uri: str, *, stream_buffer: int = 256 * 1024) -> None:
        self.uri = uri
        self._stream_buffer = stream_buffer
        self._conn: Any = None
        self._callback_id: int | None = None
        self._lost = anyio.Event()
        self._events: ResolverEvents | None = None
        self._last_error = "not connected yet"
        self._connected_since: float | None = None
        self._limiter = anyio.CapacityLimiter(MAX_THREADS)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # --- the connection -------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._conn is not None

    def health(self) -> dict[str, object]:
        doc: dict[str, object] = {"uri": self.uri, "connected": self.available}
        if self._conn is None:
            doc["error"] = self._last_error
        return doc

    def _connect(self) -> None:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.open(self.uri)
        try:
            # Drivers that are not remote (test:///) have neither.
            _unless_unsupported(conn.setKeepAlive, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT)
            _unless_unsupported(conn.registerCloseCallback, self._on_close, None)
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except libvirt.libvirtError:
            conn.close()
            raise
        self._conn = conn
        self._lost = anyio.Event()
        self._connected_since = time.time()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for step in (
            lambda: conn.domainEventDeregisterAny(self._callback_id),
            conn.unregisterCloseCallback,
            conn.close,
        ):
            with contextlib.suppress(libvirt.libvirtError):
                step()
        self._callback_id = None

    def _on_loop(self, function: Callable[..., None], *args: Any) -> None:
        """Run *function* on the loop: libvirt may call back from a worker thread."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            function(*args)
        else:
            self._loop.call_soon_threadsafe(function, *args)

    def _on_close(self, _conn: Any, reason: int, _opaque: object) -> None:
        self._last_error = f"connection closed (reason {reason})"
        self._on_loop(self._lost.set)

    def _on_lifecycle(
        self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: object
    ) -> None:
        ending = _STOPPING_EVENTS.get(event)
        if ending is not None:
            self._on_loop(self._domain_gone, dom.UUIDString(), ending)

    def _domain_gone(self, domain_uuid: str, ending: Refusal) -> None:
        if self._events is not None:
            self._events.domain_gone(domain_uuid, ending)

    async def run(
        self, events: ResolverEvents, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        register_event_loop()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._events = events
        delay = _BACKOFF_FIRST
        connected_before = False
        started = False
        try:
            while True:
                try:
                    await anyio.to_thread.run_sync(self._connect, limiter=self._limiter)
                except libvirt.libvirtError as exc:
                    if self._last_error != _message(exc) or delay == _BACKOFF_FIRST:
                        _log.warning("libvirt.unreachable", uri=self.uri, error=_message(exc),
                                     retry_in=delay)
                    self._last_error = _message(exc)
                    if not started:
                        started = True
                        task_status.started()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                delay = _BACKOFF_FIRST
                _log.info("libvirt.connected", uri=self.uri, reconnected=connected_before)
                if connected_before:
                    events.connection_restored()
                connected_before = True
                if not started:
                    started = True
                    task_status.started()
                await self._lost.wait()
                _log.warning("libvirt.connection_lost", uri=self.uri, error=self._last_error)
                await anyio.to_thread.run_sync(self._disconnect, limiter=self._limiter)
                events.connection_lost()
        finally:
            self._disconnect()
            self._events = None

    # --- resolving ------------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            raise Refused(HYPERVISOR_UNAVAILABLE, self._last_error)
        return self._conn

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """One blocking libvirt call, in a worker thread (see the module's notes)."""
        if self._conn is None:
            raise Refused(HYPERVISOR_UNAVAILABLE, self._last_error)
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(function, *args), limiter=self._limiter
            )
        except libvirt.libvirtError as exc:
            conn = self._conn
            lost = conn is not None and not conn.isAlive()
            if exc.get_error_code() in _CONNECTION_ERRORS and lost:
                self._lost.set()
                raise Refused(HYPERVISOR_UNAVAILABLE, _message(exc)) from None
            raise

    async def _lookup(self, domain_uuid: str) -> Any:
        try:
            return await self._call(self._connection().lookupByUUIDString, domain_uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise Refused(UNKNOWN_DOMAIN, f"no domain {domain_uuid}") from None
            raise Refused(HYPERVISOR_UNAVAILABLE, _message(exc)) from None

    async def target(
        self, claims: Claims, console: str | None, tls: ConsoleTLS | None = None
    ) -> Target:
        dom = await self._lookup(claims.domain_uuid)
        try:
            active, xml, name = await self._call(_state, dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise Refused(UNKNOWN_DOMAIN, f"no domain {claims.domain_uuid}") from None
            raise Refused(HYPERVISOR_UNAVAILABLE, _message(exc)) from None
        if not active:
            raise Refused(VM_NOT_RUNNING, f"domain {name} is not running")
        if console is None:
            return Target(claims.domain_uuid, name, None, handle=dom)
        root = etree.fromstring(
            xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        )
        plan = plan_endpoint(root, console, claims.device, tls=tls is not None)
        return Target(claims.domain_uuid, name, plan, handle=dom, tls=tls)

    async def open(self, target: Target) -> Endpoint:
        plan = target.console_plan
        if plan.kind == "fd":
            return await self._open_fd(target)
        if plan.kind == "stream":
            return await self._open_stream(target)
        try:
            if plan.kind == "tcp":
                assert plan.host is not None and plan.port is not None
                stream: anyio.abc.ByteStream = await open_tcp(plan.host, plan.port)
            elif plan.kind == "tls":
                stream = await _connect_tls(target)
            elif plan.kind == "unix":
                assert plan.path is not None
                stream = await open_unix(plan.path)
            else:
                assert plan.host is not None and plan.port is not None
                stream = await connect_websocket_endpoint(plan.host, plan.port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise Refused(CONSOLE_UNREACHABLE, f"{plan.describe()}: {why}") from None
        return Endpoint(stream, plan.kind, plan.describe())

    async def _open_fd(self, target: Target) -> Endpoint:
        plan = target.console_plan
        try:
            fd = await self._call(
                target.handle.openGraphicsFD, plan.index, libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH
            )
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                raise Refused(VM_NOT_RUNNING, _message(exc)) from None
            raise Refused(CONSOLE_UNREACHABLE, _message(exc)) from None
        sock = socket.socket(fileno=fd)
        try:
            stream = await open_socket(sock)
        except BaseException:
            sock.close()
            raise
        return Endpoint(stream, "fd", plan.describe())

    async def _open_stream(self, target: Target) -> Endpoint:
        plan = target.console_plan
        stream = await self._call(self._connection().newStream, libvirt.VIR_STREAM_NONBLOCK)
        try:
            await self._call(target.handle.openConsole, plan.device, stream, 0)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            message = _message(exc)
            if "active console session" in message.lower():
                raise Refused(CONSOLE_BUSY, message) from None
            if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                raise Refused(VM_NOT_RUNNING, message) from None
            raise Refused(CONSOLE_UNREACHABLE, message) from None
        return Endpoint(
            LibvirtByteStream(stream, buffer_limit=self._stream_buffer), "stream", plan.describe()
        )

    async def domains(self) -> list[DomainInfo]:
        """Every domain of the hypervisor, with its state and enabled consoles (the
        operator page's list); Refused ``hypervisor_unavailable`` without libvirt."""
        try:
            result: list[DomainInfo] = await self._call(_domain_infos, self._connection())
        except libvirt.libvirtError as exc:
            raise Refused(HYPERVISOR_UNAVAILABLE, _message(exc)) from None
        return result

    def capture_screenshot(self, target: Target, *, max_bytes: int) -> Capture:
        """:func:`broker.screenshots.capture` of *target*'s domain (a blocking stream of
        this connection: call it in a worker thread)."""
        return capture(self._connection(), target.handle, max_bytes=max_bytes)

    async def ending_for(self, domain_uuid: str) -> Refusal | None:
        try:
            dom = await self._lookup(domain_uuid)
        except Refused as exc:
            return DOMAIN_UNDEFINED if exc.refusal is UNKNOWN_DOMAIN else None
        try:
            return None if await self._call(dom.isActive) else VM_STOPPED
        except (libvirt.libvirtError, Refused):
            return None
