"""The pump's spliced path (broker/service/_splice.py): the broker's own WebSocket
connection and console socket, moved in the read callbacks. Through the real listener,
with the console on the broker's socket stream (as the libvirt resolver's fd and tcp
modes give it): order with the messages websockets still queues, reads larger than
``read_size``, a filter (``to_console``) dropping and refusing, backpressure both ways,
which side ended, and both sides given back when the pump is cancelled."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import connect

from broker import Protocol, hookimpl
from broker.config import ProxySection
from broker.plugins import PluginManager
from broker.service import PumpEnd, Session, pump
from broker.service._sockstream import SocketConsole
from broker.service._splice import Splice
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the broker's (on the loop the test run names)


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch) -> list[Splice]:
    """Every splice attached in the test."""
    attached: list[Splice] = []
    attach = Splice.attach

    def recording(self: Splice) -> None:
        attached.append(self)
        attach(self)

    monkeypatch.setattr(Splice, "attach", recording)
    return attached


class Filtered:
    """A protocol whose handler pumps with a filter: a message starting with b"drop" is
    dropped, one starting with b"bad" refused (ValueError), every other upper-cased.
    What each session's pump returned (or raised) is kept in :attr:`ends`."""

    def __init__(self) -> None:
        self.ends: list[PumpEnd | str] = []

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="vnc", handler=self.handle)]

    @staticmethod
    def to_console(data: bytes) -> bytes:
        if data.startswith(b"bad"):
            raise ValueError("refused by the filter")
        return b"" if data.startswith(b"drop") else data.upper()

    async def handle(self, session: Session) -> None:
        try:
            end = await pump(session.client, session.console_endpoint.stream,
                             traffic=session.traffic, read_size=session.read_size,
                             to_console=self.to_console)
        except ValueError as exc:
            self.ends.append(str(exc))
        else:
            self.ends.append(end)


class Cancelled:
    """A protocol whose handler pumps for a while, then cancels the pump and goes on with
    the same two sides through their usual interfaces."""

    def __init__(self) -> None:
        self.after: list[object] = []

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="vnc", handler=self.handle)]

    async def handle(self, session: Session) -> None:
        stream = session.console_endpoint.stream
        assert isinstance(stream, SocketConsole)
        with anyio.move_on_after(0.5):
            await pump(session.client, stream, traffic=session.traffic)
        connection = session.client.connection
        self.after += [connection.splice, stream.protocol.splice]
        await stream.send(b"to the console after")
        self.after.append(await stream.receive())
        await session.client.send(b"to the client after")
        self.after.append(await session.client.receive())


def plugins(name: str, plugin: object) -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[(name, plugin)])


async def test_messages_reach_the_console_in_order_whichever_way_they_come(
    verifier: TokenVerifier, issuer: TokenIssuer, splices: list[Splice]
) -> None:
    """Binary messages (spliced) between text messages (websockets' queue, the pump's
    task) reach the console in the order sent; the echo comes back as read, in
    messages of at most read_size bytes, whatever their size."""
    got = bytearray()

    async def recording_echo(stream: anyio.abc.SocketStream) -> None:
        async for chunk in stream:
            got.extend(chunk)
            await stream.send(chunk)

    resolver = FakeResolver(FakeDomain(DOMAIN, console=recording_echo))
    config = make_config(proxy=ProxySection(read_size=65536))
    sizes = [1, 125, 126, 65535, 65536, 65537, 300_000]
    expected = bytearray()
    async with running_broker(config, verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token), max_size=None) as ws:
            for number, size in enumerate(sizes):
                text = f"text {number};"
                binary = bytes([number + 1]) * size
                await ws.send(text)
                await ws.send(binary)
                expected += text.encode() + binary
            echoed = bytearray()
            with anyio.fail_after(10):
                while len(echoed) < len(expected):
                    message = await ws.recv()
                    assert isinstance(message, bytes)
                    assert len(message) <= 65536
                    echoed += message
    assert bytes(got) == bytes(expected)
    assert bytes(echoed) == bytes(expected)
    assert len(splices) == 1


