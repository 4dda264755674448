"""Connections before they are sessions: caps, and listeners that outlive their descriptors.

Theory of operation. A connection costs the broker a descriptor and memory from the
moment it is accepted, before any token is looked at. Two pieces keep a client that has
no token from exhausting either:

* :class:`ConnectionGate` counts *pending* connections (accepted, their request not yet
  answered: the WebSocket upgrade or HTTP response, the CONNECT head) on both listeners
  together, overall and per peer address, against ``limits.max_pending`` and
  ``limits.max_pending_per_client``. A connection over a cap is answered at once (503, or
  429 for one address) and closed before its request is parsed. A trusted proxy's
  connections count against the overall cap only: the proxy speaks for many clients, and
  reads their request heads itself before it forwards them. A TCP relay's connection
  that names its client in a PROXY header (the CONNECT listener's
  ``listen.connect_proxy_protocol``) is counted for that client from then on
  (:meth:`ConnectionGate.move`): the relay reads nothing of what it passes on.
* :class:`AcceptGuard` turns accept errors into log lines and metrics. When the process is
  out of descriptors (``EMFILE``, ``ENFILE``) or the kernel out of buffers (``ENOBUFS``,
  ``ENOMEM``) accepting fails: the guard gives back its *reserve descriptor* for a moment
  to accept the connections waiting in the listen backlog and refuse them (503, then
  closed), so their clients learn at once instead of hanging, then takes the reserve
  again. The listener backs off briefly and goes on; no accept error ends the broker.

The WebSocket listener is asyncio's (through websockets), whose accept loop already
survives these errors by pausing for a second; it reports them to the event loop's
exception handler, where :func:`watch_listener` routes them to the guard. The CONNECT
listener runs :meth:`AcceptGuard.accept_loop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import os
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import attrs
import structlog

from broker.service._metrics import Metrics
from broker.service._request import TrustedProxies

_log = structlog.get_logger("broker.service")

#: Accept errors that mean "out of descriptors or buffers": refuse the backlog, back off.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Accept errors of one connection that went away before it was accepted: just go on.
_TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN})
#: The most backlog connections refused for one accept error.
SHED_MAX = 256
#: Back-off after an accept error, doubling up to the maximum (seconds).
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
#: At most one ``listener.accept_failed`` line this often (seconds); metrics count all.
LOG_INTERVAL = 1.0


def http_response(status: int, text: str) -> bytes:
    """A complete plain-text HTTP/1.1 response that closes the connection."""
    body = (text + "\n").encode()
    return (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@attrs.frozen
class GateRefusal:
    """Why a connection is refused before its request: the answer and the metric label."""

    status: int
    reason: str
    text: str


POOL_FULL = GateRefusal(503, "pending_limit", "too many connections; try again later")
CLIENT_FULL = GateRefusal(429, "client_pending_limit", "too many connections from your address")
HEAD_TOO_LARGE = GateRefusal(431, "request_head_too_large", "request head too large")
MALFORMED = GateRefusal(
    400, "malformed_request", "not an HTTP/1.1 GET request without a body (console-broker)"
)


class ConnectionGate:
    """Pending connections, overall and per peer address (see the module's notes)."""

    def __init__(
        self, *, total: int, per_client: int, proxies: TrustedProxies, metrics: Metrics
    ) -> None:
        self.total = total
        self.per_client = per_client
        self._proxies = proxies
        self._metrics = metrics
        self.pending = 0
        self._by_peer: Counter[str] = Counter()

    def enter(self, peer: str, listener: str) -> GateRefusal | None:
        """Count a new connection from *peer*; the refusal (counted) if it is over a cap."""
        refusal = None
        if self.pending >= self.total:
            refusal = POOL_FULL
        elif self._by_peer[peer] >= self.per_client and not self._proxies.trusts(peer):
            refusal = CLIENT_FULL
        if refusal is not None:
            self.refused(refusal, listener)
            return refusal
        self.pending += 1
        self._by_peer[peer] += 1
        self._metrics.connections_pending.labels(listener).inc()
        return None

    def move(self, peer: str, client: str, listener: str) -> GateRefusal | None:
        """A connection counted for *peer* turns out to be *client*'s (the PROXY header
        of a trusted relay): count it for *client* from now on, or the refusal (counted;
        it stays *peer*'s until it leaves) if *client* is at its cap."""
        if client == peer:
            return None
        if self._by_peer[client] >= self.per_client and not self._proxies.trusts(client):
            self.refused(CLIENT_FULL, listener)
            return CLIENT_FULL
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
        self._by_peer[client] += 1
        return None

    def leave(self, peer: str, listener: str) -> None:
        """A connection counted by :meth:`enter` is past its request (or gone)."""
        self.pending -= 1
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]
        self._metrics.connections_pending.labels(listener).dec()

    def refused(self, refusal: GateRefusal, listener: str) -> None:
        self._metrics.connections_refused.labels(listener, refusal.reason).inc()


