"""The control channel (``/ws/{protocol}/control?token=T``, broker/service/_control.py):
a live session's presence and input, beside its console stream.

Its messages without sockets; then in process against the fake hypervisor (brokerkit),
with a protocol that declares ``presence`` (its handler the raw proxy: what a plugin
drops is the plugins' tests' business): admitted with the token of a live session only,
the presence at once and after every change, take over and release, refusals, the end
with the session.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import structlog
from brokerkit import BANNER, FakeDomain, FakeResolver, Running, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker import Protocol, hookimpl
from broker.config import HTTPSection
from broker.plugins import PluginContext, PluginManager
from broker.service._control import (
    MAX_CONTROL,
    MAX_PER_SESSION,
    SUBPROTOCOL,
    ControlError,
    Ping,
    Release,
    Takeover,
    parse,
)
from broker.service._request import ControlRoute, NotAllowed, NotFound, WebSocketRoute, route
from broker.tokens import TokenIssuer, TokenVerifier

# --- the messages -------------------------------------------------------------------------


def test_the_messages_a_client_sends() -> None:
    assert parse('{"type": "takeover"}') == Takeover()
    assert parse('{"type": "release", "extra": 1}') == Release()
    assert parse('{"type": "ping", "data": "7"}') == Ping("7")
    assert parse('{"type": "ping"}') == Ping(None)
    for bad, code in (
        (b'{"type": "takeover"}', "bad_message"),  # a binary frame
        ("takeover", "bad_message"),
        ("[1]", "bad_message"),
        ('{"kind": "takeover"}', "bad_message"),
        ('{"type": "ping", "data": 7}', "bad_message"),
        ('{"type": "ping", "data": "' + "x" * MAX_CONTROL + '"}', "bad_message"),
        ('{"type": "' + "x" * 100 + '"}', "unknown_type"),
        ("[" * 100_000, "bad_message"),
    ):
        with pytest.raises(ControlError) as refused:
            parse(bad)
        assert refused.value.code == code
        assert len(refused.value.message) < 100


def test_the_route() -> None:
    assert route("/ws/vnc/control?token=T") == ControlRoute("vnc", "T")
    assert route("/hv1/ws/spice/control?token=T", prefix="/hv1") == ControlRoute("spice", "T")
    assert route("/ws/vnc?token=T") == WebSocketRoute("vnc", "T")
    assert route("/ws/vnc/control?token=T", method="POST") == NotAllowed(("GET",))
    assert isinstance(route("/ws/vnc/other?token=T"), NotFound)
    assert isinstance(route("/ws/vnc/control/x?token=T"), NotFound)
    assert "T" not in repr(ControlRoute("vnc", "T"))


# --- in process ---------------------------------------------------------------------------


class Single(Protocol):
    def input_mode(self, context: PluginContext) -> str:
        return "single"


class Protocols:
    """``vnc``: presence, one session at a time holds the input; ``shared``: presence,
    shared input, on the same console; ``plain``: no presence."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [
            Single(name="vnc", title="vnc", presence=True, view_only=True),
            Protocol(name="shared", title="shared", console="spice", presence=True),
            Protocol(name="plain", title="plain", console="serial"),
        ]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def broker(verifier: TokenVerifier) -> AsyncIterator[Running]:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("p", Protocols())])
    config = make_config(http=HTTPSection(allow_missing_origin=True, refusals="close"))
    async with running_broker(config, verifier, resolver, plugins) as running:
        yield running


def _control_url(running: Running, protocol: str, token: str) -> str:
    return f"ws://127.0.0.1:{running.port}/ws/{protocol}/control?token={token}"


async def _presence(control: ClientConnection) -> dict[str, Any]:
    """The next message, a ``presence``."""
    with anyio.fail_after(5):
        doc = json.loads(await control.recv())
    assert doc["type"] == "presence", doc
    return doc  # type: ignore[no-any-return]


async def _until(control: ClientConnection, check: Any) -> dict[str, Any]:
    """``presence`` messages until one passes *check* (a change may come in several)."""
    while True:
        doc = await _presence(control)
        if check(doc):
            return doc


