"""The broker: one listener for WebSocket consoles and plain HTTP, and the sessions behind it.

Theory of operation. websockets' asyncio server accepts connections; for
each request, :meth:`Broker._process_request` decides before any upgrade:

1. plain HTTP (``/healthz``, ``/metrics``, console pages, client files, handoff
   handles, screenshots) is answered at once (a screenshot after the worker thread
   that takes it, :mod:`broker.service._screenshots`);
2. a WebSocket request is checked, cheapest first and without touching the
   token until it must: a real upgrade, a known protocol, the Origin, then the
   token (verified and used up), the session limits, and the resolver (domain
   known and running, console enabled). A refusal answers an HTTP status, or,
   with ``http.refusals = "close"``, upgrades and closes with the reason's
   close code so a browser page can tell the user why.

After the upgrade, :meth:`Broker._handle` hands the session to the
:class:`~broker.service._sessions.SessionRunner`, which takes a slot in the limits, opens
the console endpoint and awaits the protocol plugin's session handler inside
a cancel scope the broker holds. The broker ends a session by cancelling
that scope with a reason (VM stopped, idle, shutting down); whichever way the
handler ends, the broker closes the WebSocket with the reason's close code,
closes the endpoints and releases the slot. Native clients come in through the
HTTP CONNECT listener (:mod:`broker.service._tunnels`), which has the broker admit
each tunnel's token the same way and run its session on the tunnel.

No log line holds a token: requests are logged by route and reason, never
by target, and websockets' own request logging is silenced (see ``_logging``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import http
import json
import logging
import os
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import anyio.abc
import attrs
import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidHeader
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

import broker
from broker.config import Config
from broker.handoff import HandoffLimit
from broker.hookspecs import OPERATOR, SCREENSHOT, ClientFile, Page, Protocol
from broker.plugins import PluginContext, PluginError, PluginManager
from broker.recordings import RECORDING
from broker.recordings import retention as recordings_retention
from broker.service._admin import MAX_LINE as ADMIN_MAX_LINE
from broker.service._admin import Admin, bind_admin_socket, remove_socket, socket_inode
from broker.service._audit import AuditLog
from broker.service._clientcert import ClientCertificates, ClientTLS
from broker.service._connect import token_for_handle
from broker.service._connection import LISTENER, BrokerConnection, ConnectionLimits
from broker.service._control import SUBPROTOCOL as CONTROL_SUBPROTOCOL
from broker.service._control import ControlChannels, PendingControl
from broker.service._gate import (
    AcceptGuard,
    ConnectionGate,
    SocketListener,
    http_response,
    listening_sockets,
)
from broker.service._libvirt import Resolver, Target
from broker.service._limits import SessionCounts, session_limits
from broker.service._loop import running_loop_name
from broker.service._metrics import CONTENT_TYPE, Metrics
from broker.service._operator import SUBPROTOCOL as OPERATOR_SUBPROTOCOL
from broker.service._operator import Operators, PendingOperator
from broker.service._operator import page as operator_page
from broker.service._presence import INPUT_MODES
from broker.service._recordings import RecordingRequests
from broker.service._refusals import (
    BAD_REQUEST,
    FOREIGN_ORIGIN,
    HYPERVISOR_LOST,
    INTERNAL_ERROR,
    INVALID_TOKEN,
    LIMIT_REACHED,
    REPLAYED_TOKEN,
    SHUTDOWN,
    TOKEN_REFUSALS,
    UNKNOWN_PROTOCOL,
    VIEW_ONLY_UNSUPPORTED,
    WRONG_PROTOCOL,
    Refusal,
    Refused,
)
from broker.service._request import (
    ControlRoute,
    FileRoute,
    HandoffRoute,
    NotAllowed,
    NotFound,
    OperatorPageRoute,
    OperatorRoute,
    OriginPolicy,
    PageRoute,
    PlainRoute,
    RecordingRoute,
    RedirectRoute,
    ScreenshotRoute,
    TrustedProxies,
    WebSocketRoute,
    bearer_token,
    loggable,
    loggable_path,
    route,
)
from broker.service._screenshots import Screenshots
from broker.service._session import (
    SessionGroup,
    SessionHandler,
)
from broker.service._sessions import Pending, SessionRunner
from broker.service._tls import ConsoleTLS
from broker.service._tunnels import LISTENER as TUNNEL_LISTENER
from broker.service._tunnels import TunnelListener
from broker.service._workers import (
    CONNECT,
    HTTP,
    Passed,
    WorkerLink,
    head_token,
    merge_metrics,
    relay_streams,
    relay_transport,
)
from broker.tokens import Claims, TokenRefused, TokenVerifier

_log = structlog.get_logger("broker.service")
_SERVER = f"console-broker/{broker.__version__}"
#: The answer when the worker a connection belongs to has had no room for it.
_OWNER_BUSY = "the broker worker serving this console is restarting; try again"
#: Connections being made or passed between workers (a task the loop alone holds may be
#: collected).
_handovers: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    """Run *work* as a task of its own on the running loop, held until it is done."""
    task = asyncio.get_running_loop().create_task(work)
    _handovers.add(task)
    task.add_done_callback(_handovers.discard)


@attrs.frozen
class _PendingRefusal:
    """A request to refuse after the upgrade (``http.refusals = "close"``)."""

    refusal: Refusal


def _response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
) -> Response:
    all_headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Content-Type-Options", "nosniff"),
            *headers,
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, all_headers, body)


def _host_port(address: Any) -> tuple[str, int]:
    return (str(address[0]), int(address[1]))


def _text(status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return _response(status, (text + "\n").encode(), headers=headers)


def _handshake_problem(connection: ServerConnection, request: Request) -> Refused | None:
    """websockets' own checks of a WebSocket handshake (the upgrade runs them again), as a
    ``bad_request`` before the token is looked at: a missing, malformed or repeated
    ``Connection``, ``Upgrade``, ``Sec-WebSocket-*`` or ``Origin`` header, not HTTP/1.1.
    The detail names the header, never its value."""
    try:
        connection.protocol.process_request(request)
    except InvalidHeader as exc:
        return Refused(BAD_REQUEST, f"missing, malformed or repeated {exc.name} header")
    except InvalidHandshake as exc:
        return Refused(BAD_REQUEST, f"not a WebSocket handshake ({type(exc).__name__})")
    return None


class Broker:
    """The console broker service: ``await broker.serve()`` until :meth:`shutdown`.

    *resolver* is the boundary to the hypervisor (:class:`LibvirtResolver`, or
    a fake in tests); *verifier* checks tokens; *plugins* supplies protocols,
    session handlers and pages. Several brokers can run in one process: each
    has its own metrics registry.
    """

    def __init__(
        self,
        config: Config,
        *,
        verifier: TokenVerifier,
        resolver: Resolver,
        plugins: PluginManager,
        metrics: Metrics | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        link: WorkerLink | None = None,
        counts: SessionCounts | None = None,
        admin_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        #: With worker processes (``service.workers``): this worker's link to the others.
        self._link = link
        if link is not None:
            verifier.handoffs.accepts = link.owns
        self.metrics = metrics if metrics is not None else Metrics()
        self._verifier = verifier
        self._resolver = resolver
        self._plugins = plugins
        self._ssl = ssl_context
        self._node = config.node_name
        self._prefix = urlsplit(config.public_url).path
        self._origin = self._origin_policy(config)
        self._proxies = TrustedProxies(config.http.trusted_proxies)
        self._refuse_by_close = config.http.refusals == "close"
        limits = config.limits
        #: The session counts the limits hold against: this process's, or with worker
        #: processes every worker's (``SharedSessionCounts``).
        self._counts = counts if counts is not None else SessionCounts(session_limits(config))
        #: Each plugin's context: its logger, its metrics in this broker's registry.
        self._contexts = plugins.contexts(config, self.metrics.registry)
        self._handlers = self._load_handlers(plugins, self._contexts)
        #: TLS to consoles with a TLS port of their own, by protocol.
        self._console_tls = self._load_console_tls(plugins, self._contexts)
        self._runner = SessionRunner(config, self.metrics, resolver, self._counts)
        self._runner.input_modes = self._load_input_modes(plugins, self._contexts)
        #: Each session's audit line as it ends (``[audit]``): opened now, so that a file
        #: that cannot be written stops the start (CommandError).
        self._runner.audit = AuditLog(config.audit.file, link.index if link is not None else None)
        self._runner.audit.open()
        #: The live sessions for the admin socket and the core's pages (every worker's).
        self.admin = Admin(self._runner, link)
        #: The admin socket the supervisor bound for every worker (None: bind it here,
        #: unless this is a worker).
        self._admin_socket = admin_socket
        #: The sessions' control channels (``/ws/{protocol}/control``).
        self._controls = ControlChannels(self._runner, verifier, self._node)
        #: The operator page's sessions (``/operator/ws``).
        self._operators = Operators(
            config, verifier, {name: entry[0] for name, entry in self._handlers.items()},
            resolver, self._runner, self.admin.live_sessions,
        )
        #: ``GET /screenshot``: bounded, in worker threads.
        self.screenshots = Screenshots(resolver)
        #: ``GET /recording``: the recordings of every kind the plugins declare.
        self.recordings = RecordingRequests(config.recordings_dir, plugins.recording_kinds)
        #: Connections not yet past their request, on both listeners.
        self._gate = ConnectionGate(
            total=limits.max_pending, per_client=limits.max_pending_per_client,
            proxies=self._proxies, metrics=self.metrics,
        )
        self._pending: weakref.WeakKeyDictionary[
            ServerConnection, Pending | PendingControl | PendingOperator | _PendingRefusal
        ] = weakref.WeakKeyDictionary()
        #: Client certificates both listeners require (``tls.client_ca``):
        #: *client_ssl_context* asks for them; the tunnels' own TLS uses *ssl_context*.
        self._client_tls: ClientTLS | None = None
        if client_ssl_context is not None:
            self._client_tls = ClientTLS(
                client_ssl_context, ClientCertificates.from_config(config, self.metrics),
                config.limits.handshake_timeout, self._runner.close_timeout,
            )
        self._stop: anyio.Event | None = None
        self._group: anyio.abc.TaskGroup | None = None
        #: The (host, port) pairs listened on, once serving.
        self.addresses: list[tuple[str, int]] = []
        #: The HTTP CONNECT listener's (host, port) pairs, once serving (``listen.connect_port``).
        self.connect_addresses: list[tuple[str, int]] = []
        #: What a connection another worker passed on is made with, once serving.
        self._server: Server | None = None
        self._connection_options: dict[str, Any] = {}
        self._tunnel_listener: TunnelListener | None = None

    @staticmethod
    def _origin_policy(config: Config) -> OriginPolicy:
        """The Origin check: ``http.allowed_origins``, or the origins derived from the
        configuration (:attr:`Config.allowed_origins`), logged once at start-up."""
        allowed = config.allowed_origins
        listed = bool(config.http.allowed_origins)
        _log.info(
            "broker.origins",
            allowed=list(allowed),
            source="http.allowed_origins" if listed else "broker.public_url, listen",
            allow_missing=config.http.allow_missing_origin,
        )
        return OriginPolicy(allowed, config.http.allow_missing_origin)

    @staticmethod
    def _load_handlers(
        plugins: PluginManager, contexts: dict[str, PluginContext]
    ) -> dict[str, tuple[Protocol, SessionHandler]]:
        """Each protocol's session handler, from its own object."""
        handlers: dict[str, tuple[Protocol, SessionHandler]] = {}
        for name, (plugin_name, protocol) in sorted(plugins.protocols.items()):
            handler = protocol.session_handler(contexts[plugin_name])
            if not callable(handler):
                raise PluginError(
                    f"{plugins.describe(plugin_name)}: {type(protocol).__name__}."
                    f"session_handler() for {name!r} returned {handler!r}, not a coroutine "
                    "function"
                )
            handlers[name] = (protocol, handler)
        return handlers

    @staticmethod
    def _load_input_modes(
        plugins: PluginManager, contexts: dict[str, PluginContext]
    ) -> dict[str, str]:
        """The input mode of each protocol with presence (``Protocol.input_mode``)."""
        modes: dict[str, str] = {}
        for name, (plugin_name, protocol) in plugins.protocols.items():
            if not protocol.presence:
                continue
            mode = protocol.input_mode(contexts[plugin_name])
            if mode not in INPUT_MODES:
                raise PluginError(
                    f"{plugins.describe(plugin_name)}: input_mode() of {name!r} returned "
                    f"{mode!r}, not one of {', '.join(INPUT_MODES)}"
                )
            modes[name] = mode
        return modes

    @staticmethod
    def _load_console_tls(
        plugins: PluginManager, contexts: dict[str, PluginContext]
    ) -> dict[str, ConsoleTLS]:
        found: dict[str, ConsoleTLS] = {}
        for name, (plugin_name, protocol) in plugins.protocols.items():
            tls = protocol.console_tls(contexts[plugin_name])
            if tls is None:
                continue
            if not isinstance(tls, ConsoleTLS):
                raise PluginError(
                    f"{plugins.describe(plugin_name)}: console_tls() of {name!r} returned "
                    f"{tls!r}, not a ConsoleTLS"
                )
            found[name] = tls
        return found

    def _context(self, protocol: str) -> PluginContext:
        """The context of the plugin that owns *protocol*."""
        return self._contexts[self._plugins.protocols[protocol][0]]

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        return self.addresses[0][1]

    @property
    def session_count(self) -> int:
        return self._runner.count

    # --- running ------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`shutdown`; ``task_status.started(port)`` once listening."""
        self._stop = anyio.Event()
        async with anyio.create_task_group() as group:
            self._group = group
            await group.start(self._resolver.run, self)
            async with contextlib.AsyncExitStack() as services:
                # The recordings' retention (every plugin's, one policy), then the
                # plugins' services (console_broker_service), live while the broker
                # listens, and close after its sessions have.
                kinds = list(self._plugins.recording_kinds.values())
                await services.enter_async_context(recordings_retention(self.config, kinds))
                for name, service in self._plugins.services(self._contexts):
                    await services.enter_async_context(service)
                    _log.info("plugin.service_started", plugin=name)
                await self._listen(group, task_status)
            group.cancel_scope.cancel()
        self._runner.audit.close()

    async def _listen(
        self, group: anyio.abc.TaskGroup, task_status: anyio.abc.TaskStatus[int]
    ) -> None:
        """The listeners, until :meth:`shutdown`; then the sessions end within the grace."""
        assert self._stop is not None
        config = self.config
        ping = config.proxy.ping_interval or None
        limits = ConnectionLimits(
            self._gate, config.limits.max_request_head, config.limits.write_timeout,
            self._client_tls, self._pass_on if self._link is not None else None,
        )
        self._connection_options = {
            "limits": limits, "ping_interval": ping, "ping_timeout": ping,
            "close_timeout": self._runner.close_timeout, "max_queue": config.proxy.max_queue,
            "write_limit": config.proxy.write_buffer,
        }
        # websockets' server without its own listener: the broker accepts (SocketListener)
        # and makes each connection (_connect), the same way for one passed by a worker.
        server = serve(
            self._handle,
            process_request=self._process_request,
            server_header=_SERVER,
            open_timeout=config.limits.handshake_timeout,
            logger=logging.getLogger("websockets.server"),
        )  # not awaited: it gets its listener below, not one of the loop's
        self._server = server
        guards = [self._accept_guard(LISTENER)]
        sockets = listening_sockets(
            config.listen.host, config.listen.port, reuse_port=self._link is not None
        )
        # The connection does its own TLS with client certificates (BrokerConnection).
        tls = self._ssl if self._client_tls is None else None
        accepting = SocketListener(sockets, lambda sock: self._connect(sock, None, tls), guards[0])
        server.server = cast(asyncio.Server, accepting)  # what websockets' server drives
        self.addresses = [sock.getsockname()[:2] for sock in sockets]
        unwatch: list[Callable[[], None]] = []
        _log.info(
            "broker.listening",
            addresses=[f"{host}:{port}" for host, port in self.addresses],
            tls=self._ssl is not None,
            client_certificates=self._client_tls is not None,
            node=self._node,
            protocols=sorted(self._handlers),
            event_loop=running_loop_name(),
        )
        tunnels = None
        tunnel_scope = anyio.CancelScope()
        if config.listen.connect_port:
            tunnels = await anyio.create_tcp_listener(
                local_host=config.listen.connect_host, local_port=config.listen.connect_port,
                reuse_port=self._link is not None,
            )
            self.connect_addresses = [
                _host_port(listener.extra(anyio.abc.SocketAttribute.local_address))  # noqa: S610
                for listener in tunnels.listeners
            ]
            guards.append(self._accept_guard(TUNNEL_LISTENER))
            listener = TunnelListener(
                admit=self._admit_tunnel,
                run=self._runner.run,
                count_refusal=lambda reason: self.metrics.refusals.labels(reason).inc(),
                ssl_context=self._ssl,
                handshake_timeout=config.limits.handshake_timeout,
                write_timeout=config.limits.write_timeout,
                read_size=config.proxy.read_size,
                gate=self._gate,
                guard=guards[-1],
                client_tls=self._client_tls,
                proxy_protocol=self._proxies if config.listen.connect_proxy_protocol else None,
                pass_on=self._pass_tunnel if self._link is not None else None,
            )
            self._tunnel_listener = listener
            group.start_soon(listener.serve, tunnels, tunnel_scope)
            _log.info(
                "broker.connect_listening",
                addresses=[f"{host}:{port}" for host, port in self.connect_addresses],
                proxy_protocol=config.listen.connect_proxy_protocol,
            )
        if self._link is not None:
            unwatch.append(self._link.attach(self._passed, self._own_metrics))
        unwatch.append(await self._serve_admin())
        task_status.started(self.port)
        try:
            await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown(server)
            tunnel_scope.cancel()
            for stop in unwatch:
                stop()
            for guard in guards:
                guard.close()

    async def _serve_admin(self) -> Callable[[], None]:
        """Serve the admin socket (``service.admin_socket``); returns how to stop. A
        socket that cannot be bound is logged (``admin.unavailable``) and the consoles are
        served without it."""
        path = self.config.admin_socket
        sock, inode = self._admin_socket, 0
        if sock is None and self._link is not None:
            sock = self._link.admin_socket  # bound by the supervisor, shared by all
        if sock is None and self._link is None:
            try:
                sock = bind_admin_socket(path)
            except OSError as exc:
                _log.error("admin.unavailable", socket=str(path), error=str(exc))
                return lambda: None
            inode = socket_inode(path)
        if sock is None:
            return lambda: None
        try:  # Python 3.13's asyncio would remove the file every worker shares at close
            server = await asyncio.start_unix_server(
                self.admin.serve_connection, sock=sock, limit=ADMIN_MAX_LINE,
                cleanup_socket=False,
            )
        except TypeError:  # before 3.13, and uvloop: the file is never removed
            server = await asyncio.start_unix_server(
                self.admin.serve_connection, sock=sock, limit=ADMIN_MAX_LINE
            )
        _log.info("admin.listening", socket=str(path))

        def stop() -> None:
            server.close()
            remove_socket(path, inode)  # only the file this process bound

        return stop

    def _accept_guard(self, listener: str) -> AcceptGuard:
        """The guard of one listener: backlog connections it refuses while the process is
        out of descriptors are sent a 503 (nothing on TLS: they expect a handshake)."""
        refusal = b"" if self._ssl is not None else http_response(
            503, "the broker is out of connections; try again later"
        )
        return AcceptGuard(listener, self.metrics, refusal=refusal)

    def reopen_audit(self) -> None:
        """Open ``audit.file`` anew (after logrotate moved it away): for SIGHUP. A file
        moved away is also noticed at the next session's end without it."""
        self._runner.audit.reopen()

    def shutdown(self) -> None:
        """Begin a clean shutdown: stop accepting, end sessions with 1001, within the grace."""
        if self._stop is not None:
            self._stop.set()

    async def _shutdown(self, server: Server) -> None:
        self._runner.closing = True
        grace = self.config.limits.shutdown_grace
        _log.info("broker.stopping", sessions=self.session_count, grace=grace)
        server.close(close_connections=False)
        self._runner.end_all(SHUTDOWN)
        self._operators.end_all()
        with anyio.move_on_after(grace) as scope:
            await server.wait_closed()
        if scope.cancelled_caught:
            cut = list(server.connections)
            for connection in cut:
                connection.transport.abort()
            _log.warning("broker.grace_expired", cut=len(cut))
            with anyio.move_on_after(1.0):
                await server.wait_closed()
        _log.info("broker.stopped")

    # --- resolver events ----------------------------------------------------------------

    def domain_gone(self, domain_uuid: str, ending: Refusal) -> None:
        ended = self._runner.end_domain(domain_uuid, ending)
        if ended:
            _log.info("domain.gone", domain=domain_uuid, reason=ending.reason, sessions=ended)

    def connection_lost(self) -> None:
        self._runner.end_all(HYPERVISOR_LOST, kind="stream")

    def connection_restored(self) -> None:
        if self._group is not None and self._runner.lives:
            self._group.start_soon(self._recheck_domains)

    async def _recheck_domains(self) -> None:
        for domain in list(self._runner.lives):
            ending = await self._resolver.ending_for(domain)
            if ending is not None:
                self.domain_gone(domain, ending)

    # --- requests -----------------------------------------------------------------------

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Any
    ) -> Subprotocol | None:
        pending = self._pending.get(connection)
        wanted = pending.protocol.subprotocols if isinstance(pending, Pending) else ("binary",)
        if isinstance(pending, PendingControl):
            wanted = (CONTROL_SUBPROTOCOL,)
        if isinstance(pending, PendingOperator):
            wanted = (OPERATOR_SUBPROTOCOL,)
        for name in wanted:
            if name in offered:
                return Subprotocol(name)
        return None  # a client that offers none (xterm.js) is welcome too

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        started = time.monotonic()
        client = self._client(connection, request)
        try:
            response = await self._answer(connection, request, client, started)
        except Exception:
            _log.exception("request.failed")
            response = _text(500, "internal error")
        if response is not None:  # a plain HTTP request (an upgrade logs its session)
            path = loggable_path(request.path)  # never the query, nothing token-like
            log = _log.debug if path in ("/healthz", "/metrics") else _log.info
            log("http.request", method=loggable(request.method), path=path,
                status=response.status_code, client=client,
                duration_ms=round((time.monotonic() - started) * 1000, 2))
            if request.method == "HEAD":  # GET's headers, Content-Length included
                response = dataclasses.replace(response, body=b"")
        return response

    def _client(self, connection: ServerConnection, request: Request) -> str:
        """The client's address: the peer's, or the one a trusted proxy forwarded."""
        peer = str(connection.remote_address[0]) if connection.remote_address else "?"
        return self._proxies.client(peer, request.headers.get_all("X-Forwarded-For"))

    async def _answer(
        self, connection: ServerConnection, request: Request, client: str, started: float
    ) -> Response | None:
        try:
            found = route(request.path, self._prefix, request.method)
        except Refused as exc:
            return self._refuse_plainly(exc, None, client)
        if isinstance(found, NotAllowed):
            allow = ", ".join(found.allow)
            return _text(405, f"method not allowed (allowed: {allow})", [("Allow", allow)])
        if isinstance(found, PlainRoute):
            return self._healthz() if found.name == "healthz" else await self._metrics()
        if isinstance(found, PageRoute):
            return self._page(found)
        if isinstance(found, FileRoute):
            return await self._client_file(found, client)
        if isinstance(found, HandoffRoute):
            return self._handoff(request, found, client)
        if isinstance(found, ScreenshotRoute):
            return await self._screenshot(found, client)
        if isinstance(found, RecordingRoute):
            return await self._recording(found, client)
        if isinstance(found, RedirectRoute):
            return _text(301, "moved", headers=[("Location", found.location)])
        if isinstance(found, OperatorPageRoute):
            served = operator_page(found.path)
            if served is None:
                return _text(404, "not found")
            return _response(served.status, served.body, served.content_type, served.headers)
        if isinstance(found, OperatorRoute):
            return self._check_operator(connection, request, found, client)
        if isinstance(found, NotFound):
            return _text(404, "not found")
        return await self._check_websocket(connection, request, found, client, started)

    async def _check_websocket(
        self,
        connection: ServerConnection,
        request: Request,
        found: WebSocketRoute | ControlRoute,
        client: str,
        started: float,
    ) -> Response | None:
        if not any("websocket" in value.lower() for value in request.headers.get_all("Upgrade")):
            return _text(
                426,
                f"/ws/{found.protocol} is a WebSocket endpoint; open the console page instead",
                headers=[("Upgrade", "websocket")],
            )
        malformed = _handshake_problem(connection, request)
        if malformed is not None:
            return self._refuse_plainly(malformed, found.protocol, client)
        if self._runner.closing:
            return _text(SHUTDOWN.status, SHUTDOWN.text)
        entry = self._handlers.get(found.protocol)
        if entry is None:
            unknown = Refused(UNKNOWN_PROTOCOL, f"no handler for {found.protocol!r}")
            return self._refuse(connection, unknown, found.protocol, client)
        protocol, handler = entry
        why = self._origin.check(request.headers.get("Origin"))
        if why is not None:
            return self._refuse_plainly(Refused(FOREIGN_ORIGIN, why), found.protocol, client)
        try:
            if isinstance(found, ControlRoute):
                self._pending[connection] = self._controls.admit(protocol, found.token, client)
                return None
            pending = await self._admit(protocol, handler, found.token, client, started)
        except Refused as exc:
            return self._refuse(connection, exc, found.protocol, client)
        self._pending[connection] = pending
        return None

    def _check_operator(
        self, connection: ServerConnection, request: Request, found: OperatorRoute, client: str
    ) -> Response | None:
        """``/operator/ws?token=T``: the operator page's session, checked as a console's
        WebSocket is (a real upgrade, the Origin, then the operator token)."""
        if not any("websocket" in value.lower() for value in request.headers.get_all("Upgrade")):
            return _text(426, "/operator/ws is a WebSocket endpoint; open the operator page "
                         "instead", headers=[("Upgrade", "websocket")])
        malformed = _handshake_problem(connection, request)
        if malformed is not None:
            return self._refuse_plainly(malformed, OPERATOR, client)
        if self._runner.closing:
            return _text(SHUTDOWN.status, SHUTDOWN.text)
        try:
            why = self._origin.check(request.headers.get("Origin"))
            if why is not None:
                raise Refused(FOREIGN_ORIGIN, why)
            self._pending[connection] = self._operators.admit(found.token, client)
        except Refused as exc:
            return self._refuse(connection, exc, OPERATOR, client)
        return None

    async def _admit(
        self, protocol: Protocol, handler: SessionHandler, token: str, client: str, started: float
    ) -> Pending:
        """The token, view-only, group, limits and resolver checks; Refused if one fails.

        The token is not used up here but by :meth:`_take`, once the connection is
        upgraded (or, for a tunnel, before it is answered): a request refused on its way,
        by websockets too, leaves it usable."""
        group: SessionGroup | None = None
        claims = self._verify(token, protocol.name)
        if claims.view_only and not protocol.view_only:
            raise Refused(VIEW_ONLY_UNSUPPORTED, f"{protocol.name} does not enforce view-only")
        if protocol.multi_connection:
            group = self._runner.groups.get(claims.jti)
        if group is not None:
            # a further connection of a live session: the token was used up by its first
            if group.connections >= group.max_connections:
                raise Refused(LIMIT_REACHED, "too many connections in one session")
            target = await self._target(claims, protocol)
            if group.closed:
                raise Refused(REPLAYED_TOKEN, "the token's session has ended")
        else:
            if self._verifier.used(claims):
                raise Refused(REPLAYED_TOKEN, "the token was already used")
            self._counts.check(claims.domain_uuid, client)
            target = await self._target(claims, protocol)
        return Pending(protocol, handler, claims, target, client, started, group)

    async def _target(self, claims: Claims, protocol: Protocol) -> Target:
        if protocol.endpoint != "console":  # only the domain: it exists and runs
            return await self._resolver.target(claims, None, None)
        tls = self._console_tls.get(protocol.name)
        return await self._resolver.target(claims, protocol.console, tls)

    def _verify(self, token: str, protocol: str | None) -> Claims:
        """Check the token; it is used up by :meth:`_consume` once every check passed."""
        try:
            return self._verifier.verify(
                token, protocol=protocol, node=self._node, consume=False
            )
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None
        except ValueError:
            raise Refused(INVALID_TOKEN, "malformed token") from None

    def _take(self, pending: Pending) -> None:
        """Use the token of an admitted request up (a group's further connection does not:
        its first did); Refused as ``replayed_token`` when another request used it first."""
        if pending.group is not None:
            return
        try:
            self._verifier.consume(pending.claims)
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None

    def _refuse(
        self, connection: ServerConnection, exc: Refused, protocol: str | None, client: str
    ) -> Response | None:
        """Refuse a WebSocket request: a status, or with ``http.refusals = "close"`` the
        upgrade and then the close code (None)."""
        if not self._refuse_by_close:
            return self._refuse_plainly(exc, protocol, client)
        self._log_refusal(exc, protocol, client)
        self._pending[connection] = _PendingRefusal(exc.refusal)
        return None

    def _refuse_plainly(self, exc: Refused, protocol: str | None, client: str) -> Response:
        """Refuse a request with its HTTP status."""
        self._log_refusal(exc, protocol, client)
        return _text(exc.refusal.status, exc.refusal.text)

    def _log_refusal(self, exc: Refused, protocol: str | None, client: str) -> None:
        refusal = exc.refusal
        self.metrics.refusals.labels(refusal.reason).inc()
        _log.info(
            "request.refused", reason=refusal.reason, detail=exc.detail, protocol=protocol,
            client=client, status=refusal.status, code=refusal.close_code,
        )

    def _healthz(self) -> Response:
        available = self._resolver.available
        doc = {
            "status": "ok" if available else "unavailable",
            "version": broker.__version__,
            "node": self._node,
            "sessions": self.session_count,
            "libvirt": self._resolver.health(),
        }
        if self._link is not None:  # the sessions of every worker; which one answered
            doc.update(sessions=self._counts.total, worker=self._link.index,
                       workers=self._link.count)
        body = json.dumps(doc).encode() + b"\n"
        return _response(200 if available else 503, body, "application/json")

    def _own_metrics(self) -> bytes:
        self.metrics.libvirt_connected.set(1 if self._resolver.available else 0)
        return self.metrics.render()

    async def _metrics(self) -> Response:
        if self._link is None:
            return _response(200, self._own_metrics(), CONTENT_TYPE)
        texts = await self._link.collect_metrics()
        texts[self._link.index] = self._own_metrics()
        return _response(200, merge_metrics(texts), CONTENT_TYPE)

    # --- worker processes ---------------------------------------------------------------

    def _pass_on(self, connection: BrokerConnection, head: bytes) -> bool:
        """Pass *connection* to the worker its request belongs to; False when it is this
        worker's (:mod:`broker.service._workers`)."""
        assert self._link is not None
        owner = self._link.route(head_token(head))
        if owner is None:
            return False
        peer = connection.remote_address
        transport = connection.detach()
        address = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        _in_background(self._hand_over(transport, owner, head, address))
        return True

    async def _hand_over(
        self, transport: asyncio.Transport, owner: int, head: bytes, peer: tuple[str, int]
    ) -> None:
        """In the clear the socket itself moves (this worker's descriptor then closes); in
        TLS one end of a socket pair does, and this worker relays the plaintext to it."""
        assert self._link is not None
        clear = transport.get_extra_info("ssl_object") is None
        if clear:
            mine = None
            theirs = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        else:
            mine, theirs = socket.socketpair()
        with theirs:
            sent = await self._link.send(owner, {"kind": HTTP, "peer": list(peer)}, head,
                                         theirs.fileno())
        if not sent:
            if mine is not None:
                mine.close()
            transport.write(http_response(503, _OWNER_BUSY))
            transport.close()
            _log.warning("worker.pass_failed", to=owner, listener=HTTP, client=peer[0])
            return
        if mine is None:
            transport.abort()
            _log.debug("worker.passed", to=owner, listener=HTTP, client=peer[0])
            return
        _log.debug("worker.relayed", to=owner, listener=HTTP, client=peer[0])
        await relay_transport(transport, mine, self.config.proxy.write_buffer)

    async def _pass_tunnel(
        self,
        token: str,
        stream: anyio.abc.ByteStream,
        head: bytes,
        client: str,
        answered: Callable[[], None],
    ) -> bool:
        """Pass a CONNECT tunnel to the worker its token belongs to (always relayed: the
        tunnel's stream may be TLS); False when it is this worker's."""
        assert self._link is not None
        try:
            owner = self._link.route(token_for_handle(token))
        except ValueError:
            return False  # refused here, as anywhere
        if owner is None:
            return False
        answered()
        mine, theirs = socket.socketpair()
        with theirs:
            sent = await self._link.send(
                owner, {"kind": CONNECT, "peer": [client, 0]}, head, theirs.fileno()
            )
        if not sent:
            mine.close()
            with contextlib.suppress(Exception):
                await stream.send(http_response(503, _OWNER_BUSY))
            await stream.aclose()
            _log.warning("worker.pass_failed", to=owner, listener=CONNECT, client=client)
            return True
        _log.debug("worker.relayed", to=owner, listener=CONNECT, client=client)
        inner = await anyio.abc.SocketStream.from_socket(mine)
        await relay_streams(stream, inner, self.config.proxy.read_size)
        return True

    def _passed(self, passed: Passed) -> None:
        """A connection another worker passed to this one: served as if accepted here."""
        if passed.listener == CONNECT:
            _in_background(self._adopt_tunnel(passed))
        else:
            self._connect(passed.sock, passed.peer, None, passed.head)

    async def _adopt_tunnel(self, passed: Passed) -> None:
        if self._tunnel_listener is None:
            passed.sock.close()
            return
        stream = await anyio.abc.SocketStream.from_socket(passed.sock)
        self._tunnel_listener.adopt(stream, passed.head, passed.peer[0])

    def _connect(
        self, sock: socket.socket, passed_from: tuple[str, int] | None,
        tls: ssl.SSLContext | None, head: bytes = b"",
    ) -> None:
        """Serve *sock*, accepted here or passed by another worker (*passed_from*: the
        client's address, *head*: what that worker read of it) and, with *tls*, after its
        TLS handshake: a :class:`BrokerConnection` of the broker's websockets server."""
        if self._server is None or not self._server.is_serving():
            sock.close()
            return
        _in_background(self._connected(sock, passed_from, tls, head))

    async def _connected(
        self, sock: socket.socket, passed_from: tuple[str, int] | None,
        tls: ssl.SSLContext | None, head: bytes,
    ) -> None:
        assert self._server is not None
        connection: BrokerConnection

        def select(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            return self._select_subprotocol(connection, offered)

        protocol = ServerProtocol(
            select_subprotocol=select,
            max_size=self.config.proxy.max_message,
            logger=logging.getLogger("websockets.server"),
        )
        connection = BrokerConnection(protocol, self._server, passed_from=passed_from,
                                      **self._connection_options)
        extra: dict[str, Any] = {}
        if tls is not None:
            extra = {"ssl": tls, "ssl_handshake_timeout": self.config.limits.handshake_timeout,
                     "ssl_shutdown_timeout": self._runner.close_timeout}
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, sock, **extra
            )
        except (OSError, TimeoutError):  # ssl.SSLError, a handshake timed out, gone
            sock.close()
            return
        if head:
            connection.data_received(head)

    def _page(self, found: PageRoute) -> Response:
        if found.protocol not in self._plugins.protocols:
            return _text(404, f"no plugin serves protocol {found.protocol!r}")
        protocol = self._plugins.protocols[found.protocol][1]
        try:
            page: object = protocol.page(found.path, self._context(found.protocol))
        except Exception:
            _log.exception("page.failed", protocol=found.protocol)
            return _text(500, "internal error")
        if page is None:
            what = "console page" if not found.path else "asset"
            return _text(
                404,
                f"no {what} here for protocol {found.protocol!r}: its plugin serves none "
                f"(the WebSocket endpoint is /ws/{found.protocol})",
            )
        if not isinstance(page, Page):
            _log.error("page.invalid", protocol=found.protocol, type=type(page).__name__)
            return _text(500, "internal error")
        return _response(page.status, page.body, page.content_type, page.headers)

    async def _client_file(self, found: FileRoute, client: str) -> Response:
        """``GET /file/{protocol}?token=...``: the token and its console checked (the
        token is not used up), then the protocol's ``client_file``."""
        entry = self._handlers.get(found.protocol)
        if entry is None or not entry[0].native_clients:
            refused = Refused(UNKNOWN_PROTOCOL, f"no native clients for {found.protocol!r}")
            return self._refuse_plainly(refused, found.protocol, client)
        protocol = entry[0]
        try:
            claims = self._verify(found.token, protocol.name)
            if self._verifier.used(claims):
                raise Refused(REPLAYED_TOKEN, "the token was already used")
            target = await self._target(claims, protocol)
        except Refused as exc:
            return self._refuse_plainly(exc, found.protocol, client)
        try:
            made: object = protocol.client_file(
                found.token, target.domain_name or claims.domain_uuid,
                self._context(protocol.name),
            )
        except Exception:
            _log.exception("client_file.failed", protocol=protocol.name)
            return _text(500, "internal error")
        if made is None:
            return _text(
                404, f"this broker offers {protocol.name} clients no way in "
                "(an HTTP CONNECT listener: listen.connect_port)",
            )
        if not isinstance(made, ClientFile):
            _log.error("client_file.invalid", protocol=protocol.name, type=type(made).__name__)
            return _text(500, "internal error")
        _log.info("client_file.served", protocol=protocol.name, domain=claims.domain_uuid,
                  jti=claims.jti, file=made.name)
        disposition = f'attachment; filename="console{made.suffix}"'
        return _response(200, made.body.encode(), made.content_type,
                         [("Content-Disposition", disposition)])

    # --- handoff handles -----------------------------------------------------------------

    def _handoff(self, request: Request, found: HandoffRoute, client: str) -> Response:
        """``POST /handoff/{protocol}`` with ``Authorization: Bearer T``: a handoff handle
        for the session T opened, while it lives on this broker (T proves it: a token's
        signature, a handle's own value; not its lifetime)."""
        try:
            if self._runner.closing:
                raise Refused(SHUTDOWN)
            if found.protocol not in self._handlers:
                raise Refused(UNKNOWN_PROTOCOL, f"no handler for {found.protocol!r}")
            why = self._origin.check(request.headers.get("Origin"))
            if why is not None:
                raise Refused(FOREIGN_ORIGIN, why)
            token = bearer_token(request.headers.get_all("Authorization"))
            try:
                jti = self._verifier.session_jti(token, protocol=found.protocol, node=self._node)
            except TokenRefused as exc:
                raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None
            claims = self._runner.by_token.get(jti)
            if claims is None:
                if self._verifier.used(jti):
                    raise Refused(REPLAYED_TOKEN, "the token's session has ended")
                raise Refused(INVALID_TOKEN, "no session of this token is open on this broker")
            if claims.protocol != found.protocol:
                raise Refused(
                    WRONG_PROTOCOL, f"the session is {claims.protocol!r}, not {found.protocol!r}"
                )
            try:
                handoff = self._verifier.hand_off(claims, ttl=self.config.tokens.default_ttl)
            except HandoffLimit as exc:
                raise Refused(LIMIT_REACHED, str(exc)) from None
        except Refused as exc:
            return self._refuse_plainly(exc, found.protocol, client)
        issued = handoff.claims
        ttl = issued.expires_at - issued.issued_at
        self.metrics.handoffs.labels(issued.protocol).inc()
        _log.info(
            "token.handoff", protocol=issued.protocol, domain=issued.domain_uuid,
            client=client, jti=handoff.parent, handoff=issued.jti,
            rights=issued.rights.value, expires_at=issued.expires_at,
        )
        query = f"token={handoff.handle}"
        doc = {
            "token": handoff.handle,
            "protocol": issued.protocol,
            "expires_in": ttl,
            "expires_at": datetime.fromtimestamp(issued.expires_at, UTC)
            .isoformat().replace("+00:00", "Z"),
            "page": f"{self.config.public_url}/console/{issued.protocol}/?{query}",
            "websocket": f"{self.config.ws_url}/ws/{issued.protocol}?{query}",
        }
        return _response(200, json.dumps(doc).encode() + b"\n", "application/json")

    # --- screenshots ----------------------------------------------------------------------

    def _grants_screenshots(self, protocol: str) -> bool:
        """Whether a token for *protocol* grants a screenshot: the core's own purpose
        ``screenshot``, or a protocol whose plugin declares ``Protocol.screenshots``."""
        if protocol == SCREENSHOT:
            return True
        entry = self._handlers.get(protocol)
        return entry is not None and entry[0].screenshots

    async def _screenshot(self, found: ScreenshotRoute, client: str) -> Response:
        """``GET /screenshot?token=T``: the screen of T's domain as PNG. T is checked as a
        session's would be (signature, expiry, node, not used yet), for the ``screenshot``
        purpose or a protocol that grants screenshots, with any rights; its domain must
        exist and run. T is used up once a capture slot is taken, before the capture."""
        try:
            if self._runner.closing:
                raise Refused(SHUTDOWN)
            claims = self._verify(found.token, None)
            if not self._grants_screenshots(claims.protocol):
                raise Refused(
                    WRONG_PROTOCOL, f"a {claims.protocol!r} token grants no screenshots"
                )
            if self._verifier.used(claims):
                raise Refused(REPLAYED_TOKEN, "the token was already used")
            target = await self._resolver.target(claims, None)
            taken = await self.screenshots.take(
                target, max_width=found.max_width, before=lambda: self._use_up(claims)
            )
        except Refused as exc:
            self.metrics.screenshots.labels(exc.refusal.reason).inc()
            return self._refuse_plainly(exc, SCREENSHOT, client)
        shot = taken.shot
        self.metrics.screenshots.labels("ok").inc()
        _log.info(
            "screenshot.taken", domain=claims.domain_uuid, domain_name=target.domain_name,
            protocol=claims.protocol, jti=claims.jti, client=client, width=shot.width,
            height=shot.height, screen=f"{shot.screen_width}x{shot.screen_height}",
            bytes=len(shot.png), ms=round(taken.duration_ms, 1),
        )
        return _response(
            200, shot.png, "image/png",
            [("Content-Disposition", 'inline; filename="screenshot.png"')],
        )

    def _use_up(self, claims: Claims) -> None:
        try:
            self._verifier.consume(claims)
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None

    # --- recordings ----------------------------------------------------------------------

    async def _recording(self, found: RecordingRoute, client: str) -> Response:
        """``GET /recording?token=T[&part=N]``: the index or a part of the recording T
        names (T's ``proto`` is ``recording``); T is checked, not used up
        (:mod:`broker.service._recordings`)."""
        try:
            claims = self._verify(found.token, RECORDING)
            answer = await self.recordings.answer(claims, found.part)
        except Refused as exc:
            return self._refuse_plainly(exc, RECORDING, client)
        _log.info(
            "recording.served", domain=claims.domain_uuid, recording=claims.recording,
            protocol=answer.protocol, part=answer.part, bytes=len(answer.body),
            jti=claims.jti, client=client,
        )
        return _response(200, answer.body, answer.content_type, answer.headers)

    # --- HTTP CONNECT (native clients) ---------------------------------------------------

    async def _admit_tunnel(self, handle: str, client: str, started: float) -> Pending:
        if self._runner.closing:
            raise Refused(SHUTDOWN)
        try:
            token = token_for_handle(handle)
        except ValueError:
            raise Refused(INVALID_TOKEN, "the CONNECT target is not a session handle") from None
        claims = self._verify(token, None)
        entry = self._handlers.get(claims.protocol)
        if entry is None or not entry[0].native_clients:
            raise Refused(UNKNOWN_PROTOCOL, f"no native clients for {claims.protocol!r}")
        protocol, handler = entry
        pending = await self._admit(protocol, handler, token, client, started)
        self._take(pending)
        return pending

    # --- sessions -----------------------------------------------------------------------

    async def _handle(self, upgraded: ServerConnection) -> None:
        connection = cast(BrokerConnection, upgraded)  # serve()'s create_connection
        pending = self._pending.pop(connection, None)
        if isinstance(pending, _PendingRefusal):
            await self._runner.close(connection, pending.refusal)
            return
        if isinstance(pending, PendingControl):  # a live session's control channel
            await self._controls.serve(connection, pending)
            return
        if isinstance(pending, PendingOperator):  # the operator page's session
            try:
                self._operators.take(pending)  # upgraded: now its token is used up
            except Refused as exc:
                self._log_refusal(exc, OPERATOR, pending.client)
                await self._runner.close(connection, exc.refusal)
                return
            await self._operators.serve(connection, pending)
            return
        if pending is None:  # cannot happen: every upgrade passed _check_websocket
            await self._runner.close(connection, INTERNAL_ERROR)
            return
        try:
            self._take(pending)  # upgraded: now the token is used up
        except Refused as exc:  # another request with the same token was upgraded first
            self._log_refusal(exc, pending.protocol.name, pending.client)
            await self._runner.close(connection, exc.refusal)
            return
        await self._runner.run(connection, pending)
