"""What a client can make the broker hold before and after its token: caps on pending
connections, bounded request heads, reading paused while a client does not read, clients
that stop reading cut, accept errors survived. In process: a real listener on loopback,
a fake hypervisor (brokerkit)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import attrs
import pytest
import structlog
from brokerkit import FakeDomain, FakeResolver, free_port, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import connect

from broker.config import Config, HTTPSection, LimitsSection, ListenSection, ProxySection
from broker.service._gate import AcceptGuard, ConnectionGate, http_response
from broker.service._metrics import Metrics
from broker.service._request import TrustedProxies
from broker.service._session import ClientClosed, TunnelChannel
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- the gate, alone ---------------------------------------------------------------------


def test_the_gate_counts_overall_and_per_address() -> None:
    metrics = Metrics()
    gate = ConnectionGate(total=3, per_client=2, proxies=TrustedProxies(), metrics=metrics)
    assert gate.enter("192.0.2.1", "http") is None
    assert gate.enter("192.0.2.1", "http") is None
    refused = gate.enter("192.0.2.1", "http")
    assert refused is not None and (refused.status, refused.reason) == (429, "client_pending_limit")
    assert gate.enter("192.0.2.2", "connect") is None
    refused = gate.enter("192.0.2.3", "http")
    assert refused is not None and (refused.status, refused.reason) == (503, "pending_limit")
    gate.leave("192.0.2.1", "http")
    assert gate.enter("192.0.2.3", "http") is None
    assert gate.pending == 3
    assert sample(metrics, "console_broker_connections_pending", listener="http") == 2
    assert sample(metrics, "console_broker_connections_refused_total",
                  listener="http", reason="client_pending_limit") == 1


def test_a_trusted_proxy_counts_only_against_the_overall_cap() -> None:
    gate = ConnectionGate(total=5, per_client=1, proxies=TrustedProxies(["10.0.0.5"]),
                          metrics=Metrics())
    assert all(gate.enter("10.0.0.5", "http") is None for _ in range(5))
    refused = gate.enter("10.0.0.5", "http")
    assert refused is not None and refused.reason == "pending_limit"


# --- pending connections and request heads, through the listener -----------------------


@contextmanager
def held_connections(port: int, sources: list[str]) -> Iterator[list[socket.socket]]:
    """One TCP connection to the broker from each source address, sending nothing yet."""
    with ExitStack() as stack:
        held = []
        for source in sources:
            sock = stack.enter_context(socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(source, 0)))
            held.append(sock)
        yield held


def answer(sock: socket.socket) -> bytes:
    """What the broker sends until it closes (at most 5 s)."""
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await anyio.sleep(0.01)


def limited(**limits: Any) -> Config:
    return make_config(limits=LimitsSection(**limits))


async def test_pending_connections_are_capped_overall(verifier: TokenVerifier) -> None:
    config = limited(max_pending=5, max_pending_per_client=3, handshake_timeout=30)
    async with running_broker(config, verifier, FakeResolver()) as running:
        gate = running.broker._gate
        with held_connections(running.port, ["127.0.0.1"] * 3 + ["127.0.0.2"] * 2):
            await wait_for(lambda: gate.pending == 5)
            with held_connections(running.port, ["127.0.0.3"]) as (one_more,):
                refused = await anyio.to_thread.run_sync(answer, one_more)
            assert refused.startswith(b"HTTP/1.1 503 ")
        await wait_for(lambda: gate.pending == 0)
        assert sample(running.broker.metrics, "console_broker_connections_refused_total",
                      listener="http", reason="pending_limit") == 1


async def test_pending_connections_are_capped_per_address(verifier: TokenVerifier) -> None:
    config = limited(max_pending=50, max_pending_per_client=3, handshake_timeout=30)
    async with running_broker(config, verifier, FakeResolver()) as running:
        gate = running.broker._gate
        with held_connections(running.port, ["127.0.0.3"] * 3):
            await wait_for(lambda: gate.pending == 3)
            with held_connections(running.port, ["127.0.0.3"]) as (one_more,):
                refused = await anyio.to_thread.run_sync(answer, one_more)
            assert refused.startswith(b"HTTP/1.1 429 ") and b"too many connections" in refused
            # another address is not held back by the first one's connections
            with held_connections(running.port, ["127.0.0.1"]) as (other,):
                other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await anyio.to_thread.run_sync(answer, other)).startswith(
                    b"HTTP/1.1 200 ")
        assert sample(running.broker.metrics, "console_broker_connections_refused_total",
                      listener="http", reason="client_pending_limit") == 1
        # answered requests and closed connections are no longer pending
        await wait_for(lambda: gate.pending == 0)


async def test_a_request_head_past_the_limit_is_431(verifier: TokenVerifier) -> None:
    config = limited(max_request_head=2048)
    async with running_broker(config, verifier, FakeResolver()) as running:
        with held_connections(running.port, ["127.0.0.1"]) as (sock,):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for _ in range(10):  # header lines trickling in, never ending the head
                sock.sendall(b"X-Filler: " + b"a" * 300 + b"\r\n")
            assert (await anyio.to_thread.run_sync(answer, sock)).startswith(b"HTTP/1.1 431 ")
        with held_connections(running.port, ["127.0.0.1"]) as (sock,):  # all at once, too
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: a\r\n" * 300 + b"\r\n")
            assert (await anyio.to_thread.run_sync(answer, sock)).startswith(b"HTTP/1.1 431 ")
        with held_connections(running.port, ["127.0.0.1"]) as (sock,):  # within it: served
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"X-Filler: a\r\n" * 100 + b"\r\n")
            assert (await anyio.to_thread.run_sync(answer, sock)).startswith(b"HTTP/1.1 200 ")
        assert sample(running.broker.metrics, "console_broker_connections_refused_total",
                      listener="http", reason="request_head_too_large") == 2
        await wait_for(lambda: running.broker._gate.pending == 0)


# --- a client that sends and does not read -------------------------------------------------


def ws_upgrade(port: int, path: str) -> socket.socket:
    """A raw WebSocket client connection, upgraded, that the test drives byte by byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def masked_ping(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x89, 0x80 | len(payload)) + mask + body


