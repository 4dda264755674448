"""``console-broker open`` for the serial console, without a VM: what the user is told
(control messages), which keys go out, the detach key, raw mode and its restoring on
every way out (a pty), the window size, pipe mode; a stand-in broker on a real
WebSocket."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import struct
import termios
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from broker_serial import _terminal as terminal_module
from broker_serial._control import SUBPROTOCOL
from broker_serial._terminal import (
    BUSY,
    DETACH,
    FREE,
    NOT_WRITER,
    SKIPPED,
    TAKEN_OVER,
    VIEW_ONLY,
    WATCHING,
    WRITER,
    Attachment,
    Terminal,
    _Replay,
    attach,
    resize,
    serve_port,
    split_detach,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from broker.native import NativeClient


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def hello(**fields: Any) -> str:
    doc = {
        "type": "hello", "version": 1, "domain": {"name": "web1", "uuid": "u"},
        "device": None, "rights": "full", "role": "writer", "clients": 1,
        "scrollback": 0, "recording": False,
    }
    return json.dumps({**doc, **fields})


def message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


# --- control messages and keys (sans-I/O) ----------------------------------------------


def test_the_writer_is_told_it_has_the_keyboard_and_its_keys_go_out() -> None:
    state = Attachment()
    assert state.control(hello()) == ["connected to web1; Ctrl+] detaches", WRITER]
    assert state.keys(b"ls\r") == (True, [])


def test_keys_typed_before_the_hello_go_out() -> None:
    assert Attachment().keys(b"x") == (True, [])


def test_the_first_line_names_the_device_and_a_recording() -> None:
    state = Attachment(detach_hint="")
    lines = state.control(hello(device="serial1", recording=True, domain={"uuid": "6695"}))
    assert lines[0] == "connected to 6695 (serial1), recorded"


def test_a_watcher_is_told_once_that_its_keys_are_not_sent() -> None:
    state = Attachment()
    lines = state.control(hello(role="watcher", clients=2))
    assert lines[1] == WATCHING
    assert WATCHING == (
        "you are watching: another client is typing (--take to take the keyboard)"
    )
    assert state.keys(b"a") == (False, [NOT_WRITER])
    assert state.keys(b"b") == (False, [])
    # The broker's own error (keys sent before the role was known) is not said twice.
    assert state.control(message("error", error="not_writer", message="m")) == []


def test_a_terminals_automatic_answers_are_dropped_silently() -> None:
    state = Attachment()
    state.control(hello(role="watcher"))
    assert state.keys(b"\x1b[24;80R") == (False, [])
    assert state.keys(b"x") == (False, [NOT_WRITER])


def test_a_free_keyboard_is_said_and_typing_claims_it() -> None:
    state = Attachment()
    state.control(hello(role="watcher"))
    state.keys(b"x")
    assert state.control(message("clients", count=1, writer=False)) == [FREE]
    assert state.keys(b"y") == (True, [])
    assert state.control(message("role", role="writer", reason="claimed")) == [WRITER]
    assert state.control(message("clients", count=2, writer=True)) == []


def test_someone_else_claiming_the_free_keyboard_is_said() -> None:
    state = Attachment()
    state.control(hello(role="watcher"))
    state.control(message("clients", count=1, writer=False))
    assert state.control(message("clients", count=2, writer=True)) == [WATCHING]
    assert state.keys(b"x") == (False, [NOT_WRITER])
    assert state.control(message("clients", count=2, writer=True)) == []


def test_being_taken_over_is_said_and_keys_stop() -> None:
    state = Attachment()
    state.control(hello())
    assert state.control(message("role", role="watcher", reason="taken_over")) == [TAKEN_OVER]
    assert TAKEN_OVER.startswith("another client took the keyboard over")
    assert state.keys(b"x") == (False, [NOT_WRITER])


def test_take_sends_takeover_and_keys_go_out_until_the_answer() -> None:
    state = Attachment(take=True)
    assert [json.loads(m) for m in state.start()] == [{"type": "takeover"}]
    # The hello says watcher (the broker had not read the takeover yet): no "watching".
    assert state.control(hello(role="watcher", clients=2)) == [
        "connected to web1; Ctrl+] detaches"
    ]
    assert state.keys(b"x") == (True, [])
    assert state.control(message("role", role="writer", reason="takeover")) == [WRITER]


def test_take_with_a_view_only_token() -> None:
    state = Attachment(take=True)
    state.start()
    lines = state.control(hello(rights="view", role="watcher"))
    assert lines[1:] == ["view only: this token cannot take the keyboard", VIEW_ONLY]
    assert state.keys(b"x") == (False, [VIEW_ONLY])
    assert state.control(message("error", error="view_only", message="m")) == []
    assert state.keys(b"y") == (False, [])


def test_a_view_only_token_is_told_at_once_and_not_again() -> None:
    state = Attachment()
    assert state.control(hello(rights="view", role="watcher"))[1] == VIEW_ONLY
    assert state.keys(b"x") == (False, [VIEW_ONLY])
    assert state.keys(b"y") == (False, [])
    # A free keyboard is nothing to a view-only token.
    assert state.control(message("clients", count=1, writer=False)) == []
    assert state.keys(b"z") == (False, [])


def test_take_on_a_raw_session_sends_nothing() -> None:
    state = Attachment(take=True, framed=False)
    assert state.start() == []
    assert state.keys(b"x") == (True, [])


def test_skipped_other_errors_and_what_is_no_message() -> None:
    state = Attachment()
    state.control(hello())
    assert state.control(message("skipped", bytes=9, role="writer", clients=1, writer=True,
                                 scrollback=3)) == [SKIPPED]
    assert state.control(message("error", error="bad_message", message="nope")) == [
        "the broker said: nope"
    ]
    for text in ("pong", "[1]", "{", message("pong", data="x"), message("future")):
        assert state.control(text) == []


def test_the_detach_key_ends_the_keys() -> None:
    assert DETACH == b"\x1d"
    assert split_detach(b"ls\r") == (b"ls\r", False)
    assert split_detach(b"ab\x1dcd") == (b"ab", True)
    assert split_detach(b"\x1d") == (b"", True)


def test_resize_messages_stay_within_what_the_broker_takes() -> None:
    assert json.loads(resize(120, 40)) == {"type": "resize", "cols": 120, "rows": 40}
    assert json.loads(resize(0, 99999)) == {"type": "resize", "cols": 1, "rows": 10000}


# --- a pty and a stand-in broker ---------------------------------------------------------


@contextlib.contextmanager
def a_pty(cols: int = 100, rows: int = 30) -> Iterator[tuple[int, int]]:
    """(master, slave) of a new pty of that size."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        yield master, slave
    finally:
        os.close(master)
        os.close(slave)


