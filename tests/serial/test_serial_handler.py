"""The serial session handler with fakes at its boundary: a fake console stream and fake
WebSocket connections. Sessions attach to one hub per stream, take turns reading, pass
the writer's input on, and the last one to leave closes the hub."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import structlog
from broker_serial._control import SUBPROTOCOL
from broker_serial._serve import Hubs, Settings
from serialkit import cast_output
from websockets.exceptions import ConnectionClosed

from broker.retention import Policy, Pruner, is_being_written
from broker.service import Endpoint, Session, Traffic, WebSocketChannel
from broker.tokens import Claims, Rights

pytestmark = pytest.mark.anyio
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


#: Every fake's memory streams, closed after each test.
_STREAMS: list[Any] = []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _close_streams() -> Any:
    yield
    while _STREAMS:
        _STREAMS.pop().close()


class FakeConsole(anyio.abc.ByteStream):
    """The guest's side of a console stream: ``output`` is what the guest prints,
    ``typed`` what reached it. Counts concurrent readers (there must be one at most)."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[bytes](1000)
        _STREAMS.extend((self._send, self._receive))
        self.typed = bytearray()
        self.readers = 0
        self.most_readers = 0
        self.reads = 0
        self.closed = False

    def output(self, data: bytes) -> None:
        self._send.send_nowait(data)

    def hang_up(self) -> None:
        self._send.close()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.readers += 1
        self.most_readers = max(self.most_readers, self.readers)
        try:
            data = await self._receive.receive()
        except anyio.EndOfStream:
            raise
        finally:
            self.readers -= 1
        self.reads += 1
        return data

    async def send(self, item: bytes) -> None:
        self.typed += item

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed = True


class FakeConnection:
    """What the handler sees of websockets' ServerConnection."""

    def __init__(self, subprotocol: str | None) -> None:
        self.subprotocol = subprotocol
        self.request = None
        self._send, self._receive = anyio.create_memory_object_stream[bytes | str | None](100)
        _STREAMS.extend((self._send, self._receive))
        self.sent: list[bytes | str] = []
        self.arrived = anyio.Event()

    # the client's side
    def type(self, data: bytes | str) -> None:
        self._send.send_nowait(data)

    def leave(self) -> None:
        self._send.send_nowait(None)

    def output(self) -> bytes:
        return b"".join(m for m in self.sent if isinstance(m, bytes))

    def controls(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.sent if isinstance(m, str)]

    # the handler's side
    async def recv(self) -> bytes | str:
        item = await self._receive.receive()
        if item is None:
            raise ConnectionClosed(None, None)
        return item

    async def send(self, item: bytes | str) -> None:
        self.sent.append(item)
        self.arrived.set()
        self.arrived = anyio.Event()


def make_session(
    console: FakeConsole, connection: FakeConnection, *, view_only: bool = False
) -> Session:
    claims = Claims(
        domain_uuid=UUID, protocol="serial", node="hv1",
        rights=Rights.VIEW if view_only else Rights.FULL,
        issued_at=0, not_before=0, expires_at=60, jti="j",
    )

    async def no_more() -> Endpoint:
        raise AssertionError("the serial plugin opens no further endpoints")

    return Session(
        id="s", protocol="serial", console="serial", claims=claims,
        client=WebSocketChannel(connection),  # type: ignore[arg-type]
        endpoint=Endpoint(console, "stream", "fake console"),
        log=structlog.get_logger("test"), traffic=Traffic(), open_endpoint=no_more,
        client_address="127.0.0.1", domain_name="web1",
    )


async def until(check: Callable[[], bool], what: str = "") -> None:
    with anyio.fail_after(5):
        while not check():
            await anyio.sleep(0.005)


async def run_sessions(
    hubs: Hubs, sessions: list[Session], body: Callable[[], Awaitable[None]]
) -> None:
    async with anyio.create_task_group() as group:
        for session in sessions:
            group.start_soon(hubs.serve, session)
        await body()


