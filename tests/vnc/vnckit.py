"""Helpers for the VNC plugin's tests: certificates, a browser-side RFB client over a
WebSocket, and (in process) a broker whose one console is a scripted QEMU."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSStream
from broker_vnc import PROTOCOL, VNC
from broker_vnc._config import TABLE, VNCSection
from broker_vnc._recording import RecordingSettings
from broker_vnc._session import VNCSessionHandler, VNCSettings
from broker_vnc.rfb import NEED_DATA, Event, RFBClient, ServerInit, vnc_auth_response
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rfb_transcripts import CHALLENGE, V38, server_init, string, u8, u32

from broker import Protocol, hookimpl
from broker.config import (
    BrokerSection,
    Config,
    HTTPSection,
    LimitsSection,
    ListenSection,
    RecordingsSection,
)
from broker.plugins import PluginContext, PluginManager
from broker.service import Endpoint, Session, SessionHandler
from broker.service._app import Broker
from broker.service._libvirt import ResolverEvents, Target
from broker.service._metrics import Metrics
from broker.service._plan import EndpointPlan
from broker.tokens import ReplayCache, TokenIssuer, TokenVerifier

DOMAIN = "5d0b5b8e-3f0e-4c9a-9a3e-2f6a1f0c0d11"
NODE = "hv1"

# --- certificates -----------------------------------------------------------------------


# --- the browser's side -----------------------------------------------------------------


async def rfb_login(
    ws: Any, *, shared: bool = True, password: str | None = None
) -> tuple[list[Event], ServerInit, bytes]:
    """The browser's RFB handshake over the asyncio WebSocket *ws*:
    (events, ServerInit, bytes received beyond it)."""
    client = RFBClient(shared=shared, password=password)
    events: list[Event] = []
    while True:
        event = client.next_event()
        out = client.data_to_send()
        if out:
            await ws.send(out)
        if event is NEED_DATA:
            client.receive_data(await ws.recv())
            continue
        events.append(event)
        if isinstance(event, ServerInit):
            return events, event, client.take_trailing_data()


# --- a scripted QEMU --------------------------------------------------------------------

FRAMEBUFFER_UPDATE = b"\x00\x00\x00\x01" + bytes(8) + b"\x00\x00\x00\x00"  # one empty raw rect


@attrs.define
class FakeQEMU:
    """QEMU's side of the RFB handshake, scripted; then it records what arrives and
    answers every FramebufferUpdateRequest with :data:`FRAMEBUFFER_UPDATE`."""

    version: bytes = V38
    #: 1 None, 2 VNC Authentication, 19 VeNCrypt.
    security: int = 1
    password: bytes = b"secret"
    subtype: int = 260
    tls: ssl.SSLContext | None = None
    #: Refuse the connection itself (a list of no security types) with this reason.
    refuse: bytes | None = None
    #: Close the connection after sending the version.
    hang_up: bool = False
    init: bytes = attrs.field(factory=lambda: server_init(720, 400, b"QEMU (fake)"))
    shared: list[bool] = attrs.field(factory=list)
    received: bytearray = attrs.field(factory=bytearray)
    tls_error: str = ""

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        await stream.send(self.version)
        if self.hang_up:
            return
        await reader.receive_exactly(12)
        v33 = self.version == b"RFB 003.003\n"
        v38 = self.version == V38
        if self.refuse is not None:
            await stream.send((u32(0) if v33 else u8(0)) + string(self.refuse))
            return
        if v33:
            await stream.send(u32(self.security))
        else:
            await stream.send(u8(1) + u8(self.security))
            await reader.receive_exactly(1)
        vnc_auth = self.security == 2
        if self.security == 19:
            await stream.send(u8(0) + u8(2))
            await reader.receive_exactly(2)
            await stream.send(u8(0) + u8(1) + u32(self.subtype))
            await reader.receive_exactly(4)
            await stream.send(u8(1))
            assert self.tls is not None
            try:
                stream = await TLSStream.wrap(stream, server_side=True, ssl_context=self.tls)
            except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                self.tls_error = repr(exc)
                return
            reader = BufferedByteReceiveStream(stream)
            vnc_auth = self.subtype in (258, 261)
        if vnc_auth:
            await stream.send(CHALLENGE)
            response = await reader.receive_exactly(16)
            if response != vnc_auth_response(self.password, CHALLENGE):
                await stream.send(u32(1) + (string(b"Authentication failed") if v38 else b""))
                return
            await stream.send(u32(0))
        elif v38 or self.security == 19:
            await stream.send(u32(0))
        self.shared.append((await reader.receive_exactly(1)) != b"\x00")
        await stream.send(self.init)
        while True:
            data = await reader.receive()
            self.received += data
            if data[:1] == b"\x03":
                await stream.send(FRAMEBUFFER_UPDATE)


async def echo_console(stream: anyio.abc.ByteStream) -> None:
    """QEMU's WebSocket port as the pass-through sees it: a banner, then an echo."""
    await stream.send(V38)
    while True:
        await stream.send(await stream.receive())