class Broker:
    """A stand-in for the broker's serial WebSocket: the test drives its one connection."""

    def __init__(self) -> None:
        self.sessions: list[ServerConnection] = []
        self.arrived = anyio.Event()
        self.done = anyio.Event()
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.sessions.append(ws)
        self.arrived.set()
        await self.done.wait()

    async def session(self) -> ServerConnection:
        await self.arrived.wait()
        return self.sessions[0]


@contextlib.asynccontextmanager
async def broker_and_client(
    subprotocols: tuple[str, ...] = (SUBPROTOCOL, "binary"),
) -> AsyncIterator[tuple[Broker, ClientConnection]]:
    broker = Broker()
    async with serve(
        broker.handler, "127.0.0.1", 0,
        subprotocols=[Subprotocol(p) for p in subprotocols],
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(
            f"ws://127.0.0.1:{port}/ws/serial",
            subprotocols=[Subprotocol(SUBPROTOCOL), Subprotocol("binary")],
        ) as client:
            try:
                yield broker, client
            finally:
                broker.done.set()


async def read_until(fd: int, pattern: bytes, seen: bytearray, timeout: float = 5) -> bytes:
    """Read the pty master *fd* into *seen* until *pattern* is in it."""
    with anyio.fail_after(timeout):
        while pattern not in seen:
            await anyio.wait_readable(fd)
            seen += os.read(fd, 4096)
    return bytes(seen)


async def control(ws: ServerConnection, timeout: float = 5) -> dict[str, Any]:
    """The next text message *ws* received, parsed."""
    with anyio.fail_after(timeout):
        while True:
            received = await ws.recv()
            if isinstance(received, str):
                doc: dict[str, Any] = json.loads(received)
                return doc


def settings(fd: int) -> list[Any]:
    return termios.tcgetattr(fd)


@pytest.mark.anyio
async def test_a_session_in_a_pty_keys_output_resize_and_detach() -> None:
    with a_pty(cols=100, rows=30) as (master, slave):
        before = settings(slave)
        term = Terminal(slave, slave, slave)
        assert term.tty and term.size() == (100, 30)
        async with broker_and_client() as (broker, client), anyio.create_task_group() as group:
            result: list[int] = []

            async def run() -> None:
                result.append(await attach(client, term))

            group.start_soon(run)
            ws = await broker.session()
            # The size first (once raw mode is on), then the keys as they are typed.
            assert await control(ws) == {"type": "resize", "cols": 100, "rows": 30}
            raw = settings(slave)
            assert raw != before and not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
            await ws.send(hello())
            seen = bytearray()
            await read_until(master, b"Ctrl+] detaches\r\n", seen)
            await read_until(master, f"[console-broker] {WRITER}\r\n".encode(), seen)
            await ws.send(b"guest# ")
            await read_until(master, b"guest# ", seen)
            os.write(master, b"echo hi\r\x03")  # Ctrl+C is a key, not a signal, in raw mode
            typed = b""
            with anyio.fail_after(5):
                while typed != b"echo hi\r\x03":
                    received = await ws.recv()
                    assert isinstance(received, bytes)
                    typed += received
            # The window changes: a resize goes out on SIGWINCH.
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.kill(os.getpid(), signal.SIGWINCH)
            assert await control(ws) == {"type": "resize", "cols": 120, "rows": 40}
            # A status line starts on a line of its own after output that did not end one.
            await ws.send(message("role", role="watcher", reason="taken_over"))
            await read_until(master, f"guest# \r\n[console-broker] {TAKEN_OVER}\r\n".encode(),
                             seen)
            # Ctrl+] detaches: what came before it goes out, not what follows it.
            await ws.send(message("role", role="writer", reason="takeover"))
            with anyio.fail_after(5):
                while seen.count(f"{WRITER}\r\n".encode()) < 2:
                    await anyio.wait_readable(master)
                    seen += os.read(master, 4096)
            os.write(master, b"q" + DETACH + b"ignored")
            with anyio.fail_after(5):
                while not result:
                    await anyio.sleep(0.01)
            assert await ws.recv() == b"q"
        assert result == [0]
        await read_until(master, b"[console-broker] detached\r\n", seen)
        assert settings(slave) == before


@pytest.mark.anyio
async def test_the_broker_closing_shows_the_reason_and_restores_the_terminal() -> None:
    with a_pty() as (master, slave):
        before = settings(slave)
        term = Terminal(slave, slave, slave)
        async with broker_and_client() as (broker, client):
            async with anyio.create_task_group() as group:
                result: list[int] = []

                async def run() -> None:
                    result.append(await attach(
                        client, term, close_text=lambda ws: f"VM stopped ({ws.close_code})"
                    ))

                group.start_soon(run)
                ws = await broker.session()
                await control(ws)
                await ws.send(b"bye\r\n")
                await ws.close(4100, "VM stopped")
            assert result == [1]
        seen = bytearray()
        await read_until(master, b"bye\r\n[console-broker] VM stopped (4100)\r\n", seen)
        assert settings(slave) == before


@pytest.mark.anyio
async def test_take_sends_takeover_before_the_size() -> None:
    with a_pty() as (_master, slave):
        term = Terminal(slave, slave, slave)
        async with broker_and_client() as (broker, client), anyio.create_task_group() as group:
            group.start_soon(lambda: attach(client, term, take=True))
            ws = await broker.session()
            assert await control(ws) == {"type": "takeover"}
            assert (await control(ws))["type"] == "resize"
            await ws.close(1000, "")


@pytest.mark.anyio
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
async def test_a_signal_ends_the_attachment_and_restores_the_terminal(number: int) -> None:
    with a_pty() as (master, slave):
        before = settings(slave)
        term = Terminal(slave, slave, slave)
        results: list[int] = []
        async with broker_and_client() as (broker, client), anyio.create_task_group() as group:

            async def run() -> None:
                results.append(await attach(client, term))

            group.start_soon(run)
            ws = await broker.session()
            await control(ws)  # the handlers are in place, raw mode is on
            assert settings(slave) != before
            os.kill(os.getpid(), number)
        assert results == [128 + number]
        assert settings(slave) == before
        name = signal.Signals(number).name
        await read_until(master, f"[console-broker] ended by {name}\r\n".encode(), bytearray())
    # The handlers are gone with the attachment.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.anyio
async def test_an_exception_restores_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    with a_pty() as (_master, slave):
        before = settings(slave)
        term = Terminal(slave, slave, slave)

        def broken(data: bytes) -> None:
            raise RuntimeError("broken output")

        monkeypatch.setattr(term, "output", broken)
        async with broker_and_client() as (broker, client):
            # attach() raises the error as it is (its own task group unwrapped).
            with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="broken output")):
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: attach(client, term))
                    ws = await broker.session()
                    await control(ws)
                    assert settings(slave) != before
                    await ws.send(b"output")
        assert settings(slave) == before


