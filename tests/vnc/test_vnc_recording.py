"""Recording VNC sessions (broker_vnc._recording), in process with a scripted QEMU and on
the recorder itself: the stream the browser got from its first byte (a player replays
the handshake with security None, no password), input only with ``record_input``, parts,
every way a session ends, ``record_domains``, websocket mode; and the write-behind's
bounds: the queue never holds more than ``record_buffer`` (and one message), a slow disk
slows the session and loses nothing, a stuck or failing disk stops the recording and not
the session."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from broker_vnc._config import VNCSection
from broker_vnc._recording import (
    KIND,
    RecordedClient,
    RecordingSettings,
    SessionRecorder,
)
from broker_vnc.rfb import (
    NEED_DATA,
    RFBClient,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    VersionNegotiated,
)
from vnckit import DOMAIN, FRAMEBUFFER_UPDATE, FakeQEMU, echo_console, in_process_broker
from vnckit import rfb_login as login
from websockets.asyncio.client import connect

from broker.config import LimitsSection
from broker.recordings import RecordingInfo, list_recordings
from broker.retention import is_being_written

pytestmark = pytest.mark.anyio

FBUR = struct.pack(">BBHHHH", 3, 0, 0, 0, 720, 400)
KEY_A = struct.pack(">BBxxI", 4, 1, 0x61)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def parts_of(directory: Path) -> list[RecordingInfo]:
    return list_recordings(directory, [KIND])


async def ended(directory: Path, count: int = 1) -> list[Path]:
    """The parts of the *count* recordings in *directory*, once none is being written."""
    deadline = time.monotonic() + 10
    while True:
        found = parts_of(directory)
        if len({p.recording for p in found}) >= count and not any(
            is_being_written(p.path) for p in found
        ):
            return [p.path for p in found]
        assert time.monotonic() < deadline, f"not ended: {found} {list(directory.rglob('*'))}"
        await anyio.sleep(0.02)


def read(paths: list[Path]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    headers, events = [], []
    for path in paths:
        first, *rest = path.read_text().splitlines()
        headers.append(json.loads(first))
        events += [json.loads(line) for line in rest]
    return headers, events


def joined(events: list[list[Any]], kind: str = "o") -> bytes:
    return b"".join(base64.b64decode(e[2]) for e in events if e[1] == kind)


def replay(stream: bytes) -> tuple[list[object], bytes]:
    """What a player makes of a recorded stream: a client with no password fed it."""
    client = RFBClient()
    client.receive_data(stream)
    seen: list[object] = []
    while True:
        event = client.next_event()
        client.data_to_send()  # a player's answers go nowhere
        if event is NEED_DATA:
            raise AssertionError(f"the recording stops in the handshake: {seen}")
        seen.append(event)
        if isinstance(event, ServerInit):
            return seen, client.take_trailing_data()


async def test_a_session_is_recorded_from_its_first_byte(tmp_path: Path) -> None:
    qemu = FakeQEMU(security=2)  # QEMU asks for the VNC password; the browser is offered None
    async with in_process_broker(
        qemu, vnc=VNCSection(record=True), recordings=str(tmp_path)
    ) as broker, connect(broker.url(), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        await login(ws)
        await ws.send(FBUR)
        assert await ws.recv() == FRAMEBUFFER_UPDATE
        with anyio.fail_after(5):
            while not parts_of(tmp_path):  # the writer creates the part in its thread
                await anyio.sleep(0.01)
        assert [p.live for p in parts_of(tmp_path)] == [True]  # listed while written
    headers, events = read(await ended(tmp_path))
    (header,) = headers
    meta = header["console_broker"]
    assert header["format"] == "console-broker-rfb" and header["version"] == 1
    assert meta["domain"] == {"name": "guest", "uuid": DOMAIN} and meta["protocol"] == "vnc"
    assert meta["part"] == 1 and meta["offset"] == 0.0 and meta["input"] is False
    assert meta["mode"] == "fd" and meta["view_only"] is False
    assert events[0][1] == "o" and base64.b64decode(events[0][2]) == b"RFB 003.008\n"
    assert not [e for e in events if e[1] == "i"]  # no keystrokes without record_input
    assert events[-1][1:] == ["e", "closed"]
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] < 1
    seen, after = replay(joined(events))
    assert seen[:3] == [VersionNegotiated((3, 8), (3, 8)), SecurityTypeSelected(1, (1,)),
                        SecuritySucceeded(1)]
    init = seen[-1]
    assert isinstance(init, ServerInit) and (init.width, init.height) == (720, 400)
    assert after == FRAMEBUFFER_UPDATE


async def test_input_is_recorded_only_with_record_input(tmp_path: Path) -> None:
    qemu = FakeQEMU()
    vnc = VNCSection(record=True, record_input=True)
    async with in_process_broker(qemu, vnc=vnc, recordings=str(tmp_path)) as broker, connect(
        broker.url(), subprotocols=["binary"]  # type: ignore[list-item]
    ) as ws:
        await login(ws)
        await ws.send(FBUR)
        assert await ws.recv() == FRAMEBUFFER_UPDATE
        await ws.send(KEY_A)
        with anyio.fail_after(5):
            while KEY_A not in qemu.received:
                await anyio.sleep(0.01)
    headers, events = read(await ended(tmp_path))
    assert headers[0]["console_broker"]["input"] is True
    sent = joined(events, "i")
    assert sent.startswith(b"RFB 003.008\n") and sent.endswith(FBUR + KEY_A)


async def test_only_the_named_domains_are_recorded(tmp_path: Path) -> None:
    for domains, recorded in ((("other",), 0), (("GUEST",), 1), ((DOMAIN.upper(),), 2)):
        vnc = VNCSection(record_domains=domains)
        async with in_process_broker(
            FakeQEMU(), vnc=vnc, recordings=str(tmp_path)
        ) as broker, connect(broker.url(), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
            await login(ws)
        if recorded:
            await ended(tmp_path, recorded)
        assert len({p.recording for p in parts_of(tmp_path)}) == recorded


async def test_a_session_the_broker_ends_leaves_a_closed_recording(tmp_path: Path) -> None:
    qemu = FakeQEMU()
    async with in_process_broker(
        qemu, vnc=VNCSection(record=True), recordings=str(tmp_path)
    ) as broker, connect(broker.url(), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        await login(ws)
        for _ in range(20):
            await ws.send(FBUR)
            assert await ws.recv() == FRAMEBUFFER_UPDATE
        broker.broker.shutdown()  # the broker cancels the session's handler
        with anyio.fail_after(5):
            async for _ in ws:
                pass
    _, events = read(await ended(tmp_path))
    assert events[-1][1:] == ["e", "closed"]
    _, after = replay(joined(events))
    assert after == FRAMEBUFFER_UPDATE * 20


async def test_websocket_mode_records_qemus_own_stream(tmp_path: Path) -> None:
    async with in_process_broker(
        echo_console, kind="websocket", vnc=VNCSection(record=True), recordings=str(tmp_path)
    ) as broker, connect(broker.url(), subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        assert await ws.recv() == b"RFB 003.008\n"
        await ws.send(b"echoed")
        assert await ws.recv() == b"echoed"
    headers, events = read(await ended(tmp_path))
    assert joined(events) == b"RFB 003.008\nechoed"
    assert headers[0]["console_broker"]["mode"] == "websocket"


# --- the recorder itself ----------------------------------------------------------------------


def settings(directory: Path, **more: Any) -> RecordingSettings:
    return RecordingSettings(record=True, directory=directory, **more)


async def test_parts_continue_one_clock(tmp_path: Path) -> None:
    recorder = SessionRecorder(settings(tmp_path, max_size=4096), domain_uuid=DOMAIN,
                               domain_name="web1")
    sent = b""
    async with recorder.running():
        for i in range(60):
            chunk = bytes([i]) * 200
            sent += chunk
            await recorder.output(chunk)
            await anyio.sleep(0.001)
    assert len(recorder.paths) > 3
    headers, events = read(recorder.paths)
    assert [h["console_broker"]["part"] for h in headers] == list(range(1, len(headers) + 1))
    offsets = [h["console_broker"]["offset"] for h in headers]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    ends = [e for e in events if e[1] == "e"]
    assert [e[2] for e in ends] == ["rotated"] * (len(headers) - 1) + ["closed"]
    assert joined(events) == sent
    times = [e[0] for e in events]
    assert times == sorted(times)  # one clock across the parts
    for path in recorder.paths:
        assert path.stat().st_size <= 4096 + 400  # one event past the limit at most
    info = parts_of(tmp_path)
    assert [(p.part, p.offset) for p in info] == list(enumerate(offsets, 1))


class SlowDisk:
    """Writes that take *delay* seconds each, or block until released."""

    def __init__(self, recorder: SessionRecorder, delay: float = 0.0) -> None:
        self.delay = delay
        self.release = threading.Event()
        self.blocked = delay < 0
        self.calls = 0
        self.peak = 0
        self._write = recorder._write
        self._recorder = recorder
        recorder._write = self.write  # type: ignore[method-assign]

    def write(self, batch: list[tuple[float, str, bytes]]) -> None:
        self.calls += 1
        self.peak = max(self.peak, self._recorder._queued)
        if self.blocked:
            self.release.wait(30)
        else:
            time.sleep(self.delay)
        self._write(batch)


async def test_a_slow_disk_slows_the_session_and_loses_nothing(tmp_path: Path) -> None:
    recorder = SessionRecorder(settings(tmp_path, buffer=256 * 1024), domain_uuid=DOMAIN)
    disk = SlowDisk(recorder, delay=0.02)
    chunk = 64 * 1024
    sent = b""
    peak = 0
    started = time.monotonic()
    async with recorder.running():
        for i in range(60):
            data = bytes([i % 256]) * chunk
            await recorder.output(data)
            sent += data
            peak = max(peak, recorder._queued)
    took = time.monotonic() - started
    assert peak <= 256 * 1024 + chunk and disk.peak <= 256 * 1024 + chunk
    assert disk.calls > 5 and took > 0.1  # the session waited for the writer
    _, events = read(recorder.paths)
    assert joined(events) == sent and events[-1][1:] == ["e", "closed"]
    assert recorder.failed is None


async def test_a_stuck_disk_stops_the_recording_not_the_session(tmp_path: Path) -> None:
    recorder = SessionRecorder(settings(tmp_path, buffer=65536, stall=0.3), domain_uuid=DOMAIN)
    disk = SlowDisk(recorder, delay=-1)  # the first write never returns (until released)
    with structlog.testing.capture_logs() as logs:
        async with recorder.running():
            with anyio.fail_after(5):
                for _ in range(10):
                    await recorder.output(b"x" * 40000)  # waits 0.3 s at most, then goes on
            assert recorder.failed is not None and recorder.failed.startswith("stalled")
            with anyio.fail_after(1):
                for _ in range(100):
                    await recorder.output(b"y" * 40000)  # no waiting any more
        disk.release.set()
    failed = [e for e in logs if e["event"] == "vnc.recording_failed"]
    assert failed and "stalled" in failed[0]["error"]
    with anyio.fail_after(10):
        while is_being_written(recorder.paths[0]):  # the write returned: the file is closed
            await anyio.sleep(0.05)


async def test_a_failing_disk_stops_the_recording_not_the_session(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recorder = SessionRecorder(settings(blocker), domain_uuid=DOMAIN)
    with structlog.testing.capture_logs() as logs:
        async with recorder.running():
            for _ in range(5):
                await recorder.output(b"data")
                await anyio.sleep(0.01)
    assert recorder.failed is not None and recorder.paths == []
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["vnc.recording_failed"]


async def test_the_recorded_client_passes_everything_on(tmp_path: Path) -> None:
    class Client:
        subprotocol = "binary"
        extra = "the client's"

        def __init__(self) -> None:
            self.request_headers = {"origin": "x"}
            self.sent: list[bytes | str] = []

        async def send(self, data: bytes) -> None:
            self.sent.append(data)

        async def send_text(self, text: str) -> None:
            self.sent.append(text)

        async def receive(self) -> bytes:
            return b"in"

        async def receive_message(self) -> bytes | str:
            return "text"

    client = Client()
    recorder = SessionRecorder(settings(tmp_path, record_input=True), domain_uuid=DOMAIN)
    wrapped = RecordedClient(client, recorder)  # type: ignore[arg-type]
    async with recorder.running():
        await wrapped.send(b"out")
        await wrapped.send_text("control")  # the page's, not RFB: not recorded
        assert await wrapped.receive() == b"in" and await wrapped.receive_message() == "text"
    assert client.sent == [b"out", "control"]
    assert (wrapped.subprotocol, wrapped.request_headers, wrapped.extra) == (
        "binary", {"origin": "x"}, "the client's"
    )
    _, events = read(recorder.paths)
    assert [(e[1], base64.b64decode(e[2])) for e in events if e[1] != "e"] == [
        ("o", b"out"), ("i", b"in")
    ]


def test_the_settings_from_the_configuration(tmp_path: Path) -> None:
    from broker.config import Config, RecordingsSection

    config = Config(
        recordings=RecordingsSection(dir=str(tmp_path)),
        limits=LimitsSection(write_timeout=12.0),
        plugin_tables={"vnc": VNCSection(record_domains=("Web1",), record_buffer=1 << 20)},
    )
    found = RecordingSettings.from_config(config)
    assert found == RecordingSettings(
        record=False, record_domains=frozenset({"web1"}), directory=tmp_path,
        buffer=1 << 20, stall=12.0,
    )
    assert found.active and found.records("WEB1", DOMAIN) and not found.records("x", DOMAIN)
    assert not RecordingSettings().active


def test_the_plugin_declares_its_recordings_and_the_core_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker.cli import main
    from broker.plugins import PluginManager

    structlog.reset_defaults()  # the token command logs to stderr, as it does alone
    assert PluginManager().recording_kinds["vnc"] == KIND
    assert KIND.page == "playback/" and not KIND.parts_play_alone
    assert KIND.suffix == ".rfb.jsonl" and KIND.content_type == "application/x-ndjson"

    async def record() -> SessionRecorder:
        recorder = SessionRecorder(settings(tmp_path / "state" / "recordings"),
                                   domain_uuid=DOMAIN, domain_name="web1")
        async with recorder.running():
            await recorder.output(b"RFB 003.008\n")
        return recorder

    recorder = anyio.run(record)
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nnode = "hv1"\nstate_dir = "state"\n')
    capsys.readouterr()
    assert main(["recordings", "--config", str(config), "--protocol", "vnc"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert f"  vnc     web1  {recorder.id}  part 1  " in line
    assert line.endswith(str(recorder.paths[0]))
    assert main(["keygen", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["token", "--recording", recorder.id, "--json", "--config", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["page"].startswith("http://127.0.0.1:6080/console/vnc/playback/?token=eyJ")
    assert doc["plays"] == "vnc" and doc["parts"] == 1