Console = Callable[[anyio.abc.ByteStream], Awaitable[None]]


class OneConsole:
    """A resolver whose domain :data:`DOMAIN` has one VNC console: *console* on the
    other end of a socket pair, reached as *kind* (``fd``, ``tcp``, ``websocket``)."""

    def __init__(self, console: Console, kind: str = "fd") -> None:
        self.console = console
        self.kind = kind
        self.available = True
        self._group: anyio.abc.TaskGroup | None = None

    def health(self) -> dict[str, object]:
        return {"uri": "fake:///", "connected": True}

    async def run(self, events: ResolverEvents, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            await anyio.sleep_forever()

    async def target(self, claims: Any, console: str, tls: Any = None) -> Target:
        plan = EndpointPlan(self.kind, console, host="127.0.0.1", port=5900, index=0)
        return Target(claims.domain_uuid, "guest", plan)

    async def open(self, target: Target) -> Endpoint:
        if self.kind == "tcp":  # a real TCP connection, as QEMU's port would be
            with socket.create_server(("127.0.0.1", 0)) as listener:
                ours = socket.create_connection(listener.getsockname())
                theirs, _ = listener.accept()
        else:
            ours, theirs = socket.socketpair()
        broker_side = await anyio.abc.SocketStream.from_socket(ours)
        console_side = await anyio.abc.SocketStream.from_socket(theirs)

        async def run() -> None:
            gone = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError)
            async with console_side:
                with suppress(*gone):
                    await self.console(console_side)

        assert self._group is not None
        self._group.start_soon(run)
        return Endpoint(broker_side, self.kind, f"fake {self.kind}")

    async def ending_for(self, domain_uuid: str) -> None:
        return None


class TestPlugin:
    """The VNC plugin with the domain's password given by the test (the real plugin
    reads it from libvirt's secure XML)."""

    __test__ = False

    def __init__(self, password: bytes | None = b"secret") -> None:
        self.password = password

    async def _password(self, session: Session) -> bytes | None:
        return self.password

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        fields = {f.name: getattr(PROTOCOL, f.name) for f in attrs.fields(VNC)}
        return [PasswordVNC(**fields, password_source=self._password)]


@attrs.frozen
class PasswordVNC(VNC):
    """The built-in vnc protocol (its page too), the VNC password from the test."""

    password_source: Any = attrs.field(default=None, eq=False)

    def session_handler(self, context: PluginContext) -> SessionHandler:
        settings = VNCSettings.from_config(context.config.table(TABLE))
        recording = RecordingSettings.from_config(context.config)
        return VNCSessionHandler(
            settings, password_source=self.password_source,
            recording=recording if recording.active else None,
        )


@attrs.define
class InProcess:
    broker: Broker
    port: int
    issuer: TokenIssuer

    def url(self, *, view_only: bool = False) -> str:
        token = self.issuer.issue(DOMAIN, "vnc", ttl=60, view_only=view_only).token
        return f"ws://127.0.0.1:{self.port}/ws/vnc?token={token}"


@asynccontextmanager
async def in_process_broker(
    console: Console,
    *,
    kind: str = "fd",
    vnc: VNCSection | None = None,
    password: bytes | None = b"secret",
    recordings: str = "/nonexistent/recordings",
    limits: LimitsSection | None = None,
) -> AsyncIterator[InProcess]:
    """A real broker on 127.0.0.1 with the VNC plugin, whose one domain's console is
    *console* (a :class:`FakeQEMU`, say); *recordings*: ``recordings.dir``."""
    key = Ed25519PrivateKey.generate()
    config = Config(
        broker=BrokerSection(node=NODE, state_dir="/nonexistent"),
        listen=ListenSection(host="127.0.0.1", port=0),
        http=HTTPSection(allow_missing_origin=True),
        limits=limits or LimitsSection(),
        recordings=RecordingsSection(dir=recordings),
        plugin_tables={"vnc": vnc or VNCSection()},
    )
    verifier = TokenVerifier([key.public_key()], replay_cache=ReplayCache(100))
    plugins = PluginManager(
        disabled=(), load_entrypoints=False, plugins=[("vnc", TestPlugin(password))]
    )
    broker = Broker(
        config, verifier=verifier, resolver=OneConsole(console, kind), plugins=plugins,
        metrics=Metrics(),
    )
    async with anyio.create_task_group() as group:
        port = await group.start(broker.serve)
        try:
            yield InProcess(broker, port, TokenIssuer(key, NODE))
        finally:
            broker.shutdown()


@asynccontextmanager
async def vnc_client(
    console: Console, *, view_only: bool = False, **broker_options: Any
) -> AsyncIterator[Any]:
    """A WebSocket client of :func:`in_process_broker`'s VNC console (offering ``binary``)."""
    from websockets.asyncio.client import connect

    async with in_process_broker(console, **broker_options) as broker:
        url = broker.url(view_only=view_only)
        async with connect(url, subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            yield ws