async def test_a_filter_drops_and_refuses_on_the_spliced_path(
    verifier: TokenVerifier, issuer: TokenIssuer, splices: list[Splice]
) -> None:
    """to_console sees every message in order; what it drops never reaches the console,
    and its exception ends the pump, raised from it: nothing after the refused message
    reaches the console."""
    got = bytearray()

    async def recording(stream: anyio.abc.SocketStream) -> None:
        async for chunk in stream:
            got.extend(chunk)

    filtered = Filtered()
    resolver = FakeResolver(FakeDomain(DOMAIN, console=recording))
    async with running_broker(make_config(), verifier, resolver, plugins("f", filtered)) as run:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(run.url("vnc", token)) as ws:
            for message in (b"one", b"drop this", "two", b"three", b"bad", b"after"):
                await ws.send(message)
            with anyio.fail_after(10):
                await ws.wait_closed()
    assert bytes(got) == b"ONETWOTHREE"
    assert filtered.ends == ["refused by the filter"]
    assert len(splices) == 1


@pytest.mark.parametrize("ending", ["console", "client"])
async def test_the_pump_says_which_side_ended(
    ending: str, verifier: TokenVerifier, issuer: TokenIssuer, splices: list[Splice]
) -> None:
    async def closing(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"hello")
        if ending == "console":
            await stream.aclose()
            return
        async for _ in stream:
            pass

    filtered = Filtered()
    resolver = FakeResolver(FakeDomain(DOMAIN, console=closing))
    async with running_broker(make_config(), verifier, resolver, plugins("f", filtered)) as run:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(run.url("vnc", token)) as ws:
            assert await ws.recv() == b"hello"
            if ending == "client":
                await ws.close()
            else:
                with anyio.fail_after(10):
                    await ws.wait_closed()
        with anyio.fail_after(10):
            while not filtered.ends:
                await anyio.sleep(0.05)
    expected = PumpEnd.CONSOLE_CLOSED if ending == "console" else PumpEnd.CLIENT_CLOSED
    assert filtered.ends == [expected]
    assert len(splices) == 1


async def test_a_client_flooding_a_console_that_does_not_read_is_bounded(
    verifier: TokenVerifier, issuer: TokenIssuer, splices: list[Splice]
) -> None:
    """The console's buffer full stops the reading of the client's socket: the client's
    sends stop, the broker holds a bounded amount, and everything arrives in order once
    the console reads."""
    reading = anyio.Event()
    got = bytearray()

    async def late_reader(sock: socket.socket) -> None:
        await reading.wait()
        while True:
            await anyio.wait_readable(sock)
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    resolver = FakeResolver(FakeDomain(DOMAIN, raw_console=late_reader))
    sent = 0
    async with running_broker(make_config(), verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token), write_limit=65536) as ws:

            async def flood() -> None:
                nonlocal sent
                number = 0
                while True:
                    await ws.send(number.to_bytes(4, "big") * 16384)
                    sent += 65536
                    number += 1

            async with anyio.create_task_group() as group:
                group.start_soon(flood)
                await anyio.sleep(1.5)
                stalled = sent
                await anyio.sleep(0.5)
                assert sent == stalled, "the client's messages kept being read"
                # In flight: the sockets' kernel buffers and the transports' bounded ones.
                assert stalled < 32 * 1024 * 1024, stalled
                group.cancel_scope.cancel()
            reading.set()
            with anyio.fail_after(20):
                while len(got) < sent:  # whole messages, in order
                    await anyio.sleep(0.05)
    # The message whose send the flood's cancellation interrupted may have gone too.
    assert len(got) in (sent, sent + 65536)
    numbers = [int.from_bytes(got[at : at + 4], "big") for at in range(0, len(got), 65536)]
    assert numbers == list(range(len(numbers)))
    assert len(splices) == 1


async def test_a_cancelled_pump_gives_both_sides_back(
    verifier: TokenVerifier, issuer: TokenIssuer, splices: list[Splice]
) -> None:
    """After the pump is cancelled, nothing is spliced any more: what the console sends
    waits in the console stream for the handler, and the client's message in its channel."""
    async def answering(stream: anyio.abc.SocketStream) -> None:
        async for chunk in stream:
            if chunk == b"to the console after":
                await stream.send(b"from the console after")

    cancelled = Cancelled()
    resolver = FakeResolver(FakeDomain(DOMAIN, console=answering))
    async with running_broker(make_config(), verifier, resolver, plugins("c", cancelled)) as run:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(run.url("vnc", token)) as ws:
            with anyio.fail_after(10):
                assert await ws.recv() == b"to the client after"
            await ws.send(b"from the client after")
            with anyio.fail_after(10):
                await ws.wait_closed()
    assert cancelled.after == [None, None, b"from the console after", b"from the client after"]
    assert len(splices) == 1
