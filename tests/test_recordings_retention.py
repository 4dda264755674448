"""Retention of recordings, every plugin's under one policy: age, total size, the part
being written kept (in this process and in another), dry runs, symbolic links, errors
that do not stop a pass, the broker's pruning thread, the ``[recordings]`` keys (and
serial's old keys naming their new place) and ``console-broker recordings --prune``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import structlog
from broker_serial._config import TABLE
from broker_serial._recording import KIND as SERIAL
from broker_serial._recording import Recording

from broker import recordings, retention
from broker.cli import main
from broker.config import Config, ConfigError, load_config
from broker.recordings import RecordingKind
from broker.retention import Policy, PruneResult

#: A recording kind like the VNC plugin's (an RFB stream in JSON lines, played from part 1).
VNC = RecordingKind(
    protocol="vnc", suffix=".rfb.jsonl", title="RFB (JSON lines)",
    content_type="application/x-ndjson", page="playback/", parts_play_alone=False,
)
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
NOW = 1_900_000_000.0
DAY = 86400
KINDS = [SERIAL, VNC]
SUFFIXES = [kind.suffix for kind in KINDS]


def prune(directory: Path, policy: Policy, **more: Any) -> PruneResult:
    """A pass over the built-in plugins' recordings (``.cast``, ``.rfb.jsonl``)."""
    return retention.prune(directory, policy, suffixes=SUFFIXES, **more)


def Pruner(directory: Path, policy: Policy, interval: float = 3600.0) -> retention.Pruner:
    return retention.Pruner(directory, policy, interval, suffixes=SUFFIXES)


def list_recordings(directory: Path) -> list[recordings.RecordingInfo]:
    return recordings.list_recordings(directory, KINDS)


def plant(directory: Path, name: str, *, days_old: float, size: int = 1000,
          domain: str = UUID, now: float = NOW) -> Path:
    """A finished recording file last written *days_old* days before *now*."""
    path = directory / domain / name
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"version": 2, "width": 80, "height": 24, "timestamp": int(now)})
    path.write_text(header + "\n" + "x" * max(0, size - len(header) - 1))
    moment = now - days_old * DAY
    os.utime(path, (moment, moment))
    return path


def names(paths: Iterator[Path] | list[Path]) -> list[str]:
    return sorted(p.name for p in paths)


def test_age_deletes_files_last_written_before_keep_days(tmp_path: Path) -> None:
    old = plant(tmp_path, "a-001.cast", days_old=31)
    older = plant(tmp_path, "b-001.cast", days_old=400, domain=OTHER)
    young = plant(tmp_path, "c-001.cast", days_old=29)
    vnc = plant(tmp_path, "d-001.rfb.jsonl", days_old=35)  # every kind's, one policy
    other = plant(tmp_path, "notes.txt", days_old=400)
    new = plant(tmp_path, "e-001.rfb.jsonl.new", days_old=400)  # not a recording (yet)
    result = prune(tmp_path, Policy(keep_days=30), now=NOW)
    assert [d.path for d in result.deleted] == [older, vnc, old]  # oldest first
    assert {d.reason for d in result.deleted} == {"age"}
    assert result.freed == 3000 and result.kept == 1 and result.kept_bytes == 1000
    assert not old.exists() and not older.exists() and young.exists() and other.exists()
    assert not vnc.exists() and new.exists()
    assert result.errors == [] and not result.dry_run


def test_total_deletes_the_oldest_files_until_under_the_limit(tmp_path: Path) -> None:
    files = [plant(tmp_path, f"{i}-001.cast", days_old=10 - i, size=1000) for i in range(5)]
    result = prune(tmp_path, Policy(max_total=2500), now=NOW)
    assert [d.path for d in result.deleted] == files[:3]
    assert {d.reason for d in result.deleted} == {"total"}
    assert result.kept == 2 and result.kept_bytes == 2000 and not result.over_limit
    assert names(tmp_path.glob("*/*.cast")) == ["3-001.cast", "4-001.cast"]


def test_age_then_total(tmp_path: Path) -> None:
    plant(tmp_path, "old.cast", days_old=8, size=500)
    plant(tmp_path, "mid.cast", days_old=3, size=3000)
    plant(tmp_path, "new.cast", days_old=1, size=3000)
    result = prune(tmp_path, Policy(keep_days=7, max_total=4000), now=NOW)
    assert [(d.path.name, d.reason) for d in result.deleted] == [
        ("old.cast", "age"), ("mid.cast", "total")
    ]
    assert names(tmp_path.glob("*/*")) == ["new.cast"]