async def test_sessions_share_one_hub_and_read_the_console_one_at_a_time() -> None:
    console = FakeConsole()
    hubs = Hubs(Settings(scrollback=1024))
    writer, viewer = FakeConnection(SUBPROTOCOL), FakeConnection(SUBPROTOCOL)
    sessions = [make_session(console, writer), make_session(console, viewer, view_only=True)]

    async def body() -> None:
        await until(lambda: len(writer.controls()) >= 1 and len(viewer.controls()) >= 1)
        assert len(hubs) == 1
        for i in range(50):
            console.output(f"line {i}\r\n".encode())
        await until(lambda: writer.output().endswith(b"line 49\r\n"))
        await until(lambda: viewer.output().endswith(b"line 49\r\n"))
        assert console.most_readers == 1  # never two reads at once
        viewer.type(b"rm -rf /\r")  # view-only: dropped
        writer.type(b"ls\r")
        writer.type(b"\x1b[A")
        await until(lambda: bytes(console.typed) == b"ls\r\x1b[A")
        await until(lambda: any(c.get("error") == "view_only" for c in viewer.controls()))
        writer.type(json.dumps({"type": "ping", "data": "x"}))
        await until(lambda: {"type": "pong", "data": "x"} in writer.controls())
        writer.leave()
        viewer.leave()

    await run_sessions(hubs, sessions, body)
    assert bytes(console.typed) == b"ls\r\x1b[A"
    assert len(hubs) == 0  # the last one to leave closed the hub


async def test_the_others_keep_reading_when_one_leaves() -> None:
    console = FakeConsole()
    hubs = Hubs(Settings())
    first, second = FakeConnection(None), FakeConnection(None)

    async def body() -> None:
        console.output(b"one\r\n")
        await until(lambda: b"one" in first.output() and b"one" in second.output())
        first.leave()
        await until(lambda: len(hubs._hubs[id(console)].clients) == 1)
        console.output(b"two\r\n")
        await until(lambda: b"two" in second.output())
        second.type("typed\r")  # a raw client's text frames are keys (xterm.js' attach addon)
        await until(lambda: bytes(console.typed) == b"typed\r")
        second.leave()

    await run_sessions(hubs, [make_session(console, first), make_session(console, second)], body)
    assert b"two" not in first.output()
    assert len(hubs) == 0


async def test_the_console_ending_ends_every_session_after_its_output() -> None:
    console = FakeConsole()
    hubs = Hubs(Settings())
    a, b = FakeConnection(SUBPROTOCOL), FakeConnection(None)

    async def body() -> None:
        console.output(b"bye\r\n")
        console.hang_up()

    with anyio.fail_after(5):
        await run_sessions(hubs, [make_session(console, a), make_session(console, b)], body)
    assert a.output() == b"bye\r\n" and b.output() == b"bye\r\n"
    assert len(hubs) == 0


async def test_a_takeover_through_the_control_protocol(tmp_path: Path) -> None:
    console = FakeConsole()
    hubs = Hubs(Settings(record=True, recordings_dir=tmp_path, record_input=True))
    first, second = FakeConnection(SUBPROTOCOL), FakeConnection(SUBPROTOCOL)

    async def body() -> None:
        await until(lambda: bool(first.controls()) and bool(second.controls()))
        assert first.controls()[0]["role"] == "writer" and first.controls()[0]["recording"]
        second.type(b"no\r")
        await until(lambda: any(c.get("error") == "not_writer" for c in second.controls()))
        second.type(json.dumps({"type": "takeover"}))
        await until(lambda: {"type": "role", "role": "watcher", "reason": "taken_over"}
                    in first.controls())
        second.type(b"yes\r")
        first.type(b"late\r")
        await until(lambda: bytes(console.typed) == b"yes\r")
        await until(lambda: any(c.get("error") == "not_writer" for c in first.controls()))
        second.type("{not json")
        await until(lambda: any(c.get("error") == "bad_message" for c in second.controls()))
        first.leave()
        second.leave()

    await run_sessions(hubs, [make_session(console, first), make_session(console, second)], body)
    assert bytes(console.typed) == b"yes\r"
    (cast,) = list(tmp_path.glob("*/*.cast"))
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    assert [e[1:] for e in events if e[1] == "i"] == [["i", "yes\r"]]


