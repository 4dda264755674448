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

The WebSocket listener accepts in :class:`SocketListener`, the broker's own accept loop
on any event loop (asyncio's and uvloop's listeners handle these errors each in their own
way, uvloop's by closing the listener for good on some); the CONNECT listener runs
:meth:`AcceptGuard.accept_loop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import os
import socket
import time
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


# --- the WebSocket listener's sockets ----------------------------------------------------


def listening_sockets(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
) -> list[socket.socket]:
    """Non-blocking sockets listening on every address *host* resolves to (as asyncio's
    ``create_server`` makes them: ``SO_REUSEADDR``, IPv6 sockets IPv6-only), with
    ``SO_REUSEPORT`` when *reuse_port* (worker processes)."""
    found: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            found.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in found:
            sock.close()
        raise
    return found


class SocketListener:
    """The broker's own accept loop on *sockets*, on any asyncio event loop, and the
    :class:`asyncio.AbstractServer` face websockets' server drives (``close``,
    ``wait_closed``, ``is_serving``, ``sockets``).

    Each accepted socket goes to *accepted*; accept errors go to *guard* and a growing
    pause of that socket's accepting, never out of the loop. The loop's own listeners
    would not do: asyncio's reports an error only to the loop's exception handler, and
    uvloop's (libuv's) closes a listener for good on an error it does not handle itself
    (ENOBUFS, ENOMEM, EMFILE once its own reserve descriptor is gone).
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        accepted: Callable[[socket.socket], None],
        guard: AcceptGuard,
    ) -> None:
        self._sockets = sockets
        self._accepted = accepted
        self._guard = guard
        self._loop = asyncio.get_running_loop()
        self._serving = True
        self._backoff = {sock.fileno(): BACKOFF_MIN for sock in sockets}
        self._resume: dict[int, asyncio.TimerHandle] = {}
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _accept(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        for _ in range(SHED_MAX):  # what waits, a bounded batch per wake-up
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._guard.failed(exc, fd)
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                self._loop.remove_reader(fd)
                self._resume[fd] = self._loop.call_later(self._backoff[fd], self._again, sock)
                self._backoff[fd] = min(BACKOFF_MAX, self._backoff[fd] * 2)
                return
            self._backoff[fd] = BACKOFF_MIN
            conn.setblocking(False)
            self._accepted(conn)

    def _again(self, sock: socket.socket) -> None:
        self._resume.pop(sock.fileno(), None)
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for handle in self._resume.values():
            handle.cancel()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        return  # websockets' server waits for its connections' handlers itself

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        return