def test_a_dry_run_reports_the_same_and_deletes_nothing(tmp_path: Path) -> None:
    for i in range(4):
        plant(tmp_path, f"{i}.cast", days_old=40 - i * 10)
    dry = prune(tmp_path, Policy(keep_days=25, max_total=1500), dry_run=True, now=NOW)
    assert dry.dry_run and len(list(tmp_path.glob("*/*.cast"))) == 4
    real = prune(tmp_path, Policy(keep_days=25, max_total=1500), now=NOW)
    assert [(d.path, d.reason) for d in dry.deleted] == [(d.path, d.reason) for d in real.deleted]
    assert [d.reason for d in real.deleted] == ["age", "age", "total"]
    assert (dry.kept, dry.kept_bytes) == (real.kept, real.kept_bytes) == (1, 1000)


def test_no_policy_deletes_nothing(tmp_path: Path) -> None:
    plant(tmp_path, "a.cast", days_old=10_000)
    assert prune(tmp_path, Policy(), now=NOW).deleted == []
    assert (tmp_path / UUID / "a.cast").exists()
    assert prune(tmp_path / "missing", Policy(keep_days=1)).errors == []


def test_the_part_being_written_is_kept(tmp_path: Path) -> None:
    old = plant(tmp_path, "old.cast", days_old=100, size=5000)
    rec = Recording(tmp_path, domain_uuid=UUID, domain_name="web1", max_size=4096)
    rec.output(b"x" * 5000)
    rec.output(b"y")  # the first part is full: the second is being written
    first, current = rec.paths
    assert not (tmp_path / UUID / (current.name + ".new")).exists()
    for path in (first, current):
        os.utime(path, (NOW - 100 * DAY, NOW - 100 * DAY))  # an idle console: an old mtime
    result = prune(tmp_path, Policy(keep_days=1, max_total=10), now=NOW)
    assert sorted(d.path for d in result.deleted) == sorted([old, first])
    assert current.exists() and result.in_use == [current] and result.kept == 1
    assert result.over_limit  # what is being written takes more than max_total
    listed = list_recordings(tmp_path)
    assert [(r.path, r.live) for r in listed] == [(current, True)]
    rec.close()
    assert not list_recordings(tmp_path)[0].live
    assert [d.path for d in prune(tmp_path, Policy(keep_days=1), now=NOW).deleted] == [current]


def test_a_part_another_process_writes_is_kept(tmp_path: Path) -> None:
    path = plant(tmp_path, "other.cast", days_old=50)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "held\n"
        result = prune(tmp_path, Policy(keep_days=1), now=NOW)
        assert result.deleted == [] and result.in_use == [path] and path.exists()
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(10)
        assert writer.stdout is not None
        writer.stdout.close()
    assert [d.path for d in prune(tmp_path, Policy(keep_days=1), now=NOW).deleted] == [path]


def test_symbolic_links_are_not_followed_out_of_the_directory(tmp_path: Path) -> None:
    recordings, outside = tmp_path / "recordings", tmp_path / "outside"
    target = plant(outside, "precious.cast", days_old=100)
    (recordings / OTHER).mkdir(parents=True)
    (recordings / "linked").symlink_to(outside / UUID)  # a subdirectory that is a link
    link = recordings / OTHER / "link.cast"
    link.symlink_to(target)  # a file that is a link
    mine = plant(recordings, "mine.cast", days_old=100)
    result = prune(recordings, Policy(keep_days=1, max_total=1), now=NOW)
    assert [d.path for d in result.deleted] == [mine]
    assert target.exists() and link.is_symlink() and result.kept == 0
    assert [r.path for r in list_recordings(recordings)] == []


def test_an_error_on_one_file_does_not_stop_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = plant(tmp_path, "stuck.cast", days_old=10)
    other = plant(tmp_path, "other.cast", days_old=9, domain=OTHER)
    unlink = os.unlink

    def refuse(name: str, *, dir_fd: int | None = None) -> None:
        if name == stuck.name:
            raise PermissionError(13, "Permission denied", name)
        unlink(name, dir_fd=dir_fd)

    monkeypatch.setattr(retention.os, "unlink", refuse)
    result = prune(tmp_path, Policy(keep_days=1), now=NOW)
    assert [d.path for d in result.deleted] == [other] and not other.exists()
    assert result.errors == [(stuck, "Permission denied")] and stuck.exists()
    assert result.kept == 1


