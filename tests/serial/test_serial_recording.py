"""Serial recordings: asciicast v2 files (header, events, UTF-8 across reads, input only
when asked, size rotation into parts that play alone, modes), listed by the core as
``serial`` recordings, and a failing disk that stops the recording and nothing else.
The shared layout, listing and command are tests/test_recordings.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import structlog
from broker_serial._recording import KIND, Recording

from broker.recordings import RecordingInfo, read_part
from broker.recordings import list_recordings as list_all

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


class Clock:
    def __init__(self) -> None:
        self.now = 1_893_456_000.0
        self.mono = 100.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


def list_recordings(directory: Path, domain: str | None = None) -> list[RecordingInfo]:
    return list_all(directory, [KIND], domain)


def lines(path: Path) -> list[object]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_recording_is_asciicast_v2(tmp_path: Path) -> None:
    clock = Clock()
    rec = Recording(
        tmp_path, domain_uuid=UUID, domain_name="web1", device="serial0",
        clock=clock.wall, monotonic=clock.monotonic,
    )
    assert rec.path is not None and rec.path.parent == tmp_path / UUID
    clock.mono += 0.5
    rec.output(b"guest# ")
    clock.mono += 1.25
    rec.output("h\u00e9".encode()[:2])  # a character split between two reads
    rec.output("h\u00e9".encode()[2:] + b"\r\n")
    rec.input(b"ls\r")  # not recorded: input recording is off
    rec.resize(100, 30)
    rec.close()
    header, *events = lines(rec.paths[0])
    assert header == {
        "version": 2, "width": 80, "height": 24, "timestamp": 1_893_456_000,
        "title": "web1 serial0 (serial console)",
        "console_broker": {
            "domain": {"name": "web1", "uuid": UUID}, "device": "serial0",
            "recording": rec.id, "part": 1, "input": False,
        },
    }
    assert events == [
        [0.5, "o", "guest# "], [1.75, "o", "h"], [1.75, "o", "\u00e9\r\n"], [1.75, "r", "100x30"]
    ]
    assert os.stat(rec.paths[0]).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / UUID).st_mode & 0o777 == 0o700


def test_input_is_recorded_only_when_asked(tmp_path: Path) -> None:
    rec = Recording(tmp_path, domain_uuid=UUID, record_input=True)
    rec.input(b"echo hi\r")
    rec.output(b"\xff")  # invalid UTF-8 becomes U+FFFD
    rec.close()
    _, *events = lines(rec.paths[0])
    assert [e[1:] for e in events] == [["i", "echo hi\r"], ["o", "\ufffd"]]  # type: ignore[index]


def test_a_recording_rotates_into_parts_that_each_play_alone(tmp_path: Path) -> None:
    rec = Recording(tmp_path, domain_uuid=UUID, domain_name="web1", max_size=4096)
    for i in range(300):
        rec.output(f"line {i:04d} ".encode() + b"x" * 40 + b"\r\n")
    rec.close()
    assert len(rec.paths) > 2
    text = ""
    for number, path in enumerate(rec.paths, 1):
        header, *events = lines(path)
        assert header["console_broker"]["part"] == number  # type: ignore[index]
        assert path.stat().st_size <= 4096 + 200  # one event past the limit at most
        text += "".join(e[2] for e in events)  # type: ignore[index]
    assert text.count("\r\n") == 300 and "line 0299" in text
    listed = list_recordings(tmp_path)
    assert [r.part for r in listed] == list(range(1, len(rec.paths) + 1))
    assert {r.recording for r in listed} == {rec.id}


def test_asciinema_plays_a_recording(tmp_path: Path) -> None:
    rec = Recording(tmp_path, domain_uuid=UUID)
    rec.output(b"guest# echo hello-$((6*7))\r\nhello-42\r\n")
    rec.resize(120, 40)
    rec.close()
    asciinema = Path(sys.executable).with_name("asciinema")
    played = subprocess.run(
        [str(asciinema), "cat", str(rec.paths[0])], check=True, capture_output=True, timeout=30
    )
    assert b"hello-42" in played.stdout


def test_an_unwritable_directory_stops_the_recording_only(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with structlog.testing.capture_logs() as logs:
        rec = Recording(blocker, domain_uuid=UUID)
        assert rec.failed and rec.path is None
        rec.output(b"data")  # nothing happens, nothing raises
        rec.close()
    assert [entry["event"] for entry in logs] == ["serial.recording_failed"]


def test_listing_by_domain_name_or_uuid(tmp_path: Path) -> None:
    for uuid, name in ((UUID, "web1"), ("0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10", "db1")):
        rec = Recording(tmp_path, domain_uuid=uuid, domain_name=name)
        rec.output(b"x")
        rec.close()
    (tmp_path / UUID / "junk.cast").write_text("not json\n")
    assert len(list_recordings(tmp_path)) == 2
    assert [r.domain_name for r in list_recordings(tmp_path, "WEB1")] == ["web1"]
    assert [r.domain_name for r in list_recordings(tmp_path, UUID.upper())] == ["web1"]
    assert list_recordings(tmp_path, "nope") == []
    assert list_recordings(tmp_path / "missing") == []
    assert read_part(tmp_path / UUID / "junk.cast", KIND) is None
    (info,) = list_recordings(tmp_path, "web1")
    assert (info.protocol, info.format, info.width, info.height) == (
        "serial", "asciicast v2", 80, 24
    )