@pytest.mark.anyio
async def test_pipe_mode_sends_the_input_as_it_is_and_detaches_when_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(terminal_module, "QUIET", 0.3)
    keys_r, keys_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        term = Terminal(keys_r, out_w, err_w)
        assert not term.tty and term.size() is None
        async with broker_and_client() as (broker, client), anyio.create_task_group() as group:
            result: list[int] = []

            async def run() -> None:
                result.append(await attach(client, term, take=True))

            group.start_soon(run)
            ws = await broker.session()
            assert await control(ws) == {"type": "takeover"}  # and no size: no terminal
            await ws.send(hello(role="writer"))
            os.write(keys_w, b"echo a\n" + DETACH + b"\n")  # no detach key in a pipe
            os.close(keys_w)
            keys_w = -1
            typed = b""
            with anyio.fail_after(5):
                while typed != b"echo a\n\x1d\n":
                    received = await ws.recv()
                    assert isinstance(received, bytes)
                    typed += received
            # After the end of the input, the answer still arrives.
            await ws.send(b"a\r\n")
            with anyio.fail_after(5):
                while not result:
                    await anyio.sleep(0.05)
        assert result == [0]
        assert os.read(out_r, 100) == b"a\r\n"
        errors = os.read(err_r, 1000).decode()
        assert errors == (
            f"[console-broker] connected to web1\n[console-broker] {WRITER}\n"
            "[console-broker] end of input: detached\n"
        )
    finally:
        for fd in (keys_r, keys_w, out_r, out_w, err_r, err_w):
            if fd >= 0:
                os.close(fd)