class StalledConnection(FakeConnection):
    """A client that reads nothing until ``reading`` is set: the handler's sends wait."""

    def __init__(self, subprotocol: str | None) -> None:
        super().__init__(subprotocol)
        self.reading = anyio.Event()

    async def put(self, data: bytes | str) -> None:
        """Send *data*, waiting while the handler has not taken what was sent before."""
        await self._send.send(data)

    def unread(self) -> int:
        """Messages sent that the handler has not taken yet."""
        return self._receive.statistics().current_buffer_used

    async def send(self, item: bytes | str) -> None:
        await self.reading.wait()
        await super().send(item)


class DeafConsole(FakeConsole):
    """A console that takes no input until ``listening`` is set (a guest not reading)."""

    def __init__(self) -> None:
        super().__init__()
        self.listening = anyio.Event()
        self.writes_waiting = 0

    async def send(self, item: bytes) -> None:
        self.writes_waiting += 1
        try:
            await self.listening.wait()
        finally:
            self.writes_waiting -= 1
        await super().send(item)


async def test_a_client_that_pings_and_never_reads_costs_one_pong() -> None:
    console = FakeConsole()
    hubs = Hubs(Settings())
    client = StalledConnection(SUBPROTOCOL)
    pings = 20_000

    async def body() -> None:
        for i in range(pings):
            await client.put(json.dumps({"type": "ping", "data": str(i)}))
        await until(lambda: client.unread() == 0)  # the handler took every one ...
        (attached,) = hubs._hubs[id(console)].clients
        # ... and holds one answer (the hello is in the send that waits).
        assert attached.queued_controls == 1 and attached.queued < 100
        client.reading.set()
        await until(lambda: {"type": "pong", "data": str(pings - 1)} in client.controls())
        client.leave()

    await run_sessions(hubs, [make_session(console, client)], body)
    assert [c["type"] for c in client.controls()] == ["hello", "pong"]


async def test_input_waits_for_the_console_instead_of_piling_up_in_the_broker() -> None:
    console = DeafConsole()
    hubs = Hubs(Settings())
    writer = FakeConnection(SUBPROTOCOL)
    viewer = FakeConnection(SUBPROTOCOL)
    sessions = [make_session(console, writer), make_session(console, viewer, view_only=True)]

    async def body() -> None:
        await until(lambda: bool(writer.controls()) and bool(viewer.controls()))
        for i in range(50):
            writer.type(b"key %d\r" % i)
        await until(lambda: console.writes_waiting == 1)
        # The writer's session waits with one message for the console and reads no more
        # from the client: the rest stay with the client's connection (websockets stops
        # reading the socket once proxy.max_queue messages wait).
        for _ in range(20):
            await anyio.sleep(0.005)
            assert writer._receive.statistics().current_buffer_used == 49
        # A view-only client's keys are dropped as they come: nothing waits for them.
        for i in range(50):
            viewer.type(b"nope %d\r" % i)
        await until(lambda: viewer._receive.statistics().current_buffer_used == 0)
        console.listening.set()
        await until(lambda: bytes(console.typed).endswith(b"key 49\r"))
        writer.leave()
        viewer.leave()

    await run_sessions(hubs, sessions, body)
    assert bytes(console.typed) == b"".join(b"key %d\r" % i for i in range(50))
    assert [c["error"] for c in viewer.controls() if c["type"] == "error"] == ["view_only"]


# --- a recording holds whatever a client was sent, however its session ends ---------------


def recorded(directory: Path) -> tuple[str, list[Path]]:
    """The output the one recording under *directory* holds (its parts joined), and them."""
    parts = sorted(directory.glob("*/*.cast"))
    assert parts and not any(is_being_written(part) for part in parts)  # it ended
    return cast_output(*parts), parts


def recording_settings(directory: Path, **more: Any) -> Settings:
    """Recording on, a new part every 4 KiB."""
    return Settings(record=True, recordings_dir=directory, recording_max_size=4096, **more)