async def _closed_with(ws: ClientConnection) -> tuple[int, str]:
    with anyio.fail_after(5), pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


@pytest.mark.anyio
async def test_two_sessions_see_each_other_and_take_the_input_in_turn(
    broker: Running, issuer: TokenIssuer
) -> None:
    alice = issuer.issue(DOMAIN, "vnc", ttl=60, name="Alice").token
    bob = issuer.issue(DOMAIN, "vnc", ttl=60).token
    with structlog.testing.capture_logs() as logs:
        async with connect(broker.url("vnc", alice)) as page_a:
            assert await page_a.recv() == BANNER
            async with connect(_control_url(broker, "vnc", alice),
                               subprotocols=[SUBPROTOCOL]) as control_a:  # type: ignore[list-item]
                assert control_a.subprotocol == SUBPROTOCOL
                first = await _presence(control_a)
                me = first["you"]
                assert first["rights"] == "full" and first["mode"] == "single"
                assert first["input"] is True and first["holder"] == me
                assert first["reason"] == "joined"
                [viewer] = first["viewers"]
                assert viewer["id"] == me and viewer["you"] is True
                assert viewer["name"] == "Alice" and viewer["address"] == "127.0.0.1"
                assert viewer["rights"] == "full" and viewer["protocol"] == "vnc"
                assert viewer["since"].endswith("Z") and viewer["input"] is True

                async with connect(broker.url("vnc", bob)) as page_b:
                    assert await page_b.recv() == BANNER
                    seen = await _until(control_a, lambda d: len(d["viewers"]) == 2)
                    assert seen["holder"] == me
                    async with connect(_control_url(broker, "vnc", bob)) as control_b:
                        state = await _presence(control_b)
                        bob_id = state["you"]
                        assert state["input"] is False and state["holder"] == me
                        assert [(v["name"], v["input"], v["you"]) for v in state["viewers"]] == [
                            ("Alice", True, False), (None, False, True)
                        ]
                        # Bob takes control: both see it
                        await control_b.send('{"type": "takeover"}')
                        taken = await _until(control_a, lambda d: d["holder"] == bob_id)
                        assert taken["input"] is False and taken["reason"] == "taken"
                        mine = await _until(control_b, lambda d: d["holder"] == bob_id)
                        assert mine["input"] is True
                        # and releases it: nobody holds it
                        await control_b.send('{"type": "release"}')
                        free = await _until(control_a, lambda d: d["holder"] is None)
                        assert free["reason"] == "released" and free["input"] is False
                        await control_b.send('{"type": "ping", "data": "p1"}')
                        while (doc := json.loads(await control_b.recv()))["type"] != "pong":
                            pass
                        assert doc == {"type": "pong", "data": "p1"}
                        await control_b.send("nonsense")
                        while (doc := json.loads(await control_b.recv()))["type"] != "error":
                            pass
                        assert doc["error"] == "bad_message"
                    # Bob's page goes: Alice sees one viewer again
                left = await _until(control_a, lambda d: len(d["viewers"]) == 1)
                assert left["holder"] is None
                await control_a.send('{"type": "takeover"}')
                await _until(control_a, lambda d: d["holder"] == me)
                # the session's end ends its control channel
                await page_a.close()
                assert await _closed_with(control_a) == (1000, "the session ended")
                await anyio.sleep(0.2)  # the broker logs it closed once the close is done
    events = [e["event"] for e in logs]
    assert events.count("control.opened") == 2 and events.count("control.closed") == 2
    holders = [(e["reason"]) for e in logs if e["event"] == "input.holder"]
    assert holders == ["joined", "taken", "released", "taken", "left"]
    assert alice not in repr(logs) and bob not in repr(logs)
    opened = [e for e in logs if e["event"] == "session.opened"]
    assert [e["name"] for e in opened] == ["Alice", None]


