"""The broker's listener end to end, in process: a real server on 127.0.0.1, a fake hypervisor.

Every refusal is driven through a real WebSocket client and checked for its
HTTP status (before the upgrade) or close code (after it) and its reason.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import structlog
from brokerkit import (
    BANNER,
    FakeDomain,
    FakeResolver,
    Running,
    free_port,
    make_config,
    running_broker,
)
from conftest import DOMAIN, FakeClock
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker import Protocol, hookimpl
from broker.config import HTTPSection, LimitsSection
from broker.plugins import PluginManager
from broker.service import Session
from broker.service import _refusals as R
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
STOPPED = "1c2d3e4f-0000-4000-8000-000000000001"
BUSY = "1c2d3e4f-0000-4000-8000-000000000002"
NO_CONSOLES = "1c2d3e4f-0000-4000-8000-000000000003"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _resolver() -> FakeResolver:
    return FakeResolver(
        FakeDomain(DOMAIN, name="web1"),
        FakeDomain(STOPPED, running=False),
        FakeDomain(BUSY, busy=True),
        FakeDomain(NO_CONSOLES, consoles=()),
    )


@pytest.fixture
async def broker(verifier: TokenVerifier) -> AsyncIterator[Running]:
    async with running_broker(make_config(), verifier, _resolver()) as running:
        yield running


async def http_get(
    running: Running, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET: (status, headers, body)."""
    stream = await anyio.connect_tcp("127.0.0.1", running.port)
    async with stream:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{running.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


async def refused_status(url: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=5, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.body.decode()


async def closed_with(url: str, **kwargs: Any) -> tuple[int | None, str | None]:
    async with connect(url, open_timeout=5, **kwargs) as ws:
        with pytest.raises(ConnectionClosed):
            with anyio.fail_after(5):
                while True:
                    await ws.recv()
        return ws.close_code, ws.close_reason


# --- sessions -----------------------------------------------------------------------------


async def test_a_token_opens_a_session_that_reaches_the_console(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    with structlog.testing.capture_logs() as logs:
        async with connect(broker.url("vnc", token), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "binary"
            assert await ws.recv() == BANNER
            await ws.send(b"hello")
            assert await ws.recv() == b"hello"
            await ws.send("text keys")  # terminals send text frames: passed on as bytes
            assert await ws.recv() == b"text keys"
        with anyio.fail_after(5):
            while broker.broker.session_count:
                await anyio.sleep(0.01)
    events = {entry["event"]: entry for entry in logs}
    opened, closed = events["session.opened"], events["session.closed"]
    assert (
        opened["domain"] == DOMAIN
        and opened["protocol"] == "vnc"
        and opened["client"] == "127.0.0.1"
    )
    assert closed["reason"] == "client_closed"
    assert closed["bytes_to_client"] == len(BANNER) + len(b"hello") + len(b"text keys")
    assert closed["bytes_to_console"] == len(b"hello") + len(b"text keys")
    assert closed["duration"] >= 0
    assert token not in repr(logs)


async def test_a_client_offering_no_subprotocol_is_accepted(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "serial", ttl=60).token
    async with connect(broker.url("serial", token)) as ws:
        assert ws.subprotocol is None
        assert await ws.recv() == BANNER


async def test_the_console_closing_closes_the_client_normally(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    async def short_console(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"bye")

    resolver = FakeResolver(FakeDomain(DOMAIN, console=short_console))
    async with running_broker(make_config(), verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token)) as ws:
            assert await ws.recv() == b"bye"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (1000, "console closed")


# --- refusals before the upgrade ----------------------------------------------------------


async def test_token_refusals_have_their_own_status(
    broker: Running, issuer: TokenIssuer, clock: FakeClock
) -> None:
    assert await refused_status(broker.url("vnc", "not-a-token")) == (401, "invalid token\n")
    missing = f"ws://127.0.0.1:{broker.port}/ws/vnc"
    assert await refused_status(missing) == (401, "invalid token\n")
    twice = f"ws://127.0.0.1:{broker.port}/ws/vnc?token=a&token=b"
    assert await refused_status(twice) == (400, "malformed console request\n")

    expired = issuer.issue(DOMAIN, "vnc", ttl=1).token
    clock.advance(30)
    assert await refused_status(broker.url("vnc", expired)) == (401, "token expired\n")

    used = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with connect(broker.url("vnc", used)) as ws:
        await ws.recv()
    assert await refused_status(broker.url("vnc", used)) == (401, "token already used\n")

    serial = issuer.issue(DOMAIN, "serial", ttl=60).token
    assert await refused_status(broker.url("vnc", serial)) == (
        403,
        "token is for another protocol\n",
    )


async def test_a_token_for_another_node_is_misdirected(
    broker: Running, private_key: Any, clock: FakeClock
) -> None:
    other = TokenIssuer(private_key, "hv2", now=clock)
    token = other.issue(DOMAIN, "vnc", ttl=60).token
    assert await refused_status(broker.url("vnc", token)) == (421, "token is for another node\n")


@pytest.mark.parametrize(
    ("domain", "protocol", "status", "text"),
    [
        (OTHER, "vnc", 404, "unknown domain"),
        (STOPPED, "vnc", 409, "VM not running"),
        (NO_CONSOLES, "vnc", 404, "console not enabled on this domain"),
    ],
)
async def test_domain_refusals_have_their_own_status(
    broker: Running, issuer: TokenIssuer, domain: str, protocol: str, status: int, text: str
) -> None:
    token = issuer.issue(domain, protocol, ttl=60).token
    assert await refused_status(broker.url(protocol, token)) == (status, text + "\n")


async def test_an_unknown_protocol_is_not_found(broker: Running, issuer: TokenIssuer) -> None:
    token = issuer.issue(DOMAIN, "nope", ttl=60).token
    assert await refused_status(broker.url("nope", token)) == (
        404,
        "no plugin serves this protocol\n",
    )


async def test_the_hypervisor_being_down_is_unavailable(
    broker: Running, issuer: TokenIssuer
) -> None:
    broker.resolver.available = False
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    assert await refused_status(broker.url("vnc", token)) == (503, "hypervisor unavailable\n")


async def test_a_busy_console_closes_after_the_upgrade(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(BUSY, "serial", ttl=60).token
    assert await closed_with(broker.url("serial", token)) == (4013, "console busy")


async def test_a_plain_get_on_a_websocket_path_does_not_use_the_token(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    status, headers, _body = await http_get(broker, f"/ws/vnc?token={token}")
    assert status == 426 and headers["upgrade"] == "websocket"
    async with connect(broker.url("vnc", token)) as ws:  # still usable
        assert await ws.recv() == BANNER


# --- origins ------------------------------------------------------------------------------


async def test_origin_rules(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    config = make_config(http=HTTPSection(), port=free_port())  # a port known to the config
    async with running_broker(config, verifier, _resolver()) as running:
        own = f"http://127.0.0.1:{running.port}"  # the listen address (and the public URL)

        def url() -> str:
            return running.url("vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token)

        async with connect(url(), origin=own) as ws:  # type: ignore[arg-type]
            assert await ws.recv() == BANNER
        for foreign in ("http://evil.example", f"http://127.0.0.1:{running.port + 1}", "null"):
            status = await refused_status(url(), origin=foreign)
            assert status == (403, "origin not allowed\n"), foreign
        assert await refused_status(url()) == (403, "origin not allowed\n")  # no Origin

    config = make_config(http=HTTPSection(allowed_origins=("https://portal.example.com",)))
    async with running_broker(config, verifier, _resolver()) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        origin = "https://PORTAL.example.com:443"
        async with connect(running.url("vnc", token), origin=origin) as ws:  # type: ignore[arg-type]
            assert await ws.recv() == BANNER
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        own = f"http://127.0.0.1:{running.port}"  # the own host is not implied by a list
        status = await refused_status(running.url("vnc", token), origin=own)
        assert status == (403, "origin not allowed\n")


async def test_a_refused_origin_does_not_use_the_token(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    config = make_config(http=HTTPSection(), port=free_port())
    async with running_broker(config, verifier, _resolver()) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        await refused_status(running.url("vnc", token), origin="http://evil.example")
        own = f"http://127.0.0.1:{running.port}"
        async with connect(running.url("vnc", token), origin=own) as ws:  # type: ignore[arg-type]
            assert await ws.recv() == BANNER


# --- limits -------------------------------------------------------------------------------


async def test_limits_per_domain_client_and_total(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    limits = LimitsSection(max_sessions=3, max_sessions_per_domain=2, max_sessions_per_client=3)
    resolver = FakeResolver(FakeDomain(DOMAIN), FakeDomain(OTHER))
    async with running_broker(make_config(limits=limits), verifier, resolver) as running:

        def url(domain: str) -> str:
            return running.url("vnc", issuer.issue(domain, "vnc", ttl=60).token)

        async with connect(url(DOMAIN)) as a, connect(url(DOMAIN)) as b:
            await a.recv(), await b.recv()
            assert await refused_status(url(DOMAIN)) == (429, "session limit reached\n")
            async with connect(url(OTHER)) as c:
                await c.recv()
                assert await refused_status(url(OTHER)) == (429, "session limit reached\n")
        with anyio.fail_after(5):
            while running.broker.session_count:
                await anyio.sleep(0.01)
        async with connect(url(DOMAIN)) as again:  # released
            assert await again.recv() == BANNER


@pytest.mark.parametrize("trusted", [True, False])
async def test_a_trusted_proxys_forwarded_address_is_the_client(
    verifier: TokenVerifier, issuer: TokenIssuer, trusted: bool
) -> None:
    limits = LimitsSection(max_sessions_per_client=1)
    http = HTTPSection(allow_missing_origin=True,
                       trusted_proxies=("127.0.0.0/8",) if trusted else ())
    resolver = FakeResolver(FakeDomain(DOMAIN))
    async with running_broker(make_config(limits=limits, http=http), verifier, resolver) as running:

        def url() -> str:
            return running.url("vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token)

        def via(client: str) -> dict[str, Any]:
            # what the client wrote itself comes first; the proxy appends who it saw
            return {"additional_headers": {"X-Forwarded-For": f"203.0.113.66, {client}"}}

        with structlog.testing.capture_logs() as logs:
            async with connect(url(), **via("192.0.2.1")) as first:
                await first.recv()
                if trusted:  # another client behind the same proxy gets its own limit
                    async with connect(url(), **via("192.0.2.2")) as second:
                        assert await second.recv() == BANNER
                    assert await refused_status(url(), **via("192.0.2.1")) == (
                        429, "session limit reached\n"
                    )
                else:  # the header is not believed: all of it is one client, the proxy
                    assert (await refused_status(url(), **via("192.0.2.2")))[0] == 429
        opened = [e for e in logs if e["event"] == "session.opened"]
        refused = [e for e in logs if e["event"] == "request.refused"]
        if trusted:
            assert {e["client"] for e in opened} == {"192.0.2.1", "192.0.2.2"}
            assert refused[0]["client"] == "192.0.2.1"
        else:
            assert {e["client"] for e in opened + refused} == {"127.0.0.1"}


async def test_plain_http_requests_are_logged_without_their_query(broker: Running) -> None:
    with structlog.testing.capture_logs() as logs:
        await http_get(broker, "/console/vnc/?token=secret-looking")
        await http_get(broker, "/healthz")
    requests = [e for e in logs if e["event"] == "http.request"]
    assert [(e["path"], e["status"], e["log_level"]) for e in requests] == [
        ("/console/vnc/", 404, "info"), ("/healthz", 200, "debug"),
    ]
    assert all(e["client"] == "127.0.0.1" and e["duration_ms"] >= 0 for e in requests)
    assert "secret-looking" not in repr(logs)


# --- refusals after the upgrade (http.refusals = "close") ---------------------------------


@pytest.mark.parametrize(
    ("domain", "protocol", "on", "code", "reason"),
    [
        (DOMAIN, "serial", "vnc", 4006, "token is for another protocol"),
        (OTHER, "vnc", "vnc", 4010, "unknown domain"),
        (STOPPED, "vnc", "vnc", 4012, "VM not running"),
        (NO_CONSOLES, "vnc", "vnc", 4011, "console not enabled on this domain"),
        (BUSY, "vnc", "vnc", 4013, "console busy"),
    ],
)
async def test_refusals_as_close_codes(
    verifier: TokenVerifier,
    issuer: TokenIssuer,
    domain: str,
    protocol: str,
    on: str,
    code: int,
    reason: str,
) -> None:
    config = make_config(http=HTTPSection(allow_missing_origin=True, refusals="close"))
    async with running_broker(config, verifier, _resolver()) as running:
        token = issuer.issue(domain, protocol, ttl=60).token
        assert await closed_with(running.url(on, token)) == (code, reason)


async def test_token_refusals_as_close_codes(
    verifier: TokenVerifier, issuer: TokenIssuer, clock: FakeClock
) -> None:
    config = make_config(http=HTTPSection(allow_missing_origin=True, refusals="close"))
    async with running_broker(config, verifier, _resolver()) as running:
        assert await closed_with(running.url("vnc", "junk")) == (4001, "invalid token")
        expired = issuer.issue(DOMAIN, "vnc", ttl=1).token
        clock.advance(30)
        assert await closed_with(running.url("vnc", expired)) == (4002, "token expired")
        used = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", used)) as ws:
            await ws.recv()
        assert await closed_with(running.url("vnc", used)) == (4004, "token already used")
        # A foreign origin is never upgraded.
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        evil = "http://evil.example"
        status = await refused_status(running.url("vnc", token), origin=evil)
        assert status == (403, "origin not allowed\n")


# --- endings ------------------------------------------------------------------------------


async def test_a_stopping_vm_closes_its_sessions_within_a_second(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with connect(broker.url("vnc", token)) as ws:
        await ws.recv()
        broker.resolver.stop(DOMAIN, R.VM_STOPPED)
        with anyio.fail_after(1), pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4100, "VM stopped")
    with anyio.fail_after(1):
        while broker.resolver.closed < broker.resolver.opened:
            await anyio.sleep(0.01)


async def test_an_idle_session_is_closed(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    config = make_config(limits=LimitsSection(idle_timeout=0.3))
    async with running_broker(config, verifier, _resolver()) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token)) as ws:
            await ws.recv()
            for _ in range(3):  # activity keeps it open
                await anyio.sleep(0.15)
                await ws.send(b"x")
                assert await ws.recv() == b"x"
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (4102, "idle timeout")


async def test_shutdown_closes_sessions_with_going_away(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    config = make_config(limits=LimitsSection(shutdown_grace=2.0))
    async with running_broker(config, verifier, _resolver()) as running:
        tokens = [issuer.issue(DOMAIN, "vnc", ttl=60).token for _ in range(3)]
        clients = [await connect(running.url("vnc", t)) for t in tokens]
        for ws in clients:
            await ws.recv()
        started = anyio.current_time()
        running.broker.shutdown()
        for ws in clients:
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (1001, "broker shutting down")
    assert anyio.current_time() - started < 2.0
    with pytest.raises(OSError):  # no longer listening
        await anyio.connect_tcp("127.0.0.1", running.port)


# --- plain HTTP ---------------------------------------------------------------------------


async def test_healthz(broker: Running) -> None:
    status, headers, body = await http_get(broker, "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["status"] == "ok" and doc["libvirt"]["connected"] is True and doc["node"] == "hv1"
    broker.resolver.available = False
    status, _, body = await http_get(broker, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "unavailable"


async def test_metrics(broker: Running, issuer: TokenIssuer) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with connect(broker.url("vnc", token)) as ws:
        await ws.recv()
        await ws.send(b"abc")
        await ws.recv()
        _, _, body = await http_get(broker, "/metrics")
        text = body.decode()
        assert 'console_broker_sessions_active{protocol="vnc"} 1.0' in text
    await refused_status(broker.url("vnc", "junk"))
    status, headers, body = await http_get(broker, "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'console_broker_refusals_total{reason="invalid_token"} 1.0' in text
    assert 'console_broker_bytes_total{direction="to_console",protocol="vnc"} 3.0' in text
    assert 'console_broker_handshake_seconds_count{protocol="vnc"} 1.0' in text
    assert "console_broker_libvirt_connected 1.0" in text


async def test_pages(broker: Running) -> None:
    status, headers, body = await http_get(broker, "/console/vnc/?token=x")
    assert status == 404 and b"no console page here for protocol 'vnc'" in body
    assert headers["referrer-policy"] == "no-referrer" and headers["cache-control"] == "no-store"
    status, headers, _ = await http_get(broker, "/console/vnc?token=x")
    assert status == 301 and headers["location"] == "vnc/?token=x"
    assert (await http_get(broker, "/console/nope/"))[0] == 404
    assert (await http_get(broker, "/console/vnc/../../etc/passwd"))[0] == 404
    assert (await http_get(broker, "/elsewhere"))[0] == 404


# --- view-only, single use, the session hook ----------------------------------------------


async def test_a_view_only_token_needs_a_protocol_that_enforces_it(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60, view_only=True).token
    status = await refused_status(broker.url("vnc", token))
    assert status == (403, "view-only sessions are not available for this protocol\n")


async def test_a_token_refused_before_the_upgrade_stays_usable(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(STOPPED, "vnc", ttl=60).token
    assert await refused_status(broker.url("vnc", token)) == (409, "VM not running\n")
    broker.resolver.domains[STOPPED].running = True
    async with connect(broker.url("vnc", token)) as ws:
        assert await ws.recv() == BANNER
    assert await refused_status(broker.url("vnc", token)) == (401, "token already used\n")


class _HookPlugin:
    """A plugin defined in the test: it opens a second endpoint, or fails."""

    def __init__(self) -> None:
        self.seen: list[Session] = []

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [
            Protocol(name="two-vnc", title="two", console="vnc", view_only=True,
                     handler=self.two),
            Protocol(name="broken", title="broken", console="vnc", handler=self.broken),
            Protocol(name="gone", title="gone", console="vnc", handler=self.gone),
        ]

    async def two(self, session: Session) -> None:
        self.seen.append(session)
        second = await session.open_endpoint()
        assert await second.stream.receive() == BANNER
        await session.client.send(b"two:" + await session.console_endpoint.stream.receive())

    async def broken(self, session: Session) -> None:
        raise RuntimeError("plugin bug")

    async def gone(self, session: Session) -> None:
        async with anyio.create_task_group() as group:  # as a plugin's two directions would
            group.start_soon(self._console_breaks, session)

    @staticmethod
    async def _console_breaks(session: Session) -> None:
        raise anyio.BrokenResourceError  # what a console's stream raises once it is gone


async def test_the_session_hook_gets_a_session_and_the_core_closes_everything(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    plugin = _HookPlugin()
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("hooked", plugin)])
    resolver = _resolver()
    async with running_broker(make_config(), verifier, resolver, plugins) as running:
        token = issuer.issue(DOMAIN, "two-vnc", ttl=60, view_only=True).token
        async with connect(running.url("two-vnc", token)) as ws:
            assert await ws.recv() == b"two:" + BANNER
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (1000, "console closed")
        session = plugin.seen[0]
        assert session.view_only and session.console == "vnc" and session.domain_name == "web1"
        assert resolver.opened == 2
        with anyio.fail_after(3):
            while resolver.closed < 2:  # both endpoints closed by the core
                await anyio.sleep(0.01)

        token = issuer.issue(DOMAIN, "broken", ttl=60).token
        with structlog.testing.capture_logs() as logs:
            assert await closed_with(running.url("broken", token)) == (1011, "internal error")
        assert any(entry["event"] == "session.failed" for entry in logs)

        # a console error a handler lets escape is the console closing, not a plugin bug
        token = issuer.issue(DOMAIN, "gone", ttl=60).token
        with structlog.testing.capture_logs() as logs:
            assert await closed_with(running.url("gone", token)) == (1000, "console closed")
        assert not any(entry["event"] == "session.failed" for entry in logs)
