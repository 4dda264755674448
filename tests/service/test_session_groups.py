"""Sessions of several connections (Protocol.multi_connection) and CONNECT tunnels
(Protocol.native_clients), in process against the fake hypervisor."""

from __future__ import annotations

import asyncio

import anyio
import anyio.abc
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker import Protocol, hookimpl
from broker.config import Config, LimitsSection, ListenSection
from broker.plugins import PluginManager
from broker.service import ClientClosed, Session, SessionHandler
from broker.service._connect import handle_for_token
from broker.tokens import TokenIssuer, TokenVerifier

SEEN: list[tuple[bool, str | None, str]] = []


async def _handler(session: Session) -> None:
    group = session.group
    SEEN.append((session.joined, group.session_id if group else None, session.id))
    await session.client.send(b"joined" if session.joined else b"first")
    try:
        while True:
            data = await session.client.receive()
            session.traffic.count_to_console(len(data))
            await session.client.send(data)
    except ClientClosed:
        pass


class Multi:
    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="multi", title="multi", console="vnc", multi_connection=True,
                         native_clients=True),
                Protocol(name="single", title="single", console="vnc")]

    @hookimpl
    def console_broker_session_handler(self, protocol: str) -> SessionHandler | None:
        return _handler


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _plugins() -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[("multi", Multi())])


def _config() -> Config:
    base = make_config()
    listen = ListenSection(host="127.0.0.1", port=0, connect_port=_free_port())
    return Config(broker=base.broker, listen=listen, http=base.http, limits=base.limits,
                  proxy=base.proxy)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
async def test_one_token_several_connections_while_the_first_lives(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    SEEN.clear()
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(make_config(), verifier, resolver, _plugins()) as running:
        url = running.url("multi", issuer.issue(DOMAIN, "multi", ttl=60).token)
        async with connect(url) as first:
            assert await first.recv() == b"first"
            async with connect(url) as second, connect(url) as third:
                assert await second.recv() == b"joined"
                assert await third.recv() == b"joined"
                await third.send(b"ping")
                assert await third.recv() == b"ping"
            group_ids = {group for _joined, group, _id in SEEN}
            assert len(group_ids) == 1 and SEEN[0][2] in group_ids
        await anyio.sleep(0.3)  # the first connection's session has ended
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401
        # a protocol without multi_connection stays strictly single use
        single = running.url("single", issuer.issue(DOMAIN, "single", ttl=60).token)
        async with connect(single) as ws:
            assert await ws.recv() == b"first"
            with pytest.raises(InvalidStatus):
                async with connect(single):
                    pass
        assert running.broker.session_count <= 1


async def _tunnel(port: int, target: str) -> tuple[bytes, anyio.abc.SocketStream]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(f"CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            head += await stream.receive(1)
        except anyio.EndOfStream:
            break
    return head, stream


@pytest.mark.anyio
async def test_connect_tunnels_join_the_session_by_handle(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    SEEN.clear()
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    config = _config()
    async with running_broker(config, verifier, resolver, _plugins()) as running:
        port = running.broker.connect_addresses[0][1]
        handle = handle_for_token(issuer.issue(DOMAIN, "multi", ttl=60).token)
        head, first = await _tunnel(port, f"{handle}:5900")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await first.receive() == b"first"
        head, second = await _tunnel(port, f"{handle.upper()}:1")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await second.receive() == b"joined"
        await second.send(b"abc")
        assert await second.receive() == b"abc"
        await second.aclose()
        await first.aclose()
        await anyio.sleep(0.3)
        head, third = await _tunnel(port, f"{handle}:5900")
        assert head.startswith(b"HTTP/1.1 401 ")
        await third.aclose()
        # protocols without native clients are not reachable this way
        other = handle_for_token(issuer.issue(DOMAIN, "single", ttl=60).token)
        head, fourth = await _tunnel(port, f"{other}:5900")
        assert head.startswith(b"HTTP/1.1 404 ")
        await fourth.aclose()
        head, fifth = await _tunnel(port, "not-a-handle!:5900")
        assert head.startswith(b"HTTP/1.1 401 ")
        await fifth.aclose()


@pytest.mark.anyio
async def test_a_quiet_connection_of_a_busy_group_is_not_idle(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    base = make_config()
    limits = LimitsSection(idle_timeout=0.5)
    config = Config(broker=base.broker, listen=base.listen, http=base.http, limits=limits,
                    proxy=base.proxy)
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(config, verifier, resolver, _plugins()) as running:
        url = running.url("multi", issuer.issue(DOMAIN, "multi", ttl=60).token)
        async with connect(url) as first, connect(url) as quiet:
            assert await first.recv() == b"first"
            assert await quiet.recv() == b"joined"
            for _ in range(8):  # 1.2 s of traffic on the first connection only
                await first.send(b"x")
                assert await first.recv() == b"x"
                await anyio.sleep(0.15)
            await quiet.send(b"still here")
            assert await quiet.recv() == b"still here"
        async with connect(
            running.url("multi", issuer.issue(DOMAIN, "multi", ttl=60).token)
        ) as alone:
            assert await alone.recv() == b"first"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(alone.recv(), 3)
            assert alone.close_code == 4102