@pytest.mark.anyio
async def test_a_view_only_session_and_shared_input_cannot_take(
    broker: Running, issuer: TokenIssuer
) -> None:
    viewer = issuer.issue(DOMAIN, "vnc", ttl=60, view_only=True).token
    shared = issuer.issue(DOMAIN, "shared", ttl=60).token
    async with connect(broker.url("vnc", viewer)) as page, \
            connect(_control_url(broker, "vnc", viewer)) as control:
        assert await page.recv() == BANNER
        state = await _presence(control)
        assert (state["rights"], state["input"], state["holder"]) == ("view", False, None)
        await control.send('{"type": "takeover"}')
        doc = json.loads(await control.recv())
        assert (doc["type"], doc["error"]) == ("error", "view_only")
    async with connect(broker.url("shared", shared)) as page, \
            connect(_control_url(broker, "shared", shared)) as control:
        state = await _presence(control)
        assert (state["mode"], state["input"], state["holder"]) == ("shared", True, None)
        await control.send('{"type": "takeover"}')
        doc = json.loads(await control.recv())
        assert (doc["type"], doc["error"]) == ("error", "shared_input")


async def _refused(url: str) -> tuple[int, str]:
    """A refused control channel, ``http.refusals = "close"``: its close code and reason."""
    async with connect(url) as ws:
        return await _closed_with(ws)


@pytest.mark.anyio
async def test_only_a_live_sessions_token_opens_its_control_channel(
    broker: Running, issuer: TokenIssuer
) -> None:
    unused = issuer.issue(DOMAIN, "vnc", ttl=60).token
    assert await _refused(_control_url(broker, "vnc", unused)) == (4001, "invalid token")
    assert await _refused(_control_url(broker, "vnc", "garbage")) == (4001, "invalid token")
    plain = issuer.issue(DOMAIN, "plain", ttl=60).token
    async with connect(broker.url("plain", plain)):
        assert await _refused(_control_url(broker, "plain", plain)) == (
            4008, "no plugin serves this protocol"
        )
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with connect(broker.url("vnc", token)) as page:
        assert await page.recv() == BANNER
        # another protocol's path: refused (the token says vnc)
        assert (await _refused(_control_url(broker, "shared", token)))[0] == 4006
        opened = [
            await connect(_control_url(broker, "vnc", token)) for _ in range(MAX_PER_SESSION)
        ]
        for control in opened:
            await _presence(control)
        assert await _refused(_control_url(broker, "vnc", token)) == (
            4014, "session limit reached"
        )
        await opened[0].close()
        await anyio.sleep(0.1)
        async with connect(_control_url(broker, "vnc", token)) as again:
            await _presence(again)
        for control in opened[1:]:
            await control.close()
    await anyio.sleep(0.2)
    assert await _refused(_control_url(broker, "vnc", token)) == (4004, "token already used")


@pytest.mark.anyio
async def test_a_handle_opens_the_control_channel_of_its_own_session(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60, name="Carol").token
    claims = verifier.verify(token, consume=False)
    handle = verifier.hand_off(claims, ttl=60).handle
    async with connect(broker.url("vnc", handle)) as native:
        assert await native.recv() == BANNER
        async with connect(_control_url(broker, "vnc", handle)) as control:
            state = await _presence(control)
            assert [v["name"] for v in state["viewers"]] == ["Carol"]  # the handle's name
            assert state["holder"] == state["you"]
        # the token itself opened no session here: nothing to join
        assert await _refused(_control_url(broker, "vnc", token)) == (4001, "invalid token")


@pytest.mark.anyio
async def test_shutdown_closes_control_channels_with_1001(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("p", Protocols())])
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    async with running_broker(make_config(), verifier, resolver, plugins) as running:
        page = await connect(running.url("vnc", token))
        control = await connect(_control_url(running, "vnc", token))
        await _presence(control)
        running.broker.shutdown()
        assert (await _closed_with(control))[0] == 1001
        assert (await _closed_with(page))[0] == 1001


@pytest.mark.anyio
async def test_without_close_refusals_a_refused_channel_is_an_http_status(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("p", Protocols())])
    async with running_broker(make_config(), verifier, resolver, plugins) as running:
        with pytest.raises(InvalidStatus) as refused:
            await connect(_control_url(running, "vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token))
        assert refused.value.response.status_code == 401
