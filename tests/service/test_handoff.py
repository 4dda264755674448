"""Handoff handles (broker/handoff.py, ``POST /handoff/{protocol}``): issued only for a
session live on this broker, to the holder of its token or handle; single use, short
lived, bounded; accepted wherever a token is (WebSocket, /file, CONNECT); never logged.

The table and the verifier with a fake clock; the endpoint in process against the fake
hypervisor (brokerkit), requests written by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
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
from conftest import DOMAIN, FakeClock, MakeVerifier
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from broker import Protocol, hookimpl
from broker.config import Config, HTTPSection, ListenSection
from broker.handoff import HANDLE, HandoffLimit, HandoffTable, handle_id
from broker.hookspecs import ClientFile
from broker.plugins import PluginContext, PluginManager
from broker.service._connect import handle_for_token
from broker.service._logging import scrub
from broker.service._refusals import Refused
from broker.service._request import (
    HandoffRoute,
    NotAllowed,
    NotFound,
    bearer_token,
    loggable_path,
    route,
)
from broker.tokens import (
    Claims,
    ExpiredToken,
    InvalidToken,
    ReplayedToken,
    Rights,
    TokenIssuer,
    TokenVerifier,
    WrongNode,
    WrongProtocol,
)


def _claims(jti: str = "parent-jti", protocol: str = "vnc") -> Claims:
    return Claims(
        domain_uuid=DOMAIN, protocol=protocol, node="hv1", rights=Rights.VIEW,
        issued_at=1, not_before=1, expires_at=61, jti=jti, device="serial1",
    )


# --- the table and the verifier ---------------------------------------------------------


def test_a_handle_stands_for_the_sessions_claims(verifier: TokenVerifier, clock: FakeClock) -> None:
    parent = _claims()
    handoff = verifier.hand_off(parent, ttl=60)
    assert HANDLE.fullmatch(handoff.handle) and not handoff.handle.startswith("eyJ")
    assert handoff.handle not in repr(handoff)
    assert handoff.parent == "parent-jti"
    now = int(clock())
    assert handoff.claims == attrs.evolve(
        parent, issued_at=now, not_before=now, expires_at=now + 60,
        jti=handle_id(handoff.handle),
    )
    assert handoff.handle not in handoff.claims.jti
    claims = verifier.verify(handoff.handle, protocol="vnc", node="hv1", domain=DOMAIN)
    assert claims == handoff.claims
    with pytest.raises(ReplayedToken):
        verifier.verify(handoff.handle, protocol="vnc", node="hv1")
    # each handle is new
    assert verifier.hand_off(parent, ttl=60).handle != handoff.handle


def test_a_handle_is_checked_like_a_token(make_verifier: MakeVerifier, clock: FakeClock) -> None:
    verifier = make_verifier(max_ttl=30)
    handoff = verifier.hand_off(_claims(), ttl=60)
    assert handoff.claims.expires_at - handoff.claims.issued_at == 30  # at most max_ttl
    for refused, expected in [
        ({"protocol": "spice"}, WrongProtocol),
        ({"node": "hv2"}, WrongNode),
    ]:
        with pytest.raises(expected):
            verifier.verify(handoff.handle, **refused)
    # refused before single use: still usable
    assert verifier.verify(handoff.handle, protocol="vnc", consume=False) == handoff.claims
    assert not verifier.used(handoff.claims)
    clock.advance(30 + 5)  # past exp + leeway: expired, and said so for a while
    with pytest.raises(ExpiredToken):
        verifier.verify(handoff.handle)
    clock.advance(60)  # then forgotten
    with pytest.raises(InvalidToken, match="unknown handoff handle"):
        verifier.verify(handoff.handle)
    assert len(verifier.handoffs) == 0


@pytest.mark.parametrize(
    "garbage",
    ["h.", "h.short", "h." + "!" * 32, "h." + "A" * 33, "h." + "A" * 32, "H." + "A" * 32,
     "h.\u00e9"],
)
def test_unknown_or_malformed_handles_are_invalid(verifier: TokenVerifier, garbage: str) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(garbage)


def test_a_handle_is_usable_only_where_it_was_issued(make_verifier: MakeVerifier) -> None:
    handoff = make_verifier().hand_off(_claims(), ttl=60)
    with pytest.raises(InvalidToken, match="another broker process"):
        make_verifier().verify(handoff.handle)


def test_a_session_has_a_few_handles_outstanding(verifier: TokenVerifier, clock: FakeClock) -> None:
    parent = _claims()
    table = verifier.handoffs
    handles = [verifier.hand_off(parent, ttl=60) for _ in range(table.per_session)]
    with pytest.raises(HandoffLimit, match="not yet used"):
        verifier.hand_off(parent, ttl=60)
    verifier.hand_off(_claims("another session"), ttl=60)  # other sessions are not held up
    verifier.verify(handles[0].handle)  # used: no longer outstanding
    verifier.hand_off(parent, ttl=60)
    with pytest.raises(HandoffLimit):
        verifier.hand_off(parent, ttl=60)
    clock.advance(66)  # expired ones no longer count either
    verifier.hand_off(parent, ttl=60)


def test_the_table_is_bounded_and_expired_handles_make_room(clock: FakeClock) -> None:
    table = HandoffTable(maxsize=3, leeway=5)
    for n in range(3):
        table.issue(_claims(f"s{n}"), ttl=60, now=clock())
    with pytest.raises(HandoffLimit, match="3 live handoff handles"):
        table.issue(_claims("s3"), ttl=60, now=clock())
    clock.advance(65)  # expired, still known (lingering): they make room
    lingering = table.issue(_claims("s0"), ttl=60, now=clock())
    assert len(table) == 1 and table.claims(lingering.handle, now=clock()) is not None
    with pytest.raises(ValueError, match="at least one"):
        HandoffTable(maxsize=0)


def test_session_jti_proves_possession_not_lifetime(
    verifier: TokenVerifier, issuer: TokenIssuer, clock: FakeClock
) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    clock.advance(3600)  # long expired: a session outlives its token
    assert verifier.session_jti(issued.token, protocol="vnc", node="hv1") == issued.claims.jti
    with pytest.raises(WrongProtocol):
        verifier.session_jti(issued.token, protocol="spice", node="hv1")
    with pytest.raises(WrongNode):
        verifier.session_jti(issued.token, protocol="vnc", node="hv2")
    with pytest.raises(InvalidToken):
        verifier.session_jti(issued.token[:-2] + "xx", protocol="vnc", node="hv1")
    handle = "h." + "A" * 32
    assert verifier.session_jti(handle, protocol="vnc", node="hv1") == handle_id(handle)


def test_handles_never_reach_a_log_line(verifier: TokenVerifier) -> None:
    handle = verifier.hand_off(_claims(), ttl=60).handle
    assert scrub(f"opened {handle}, ?token={handle}") == "opened [redacted], ?token=[redacted]"
    assert scrub(f"x{handle}") == f"x{handle}"  # inside a longer word: not a handle
    assert loggable_path(f"/ws/vnc/{handle}") == "/ws/vnc/[redacted]"
    assert loggable_path("/handoff/vnc") == "/handoff/vnc"


def test_the_authorization_header() -> None:
    assert bearer_token(["Bearer abc"]) == "abc"
    assert bearer_token(["bearer  abc "]) == "abc"
    for values, reason in [
        ([], "invalid_token"),
        (["Basic abc"], "invalid_token"),
        (["Bearer"], "invalid_token"),
        (["Bearer a b"], "invalid_token"),
        (["Bearer a", "Bearer b"], "bad_request"),
    ]:
        with pytest.raises(Refused) as refused:
            bearer_token(values)
        assert refused.value.refusal.reason == reason
        assert "abc" not in refused.value.detail


# --- the endpoint -----------------------------------------------------------------------


class WithFiles(Protocol):
    def client_file(self, token: str, title: str, context: PluginContext) -> ClientFile:
        return ClientFile(name="conn", body=f"token={token}\n", content_type="application/x-test",
                          suffix=".conn")


class Protocols:
    """``vnc`` (raw, single connection) and ``multi`` (several connections, native
    clients with a file)."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [
            Protocol(name="vnc", title="vnc"),
            WithFiles(name="multi", title="multi", console="vnc", multi_connection=True,
                      native_clients=True),
        ]


