"""The pump: bytes both ways, bounded buffers, backpressure, and which side ended."""

from __future__ import annotations

import socket

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import connect

from broker.config import ProxySection
from broker.service import ClientClosed, PumpEnd, Traffic, pump
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio
READ = 4096


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Flood(anyio.abc.ByteStream):
    """A console that always has *chunk* more bytes, and counts what was read from it."""

    def __init__(self) -> None:
        self.produced = 0
        self.received: list[bytes] = []

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        self.produced += max_bytes
        return b"x" * max_bytes

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        self.received.append(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class SlowClient:
    """A client that takes messages only when the test says so, and sends what it is told."""

    def __init__(self) -> None:
        self.inbox_send, self.inbox = anyio.create_memory_object_stream[bytes](1)
        self.outbox, self.outbox_receive = anyio.create_memory_object_stream[bytes | None](10)

    async def send(self, data: bytes) -> None:
        await self.inbox_send.send(data)

    async def receive(self) -> bytes:
        data = await self.outbox_receive.receive()
        if data is None:
            raise ClientClosed
        return data

    def __enter__(self) -> SlowClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        for stream in (self.inbox_send, self.inbox, self.outbox, self.outbox_receive):
            stream.close()


async def test_a_slow_client_bounds_what_is_read_from_the_console() -> None:
    console = Flood()
    with SlowClient() as client:
        async with anyio.create_task_group() as group:
            group.start_soon(pump, client, console)
            await anyio.sleep(0.2)
            # One message waits in the client's buffer, one in send(), one just read.
            assert console.produced <= 3 * 256 * 1024
            stalled = console.produced
            await anyio.sleep(0.2)
            assert console.produced == stalled  # nothing read while the client takes nothing
            for _ in range(5):
                await client.inbox.receive()
            await anyio.sleep(0.05)
            assert stalled < console.produced <= stalled + 6 * 256 * 1024
            group.cancel_scope.cancel()


async def test_the_pump_reports_which_side_ended_and_counts_bytes() -> None:
    ours, theirs = socket.socketpair()
    broker_side = await anyio.abc.SocketStream.from_socket(ours)
    console_side = await anyio.abc.SocketStream.from_socket(theirs)
    traffic = Traffic()
    with SlowClient() as client:
        async with anyio.create_task_group() as group:

            async def run() -> None:
                end = await pump(client, broker_side, traffic=traffic, read_size=READ)
                assert end is PumpEnd.CLIENT_CLOSED

            group.start_soon(run)
            await console_side.send(b"banner")
            assert await client.inbox.receive() == b"banner"
            await client.outbox.send(b"keys")
            assert await console_side.receive() == b"keys"
            await client.outbox.send(None)  # the client goes
    assert (traffic.to_client, traffic.to_console) == (6, 4)

    with SlowClient() as client:
        async with anyio.create_task_group() as group:

            async def run_to_eof() -> None:
                assert await pump(client, broker_side, read_size=READ) is PumpEnd.CONSOLE_CLOSED

            group.start_soon(run_to_eof)
            await console_side.aclose()  # the console goes
    await broker_side.aclose()


async def test_a_client_flood_is_bounded_by_a_console_that_does_not_read() -> None:
    class Stuck(Flood):
        async def send(self, item: bytes) -> None:
            self.received.append(item)
            await anyio.sleep_forever()

    console = Stuck()
    with SlowClient() as client:
        async with anyio.create_task_group() as group:
            group.start_soon(pump, client, console)
            for _ in range(11):  # one taken by the pump, 10 in the client's outbox
                await client.outbox.send(b"k" * 1000)
            with anyio.move_on_after(0.2) as scope:
                await client.outbox.send(b"more")
            assert scope.cancelled_caught  # the pump stopped taking the client's messages
            assert len(console.received) == 1
            group.cancel_scope.cancel()


async def test_a_websocket_client_that_does_not_read_bounds_the_broker(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    """Through the real listener: a console pouring bytes out to a client that reads nothing."""
    sent = 0

    async def pouring(stream: anyio.abc.SocketStream) -> None:
        nonlocal sent
        chunk = b"p" * 65536
        try:
            while True:
                await stream.send(chunk)
                sent += len(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    resolver = FakeResolver(FakeDomain(DOMAIN, console=pouring))
    proxy = ProxySection(read_size=65536, write_buffer=65536)
    async with running_broker(make_config(proxy=proxy), verifier, resolver) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        async with connect(running.url("vnc", token), max_queue=2, max_size=None) as ws:
            await ws.recv()
            await anyio.sleep(1.0)
            stalled = sent
            await anyio.sleep(0.5)
            assert sent == stalled, "the console kept being read while the client read nothing"
            # What is in flight is kernel socket buffers plus a few messages, not a flood.
            assert stalled < 32 * 1024 * 1024, stalled
            received = 0
            with anyio.fail_after(10):
                while received < 2 * stalled:  # and it flows again when the client reads
                    received += len(await ws.recv())
