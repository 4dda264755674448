"""Requests the listener must answer cleanly: other methods than GET, malformed or
duplicated handshake headers, origins decided by configuration (not by the request's
Host), tokens put where they do not belong, and error pages that name no server path.

Requests are written by hand (:func:`exchange`), so each can be as wrong as a client
may make it; a token is checked to stay usable whenever the broker did not upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
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
from conftest import DOMAIN
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broker.config import (
    BrokerSection,
    Config,
    ConfigError,
    HTTPSection,
    ListenSection,
    TLSSection,
    config_from_dict,
)
from broker.plugins import PluginManager
from broker.service._request import loggable_path
from broker.tokens import Claims, TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio
#: A valid Sec-WebSocket-Key (RFC 6455's example).
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def broker(verifier: TokenVerifier) -> AsyncIterator[Running]:
    async with running_broker(make_config(), verifier, FakeResolver(FakeDomain(DOMAIN))) as running:
        yield running


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes


def request(
    method: str,
    target: str,
    *,
    websocket: bool = False,
    without: tuple[str, ...] = (),
    headers: tuple[tuple[str, str], ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    """A request head: with *websocket* a valid handshake's headers, less those named in
    *without*, plus *headers*."""
    lines = [("Host", "127.0.0.1")]
    if websocket:
        lines += [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", KEY),
            ("Sec-WebSocket-Version", "13"),
        ]
    lines = [(name, value) for name, value in lines if name not in without]
    head = [f"{method} {target} {version}", *(f"{n}: {v}" for n, v in [*lines, *headers])]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def exchange(port: int, head: bytes) -> Answer:
    """Send *head*, read the answer (to the end of the connection, or of a 101's head)."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    data = b""
    async with stream:
        await stream.send(head)
        with anyio.fail_after(5):
            try:
                while not data.startswith(b"HTTP/1.1 101 ") or b"\r\n\r\n" not in data:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode().split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Answer(int(status_line.split()[1]), headers, body)


def failures(logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> list[Any]:
    """Log entries that report a failure: a traceback, ``request.failed``, or a warning
    or worse from the standard library's loggers (websockets)."""
    ours = [e for e in logs if "exc_info" in e or e["event"] == "request.failed"]
    return ours + [r for r in caplog.records if r.levelno >= logging.WARNING]


async def still_usable(running: Running, token: str) -> None:
    async with connect(running.url("vnc", token)) as ws:
        assert await ws.recv() == BANNER


# --- methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
async def test_only_get_and_head_are_served(
    broker: Running, issuer: TokenIssuer, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    expected = [
        ("/healthz", 405, ["GET, HEAD"]),
        ("/metrics", 405, ["GET, HEAD"]),
        ("/console/vnc/", 405, ["GET, HEAD"]),
        (f"/file/spice?token={token}", 405, ["GET, HEAD"]),
        (f"/ws/vnc?token={token}", 405, ["GET"]),
        ("/nowhere", 404, None),
    ]
    with structlog.testing.capture_logs() as logs:
        for target, status, allow in expected:
            websocket = target.startswith("/ws/")
            answer = await exchange(broker.port, request(method, target, websocket=websocket))
            assert (answer.status, answer.headers.get("allow")) == (status, allow), target
    logged = [(e["method"], e["status"]) for e in logs if e["event"] == "http.request"]
    assert logged == [(method, status) for _, status, _ in expected]
    assert not failures(logs, caplog)
    await still_usable(broker, token)


async def test_head_answers_the_get_headers_without_a_body(
    broker: Running, issuer: TokenIssuer
) -> None:
    get = await exchange(broker.port, request("GET", "/healthz"))
    head = await exchange(broker.port, request("HEAD", "/healthz"))
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == [str(len(get.body))]
    assert head.headers["content-type"] == get.headers["content-type"]
    assert (await exchange(broker.port, request("HEAD", "/metrics"))).status == 200
    page = await exchange(broker.port, request("HEAD", "/console/vnc/"))
    assert (page.status, page.body) == (404, b"")
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    upgrade = await exchange(broker.port, request("HEAD", f"/ws/vnc?token={token}", websocket=True))
    assert (upgrade.status, upgrade.headers["allow"]) == (405, ["GET"])
    await still_usable(broker, token)


async def test_a_malformed_request_target_is_a_bad_request(
    broker: Running, caplog: pytest.LogCaptureFixture
) -> None:
    with structlog.testing.capture_logs() as logs:
        for target in ("http://[::1/ws/vnc?token=x", "//[oops/healthz"):
            answer = await exchange(broker.port, request("GET", target, websocket=True))
            assert (answer.status, answer.body) == (400, b"malformed console request\n")
    assert not failures(logs, caplog)


# --- handshake headers --------------------------------------------------------------------

_OWN = ("Origin", "http://127.0.0.1")
MALFORMED: dict[str, dict[str, Any]] = {
    "two Origin headers": {"headers": (_OWN, _OWN)},
    "two Upgrade headers": {"headers": (("Upgrade", "websocket"),)},
    "two keys": {"headers": (("Sec-WebSocket-Key", KEY),)},
    "two versions": {"headers": (("Sec-WebSocket-Version", "13"),)},
    "version 12": {"without": ("Sec-WebSocket-Version",),
                   "headers": (("Sec-WebSocket-Version", "12"),)},
    "no version": {"without": ("Sec-WebSocket-Version",)},
    "a short key": {"without": ("Sec-WebSocket-Key",),
                    "headers": (("Sec-WebSocket-Key", "c2hvcnQ="),)},
    "no key": {"without": ("Sec-WebSocket-Key",)},
    "no Connection: Upgrade": {"without": ("Connection",),
                               "headers": (("Connection", "keep-alive"),)},
    "HTTP/1.0": {"version": "HTTP/1.0"},
}


@pytest.mark.parametrize("refusals", ["status", "close"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_handshake_is_a_bad_request_and_leaves_the_token_usable(
    verifier: TokenVerifier,
    issuer: TokenIssuer,
    caplog: pytest.LogCaptureFixture,
    case: str,
    refusals: str,
) -> None:
    config = make_config(http=HTTPSection(allow_missing_origin=True, refusals=refusals))
    async with running_broker(config, verifier, FakeResolver(FakeDomain(DOMAIN))) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        head = request("GET", f"/ws/vnc?token={token}", websocket=True, **MALFORMED[case])
        with structlog.testing.capture_logs() as logs:
            answer = await exchange(running.port, head)
        assert (answer.status, answer.body) == (400, b"malformed console request\n")
        refused = [e for e in logs if e["event"] == "request.refused"]
        assert [(e["reason"], e["status"]) for e in refused] == [("bad_request", 400)]
        assert not failures(logs, caplog)
        await still_usable(running, token)


class GatedResolver(FakeResolver):
    """Holds every request in the resolver until :attr:`gate` is set."""

    def __init__(self, *domains: FakeDomain) -> None:
        super().__init__(*domains)
        self.gate = anyio.Event()
        self.waiting = 0

    async def target(self, claims: Claims, console: str, tls: Any = None) -> Any:
        self.waiting += 1
        await self.gate.wait()
        return await super().target(claims, console, tls)


async def test_two_upgrades_racing_with_one_token_open_one_session(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    resolver = GatedResolver(FakeDomain(DOMAIN))
    async with running_broker(make_config(), verifier, resolver) as running:
        url = running.url("vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token)
        outcomes: list[object] = []

        async def client() -> None:
            async with connect(url, open_timeout=5) as ws:  # both are upgraded
                try:
                    outcomes.append(await ws.recv())
                    await ws.close()
                except ConnectionClosed:
                    outcomes.append((ws.close_code, ws.close_reason))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                group.start_soon(client)
                group.start_soon(client)
                while resolver.waiting < 2:
                    await anyio.sleep(0.01)
                resolver.gate.set()
        assert sorted(outcomes, key=repr) == sorted(
            [BANNER, (4004, "token already used")], key=repr
        )
        assert resolver.opened == 1


# --- origins ------------------------------------------------------------------------------


def test_allowed_origins_come_from_the_configuration() -> None:
    assert Config().allowed_origins == ("http://127.0.0.1:6080",)
    tls = TLSSection(cert="c.pem", key="k.pem")
    v6 = Config(listen=ListenSection(host="::1", port=7000), tls=tls)
    assert v6.allowed_origins == ("https://[::1]:7000",)
    wildcard = Config(broker=BrokerSection(node="hv1"), listen=ListenSection(host="0.0.0.0"))
    assert wildcard.allowed_origins == ("http://hv1:6080",)  # the node name, as public_url
    proxied = Config(broker=BrokerSection(public_url="https://Consoles.example.com/hv1/"))
    assert proxied.allowed_origins == ("https://consoles.example.com", "http://127.0.0.1:6080")
    behind = Config(
        broker=BrokerSection(public_url="https://consoles.example.com:8443"),
        listen=ListenSection(host="::"),
    )
    assert behind.allowed_origins == ("https://consoles.example.com:8443",)
    listed = Config(http=HTTPSection(allowed_origins=("https://portal.example.com",)))
    assert listed.allowed_origins == ("https://portal.example.com",)


def test_a_public_url_with_a_bad_port_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"broker\.public_url: must have a port"):
        config_from_dict({"broker": {"public_url": "https://consoles.example.com:99999"}})


async def handshake_status(port: int, token: str, host: str, origin: str) -> int:
    head = request("GET", f"/ws/vnc?token={token}", websocket=True, without=("Host",),
                   headers=(("Host", host), ("Origin", origin)))
    answer = await exchange(port, head)
    return answer.status


async def test_the_host_header_does_not_make_an_origin_allowed(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    """DNS rebinding: a page of rebound.example, whose name now resolves to the broker,
    sends its own name as Host and as Origin."""
    port = free_port()
    config = make_config(http=HTTPSection(), port=port)
    async with running_broker(config, verifier, FakeResolver(FakeDomain(DOMAIN))):
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        rebound = f"rebound.example:{port}"
        assert await handshake_status(port, token, rebound, f"http://{rebound}") == 403
        own = f"http://127.0.0.1:{port}"
        assert await handshake_status(port, token, rebound, own) == 101


async def test_pages_from_the_public_url_may_connect_whatever_the_host(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    port = free_port()
    config = make_config(
        http=HTTPSection(), port=port, public_url="https://consoles.example.com/hv1"
    )
    with structlog.testing.capture_logs() as logs:
        async with running_broker(config, verifier, FakeResolver(FakeDomain(DOMAIN))) as running:

            def token() -> str:
                return issuer.issue(DOMAIN, "vnc", ttl=60).token

            here = f"127.0.0.1:{port}"
            proxy = "https://consoles.example.com"
            assert await handshake_status(port, token(), here, proxy) == 101
            assert await handshake_status(port, token(), here, f"http://{here}") == 101
            for foreign in ("http://consoles.example.com", "https://evil.example", "null"):
                assert await handshake_status(port, token(), "evil.example", foreign) == 403
            async with connect(running.url("vnc", token()), origin=proxy) as ws:  # type: ignore[arg-type]
                assert await ws.recv() == BANNER
    started = [e for e in logs if e["event"] == "broker.origins"]
    assert [(e["allowed"], e["source"]) for e in started] == [
        ([proxy, f"http://{here}"], "broker.public_url, listen")
    ]


# --- no token in the logs -----------------------------------------------------------------


async def test_a_token_in_the_wrong_place_never_reaches_the_log(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    heads = [
        request("GET", f"/ws/vnc/{token}", websocket=True),
        request("GET", f"/{token}"),
        request("GET", f"/console/vnc/{token}"),
        request("GET", f"/console/vnc/app/{token}/x.js"),
        request("GET", f"/ws/{token}", websocket=True),
        request("GET", f"/file/{token}"),
        request("GET", f"/ws/vnc?tok={token}", websocket=True),
        request("GET", f"/ws/vnc?x=1&t={token}", websocket=True),
        request("GET", f"/ws/vnc#token={token}", websocket=True),
        request("GET", f"/console/vnc/#{token}"),
        request("GET", f"/ws/vnc/;token={token}"),
        request("GET", f"/healthz/{token}"),
        request(token, "/healthz"),
        request("GET", "/ws/vnc?token=x", websocket=True, without=("Sec-WebSocket-Key",),
                headers=(("Sec-WebSocket-Key", token),)),
        request("GET", "/ws/vnc?token=x", websocket=True, headers=(("Origin", token),)),
    ]
    with structlog.testing.capture_logs() as logs:
        for head in heads:
            await exchange(broker.port, head)
    text = repr(logs)
    _header, payload, signature = token.split(".")
    assert "http.request" in text and "request.refused" in text
    for part in (payload, signature):
        for start in range(0, len(part) - 16, 8):  # not even a piece of it
            assert part[start : start + 16] not in text
    assert "eyJ" not in text  # nothing token-shaped either


def test_loggable_paths_keep_the_route_and_drop_token_like_segments() -> None:
    token = "eyJhbGciOiJFZERTQSJ9." + "A" * 200 + "." + "b" * 86
    assert loggable_path("/console/vnc/novnc/core/rfb.js") == "/console/vnc/novnc/core/rfb.js"
    assert loggable_path(f"/ws/vnc/{token}") == "/ws/vnc/[redacted]"
    assert loggable_path(f"/x/{'b' * 86}/y") == "/x/[redacted]/y"
    assert loggable_path("/x/eyJhbGciOiJFZERTQSJ9") == "/x/[redacted]"
    assert loggable_path("/" + "a/" * 100) == "/" + "a/" * 31 + "[...]"


# --- error pages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/vnc/", 503),
        ("/console/vnc/novnc/core/rfb.js", 404),
        ("/console/spice/", 503),
        ("/console/spice/spice-html5/src/main.js", 404),
        ("/console/serial/xterm/xterm.js", 503),
        ("/console/serial/xterm/addon-fit.js", 503),
    ],
)
async def test_a_page_without_its_assets_names_no_server_path(
    verifier: TokenVerifier, tmp_path: Path, path: str, status: int
) -> None:
    assets = tmp_path / "node_modules-nowhere"
    config = attrs.evolve(make_config(), http=HTTPSection(assets_dir=str(assets)))
    resolver, plugins = FakeResolver(FakeDomain(DOMAIN)), PluginManager(disabled=())
    with structlog.testing.capture_logs() as logs:
        async with running_broker(config, verifier, resolver, plugins) as running:
            answer = await exchange(running.port, request("GET", path))
    assert answer.status == status
    assert str(tmp_path).encode() not in answer.body and b"nowhere" not in answer.body
    if status == 503:  # the administrator finds where it was looked for in the log
        assert str(assets) in repr(logs)
