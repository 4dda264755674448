"""Plugin API 2 through the core, in process: protocols that open their own endpoint or
have none, a plugin's own refusal, its service and its metric, text messages both ways.
A real listener on loopback, a fake hypervisor (brokerkit)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from prometheus_client import Counter
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broker.api import (
    CONSOLE_UNREACHABLE,
    Endpoint,
    EndpointRequest,
    PluginContext,
    Protocol,
    Refusal,
    Refused,
    Session,
    SessionHandler,
    hookimpl,
)
from broker.plugins import PluginManager
from broker.service import _refusals as R
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio

ECHO_REFUSED = Refusal("echo_refused", 0, 4310, "the echo plugin refuses this")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Echo(Protocol):
    """No console: echoes text messages, counts them in the plugin's metric, refuses
    ``stop`` with its own reason."""

    def session_handler(self, context: PluginContext) -> SessionHandler:
        lines = context.metric(Counter, "lines", "Lines echoed.", ["kind"])

        async def serve(session: Session) -> None:
            assert session.endpoint is None and session.domain_handle is not None
            while True:
                message = await session.client.receive_message()
                if message == "stop":
                    raise Refused(ECHO_REFUSED, "asked to stop")
                kind = "text" if isinstance(message, str) else "binary"
                lines.labels(kind).inc()
                if isinstance(message, str):
                    await session.client.send_text(message.upper())
                else:
                    await session.client.send(message)

        return serve


class OwnSocket(Protocol):
    """A console the plugin connects itself: one end of a socket pair whose other end the
    test holds."""

    async def open_endpoint(self, request: EndpointRequest) -> Endpoint:
        if request.domain_name == "unreachable":
            raise Refused(CONSOLE_UNREACHABLE, "the plugin's console is down")
        ours, theirs = socket.socketpair()
        OPENED.append(theirs)
        stream = await anyio.abc.SocketStream.from_socket(ours)
        return Endpoint(stream, "socketpair", f"{request.domain_name} (plugin)")


OPENED: list[socket.socket] = []


class Plugin:
    def __init__(self) -> None:
        self.service_log: list[str] = []

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Echo(name="echo", title="echo", endpoint="none"),
                OwnSocket(name="own", title="own", endpoint="plugin")]

    @hookimpl
    def console_broker_refusals(self) -> list[Refusal]:
        return [ECHO_REFUSED]

    @hookimpl
    def console_broker_service(self, context: PluginContext) -> AsyncIterator[None]:
        return self._service(context)  # type: ignore[return-value]

    @contextlib.asynccontextmanager
    async def _service(self, context: PluginContext) -> AsyncIterator[None]:
        context.metric(Counter, "services", "Services started.").inc()
        self.service_log.append(f"start {context.plugin}")
        try:
            yield
        finally:
            self.service_log.append("stop")


def plugins(plugin: Plugin) -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[("echo-plugin", plugin)])


def resolver() -> FakeResolver:
    return FakeResolver(FakeDomain(DOMAIN, name="web1", consoles=()),
                        FakeDomain("1c2d3e4f-0000-4000-8000-000000000009", name="unreachable"))


async def test_a_console_less_protocol_echoes_text_and_ends_with_4100_on_vm_stop(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    plugin = Plugin()
    fake = resolver()
    async with running_broker(make_config(), verifier, fake, plugins(plugin)) as running:
        assert plugin.service_log == ["start echo-plugin"]
        token = issuer.issue(DOMAIN, "echo", ttl=60).token
        async with connect(running.url("echo", token)) as ws:
            await ws.send("info status")
            assert await ws.recv() == "INFO STATUS"  # a text message back
            await ws.send(b"\x00bytes")
            assert await ws.recv() == b"\x00bytes"
            fake.stop(DOMAIN, R.VM_STOPPED)
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4100
        assert fake.opened == 0  # no console was ever opened for it
        metrics = running.broker.metrics.render().decode()
        assert 'console_broker_echo_plugin_lines_total{kind="text"} 1.0' in metrics
        assert "console_broker_echo_plugin_services_total 1.0" in metrics
    assert plugin.service_log == ["start echo-plugin", "stop"]


async def test_a_plugins_own_refusal_closes_with_its_code(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    async with running_broker(make_config(), verifier, resolver(), plugins(Plugin())) as running:
        token = issuer.issue(DOMAIN, "echo", ttl=60).token
        async with connect(running.url("echo", token)) as ws:
            await ws.send("stop")
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert (ws.close_code, ws.close_reason) == (4310, "the echo plugin refuses this")
        closed = 'console_broker_sessions_closed_total{protocol="echo",reason="echo_refused"} 1.0'
        with anyio.fail_after(2):  # counted once the core has closed the session
            while closed not in running.broker.metrics.render().decode():
                await anyio.sleep(0.01)


async def test_a_plugin_opened_endpoint_is_closed_by_the_core_and_ends_with_4100(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    OPENED.clear()
    fake = resolver()
    async with running_broker(make_config(), verifier, fake, plugins(Plugin())) as running:
        token = issuer.issue(DOMAIN, "own", ttl=60).token
        async with connect(running.url("own", token)) as ws:
            with anyio.fail_after(2):
                while not OPENED:
                    await anyio.sleep(0.01)
            console = OPENED[0]
            console.sendall(b"from the console")
            assert await ws.recv() == b"from the console"  # raw_proxy, the default handler
            await ws.send(b"to the console")
            assert await anyio.to_thread.run_sync(console.recv, 100) == b"to the console"
            fake.stop(DOMAIN, R.VM_STOPPED)
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4100
        console.settimeout(2)
        assert console.recv(100) == b""  # the core closed the plugin's endpoint
        console.close()
        unreachable = issuer.issue("1c2d3e4f-0000-4000-8000-000000000009", "own", ttl=60).token
        async with connect(running.url("own", unreachable)) as ws:
            with anyio.fail_after(2), pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == R.CONSOLE_UNREACHABLE.close_code
