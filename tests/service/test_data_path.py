"""The data path's own frame handling (BrokerConnection): client frames as they come off
the wire, whole or split anywhere, mixed with what websockets still handles (fragments,
text, control frames, protocol errors), and binary messages sent without websockets'
frames. A raw TCP client speaks RFC 6455 to the real listener; the console echoes."""

from __future__ import annotations

import base64
import os
import random
import struct

import anyio
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN

from broker.config import ProxySection
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio
BANNER = b"RFB 003.008\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the broker's (on the loop the test run names)


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """A client frame (RFC 6455 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a bare TCP stream: frames written as given, read as parsed."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, token: str) -> RawClient:
        stream = await anyio.connect_tcp("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send(
            f"GET /ws/vnc?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n".encode()
        )
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await stream.receive()
        head, _, client.buffer = client.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            self.buffer += await self.stream.receive()

    async def next_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (unmasked, RFC 6455 5.1)."""
        await self._need(2)
        first, second = self.buffer[0], self.buffer[1]
        assert not second & 0x80, "a server frame is never masked"
        size, offset = second & 0x7F, 2
        if size == 126:
            await self._need(4)
            size, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif size == 127:
            await self._need(10)
            size, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
        await self._need(offset + size)
        payload = self.buffer[offset:offset + size]
        self.buffer = self.buffer[offset + size:]
        assert first & 0x80, "the broker sends whole messages"
        return first & 0x0F, payload

    async def echoed(self, size: int) -> bytes:
        """Binary payloads (pongs skipped) until *size* bytes came back."""
        got = b""
        with anyio.fail_after(10):
            while len(got) < size:
                opcode, payload = await self.next_frame()
                if opcode == 2:
                    got += payload
        return got

    async def closed_with(self) -> int:
        with anyio.fail_after(10):
            while True:
                opcode, payload = await self.next_frame()
                if opcode == 8:
                    return int(struct.unpack("!H", payload[:2])[0])


async def _session(verifier: TokenVerifier, issuer: TokenIssuer, max_message: int = 1 << 20):
    resolver = FakeResolver(FakeDomain(DOMAIN))
    proxy = ProxySection(max_message=max_message)
    return running_broker(make_config(proxy=proxy), verifier, resolver), issuer.issue(
        DOMAIN, "vnc", ttl=60
    ).token


async def test_frames_split_anywhere_arrive_whole_and_in_order(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    rng = random.Random(16)
    payloads = [os.urandom(size) for size in (0, 1, 125, 126, 127, 65535, 65536, 70000, 3)]
    wire = b"".join(frame(2, p) for p in payloads)
    expected = b"".join(payloads)
    broker, token = await _session(verifier, issuer)
    async with broker as running:
        client = await RawClient.open(running.port, token)
        assert await client.echoed(len(BANNER)) == BANNER
        pos = 0
        while pos < len(wire):  # pieces of 1 to 20 bytes, then larger ones
            step = rng.randint(1, 20) if pos < 400 else rng.randint(1, 9000)
            await client.stream.send(wire[pos:pos + step])
            pos += step
            if rng.random() < 0.3:
                await anyio.sleep(0.001)
        assert await client.echoed(len(expected)) == expected
        await client.stream.send(wire)  # and all of it in one write
        assert await client.echoed(len(expected)) == expected
        await client.stream.aclose()


async def test_messages_larger_than_a_read_and_two_sessions_at_once(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    """Messages of several MiB (their rest read straight into place, beyond the read
    buffer's 1 MiB) and small ones split anywhere, on two sessions at once: every
    connection reads through the one read buffer, and neither sees the other's bytes."""
    broker, _ = await _session(verifier, issuer, max_message=8 << 20)

    async def one(port: int, seed: int) -> None:
        rng = random.Random(seed)
        payloads = [os.urandom(size) for size in (3 << 20, 70000, 5, (1 << 20) + 1, 65536)]
        wire = b"".join(frame(2, p) for p in payloads)
        expected = b"".join(payloads)
        client = await RawClient.open(port, issuer.issue(DOMAIN, "vnc", ttl=60).token)
        assert await client.echoed(len(BANNER)) == BANNER
        pos = 0
        while pos < len(wire):
            step = rng.randint(1, 300_000)
            await client.stream.send(wire[pos:pos + step])
            pos += step
            await anyio.sleep(0)
        assert await client.echoed(len(expected)) == expected
        await client.stream.aclose()

    async with broker as running, anyio.create_task_group() as group:
        group.start_soon(one, running.port, 1)
        group.start_soon(one, running.port, 2)


async def test_fragments_text_and_pings_between_binary_frames(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    broker, token = await _session(verifier, issuer)
    async with broker as running:
        client = await RawClient.open(running.port, token)
        await client.echoed(len(BANNER))
        wire = (
            frame(2, b"one")
            + frame(2, b"frag-", fin=False)  # a fragmented binary message...
            + frame(9, b"ping-1")  # ...with a ping between its fragments
            + frame(0, b"ment-", fin=False)
            + frame(0, b"ed", fin=True)
            + frame(1, "text-é".encode())  # a text message: its UTF-8 to the console
            + frame(2, b"two")
        )
        for piece in (wire[:7], wire[7:30], wire[30:31], wire[31:]):
            await client.stream.send(piece)
        expected = b"one" + b"frag-ment-ed" + "text-é".encode() + b"two"
        got, pongs = b"", []
        with anyio.fail_after(10):
            while len(got) < len(expected):
                opcode, payload = await client.next_frame()
                if opcode == 10:
                    pongs.append(payload)
                elif opcode == 2:
                    got += payload
        assert got == expected
        assert pongs == [b"ping-1"]
        await client.stream.aclose()


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(2, b"not masked", mask=False), 1002),  # RFC 6455 5.1: the server fails it
        (frame(2, b"x" * 2000), 1009),  # over proxy.max_message (1024 here)
        (bytes([0x80 | 0x40 | 2]) + frame(2, b"rsv1")[1:], 1002),  # an extension bit
        (frame(0, b"continuation of nothing"), 1002),
    ],
    ids=["unmasked", "too-large", "rsv1", "stray-continuation"],
)
async def test_bad_frames_still_close_the_connection_with_websockets_codes(
    verifier: TokenVerifier, issuer: TokenIssuer, wire: bytes, code: int
) -> None:
    broker, token = await _session(verifier, issuer, max_message=1024)
    async with broker as running:
        client = await RawClient.open(running.port, token)
        await client.echoed(len(BANNER))
        await client.stream.send(frame(2, b"fine"))
        assert await client.echoed(4) == b"fine"
        await client.stream.send(wire[:3])  # the bad frame's header split too
        await anyio.sleep(0.01)
        await client.stream.send(wire[3:])
        assert await client.closed_with() == code
        await client.stream.aclose()


async def test_a_close_frame_ends_the_session_cleanly(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    broker, token = await _session(verifier, issuer)
    async with broker as running:
        client = await RawClient.open(running.port, token)
        await client.echoed(len(BANNER))
        await client.stream.send(frame(2, b"last"))
        assert await client.echoed(4) == b"last"
        await client.stream.send(frame(8, struct.pack("!H", 1000)))
        assert await client.closed_with() == 1000  # the close handshake's answer
        await client.stream.aclose()