class AcceptGuard:
    """Accept errors of one listener: logged, counted, the backlog refused when the process
    is out of descriptors (see the module's notes). :meth:`close` gives the reserve back."""

    def __init__(self, listener: str, metrics: Metrics, *, refusal: bytes = b"") -> None:
        #: The listener's name in logs and metrics (``http``, ``connect``).
        self.listener = listener
        self._metrics = metrics
        #: What a refused backlog connection is sent before it is closed (nothing on TLS).
        self._refusal = refusal
        self._reserve: int | None = None
        self._take_reserve()
        #: Failures and refused connections since the last log line, and its time.
        self._failures = self._refused = 0
        self._logged_at = -LOG_INTERVAL

    def _take_reserve(self) -> None:
        if self._reserve is None:
            with contextlib.suppress(OSError):
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def failed(self, exc: OSError, listening_fd: int) -> None:
        """Accepting on *listening_fd* raised *exc*: log, count, and when out of
        descriptors refuse what waits in the backlog."""
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        self._metrics.accept_errors.labels(self.listener, name).inc()
        if exc.errno in _TRANSIENT_ERRNOS:
            return
        self._failures += 1
        self._refused += self._shed(listening_fd) if exc.errno in RESOURCE_ERRNOS else 0
        now = time.monotonic()
        if now - self._logged_at >= LOG_INTERVAL:  # a flood makes one line a second
            _log.warning("listener.accept_failed", listener=self.listener, error=name,
                         detail=exc.strerror, failures=self._failures, refused=self._refused)
            self._logged_at, self._failures, self._refused = now, 0, 0

    def _shed(self, listening_fd: int) -> int:
        """Accept and refuse backlog connections with the reserve descriptor given back."""
        if self._reserve is None:
            self._take_reserve()  # a descriptor may have come free since
            return 0
        os.close(self._reserve)
        self._reserve = None
        shed = 0
        listening = socket.socket(fileno=listening_fd)  # wraps the fd, takes no new one
        try:
            while shed < SHED_MAX:
                try:
                    conn, _ = listening.accept()
                except OSError:  # empty backlog, or still no descriptor
                    break
                with conn:
                    conn.setblocking(False)
                    if self._refusal:
                        with contextlib.suppress(OSError):
                            conn.send(self._refusal)
                shed += 1
        finally:
            listening.detach()
            self._take_reserve()
        if shed:
            self._metrics.connections_refused.labels(
                self.listener, "out_of_descriptors").inc(shed)
        return shed

    async def accept_loop(
        self,
        listener: anyio.abc.SocketListener,
        handle: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
        group: anyio.abc.TaskGroup,
    ) -> None:
        """Accept on *listener* until cancelled, each connection handled in *group*; accept
        errors go to :meth:`failed` and a growing pause, never out of the loop."""
        raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
        backoff = BACKOFF_MIN
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.failed(exc, raw.fileno())
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                await anyio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            backoff = BACKOFF_MIN
            group.start_soon(handle, stream)


# --- asyncio's listeners -------------------------------------------------------------------

#: The guard of each listening descriptor asyncio serves, for the loop's exception handler.
_watched: dict[int, AcceptGuard] = {}
_handled_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_ACCEPT_FAILED = "socket.accept() out of system resource"


def watch_listener(sock: Any, guard: AcceptGuard) -> Callable[[], None]:
    """Route asyncio's accept errors on *sock* (a listening socket of the running loop)
    to *guard*; returns the function that stops it."""
    loop = asyncio.get_running_loop()
    if loop not in _handled_loops:
        _handled_loops.add(loop)
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc, listening = context.get("exception"), context.get("socket")
            if (
                context.get("message") == _ACCEPT_FAILED
                and isinstance(exc, OSError)
                and listening is not None
                and listening.fileno() in _watched
            ):
                _watched[listening.fileno()].failed(exc, listening.fileno())
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
    fd = sock.fileno()
    _watched[fd] = guard

    def stop() -> None:
        _watched.pop(fd, None)

    return stop