async def test_clients_leaving_leave_the_recording_with_all_they_were_sent(
    tmp_path: Path,
) -> None:
    console = FakeConsole()
    hubs = Hubs(recording_settings(tmp_path))
    early, last = FakeConnection(SUBPROTOCOL), FakeConnection(None)

    async def body() -> None:
        for i in range(200):
            console.output(b"line %03d\r\n" % i)
        await until(lambda: early.output().endswith(b"line 199\r\n"))
        early.leave()
        await until(lambda: len(hubs._hubs[id(console)].clients) == 1)
        for i in range(200, 400):
            console.output(b"line %03d\r\n" % i)
        await until(lambda: last.output().endswith(b"line 399\r\n"))
        last.leave()

    await run_sessions(hubs, [make_session(console, early), make_session(console, last)], body)
    text, parts = recorded(tmp_path)
    assert len(parts) > 1  # it went on in further parts meanwhile
    assert text == last.output().decode() == "".join(f"line {i:03d}\r\n" for i in range(400))
    assert text.startswith(early.output().decode())


async def test_the_console_ending_leaves_the_recording_with_its_last_output(
    tmp_path: Path,
) -> None:
    console = FakeConsole()
    hubs = Hubs(recording_settings(tmp_path))
    client = FakeConnection(SUBPROTOCOL)

    async def body() -> None:
        for i in range(300):
            console.output(b"line %03d\r\n" % i)
        console.output(b"the last words")
        console.hang_up()  # the VM stopped: the stream ends

    with anyio.fail_after(5):
        await run_sessions(hubs, [make_session(console, client)], body)
    text, _ = recorded(tmp_path)
    assert client.output().endswith(b"the last words")
    assert text == client.output().decode()


async def test_a_session_ended_by_the_broker_leaves_the_recording_complete(
    tmp_path: Path,
) -> None:
    """The broker ends a session by cancelling its handler (the VM stopped, a shutdown):
    the recording is closed with everything the client was sent, a character cut
    between two reads included (as U+FFFD, the rest never came)."""
    console = FakeConsole()
    hubs = Hubs(recording_settings(tmp_path))
    client = FakeConnection(SUBPROTOCOL)
    cut = "\u00e9".encode()[:1]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(hubs.serve, make_session(console, client))
            for i in range(300):
                console.output(b"line %03d\r\n" % i)
            console.output(b"caf" + cut)
            await until(lambda: client.output().endswith(b"caf" + cut))
            group.cancel_scope.cancel()
    text, _ = recorded(tmp_path)
    assert text == client.output().decode("utf-8", "replace")
    assert text.endswith("caf\ufffd") and len(hubs) == 0


async def test_retention_passes_during_a_session_leave_its_recording_whole(
    tmp_path: Path,
) -> None:
    old = tmp_path / "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10" / "20200101T000000Z-00000000-001.cast"
    old.parent.mkdir(mode=0o700)
    old.write_text('{"version": 2, "width": 80, "height": 24, "timestamp": 1577836800}\n')
    os.utime(old, (0, 0))
    console = FakeConsole()
    hubs = Hubs(recording_settings(tmp_path))
    client = FakeConnection(SUBPROTOCOL)
    # The broker's retention: a pass on start and after each of the recording's rotations
    # (a new part wakes it), in its thread.
    pruner = Pruner(tmp_path, Policy(keep_days=7), 3600, suffixes=[".cast"])

    async def body() -> None:
        for i in range(400):
            console.output(b"line %03d\r\n" % i)
            if i % 50 == 0:
                await anyio.sleep(0.01)  # let passes run while it records
        await until(lambda: client.output().endswith(b"line 399\r\n"))
        await until(lambda: pruner.passes > 1)
        client.leave()

    pruner.start()
    try:
        await run_sessions(hubs, [make_session(console, client)], body)
    finally:
        pruner.stop(timeout=10)
    assert not old.exists()  # the passes deleted what the policy does not keep ...
    text, parts = recorded(tmp_path)  # ... and nothing of the recording
    assert len(parts) > 2
    assert text == client.output().decode()