def _plugins() -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[("p", Protocols())])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def broker(verifier: TokenVerifier) -> AsyncIterator[Running]:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(make_config(), verifier, resolver, _plugins()) as running:
        yield running


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    running: Running, path: str, token: str | None = None, *, method: str = "POST",
    headers: tuple[tuple[str, str], ...] = (),
) -> Answer:
    """A request written by hand (*token* as ``Authorization: Bearer``), read to its end."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Length: 0"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name}: {value}" for name, value in headers]
    stream = await anyio.connect_tcp("127.0.0.1", running.port)
    data = b""
    async with stream:
        await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        with anyio.fail_after(5):
            try:
                while True:
                    data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), parsed, body)


async def refused_status(url: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    return refused.value.response.status_code


@pytest.mark.anyio
async def test_a_live_session_hands_off_a_single_use_handle(
    broker: Running, issuer: TokenIssuer
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    with structlog.testing.capture_logs() as logs:
        async with connect(broker.url("vnc", token)) as page:
            assert await page.recv() == BANNER
            answer = await post(broker, "/handoff/vnc", token)
            assert answer.status == 200, answer.body
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["cache-control"] == "no-store"
            doc = answer.json()
            handle = doc["token"]
            assert HANDLE.fullmatch(handle)
            assert doc["protocol"] == "vnc" and doc["expires_in"] == 60
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["expires_at"])
            assert doc["page"] == f"http://127.0.0.1:0/console/vnc/?token={handle}"
            assert doc["websocket"] == f"ws://127.0.0.1:0/ws/vnc?token={handle}"
            # the handle opens a session of its own, once
            async with connect(broker.url("vnc", handle)) as native:
                assert await native.recv() == BANNER
                await native.send(b"typed")
                assert await native.recv() == b"typed"
                assert await refused_status(broker.url("vnc", handle)) == 401
                # the handle's own session may hand off in turn
                again = await post(broker, "/handoff/vnc", handle)
                assert again.status == 200 and again.json()["token"] != handle
            assert await refused_status(broker.url("vnc", handle)) == 401  # still used
            # the page's session goes on meanwhile
            await page.send(b"still here")
            assert await page.recv() == b"still here"
        await anyio.sleep(0.3)  # the page's session has ended: no more handles
        ended = await post(broker, "/handoff/vnc", token)
        assert (ended.status, ended.body) == (401, b"token already used\n")
    handoffs = [e for e in logs if e["event"] == "token.handoff"]
    assert len(handoffs) == 2
    assert handoffs[0]["protocol"] == "vnc" and handoffs[0]["domain"] == DOMAIN
    assert handoffs[0]["handoff"] == handle_id(handle) and handoffs[0]["rights"] == "full"
    assert handoffs[1]["jti"] == handle_id(handle)  # issued for the handle's session
    opened = [e for e in logs if e["event"] == "session.opened"]
    assert [e["jti"] for e in opened] == [handoffs[0]["jti"], handle_id(handle)]
    text = repr(logs)
    assert handle not in text and handle[2:] not in text and token not in text
    _status, _headers, metrics = await _get(broker, "/metrics")
    assert 'console_broker_handoffs_total{protocol="vnc"} 2.0' in metrics


async def _get(running: Running, path: str) -> tuple[int, dict[str, str], str]:
    answer = await post(running, path, method="GET")
    return answer.status, answer.headers, answer.body.decode()


@pytest.mark.anyio
async def test_handoffs_are_refused_without_a_live_session_or_a_proof(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    unused = issuer.issue(DOMAIN, "vnc", ttl=60).token
    multi = issuer.issue(DOMAIN, "multi", ttl=60).token
    async with connect(broker.url("vnc", token)) as page:
        assert await page.recv() == BANNER
        for path, credential, headers, expected in [
            ("/handoff/vnc", unused, (), (401, b"invalid token\n")),  # no session yet
            ("/handoff/vnc", token[:-3] + "abc", (), (401, b"invalid token\n")),
            ("/handoff/vnc", "h." + "A" * 32, (), (401, b"invalid token\n")),
            ("/handoff/vnc", "garbage", (), (401, b"invalid token\n")),
            ("/handoff/vnc", None, (), (401, b"invalid token\n")),
            ("/handoff/vnc", None, (("Authorization", "Basic eA=="),), (401, b"invalid token\n")),
            ("/handoff/vnc", token, (("Authorization", f"Bearer {token}"),), (400, None)),
            ("/handoff/multi", token, (), (403, b"token is for another protocol\n")),
            ("/handoff/multi", multi, (), (401, b"invalid token\n")),
            ("/handoff/nope", token, (), (404, None)),
            (f"/handoff/vnc?token={token}", token, (), (400, None)),
        ]:
            answer = await post(broker, path, credential, headers=headers)
            assert answer.status == expected[0], (path, answer.body)
            if expected[1] is not None:
                assert answer.body == expected[1], path
            assert token.encode() not in answer.body
        for method in ("GET", "HEAD", "PUT"):
            answer = await post(broker, "/handoff/vnc", token, method=method)
            assert (answer.status, answer.headers["allow"]) == (405, "POST")
        assert len(verifier.handoffs) == 0
        # a few outstanding per session, then 429
        for _ in range(verifier.handoffs.per_session):
            assert (await post(broker, "/handoff/vnc", token)).status == 200
        answer = await post(broker, "/handoff/vnc", token)
        assert (answer.status, answer.body) == (429, b"session limit reached\n")
        # none of this touched the page's session
        await page.send(b"x")
        assert await page.recv() == b"x"
    async with connect(broker.url("vnc", unused)) as ws:  # refusals did not use it up
        assert await ws.recv() == BANNER


@pytest.mark.anyio
async def test_a_session_outlives_its_token_and_still_hands_off(
    broker: Running, issuer: TokenIssuer, clock: FakeClock
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with connect(broker.url("vnc", token)) as page:
        assert await page.recv() == BANNER
        clock.advance(600)  # the token expired long ago; its session lives
        answer = await post(broker, "/handoff/vnc", token)
        assert answer.status == 200
        handle = answer.json()["token"]
        clock.advance(61)  # the handle's own lifetime (60 s) is over, with the leeway
        clock.advance(5)
        assert await refused_status(broker.url("vnc", handle)) == 401


@pytest.mark.anyio
async def test_only_allowed_origins_may_ask(verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    config = make_config(http=HTTPSection(allowed_origins=("https://ui.example",)))
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(config, verifier, resolver, _plugins()) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token), origin=Origin("https://ui.example")) as page:
            assert await page.recv() == BANNER
            for origin, status in [(None, 403), ("https://evil.example", 403),
                                   ("https://ui.example", 200)]:
                headers = () if origin is None else (("Origin", origin),)
                answer = await post(running, "/handoff/vnc", token, headers=headers)
                assert answer.status == status, origin


async def _tunnel(port: int, target: str) -> tuple[bytes, anyio.abc.SocketStream]:
    """A CONNECT request to *target*: the answer's head, and the stream."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in head:
            try:
                head += await stream.receive(1)
            except anyio.EndOfStream:
                break
    return head, stream