@pytest.mark.anyio
async def test_a_regular_file_as_input(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(terminal_module, "QUIET", 0.1)
    path = tmp_path / "keys"
    path.write_bytes(b"uname\n")
    with open(path, "rb") as keys, open(os.devnull, "wb") as sink:
        term = Terminal(keys.fileno(), sink.fileno(), sink.fileno())
        async with broker_and_client() as (broker, client), anyio.create_task_group() as group:
            result: list[int] = []

            async def run() -> None:
                result.append(await attach(client, term))

            group.start_soon(run)
            ws = await broker.session()
            with anyio.fail_after(5):
                assert await ws.recv() == b"uname\n"
                while not result:
                    await anyio.sleep(0.05)
        assert result == [0]


@pytest.mark.anyio
async def test_a_raw_session_passes_everything() -> None:
    with a_pty() as (master, slave):
        term = Terminal(slave, slave, slave)
        async with (
            broker_and_client(subprotocols=("binary",)) as (broker, client),
            anyio.create_task_group() as group,
        ):
            assert client.subprotocol == "binary"
            group.start_soon(lambda: attach(client, term, take=True))
            ws = await broker.session()
            await ws.send("[console-broker: view only; your keys are ignored]\r\n")
            await read_until(master, b"[console-broker: view only", bytearray())
            os.write(master, b"x")
            with anyio.fail_after(5):
                assert await ws.recv() == b"x"  # no takeover, no resize: raw
            await ws.close(1000, "")


# --- --listen: the console on a local TCP port -----------------------------------------


@pytest.mark.anyio
async def test_listen_one_client_at_a_time_and_output_kept_between_them() -> None:
    lines: list[str] = []
    native = NativeClient(
        protocol="serial", token="t", base_url="http://x", listen=("127.0.0.1", 0)
    )
    async with (
        await native.local_listener() as local,
        broker_and_client() as (broker, client),
        anyio.create_task_group() as group,
    ):
        result: list[int] = []

        async def run() -> None:
            result.append(await serve_port(client, local, take=True, status=lines.append,
                                           close_text=lambda ws: f"closed {ws.close_code}"))

        group.start_soon(run)
        ws = await broker.session()
        assert await control(ws) == {"type": "takeover"}
        await ws.send(hello(role="watcher", clients=2))
        await ws.send(message("role", role="writer", reason="takeover"))
        await ws.send(b"before anyone\r\nguest# ")
        with anyio.fail_after(5):
            while not any(line.startswith("the console is on") for line in lines):
                await anyio.sleep(0.01)
        first = await anyio.connect_tcp(local.host, local.port)
        # What came while nobody was connected, then the live output.
        assert await receive(first, b"before anyone\r\nguest# ") == b"before anyone\r\nguest# "
        await first.send(b"ls\n")
        assert await ws.recv() == b"ls\n"
        await ws.send(b"bin\r\n")
        assert await receive(first, b"bin\r\n") == b"bin\r\n"
        # A second client while the first is connected is told, and closed.
        second = await anyio.connect_tcp(local.host, local.port)
        assert await receive(second, b"") == BUSY
        await second.aclose()
        assert lines[0].startswith(f"the console is on 127.0.0.1:{local.port}: raw bytes")
        assert lines[1:4] == ["connected to web1", WRITER, lines[3]]
        assert lines[3].startswith("127.0.0.1:") and lines[3].endswith(" connected")
        await first.aclose()
        with anyio.fail_after(5):
            while not lines[-1].endswith("disconnected"):
                await anyio.sleep(0.01)
        await ws.send(b"while away\r\n")
        await anyio.sleep(0.1)
        third = await anyio.connect_tcp(local.host, local.port)
        assert await receive(third, b"while away\r\n") == b"while away\r\n"
        # A client that comes as the previous one leaves gets the port.
        await third.aclose()
        fourth = await anyio.connect_tcp(local.host, local.port)
        await fourth.send(b"pwd\n")
        assert await ws.recv() == b"pwd\n"
        await ws.close(4100, "VM stopped")
        assert await receive(fourth, b"") == b""  # closed with the session
        await fourth.aclose()
        with anyio.fail_after(5):
            while not result:
                await anyio.sleep(0.01)
    assert result == [1]
    assert lines[-1] == "closed 4100"


async def receive(stream: Any, expected: bytes, timeout: float = 5) -> bytes:
    """What *stream* sends until *expected* (or, for b"", until its end)."""
    data = b""
    with anyio.fail_after(timeout):
        while not expected or expected not in data:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    return data


def test_the_replay_keeps_the_latest_output_from_a_line_start() -> None:
    replay = _Replay(limit=10)
    replay.add(b"one\ntwo\nthree")
    assert replay.take() == b"two\nthree"
    assert replay.take() == b""
    replay.add(b"0123456789abc")
    assert replay.take() == b"3456789abc"
