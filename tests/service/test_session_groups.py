"""Sessions of several connections (Protocol.multi_connection) and CONNECT tunnels
(Protocol.native_clients), in process against the fake hypervisor."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from certs import make_certificates
from conftest import DOMAIN
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker import Protocol, hookimpl
from broker.config import Config, LimitsSection, ListenSection
from broker.hookspecs import ClientFile
from broker.plugins import PluginContext, PluginManager
from broker.service import ClientClosed, Session
from broker.service._connect import PLAIN_PORT, TLS_PORT, handle_for_token
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
    multi: type[Protocol] = Protocol

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [self.multi(name="multi", title="multi", console="vnc", multi_connection=True,
                           native_clients=True, handler=_handler),
                Protocol(name="single", title="single", console="vnc", handler=_handler)]


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


# --- TLS inside the tunnels, and the client file over HTTP ---------------------------------


def _server_tls(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The broker's server context and a client context trusting its CA (no name check:
    the CONNECT host is a session handle, clients verify the subject)."""
    paths = make_certificates(directory, names=("broker.example",))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(paths["server"], paths["server-key"])
    client = ssl.create_default_context(cafile=str(paths["ca"]))
    client.check_hostname = False
    return server, client


@pytest.mark.anyio
async def test_a_broker_with_tls_answers_the_tunnels_tls_handshake(
    issuer: TokenIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    server, client = _server_tls(tmp_path)
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(
        _config(), verifier, resolver, _plugins(), ssl_context=server
    ) as running:
        port = running.broker.connect_addresses[0][1]
        handle = handle_for_token(issuer.issue(DOMAIN, "multi", ttl=60).token)
        # the plain port is refused before the token is looked at (it stays usable)
        head, plain = await _tunnel(port, f"{handle}:{PLAIN_PORT}")
        assert head.startswith(b"HTTP/1.1 400 ") and b"TLS only" in head + await plain.receive()
        await plain.aclose()
        head, stream = await _tunnel(port, f"{handle}:{TLS_PORT}")
        assert head.startswith(b"HTTP/1.1 200 ")
        tls = await TLSStream.wrap(stream, hostname="ignored", ssl_context=client,
                                   standard_compatible=False)
        assert await tls.receive() == b"first"
        head, second = await _tunnel(port, f"{handle}:{TLS_PORT}")
        joined = await TLSStream.wrap(second, hostname="x", ssl_context=client,
                                      standard_compatible=False)
        assert await joined.receive() == b"joined"
        await joined.send(b"over tls")
        assert await joined.receive() == b"over tls"
        # a client that speaks no TLS after the 200 is closed, and the broker goes on
        head, broken = await _tunnel(port, f"{handle}:{TLS_PORT}")
        assert head.startswith(b"HTTP/1.1 200 ")
        await broken.send(b"REDQ" + bytes(60))
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            while True:
                await broken.receive()
        await broken.aclose()
        await joined.aclose()
        await tls.aclose()


@pytest.mark.anyio
async def test_a_broker_without_tls_refuses_the_tls_port(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(_config(), verifier, resolver, _plugins()) as running:
        port = running.broker.connect_addresses[0][1]
        handle = handle_for_token(issuer.issue(DOMAIN, "multi", ttl=60).token)
        head, stream = await _tunnel(port, f"{handle}:{TLS_PORT}")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b"no TLS" in await stream.receive()
        await stream.aclose()


class WithFiles(Protocol):
    def client_file(self, token: str, title: str, context: PluginContext) -> ClientFile:
        return ClientFile(name="conn", body=f"title={title}\ntoken={token}\n",
                          content_type="application/x-test", suffix=".conn")


class Files(Multi):
    multi = WithFiles


@pytest.mark.anyio
async def test_the_client_file_over_http_checks_the_token_first(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("files", Files())])
    async with running_broker(_config(), verifier, resolver, plugins) as running:

        def get(path: str) -> tuple[int, dict[str, str], bytes]:
            try:
                with urllib.request.urlopen(running.http + path, timeout=5) as reply:
                    return reply.status, dict(reply.headers), reply.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()

        token = issuer.issue(DOMAIN, "multi", ttl=60).token
        status, headers, body = await anyio.to_thread.run_sync(get, f"/file/multi?token={token}")
        assert status == 200, body
        assert body == f"title=web1\ntoken={token}\n".encode()
        assert headers["Content-Type"] == "application/x-test"
        assert headers["Content-Disposition"] == 'attachment; filename="console.conn"'
        assert headers["Cache-Control"] == "no-store"
        # the file did not use the token up: a session still opens with it
        async with connect(running.url("multi", token)) as ws:
            assert await ws.recv() == b"first"
        for path, expected in [
            (f"/file/multi?token={token}x", 401),  # a bad signature
            ("/file/multi", 401),  # no token
            (f"/file/single?token={issuer.issue(DOMAIN, 'single', ttl=60).token}", 404),
            (f"/file/multi?token={issuer.issue(DOMAIN, 'single', ttl=60).token}", 403),
            (f"/file/multi?token={issuer.issue(str(uuid.uuid4()), 'multi', ttl=60).token}", 404),
        ]:
            status, _headers, body = await anyio.to_thread.run_sync(get, path)
            assert status == expected, (path, body)
            assert token.encode() not in body
        await anyio.sleep(0.3)
        status, _headers, _body = await anyio.to_thread.run_sync(get, f"/file/multi?token={token}")
        assert status == 401  # its session has ended: the token is used up