def test_files_another_pass_deletes_meanwhile_are_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes at once (the broker's, and ``recordings --prune`` by hand): a file the
    other deletes between this pass' listing and its look at the file is gone, not an
    error (the command would exit 1 for it)."""
    raced = plant(tmp_path, "raced.cast", days_old=10)
    old = plant(tmp_path, "old.cast", days_old=10, domain=OTHER)
    kept = plant(tmp_path, "kept.cast", days_old=0, size=10)
    scandir = os.scandir

    class Entry:
        """A directory entry whose file the other pass deletes just before it is looked at."""

        def __init__(self, entry: os.DirEntry[str], parent: int) -> None:
            self._entry, self._parent = entry, parent
            self.name = entry.name

        def is_file(self, *, follow_symlinks: bool = True) -> bool:
            return self._entry.is_file(follow_symlinks=follow_symlinks)

        def is_dir(self, *, follow_symlinks: bool = True) -> bool:
            return self._entry.is_dir(follow_symlinks=follow_symlinks)

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.name == raced.name:
                os.unlink(self.name, dir_fd=self._parent)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    class Listing:
        def __init__(self, fd: int) -> None:
            self._fd, self._listing = fd, scandir(fd)

        def __enter__(self) -> list[Entry]:
            return [Entry(entry, self._fd) for entry in self._listing]

        def __exit__(self, *exc: object) -> None:
            self._listing.close()

    monkeypatch.setattr(retention.os, "scandir", Listing)
    result = prune(tmp_path, Policy(keep_days=1), now=NOW)
    assert result.errors == []
    assert [d.path for d in result.deleted] == [old] and not raced.exists()
    assert result.kept == 1 and kept.exists()
    monkeypatch.undo()
    vanished = tmp_path / "gone"
    vanished.mkdir()
    listdir = scandir

    def then_gone(path: int) -> object:
        listing = listdir(path)
        if vanished.exists():  # removed by hand between the listing and its opening
            vanished.rmdir()
        return listing

    monkeypatch.setattr(retention.os, "scandir", then_gone)
    assert prune(tmp_path, Policy(keep_days=1), now=NOW).errors == []


def test_an_unreadable_directory_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = prune(blocker, Policy(keep_days=1))
    assert result.errors == [(blocker, "Not a directory")] and result.deleted == []
    plant(tmp_path / "rec", "a.cast", days_old=5)
    good = plant(tmp_path / "rec", "b.cast", days_old=5, domain=OTHER)
    scandir = os.scandir

    def refuse(path: int) -> object:
        if os.path.basename(os.readlink(f"/proc/self/fd/{path}")) == UUID:
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(retention.os, "scandir", refuse)
    result = prune(tmp_path / "rec", Policy(keep_days=1), now=NOW)
    assert result.errors == [(tmp_path / "rec" / UUID, "Permission denied")]
    assert [d.path for d in result.deleted] == [good]


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_pruner_runs_on_start_on_wake_and_every_interval(tmp_path: Path) -> None:
    plant(tmp_path, "old.cast", days_old=3, now=time.time())
    pruner = Pruner(tmp_path, Policy(keep_days=2), interval=3600)
    with structlog.testing.capture_logs() as logs:
        pruner.start()
        try:
            wait_for(lambda: pruner.passes == 1)
            plant(tmp_path, "older.cast", days_old=5, now=time.time())
            pruner.wake()
            wait_for(lambda: pruner.passes == 2)
        finally:
            pruner.stop(timeout=10)
    pruned = [e for e in logs if e["event"] == "recordings.pruned"]
    assert [(e["trigger"], e["deleted"], e["freed"]) for e in pruned] == [
        ("start", 1, 1000), ("rotation", 1, 1000)
    ]
    assert pruned[0]["dir"] == str(tmp_path) and pruned[0]["errors"] == 0
    quick = Pruner(tmp_path, Policy(keep_days=2), interval=0.05)
    quick.start()
    try:
        wait_for(lambda: quick.passes >= 3)
    finally:
        quick.stop(timeout=10)


def test_the_pruner_logs_errors_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(tmp_path, "a.cast", days_old=5, now=time.time())

    def broken(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(retention.os, "unlink", broken)
    pruner = Pruner(tmp_path, Policy(keep_days=1))
    with structlog.testing.capture_logs() as logs:
        assert pruner.run_pass("start") is not None
    assert [(e["event"], e.get("error")) for e in logs] == [
        ("recordings.prune_failed", "Permission denied"), ("recordings.pruned", None)
    ]
    assert logs[1]["errors"] == 1 and logs[1]["deleted"] == 0


def test_the_broker_prunes_on_start_and_after_a_rotation(tmp_path: Path) -> None:
    """The core runs the pruner while the broker serves (:func:`broker.recordings.retention`,
    every kind's files); a recording moving on to its next part wakes it."""
    config = attrs.evolve(Config(), recordings=attrs.evolve(
        Config().recordings, dir=str(tmp_path), max_total=6000, prune_interval=3600,
    ))
    plant(tmp_path, "old.cast", days_old=1, size=3000, now=time.time())

    async def serving() -> None:
        async with recordings.retention(config, KINDS) as pruner:
            assert pruner is not None and pruner.suffixes == (".cast", ".rfb.jsonl")
            await anyio.to_thread.run_sync(wait_for, lambda: pruner.passes == 1)
            assert (tmp_path / UUID / "old.cast").exists()  # 3000 bytes: nothing to do
            rec = Recording(tmp_path, domain_uuid=UUID, max_size=4096)
            rec.output(b"z" * 4200)
            rec.output(b"z")  # rotated: 3000 + 4300 + a header > 6000
            await anyio.to_thread.run_sync(wait_for, lambda: pruner.passes == 2)
            assert not (tmp_path / UUID / "old.cast").exists()
            assert all(p.exists() for p in rec.paths)
            rec.close()
        assert not pruner.alive  # stopped with the broker
        assert retention.wake_pruners(tmp_path) == 0

    anyio.run(serving)

    async def no_policy() -> None:
        async with recordings.retention(Config(), KINDS) as pruner:
            assert pruner is None  # no policy, no thread
        async with recordings.retention(config, []) as pruner:
            assert pruner is None  # nothing records

    anyio.run(no_policy)


def test_the_configuration_keys(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        "[recordings]\ndir = 'rec'\nkeep_days = 30\nmax_total = 1073741824\n"
        "prune_interval = 600\n"
    )
    loaded = load_config(config, [TABLE])
    assert recordings.policy_of(loaded) == Policy(keep_days=30, max_total=1 << 30)
    assert loaded.recordings.prune_interval == 600.0
    assert loaded.recordings_dir == tmp_path / "rec"  # relative to the file
    assert recordings.policy_of(load_config(None, [TABLE])) == Policy()  # keep everything
    assert load_config(None, []).recordings_dir == Path("/var/lib/console-broker/recordings")
    config.write_text("[recordings]\nkeep_days = -1\n")
    with pytest.raises(ConfigError, match=r"recordings\.keep_days: must be at least 0"):
        load_config(config, [TABLE])
    # serial's keys of before are the core's now: a file still setting one says where
    for old, new in (("recordings_dir", "dir"), ("recordings_keep_days", "keep_days"),
                     ("recordings_max_total", "max_total"),
                     ("recordings_prune_interval", "prune_interval")):
        config.write_text(f"[serial]\n{old} = 1\n")
        with pytest.raises(ConfigError, match=rf"serial\.{old}: unknown key: it is now "
                           rf"recordings\.{new} \(set {new} in the \[recordings\] table\)"):
            load_config(config, [TABLE])


def test_the_prune_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nstate_dir = "state"\n')
    recordings = tmp_path / "state" / "recordings"
    old = plant(recordings, "old.cast", days_old=40, now=time.time())
    plant(recordings, "new.cast", days_old=1, now=time.time())
    args = ["recordings", "--config", str(config), "--prune"]
    assert main(args) == 1
    assert "no retention to apply" in capsys.readouterr().err
    assert main([*args, "--keep-days", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete  " in out and str(old) in out and "age" in out
    assert "would delete 1 file (1000 B)" in out and "kept 1 file " in out and old.exists()
    config.write_text(
        '[broker]\nstate_dir = "state"\n[recordings]\nkeep_days = 30\n'
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("deleted  ") and "deleted 1 file (1000 B)" in out
    assert not old.exists()
    assert main([*args, "--max-total", "1K", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["deleted"] == [] and doc["kept"] == 1 and doc["max_total"] == 1024
    assert main([*args, "--max-total", "100", "--json", "--dry-run"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["reason"] for d in doc["deleted"]] == ["total"] and doc["dry_run"]


def test_the_prune_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["recordings", "--dir", str(blocker), "--prune", "--keep-days", "1"]) == 1
    assert f"cannot prune {blocker}: Not a directory" in capsys.readouterr().err
    assert main(["recordings", "--dir", str(blocker)]) == 1
    assert f"cannot read {blocker}: Not a directory" in capsys.readouterr().err
    assert main(["recordings", "--dir", str(tmp_path), "--prune", "--domain", "web1"]) == 1
    assert "takes no --domain" in capsys.readouterr().err
    assert main(["recordings", "--dir", str(tmp_path), "--prune", "--protocol", "vnc"]) == 1
    assert "or --protocol" in capsys.readouterr().err
    assert main(["recordings", "--dir", str(tmp_path), "--dry-run"]) == 1
    assert "go with --prune" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recordings", "--prune", "--max-total", "lots"])
    assert "not a size in bytes" in capsys.readouterr().err


def test_the_help_explains_pruning() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from broker.cli import main; main()", "recordings", "--help"],
        capture_output=True, text=True, check=True,
    )
    text = " ".join(result.stdout.split())
    for part in ("--prune", "--dry-run", "--keep-days", "--max-total",
                 "recordings.keep_days", "recordings.max_total",
                 "never deleted", "symbolic links are not followed"):
        assert part in text, part
