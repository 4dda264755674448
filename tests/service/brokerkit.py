"""An in-process broker for tests: real listener on 127.0.0.1, fake hypervisor behind it.

:class:`FakeResolver` stands at the boundary the real :class:`LibvirtResolver`
occupies: it knows a few domains, and opens each console as one end of a
socket pair whose other end runs a fake console (by default: send the RFB
banner, then echo).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs

from broker import Protocol, hookimpl
from broker.config import (
    BrokerSection,
    Config,
    HTTPSection,
    LimitsSection,
    ListenSection,
    ProxySection,
)
from broker.plugins import PluginManager
from broker.screenshots import Capture, ScreenshotError
from broker.service._app import Broker
from broker.service._libvirt import ResolverEvents, Target
from broker.service._metrics import Metrics
from broker.service._plan import EndpointPlan
from broker.service._refusals import (
    CONSOLE_BUSY,
    CONSOLE_NOT_ENABLED,
    HYPERVISOR_UNAVAILABLE,
    UNKNOWN_DOMAIN,
    VM_NOT_RUNNING,
    Refusal,
    Refused,
)
from broker.service._session import Endpoint
from broker.service._sockstream import open_socket
from broker.service._tls import ConsoleTLS
from broker.tokens import Claims, TokenVerifier

BANNER = b"RFB 003.008\n"
Console = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def echo_console(stream: anyio.abc.SocketStream) -> None:
    """Send the RFB banner, then echo whatever arrives."""
    await stream.send(BANNER)
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


def _no_screenshot() -> Capture:
    raise ScreenshotError("no_screen", "the fake domain has no screen")


@attrs.define
class FakeDomain:
    uuid: str
    name: str = "guest"
    running: bool = True
    consoles: tuple[str, ...] = ("vnc", "serial", "spice")
    busy: bool = False
    console: Console = echo_console
    #: What :meth:`FakeResolver.capture_screenshot` does (in a worker thread): returns
    #: the capture or raises.
    screen: Callable[[], Capture] = _no_screenshot
    #: Instead of :attr:`console`: called with the console end's bare socket
    #: (non-blocking), for a console that must read nothing until it says so (anyio's
    #: stream reads whatever arrives into its queue before it is asked).
    raw_console: Callable[[socket.socket], Awaitable[None]] | None = None


class FakeResolver:
    """A :class:`broker.service._libvirt.Resolver` over :class:`FakeDomain` objects."""

    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.uuid: d for d in domains}
        self.available = True
        self.events: ResolverEvents | None = None
        self.opened = 0
        #: Fake consoles whose connection the broker closed.
        self.closed = 0
        #: The console ends' streams, to watch them close.
        self.console_streams: list[anyio.abc.SocketStream] = []
        self._group: anyio.abc.TaskGroup | None = None

    def health(self) -> dict[str, object]:
        return {"uri": "fake:///", "connected": self.available}

    async def run(self, events: ResolverEvents, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.events = events
        async with anyio.create_task_group() as group:
            self._group = group
            task_status.started()
            await anyio.sleep_forever()

    async def target(
        self, claims: Claims, console: str | None, tls: ConsoleTLS | None = None
    ) -> Target:
        if not self.available:
            raise Refused(HYPERVISOR_UNAVAILABLE, "fake hypervisor down")
        dom = self.domains.get(claims.domain_uuid)
        if dom is None:
            raise Refused(UNKNOWN_DOMAIN, f"no domain {claims.domain_uuid}")
        if not dom.running:
            raise Refused(VM_NOT_RUNNING, "not running")
        if console is None:  # a protocol that opens its own endpoint, or has none
            return Target(dom.uuid, dom.name, None, handle=dom)
        if console not in dom.consoles:
            raise Refused(CONSOLE_NOT_ENABLED, f"no {console}")
        return Target(
            dom.uuid, dom.name, EndpointPlan("tcp", console, host="fake", port=1), handle=dom
        )

    async def open(self, target: Target) -> Endpoint:
        dom: FakeDomain = target.handle
        if dom.busy:
            raise Refused(CONSOLE_BUSY, "busy")
        ours, theirs = socket.socketpair()
        if dom.raw_console is not None:
            theirs.setblocking(False)
            self.opened += 1
            assert self._group is not None
            raw = dom.raw_console

            async def run_raw() -> None:
                with theirs:
                    await raw(theirs)
                self.closed += 1

            self._group.start_soon(run_raw)
            return Endpoint(await open_socket(ours), "fake", "socketpair")
        # The broker's own console stream, as the libvirt resolver's fd and tcp modes
        # give (so sessions take the pump's spliced path, broker/service/_splice.py).
        broker_side = await open_socket(ours)
        console_side = await anyio.abc.SocketStream.from_socket(theirs)
        self.console_streams.append(console_side)
        self.opened += 1
        assert self._group is not None

        async def run_console() -> None:
            async with console_side:
                await dom.console(console_side)
            self.closed += 1

        self._group.start_soon(run_console)
        return Endpoint(broker_side, "fake", "socketpair")

    async def ending_for(self, domain_uuid: str) -> Refusal | None:
        return None

    def capture_screenshot(self, target: Target, *, max_bytes: int) -> Capture:
        dom: FakeDomain = target.handle
        captured = dom.screen()
        if len(captured.data) > max_bytes:
            raise ScreenshotError("too_large", f"more than {max_bytes} bytes")
        return captured

    def stop(self, uuid: str, ending: Refusal) -> None:
        self.domains[uuid].running = False
        assert self.events is not None
        self.events.domain_gone(uuid, ending)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a broker whose own origin a test uses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(
    *,
    http: HTTPSection | None = None,
    limits: LimitsSection | None = None,
    proxy: ProxySection | None = None,
    node: str = "hv1",
    port: int = 0,
    public_url: str = "",
) -> Config:
    """A broker on 127.0.0.1 (*port* 0: any free one; a page's origin is allowed only
    with a known port, see :func:`free_port`), accepting requests without Origin unless
    *http* says otherwise."""
    return Config(
        broker=BrokerSection(node=node, state_dir="/nonexistent", public_url=public_url),
        listen=ListenSection(host="127.0.0.1", port=port),
        http=http or HTTPSection(allow_missing_origin=True),
        limits=limits or LimitsSection(),
        proxy=proxy or ProxySection(),
    )


class RawProtocols:
    """The built-in protocols' names, each served by :func:`broker.service.raw_proxy`
    with no page: the service tests are about the core, not about what a protocol
    plugin parses (the plugins' own tests are)."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name=name, title=name) for name in ("vnc", "spice", "serial")]


def builtin_plugins() -> PluginManager:
    """The built-in protocols, served raw (the environment may have other plugins)."""
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[("raw", RawProtocols())])


@attrs.define
class Running:
    broker: Broker
    resolver: FakeResolver
    port: int

    def url(self, protocol: str, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{protocol}?token={token}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_broker(
    config: Config,
    verifier: TokenVerifier,
    resolver: FakeResolver,
    plugins: PluginManager | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    broker = Broker(
        config,
        verifier=verifier,
        resolver=resolver,
        plugins=plugins or builtin_plugins(),
        metrics=Metrics(),
        **kwargs,
    )
    async with anyio.create_task_group() as group:
        port = await group.start(broker.serve)
        try:
            yield Running(broker, resolver, port)
        finally:
            broker.shutdown()
