"""The recordings every plugin shares (broker.recordings): the layout and how a part is
created, the listing of every kind with its protocol column (the header convention, the
duration from the last line however long or cut short), finding a recording by the ids a
token holds and nothing else, the index the playback page reads, ``console-broker
recordings`` and the declarations' checks. Retention is tests/test_recordings_retention.py's."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from broker_serial._recording import KIND as SERIAL
from broker_serial._recording import Recording

from broker import Protocol, hookimpl
from broker.cli import main
from broker.plugins import PluginError, PluginManager
from broker.recordings import (
    RECORDING,
    PartFile,
    RecordingKind,
    find_recording,
    find_recording_anywhere,
    list_recordings,
    part_name,
    read_part,
    recording_index,
)
from broker.retention import Policy, Pruner, is_being_written

#: A recording kind like the VNC plugin's (an RFB stream in JSON lines, played from part 1).
VNC = RecordingKind(
    protocol="vnc", suffix=".rfb.jsonl", title="RFB (JSON lines)",
    content_type="application/x-ndjson", page="playback/", parts_play_alone=False,
)
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
KINDS = [SERIAL, VNC]
T = 1_893_456_000  # 2030-01-01T00:00:00Z


def vnc_part(
    directory: Path, recording: str, part: int, *, domain: str = UUID, name: str = "web1",
    offset: float = 0.0, events: list[list[Any]] | None = None, tail: str = "",
) -> Path:
    """A VNC recording part as the plugin writes it."""
    path = directory / domain / part_name(T, recording, part, VNC.suffix)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    header = {
        "format": "console-broker-rfb", "version": 1, "timestamp": int(T + offset),
        "console_broker": {
            "domain": {"name": name, "uuid": domain}, "protocol": "vnc", "device": None,
            "recording": recording, "part": part, "offset": offset, "input": False,
        },
    }
    lines = [json.dumps(header)] + [json.dumps(e) for e in (events or [])]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def test_a_part_is_created_held_in_the_layout(tmp_path: Path) -> None:
    part = PartFile.create(tmp_path, UUID, "a1b2c3d4", T, 1, ".rfb.jsonl")
    assert part.path == tmp_path / UUID / "20300101T000000Z-a1b2c3d4-001.rfb.jsonl"
    assert os.stat(tmp_path / UUID).st_mode & 0o777 == 0o700
    assert os.stat(part.path).st_mode & 0o777 == 0o600
    assert is_being_written(part.path)  # held: retention never deletes it
    assert list((tmp_path / UUID).iterdir()) == [part.path]  # the .new name is gone
    part.write(b'{"timestamp": 1}\n')
    part.close()
    assert not is_being_written(part.path) and part.path.read_bytes() == b'{"timestamp": 1}\n'
    with pytest.raises(FileExistsError):  # never over another part
        PartFile.create(tmp_path, UUID, "a1b2c3d4", T, 1, ".rfb.jsonl")
    assert sorted(p.name for p in (tmp_path / UUID).iterdir()) == [part.path.name]
    for bad in (("../x", 1), ("A1B2C3D4", 1), ("a1b2c3d4", 0), ("a1b2c3d4", 1000)):
        with pytest.raises(ValueError, match="no such recording part"):
            PartFile.create(tmp_path, UUID, bad[0], T, bad[1], ".cast")


def test_a_second_part_wakes_the_pruners_of_its_directory(tmp_path: Path) -> None:
    pruner = Pruner(tmp_path, Policy(keep_days=1), 3600, suffixes=[".cast"])
    elsewhere = Pruner(tmp_path / "other", Policy(keep_days=1), 3600, suffixes=[".cast"])
    pruner.start()
    elsewhere.start()
    try:
        PartFile.create(tmp_path, UUID, "a1b2c3d4", T, 1, ".cast").close()
        assert not pruner._wake.is_set()  # a first part is no rotation
        PartFile.create(tmp_path, UUID, "a1b2c3d4", T, 2, ".cast").close()
        assert pruner._trigger == "rotation" and elsewhere._trigger == "start"
    finally:
        pruner.stop(timeout=10)
        elsewhere.stop(timeout=10)


def test_the_listing_has_every_kind_with_its_protocol(tmp_path: Path) -> None:
    rec = Recording(tmp_path, domain_uuid=UUID, domain_name="web1", device="serial0")
    rec.output(b"hello")
    rec.close()
    first = vnc_part(tmp_path, "0badcafe", 1, events=[[0.25, "o", "UkZC"], [3.5, "e", "rotated"]])
    second = vnc_part(tmp_path, "0badcafe", 2, offset=3.5, events=[[10.0, "e", "closed"]])
    db = vnc_part(tmp_path, "deadbeef", 1, domain=OTHER, name="db1", events=[[1, "e", "x"]])
    (tmp_path / UUID / "notes.txt").write_text("not a recording\n")
    (tmp_path / UUID / "junk.rfb.jsonl").write_text("not json\n")
    listed = list_recordings(tmp_path, KINDS)
    assert {(r.protocol, r.recording, r.part) for r in listed} == {
        ("serial", rec.id, 1), ("vnc", "0badcafe", 1), ("vnc", "0badcafe", 2),
        ("vnc", "deadbeef", 1),
    }
    by_path = {r.path: r for r in listed}
    assert by_path[first].duration == 3.5 and by_path[first].format == "RFB (JSON lines)"
    assert by_path[second].duration == 6.5 and by_path[second].offset == 3.5  # its own part
    assert by_path[second].started == T + 3
    assert [r.path for r in listed if r.recording == "0badcafe"] == [first, second]
    assert [r.path for r in list_recordings(tmp_path, KINDS, "DB1")] == [db]
    assert {r.protocol for r in list_recordings(tmp_path, [SERIAL])} == {"serial"}
    doc = by_path[first].to_json()
    assert doc["protocol"] == "vnc" and doc["recording"] == "0badcafe"
    assert doc["started"] == "2030-01-01T00:00:00Z" and doc["live"] is False


def test_parts_are_listed_in_order_whatever_their_headers_say(tmp_path: Path) -> None:
    for number in (3, 1, 2):  # a part's header time is its own start: later ones vary
        vnc_part(tmp_path, "0badcafe", number, offset=10.0 * (3 - number))
    vnc_part(tmp_path, "00000001", 1)  # the same start: by id
    listed = [(r.recording, r.part) for r in list_recordings(tmp_path, KINDS)]
    assert listed == [("00000001", 1), ("0badcafe", 1), ("0badcafe", 2), ("0badcafe", 3)]
    assert [i.part for i in find_recording(tmp_path, KINDS, UUID, "0badcafe")] == [1, 2, 3]


def test_the_duration_of_a_part_whose_last_line_is_long_or_cut(tmp_path: Path) -> None:
    big = base64.b64encode(os.urandom(300_000)).decode()  # a large framebuffer update
    long_last = vnc_part(tmp_path, "aaaaaaaa", 1, events=[[1.0, "o", "x"], [7.25, "o", big]])
    cut = vnc_part(  # the broker was killed in the middle of a line
        tmp_path, "bbbbbbbb", 1, events=[[1.0, "o", "x"]], tail=f'[9.5, "o", "{big[:5000]}'
    )
    header_only = vnc_part(tmp_path, "cccccccc", 1)
    durations = {r.path: r.duration for r in list_recordings(tmp_path, KINDS)}
    assert durations == {long_last: 7.25, cut: 9.5, header_only: 0.0}


def test_a_recording_is_found_by_domain_and_id_only(tmp_path: Path) -> None:
    first = vnc_part(tmp_path, "0badcafe", 1)
    second = vnc_part(tmp_path, "0badcafe", 2, offset=1)
    vnc_part(tmp_path, "0badcafe", 1, domain=OTHER)  # the same id in another domain
    assert [i.path for i in find_recording(tmp_path, KINDS, UUID, "0badcafe")] == [first, second]
    assert [i.domain_uuid for i in find_recording(tmp_path, KINDS, OTHER, "0badcafe")] == [OTHER]
    assert [i.path for i in find_recording_anywhere(tmp_path, KINDS, "0badcafe")] in (
        [first, second], [tmp_path / OTHER / first.name]
    )
    for domain, recording in (
        (UUID, "0badcafe/../x"), (UUID, "0BADCAFE"), (UUID, "0badcaf"), (UUID, "*"),
        ("../" + UUID, "0badcafe"), (UUID.upper(), "0badcafe"), (UUID + "/", "0badcafe"),
        (".", "0badcafe"), ("", "0badcafe"),
    ):
        assert find_recording(tmp_path, KINDS, domain, recording) == [], (domain, recording)
    # names that merely resemble a part's, and links, are never found
    for name in ("x-0badcafe-003.rfb.jsonl", "20300101T000000Z-0badcafe-03.rfb.jsonl",
                 "20300101T000000Z-0badcafe-000.rfb.jsonl",
                 "20300101T000000Z-0badcafe-004.rfb.jsonl.new",
                 "20300101T000000Z-x-0badcafe-005.rfb.jsonl"):
        (tmp_path / UUID / name).write_text(first.read_text())
    outside = tmp_path.parent / f"{tmp_path.name}-outside.rfb.jsonl"
    outside.write_text(first.read_text())
    (tmp_path / UUID / "20300101T000000Z-0badcafe-006.rfb.jsonl").symlink_to(outside)
    linked = tmp_path / "1c2d3e4f-0000-4000-8000-000000000001"
    linked.symlink_to(tmp_path / UUID)  # a domain directory that is a link
    assert [i.path for i in find_recording(tmp_path, KINDS, UUID, "0badcafe")] == [first, second]
    assert find_recording(tmp_path, KINDS, linked.name, "0badcafe") == []
    assert find_recording(tmp_path / "missing", KINDS, UUID, "0badcafe") == []
    assert find_recording(tmp_path, [SERIAL], UUID, "0badcafe") == []  # no kind plays it
    outside.unlink()


def test_the_index_names_no_path(tmp_path: Path) -> None:
    vnc_part(tmp_path, "0badcafe", 1, events=[[2.0, "e", "rotated"]])
    vnc_part(tmp_path, "0badcafe", 3, offset=5.0, events=[[6.0, "e", "closed"]])
    parts = find_recording(tmp_path, KINDS, UUID, "0badcafe")
    index = recording_index(parts, VNC)
    assert index == {
        "recording": "0badcafe", "protocol": "vnc", "format": "RFB (JSON lines)",
        "domain": {"name": "web1", "uuid": UUID}, "device": None,
        "started": "2030-01-01T00:00:00Z", "input": False, "parts_play_alone": False,
        "complete": False,  # part 2 is gone (retention): what is left cannot play
        "parts": [
            {"part": 1, "size": parts[0].size, "offset": 0.0, "duration": 2.0, "live": False},
            {"part": 3, "size": parts[1].size, "offset": 5.0, "duration": 1.0, "live": False},
        ],
    }
    assert str(tmp_path) not in json.dumps(index)


def test_the_recordings_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nstate_dir = "state"\n')
    assert main(["recordings", "--config", str(config)]) == 0
    assert "no recordings in" in capsys.readouterr().out
    directory = tmp_path / "state" / "recordings"
    rec = Recording(directory, domain_uuid=UUID, domain_name="web1", device="serial0")
    rec.output(b"hello")
    rec.close()
    other = Recording(directory, domain_uuid=OTHER, domain_name="db1")
    other.output(b"hello")
    other.close()
    (directory / UUID / "20300101T000000Z-0badcafe-001.unknown").write_text("{}\n")
    capsys.readouterr()  # the recordings' log lines
    assert main(["recordings", "--config", str(config), "--domain", "web1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # a kind no plugin declares: not listed
    assert f"  serial  web1 serial0  {rec.id}  part 1  0.0 s  " in line
    assert line.endswith(str(rec.paths[0]))
    assert main(["recordings", "--config", str(config), "--protocol", "serial", "--json"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert [(d["protocol"], d["recording"]) for d in docs] in (
        [("serial", rec.id), ("serial", other.id)], [("serial", other.id), ("serial", rec.id)]
    )
    assert docs[0]["format"] == "asciicast v2" and docs[0]["width"] == 80
    assert main(["recordings", "--config", str(config), "--protocol", "spice"]) == 1
    assert "no recordings of the protocol 'spice'" in capsys.readouterr().err
    assert main(["recordings", "--dir", str(tmp_path / "elsewhere")]) == 0
    assert "no recordings in" in capsys.readouterr().out
    config.write_text("[serial]\nrecord = 1\n")
    assert main(["recordings", "--config", str(config)]) == 1
    assert "serial.record: must be true or false" in capsys.readouterr().err


class Recorder:
    """A plugin recording a protocol of its own."""

    def __init__(self, *kinds: RecordingKind, protocols: tuple[str, ...] = ("rec-a",)) -> None:
        self.kinds, self.protocols = kinds, protocols

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name=name, title=name) for name in self.protocols]

    @hookimpl
    def console_broker_recording_kinds(self) -> list[RecordingKind]:
        return list(self.kinds)


def load(*plugins: tuple[str, object]) -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=plugins)


def test_the_declarations_are_checked() -> None:
    a = RecordingKind(protocol="rec-a", suffix=".a.log", title="a")
    assert load(("one", Recorder(a))).recording_kinds == {"rec-a": a}
    with pytest.raises(PluginError, match="recordings of the protocol 'rec-b', which it does"):
        load(("one", Recorder(RecordingKind(protocol="rec-b", suffix=".b", title="b"))))
    with pytest.raises(PluginError, match="which it does not serve"):  # another plugin's
        load(("one", Recorder(protocols=("rec-b",))),
             ("two", Recorder(RecordingKind(protocol="rec-b", suffix=".b", title="b"),
                              protocols=())))
    with pytest.raises(PluginError, match="two recording kinds of 'rec-a'"):
        load(("one", Recorder(a, RecordingKind(protocol="rec-a", suffix=".z", title="z"))))
    with pytest.raises(PluginError, match=r"suffix '\.log' of 'rec-b' clashes with '\.a\.log'"):
        load(("one", Recorder(a, RecordingKind(protocol="rec-b", suffix=".log", title="b"),
                              protocols=("rec-a", "rec-b"))))
    with pytest.raises(PluginError, match="the name is the core's own"):
        load(("one", Recorder(protocols=(RECORDING,))))
    for bad in ("cast", ".Cast", ".x.new", ".a/b", ""):
        with pytest.raises(ValueError, match="recording suffix"):
            RecordingKind(protocol="x", suffix=bad, title="x")


def test_the_serial_plugin_declares_its_recordings() -> None:
    kinds = PluginManager().recording_kinds
    assert kinds["serial"] == SERIAL
    assert SERIAL.parts_play_alone and not SERIAL.page  # asciinema plays each part alone
    assert read_part(Path("/nonexistent.cast"), SERIAL) is None
