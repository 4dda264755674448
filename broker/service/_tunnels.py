"""The HTTP CONNECT listener for native clients: one tunnel per connection.

Each connection sends one ``CONNECT HANDLE:PORT`` head (parsed by
:mod:`broker.service._connect`). The listener checks that the port fits the broker's
TLS (:data:`~broker.service._connect.TLS_PORT` exactly when ``[tls]`` is set), has the
broker admit the handle's token as it would a WebSocket's, answers ``200`` (or the
refusal's status, and closes), does the TLS handshake inside the tunnel where the broker
has TLS, and hands the tunnel to the broker as the session's client
(:class:`~broker.service._session.TunnelChannel`). The broker owns admission and
sessions; this module only speaks the listener's side of HTTP and TLS.

With client certificates (``tls.client_ca``; :mod:`broker.service._clientcert`) the
listener speaks TLS itself: each connection's TLS handshake, with the broker's
certificate and the client's required, comes before the CONNECT head (a subject not
accepted is answered 403), and the tunnel's own TLS runs inside that one.

With ``listen.connect_proxy_protocol`` every connection opens with a PROXY protocol v1
header (:mod:`broker.service._proxyprotocol`), sent in the clear by a TCP relay (a front
door's nginx stream proxy) before anything else, its TLS included. The header is read
(at most a line, within ``limits.handshake_timeout``) and believed only from a peer in
``http.trusted_proxies``; its client address is then the connection's, for the pending
cap per client, the session's limits and the logs. A connection without a valid header,
or from another peer, is closed without an answer and logged as
``connect.proxy_refused``. So a connection goes: TCP, PROXY header, outer TLS (client
certificates), CONNECT head, the tunnel's TLS.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.tls import TLSAttribute, TLSStream

from broker.service._clientcert import NOT_ACCEPTED, ClientTLS
from broker.service._connect import (
    MAX_HEAD,
    TLS_PORT,
    UNEXPECTED_PROXY_HEADER,
    ConnectError,
    ConnectParser,
    ConnectRequest,
)
from broker.service._gate import AcceptGuard, ConnectionGate, GateRefusal, http_response
from broker.service._proxyprotocol import (
    MAX_LINE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
)
from broker.service._refusals import Refused
from broker.service._request import TrustedProxies
from broker.service._session import TunnelChannel
from broker.service._tls import tls_error

_log = structlog.get_logger("broker.service")

#: Admits a tunnel: (session handle, client address, start time) -> the broker's pending
#: session, or :class:`Refused`.
Admit = Callable[[str, str, float], Awaitable[Any]]
#: Runs an admitted session on its tunnel.
Run = Callable[[TunnelChannel, Any], Awaitable[None]]
#: Counts a refusal (its reason) in the broker's metrics.
Count = Callable[[str], None]
#: With worker processes: (the tunnel's token or handle, its stream, the bytes read from
#: it, the client's address, called once it is no longer this worker's pending
#: connection) -> True once the tunnel, passed to another worker, has ended; False when
#: it is this worker's own.
PassOn = Callable[
    [str, anyio.abc.ByteStream, bytes, str, Callable[[], None]], Awaitable[bool]
]
#: The listener's name in logs and metrics.
LISTENER = "connect"
#: A connection refused for its PROXY header: counted in ``connections_refused_total``
#: with this reason, and closed without an answer (status and text unused).
PROXY_REFUSED = GateRefusal(400, "proxy_protocol", "no valid PROXY header from a trusted relay")


class TunnelListener:
    """Serves CONNECT tunnels for a broker (see the module's notes)."""

    def __init__(
        self,
        *,
        admit: Admit,
        run: Run,
        count_refusal: Count,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        write_timeout: float,
        read_size: int,
        gate: ConnectionGate,
        guard: AcceptGuard,
        client_tls: ClientTLS | None = None,
        proxy_protocol: TrustedProxies | None = None,
        pass_on: PassOn | None = None,
    ) -> None:
        self._admit = admit
        self._pass_on = pass_on
        self._group: anyio.abc.TaskGroup | None = None
        self._run = run
        self._count_refusal = count_refusal
        self._ssl = ssl_context
        self._timeout = handshake_timeout
        self._write_timeout = write_timeout
        self._read_size = read_size
        self._gate = gate
        self._guard = guard
        self._client_tls = client_tls
        #: With ``listen.connect_proxy_protocol``: the peers whose PROXY header is believed.
        self._relays = proxy_protocol

    async def serve(
        self, listener: anyio.abc.Listener[anyio.abc.SocketStream], scope: anyio.CancelScope
    ) -> None:
        """Serve *listener* (one socket listener, or several in a multi-listener) until
        *scope* is cancelled; accept errors never end it (:class:`AcceptGuard`)."""
        listeners = getattr(listener, "listeners", [listener])
        with scope:
            async with listener, anyio.create_task_group() as group:
                self._group = group
                for one in listeners:
                    group.start_soon(self._guard.accept_loop, one, self.handle, group)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        """One tunnel: counted as pending until its head is answered (refused at once over
        the caps, with no answer where a TLS handshake is expected); its PROXY header, with
        ``listen.connect_proxy_protocol`` (then counted for the header's client, 429 over
        that client's cap); the client's certificate, with client certificates; then
        :meth:`tunnel`."""
        address = stream.extra(anyio.abc.SocketAttribute.remote_address, ("?",))  # noqa: S610
        peer = str(address[0]) if isinstance(address, tuple) else "?"
        refusal = self._gate.enter(peer, LISTENER)
        if refusal is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                if self._client_tls is None:
                    with anyio.move_on_after(1.0):
                        await stream.send(http_response(refusal.status, refusal.text))
                await stream.aclose()
            return
        counted: str | None = peer  # whose pending connection this is, until answered

        def leave() -> None:
            nonlocal counted
            if counted is not None:
                self._gate.leave(counted, LISTENER)
                counted = None

        try:
            client = peer
            outer: anyio.abc.ByteStream | None = stream
            if self._relays is not None:
                relayed = await self._proxy_header(stream, peer, self._relays)
                if relayed is None:
                    return
                outer, client = relayed
            elif self._client_tls is not None:
                outer = await self._unexpected_header(stream, peer, self._client_tls)
            if self._client_tls is not None and outer is not None:
                outer = await self._accept_client(outer, peer, self._client_tls)
            if outer is None:
                return
            refusal = self._gate.move(peer, client, LISTENER)
            if refusal is not None:  # the client's own cap on pending connections
                await _answer(outer, refusal.status, refusal.text, close=True)
                return
            counted = client
            await self.tunnel(outer, client, leave)
        finally:
            leave()

    async def _proxy_header(
        self, stream: anyio.abc.SocketStream, peer: str, relays: TrustedProxies
    ) -> tuple[anyio.abc.ByteStream, str] | None:
        """The PROXY header that opens the connection: the stream to go on with (the bytes
        read past the header first) and the client's address; None (the connection
        closed, the refusal logged and counted) without a valid header from a trusted
        peer."""
        parser = ProxyHeaderParser()
        header: ProxyHeader | None = None
        detail = ""
        try:
            with anyio.fail_after(self._timeout):
                while header is None:
                    event = parser.next_event()
                    if isinstance(event, ProxyHeader):
                        header = event
                    else:
                        parser.receive_data(await stream.receive(MAX_LINE))
        except ProxyHeaderError as exc:
            detail = exc.detail
        except TimeoutError:
            detail = f"no PROXY header within {self._timeout:g} s (limits.handshake_timeout)"
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            detail = "the connection closed before its PROXY header was complete"
        if header is not None and relays.trusts(peer):
            client = header.client(peer)
            if not header.rest:
                return stream, client
            return _Replayed(stream, header.rest), client
        if header is not None:
            detail = ("a PROXY header from a peer not in http.trusted_proxies (it named "
                      f"{header.client(peer)})")
        self._gate.refused(PROXY_REFUSED, LISTENER)
        _log.warning("connect.proxy_refused", peer=peer, detail=detail)
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await stream.aclose()
        return None

    async def _unexpected_header(
        self, stream: anyio.abc.SocketStream, peer: str, tls: ClientTLS
    ) -> anyio.abc.ByteStream | None:
        """Without ``listen.connect_proxy_protocol``, before a TLS handshake: a relay that
        sends a PROXY header (nginx's ``proxy_protocol on``) would only fail the handshake,
        which is logged at debug level; refuse it with a warning that says why. The stream
        to go on with (its first bytes received again), or None (closed)."""
        try:
            with anyio.fail_after(tls.handshake_timeout):
                first = await stream.receive(MAX_LINE)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            tls.certificates.handshake_failed(exc, LISTENER, peer)  # as the handshake would
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await stream.aclose()
            return None
        if not first.startswith(b"PROXY "):
            return _Replayed(stream, first)
        self._gate.refused(PROXY_REFUSED, LISTENER)
        _log.warning("connect.proxy_refused", peer=peer, detail=UNEXPECTED_PROXY_HEADER)
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await stream.aclose()
        return None

    async def _accept_client(
        self, stream: anyio.abc.ByteStream, peer: str, tls: ClientTLS
    ) -> anyio.abc.ByteStream | None:
        """The TLS handshake with a client certificate required, and its check; None (the
        connection closed) if the client is refused."""
        try:
            with anyio.fail_after(tls.handshake_timeout):
                outer = await TLSStream.wrap(
                    stream, server_side=True, ssl_context=tls.context,
                    standard_compatible=False,
                )
        except (ssl.SSLError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError,
                OSError) as exc:
            tls.certificates.handshake_failed(exc, LISTENER, peer)
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await stream.aclose()
            return None
        reason = tls.certificates.check(outer.extra(TLSAttribute.ssl_object))  # noqa: S610
        if reason is None:
            return outer
        tls.certificates.refused(LISTENER, peer, reason)
        await _answer(outer, 403, NOT_ACCEPTED, close=True)
        return None

    def adopt(self, stream: anyio.abc.SocketStream, head: bytes, client: str) -> None:
        """Serve a tunnel another worker passed on (its PROXY header and TLS, if any, dealt
        with there; *head*: the bytes it read), as one accepted here."""
        if self._group is None:
            stream.extra(anyio.abc.SocketAttribute.raw_socket).close()  # noqa: S610
            return
        self._group.start_soon(self._adopted, stream, head, client)

    async def _adopted(self, stream: anyio.abc.SocketStream, head: bytes, client: str) -> None:
        refusal = self._gate.enter(client, LISTENER)
        if refusal is not None:
            await _answer(stream, refusal.status, refusal.text, close=True)
            return
        counted = True

        def leave() -> None:
            nonlocal counted
            if counted:
                self._gate.leave(client, LISTENER)
                counted = False

        try:
            await self.tunnel(_Replayed(stream, head), client, leave, passed=True)
        finally:
            leave()

    async def tunnel(
        self,
        stream: anyio.abc.ByteStream,
        client: str,
        answered: Callable[[], None],
        *,
        passed: bool = False,
    ) -> None:
        """Read the CONNECT head, admit its token like a WebSocket's, answer 200 and run the
        session on the tunnel (or answer the refusal's status and close). *answered* is
        called once the head is answered, either way. With worker processes, a tunnel
        whose token belongs to another worker is passed to it first (unless it was
        *passed* here)."""
        started = time.monotonic()
        parser = ConnectParser()
        read = bytearray()
        try:
            with anyio.fail_after(self._timeout):
                while True:
                    event = parser.next_event()
                    if isinstance(event, ConnectRequest):
                        break
                    chunk = await stream.receive(MAX_HEAD)
                    if self._pass_on is not None and not passed:
                        read += chunk
                    parser.receive_data(chunk)
        except ConnectError as exc:
            _log.info("connect.refused", reason="bad_request", detail=exc.detail, client=client,
                      status=exc.status)
            await _answer(stream, exc.status, "bad request", close=True)
            return
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await _answer(stream, 0, "", close=True)
            return
        if (
            self._pass_on is not None
            and not passed
            and await self._pass_on(event.host, stream, bytes(read), client, answered)
        ):
            return
        why = self.mismatch(event)
        if why is not None:
            _log.info("connect.refused", reason="bad_request", detail=why, client=client,
                      status=400)
            await _answer(stream, 400, why, close=True)
            return
        try:
            pending = await self._admit(event.host, client, started)
        except Refused as exc:
            refusal = exc.refusal
            self._count_refusal(refusal.reason)
            _log.info("request.refused", reason=refusal.reason, detail=exc.detail, client=client,
                      status=refusal.status, route="connect")
            await _answer(stream, refusal.status or 403, refusal.text, close=True)
            return
        if not await _answer(stream, 200, "Connection established", close=False):
            return
        answered()
        inner: anyio.abc.ByteStream = stream
        if self._ssl is not None:
            tls = await self._start_tls(stream, client)
            if tls is None:
                return
            inner = tls
        channel = TunnelChannel(inner, event.rest, self._read_size, self._write_timeout)
        await self._run(channel, pending)

    def mismatch(self, event: ConnectRequest) -> str | None:
        """Why the target's port does not fit this broker's TLS, or None.

        The port says what the tunnel carries: :data:`TLS_PORT` TLS with the broker's
        certificate (``[tls]`` set), any other the protocol in the clear (``[tls]``
        unset); client files name the right one."""
        if self._ssl is not None and event.port != TLS_PORT:
            return (f"this broker tunnels TLS only: CONNECT to port {TLS_PORT} "
                    "(the tls-port of a connection file it made)")
        if self._ssl is None and event.port == TLS_PORT:
            return f"this broker has no TLS ([tls]); port {TLS_PORT} means TLS in the tunnel"
        if self._ssl is not None and event.rest:
            return "send nothing before the 200 answer (the TLS handshake follows it)"
        return None

    async def _start_tls(
        self, stream: anyio.abc.ByteStream, client: str
    ) -> anyio.abc.ByteStream | None:
        """TLS inside the tunnel, with the broker's certificate; None (the tunnel
        closed) if the handshake fails."""
        assert self._ssl is not None
        try:
            with anyio.fail_after(self._timeout):
                return await TLSStream.wrap(
                    stream, server_side=True, ssl_context=self._ssl,
                    standard_compatible=False,
                )
        except ssl.SSLError as exc:
            _log.info("connect.tls_failed", client=client, detail=tls_error(exc))
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            _log.info("connect.tls_failed", client=client, detail="the client left")
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await stream.aclose()
        return None


async def _answer(stream: anyio.abc.ByteStream, status: int, text: str, *, close: bool) -> bool:
    """Answer the CONNECT (nothing for *status* 0); False once the tunnel is closed."""
    try:
        if status == 200:
            await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        elif status:
            await stream.send(http_response(status, text))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        close = True
    if close:
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
            await stream.aclose()
        return False
    return True


class _Replayed(anyio.abc.ByteStream):
    """*stream* with *first* (bytes read from it already) received before the rest."""

    def __init__(self, stream: anyio.abc.ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:max_bytes], self._first[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._stream.extra_attributes