def flood_pings(sock: socket.socket, limit: int) -> int:
    """Send pings without reading until the broker stops taking them (the socket's send
    blocks for a second) or *limit* bytes went; how many bytes went."""
    frame = masked_ping(b"p" * 125) * 512
    sent = 0
    sock.settimeout(1.0)
    try:
        while sent < limit:
            sent += sock.send(frame)
    except (TimeoutError, BlockingIOError):
        pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


async def test_a_client_flooding_pings_without_reading_is_held_back_then_cut(
    verifier: TokenVerifier, issuer: TokenIssuer,
) -> None:
    config = make_config(
        limits=LimitsSection(write_timeout=1.0),
        proxy=ProxySection(write_buffer=65536, ping_interval=0),
    )
    resolver = FakeResolver(FakeDomain(DOMAIN))
    async with running_broker(config, verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        with structlog.testing.capture_logs() as logs:
            sock = await anyio.to_thread.run_sync(
                ws_upgrade, running.port, f"/ws/vnc?token={token}")
            with sock:
                # The broker stops reading once its pongs fill the buffer: the flood stops
                # long before 256 MiB (without the pause, all of it was read and answered).
                sent = await anyio.to_thread.run_sync(flood_pings, sock, 256 << 20)
                assert sent < 256 << 20
                await wait_for(lambda: running.broker.session_count == 0)
        closed = [entry for entry in logs if entry["event"] == "session.closed"]
        assert [(c["reason"], c["code"]) for c in closed] == [("client_stalled", 4108)]
        assert sample(running.broker.metrics, "console_broker_sessions_closed_total",
                      protocol="vnc", reason="client_stalled") == 1


async def test_a_reading_client_is_never_cut_for_a_full_buffer(
    verifier: TokenVerifier, issuer: TokenIssuer,
) -> None:
    """A console that sends far more than the buffer, to a client that reads slowly but
    reads: the session lives on past write_timeout."""

    async def chatty(stream: anyio.abc.SocketStream) -> None:
        block = b"x" * 65536
        try:
            while True:
                await stream.send(block)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    config = make_config(
        limits=LimitsSection(write_timeout=1.0), proxy=ProxySection(write_buffer=65536)
    )
    resolver = FakeResolver(FakeDomain(DOMAIN, console=chatty))
    async with running_broker(config, verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        # The client reads far slower than the console sends, in bursts (its library
        # stops reading while 4 messages wait in its queue): the buffer is full most of
        # the time, but it drains.
        async with connect(running.url("vnc", token), max_size=None, max_queue=4,
                           close_timeout=1) as ws:
            received = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                received += len(await ws.recv())
                await anyio.sleep(0.05)
            assert received > 0
            assert running.broker.session_count == 1


async def test_a_tunnel_client_that_does_not_read_is_cut() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        stream = await anyio.abc.SocketStream.from_socket(ours)
        channel = TunnelChannel(stream, b"", 65536, write_timeout=0.3)
        stalls = []
        channel.on_stall = lambda: stalls.append(True)
        with pytest.raises(ClientClosed), anyio.fail_after(10):
            while True:
                await channel.send(b"x" * 65536)
        assert channel.stalled and channel.closed and stalls == [True]
        await stream.aclose()


# --- accept errors -------------------------------------------------------------------------


def test_out_of_descriptors_the_guard_refuses_the_backlog() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    port = listening.getsockname()[1]
    metrics = Metrics()
    guard = AcceptGuard("http", metrics, refusal=http_response(503, "out of connections"))
    try:
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        guard.failed(OSError(errno.EMFILE, "Too many open files"), listening.fileno())
        for sock in waiting:
            with sock:
                assert answer(sock).startswith(b"HTTP/1.1 503 ")
        assert sample(metrics, "console_broker_accept_errors_total",
                      listener="http", error="EMFILE") == 1
        assert sample(metrics, "console_broker_connections_refused_total",
                      listener="http", reason="out_of_descriptors") == 3
        # the listening socket is still the listener's, and still listens
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = listening.accept()
            conn.close()
    finally:
        guard.close()
        listening.close()


def test_the_guard_holds_one_reserve_descriptor() -> None:
    before = len(os.listdir("/proc/self/fd"))
    guard = AcceptGuard("connect", Metrics())
    assert len(os.listdir("/proc/self/fd")) == before + 1
    guard.close()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_pending_refusals_are_not_counted_as_sessions(verifier: TokenVerifier) -> None:
    """HTTP answers and the gate's bookkeeping agree: many short requests leave nothing
    pending."""
    config = make_config(http=HTTPSection(allow_missing_origin=True))
    async with running_broker(config, verifier, FakeResolver()) as running:
        for _ in range(20):
            with held_connections(running.port, ["127.0.0.1"]) as (sock,):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await anyio.to_thread.run_sync(answer, sock)).startswith(
                    b"HTTP/1.1 200 ")
        await wait_for(lambda: running.broker._gate.pending == 0)


async def test_the_connect_listener_has_the_same_caps(verifier: TokenVerifier) -> None:
    config = attrs.evolve(
        limited(max_pending=50, max_pending_per_client=2, handshake_timeout=30),
        listen=ListenSection(host="127.0.0.1", port=0, connect_port=free_port()),
    )
    async with running_broker(config, verifier, FakeResolver()) as running:
        gate = running.broker._gate
        port = running.broker.connect_addresses[0][1]
        with held_connections(port, ["127.0.0.4"] * 2):
            await wait_for(lambda: gate.pending == 2)
            with held_connections(port, ["127.0.0.4"]) as (one_more,):
                refused = await anyio.to_thread.run_sync(answer, one_more)
            assert refused.startswith(b"HTTP/1.1 429 ")
            with held_connections(port, ["127.0.0.1"]) as (other,):  # answered: not pending
                other.sendall(b"CONNECT not-a-handle:5900 HTTP/1.1\r\n\r\n")
                assert (await anyio.to_thread.run_sync(answer, other)).startswith(
                    b"HTTP/1.1 401 ")
        await wait_for(lambda: gate.pending == 0)
        assert sample(running.broker.metrics, "console_broker_connections_refused_total",
                      listener="connect", reason="client_pending_limit") == 1


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain listener
    ],
)
async def test_a_request_websockets_cannot_parse_is_answered_400(
    verifier: TokenVerifier, request_bytes: bytes
) -> None:
    async with running_broker(make_config(), verifier, FakeResolver()) as running:
        with held_connections(running.port, ["127.0.0.1"]) as (sock,):
            sock.sendall(request_bytes)
            assert (await anyio.to_thread.run_sync(answer, sock)).startswith(b"HTTP/1.1 400 ")
        assert sample(running.broker.metrics, "console_broker_connections_refused_total",
                      listener="http", reason="malformed_request") == 1
        await wait_for(lambda: running.broker._gate.pending == 0)