@pytest.mark.anyio
async def test_a_handle_serves_files_tunnels_and_several_connections(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    """For a protocol of several connections with native clients: the handle's file
    (which does not use it up), then its connections joining one session, by WebSocket
    and by CONNECT tunnel, as with a token."""
    base = make_config()
    config = Config(broker=base.broker, http=base.http, limits=base.limits, proxy=base.proxy,
                    listen=ListenSection(host="127.0.0.1", port=0, connect_port=free_port()))
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(config, verifier, resolver, _plugins()) as running:
        token = issuer.issue(DOMAIN, "multi", ttl=60).token
        async with connect(running.url("multi", token)) as page:
            assert await page.recv() == BANNER
            assert (await post(running, "/handoff/vnc", token)).status == 403
            handle = (await post(running, "/handoff/multi", token)).json()["token"]
            answer = await post(running, f"/file/multi?token={handle}", method="GET")
            assert (answer.status, answer.body) == (200, f"token={handle}\n".encode())
            port = running.broker.connect_addresses[0][1]
            head, tunnel = await _tunnel(port, f"{handle_for_token(handle)}:5900")
            assert head.startswith(b"HTTP/1.1 200 "), head
            async with tunnel, connect(running.url("multi", handle)) as joined:
                assert await tunnel.receive() == BANNER and await joined.recv() == BANNER
                group = running.broker._runner.groups[handle_id(handle)]
                assert group.connections == 2  # the tunnel first, the WebSocket joined
        await anyio.sleep(0.3)
        assert await refused_status(running.url("multi", handle)) == 401
        answer = await post(running, f"/file/multi?token={handle}", method="GET")
        assert answer.status == 401


def test_the_route() -> None:
    assert route("/handoff/vnc", method="POST") == HandoffRoute("vnc")
    assert route("/hv1/handoff/raw-vnc", "/hv1", method="POST") == HandoffRoute("raw-vnc")
    assert route("/handoff/vnc", method="GET") == NotAllowed(("POST",))
    assert route("/handoff/vnc/x", method="POST") == NotFound("/handoff/vnc/x")
    with pytest.raises(Refused, match="Authorization header"):
        route("/handoff/vnc?token=abc", method="POST")
