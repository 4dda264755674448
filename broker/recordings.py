"""Session recordings, shared by every plugin that records: where they go, how their
files are named, created and found, how they are listed, played back and pruned.

Theory of operation. The core names no protocol: a plugin that records its sessions
declares a :class:`RecordingKind` (``console_broker_recording_kinds``): the protocol
whose sessions it records, the files' suffix, their content type and the page that
plays them. Every kind shares:

* **the layout**: ``{recordings.dir}/{domain UUID}/{start}-{id}-{part}{suffix}``, a
  0700 directory per domain and 0600 files, ``start`` the recording's start
  (``20300101T000000Z``), ``id`` the recording's id (hex), ``part`` from ``001``;
* **parts**: a plugin moves a recording on to its next part past a size of its own;
  :class:`PartFile` creates each part (as ``....new``, held, then renamed) so that
  retention never sees one unheld, and wakes this process' pruners for a new part;
* **the header convention**, which the listing reads whatever the format: a part's
  first line is a JSON object with ``timestamp`` (the part's start, seconds since the
  epoch) and a ``console_broker`` object (``domain`` {``name``, ``uuid``}, ``device``,
  ``recording``, ``part``, ``input``, and ``offset``: seconds from the recording's
  start to this part's, 0 when each part has its own clock); optionally ``width`` and
  ``height``. Its last line is a JSON array whose first item is seconds on that clock
  (an asciicast v2 event, a VNC frame), which gives the part's duration;
* **retention** (:mod:`broker.retention`): one policy (``[recordings]``) over every
  kind's files, run by the broker while it serves (:func:`retention`);
* **the listing** (``console-broker recordings``, :func:`list_recordings`), with a
  protocol column;
* **playback**: a token whose ``proto`` is :data:`RECORDING` and whose ``rec`` claim
  names a recording (``console-broker token --recording ID``) fetches it from
  ``GET /recording?token=`` (the index) and ``&part=N`` (a part's bytes), never by a
  path: :func:`find_recording` maps the token's domain and id to files, refusing
  anything else (:data:`RECORDING_ID`, exact names, no symbolic links).

This module imports nothing of the server side: ``console-broker recordings`` and the
plugins' declarations load it on a client-only install too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import attrs

from broker.retention import Policy, Pruner, hold, is_being_written, wake_pruners

if TYPE_CHECKING:
    from broker.config import Config

#: The ``proto`` claim of a recording token: the core's own purpose, no console protocol
#: (no plugin may declare a protocol of this name). Such a token opens no session: it
#: fetches one recording (its ``rec`` claim) through ``GET /recording``.
RECORDING = "recording"
#: A recording's id, as file names and the ``rec`` claim hold it.
RECORDING_ID = re.compile(r"[0-9a-f]{8,32}")
#: The key of a part's header holding console-broker's facts (players ignore it).
META = "console_broker"
#: Parts of one recording at most (the part number has three digits).
MAX_PARTS = 999
_SUFFIX = re.compile(r"(\.[a-z0-9]+)+")
_STAMP = re.compile(r"\d{8}T\d{6}Z")
_MAX_HEADER = 65536
#: How far back from a part's end the start of its last line is looked for.
_MAX_TAIL = 8 * 1024 * 1024
_TAIL_CHUNK = 65536
_LEADING_TIME = re.compile(rb"\[\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*,")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _check_suffix(_instance: object, _attribute: object, value: str) -> None:
    if not _SUFFIX.fullmatch(value) or value.endswith(".new"):
        raise ValueError(f"recording suffix {value!r} must be like '.cast' (lower-case, dotted)")


@attrs.frozen
class RecordingKind:
    """The recordings of one protocol's sessions, as a plugin declares them
    (``console_broker_recording_kinds``).

    The core lists, serves and prunes a kind's files; the plugin writes them (with
    :class:`PartFile`, following the header convention of this module) and plays
    them back (its :attr:`page`).
    """

    #: The protocol whose sessions are recorded: the listing's protocol column, and the
    #: protocol whose page plays them (``/console/{protocol}/{page}``).
    protocol: str
    #: How the files' names end (``.cast``); unique among the kinds.
    suffix: str = attrs.field(validator=_check_suffix)
    #: The format, for people (``asciicast v2``).
    title: str
    #: The ``Content-Type`` a part is served with (``GET /recording?token=...&part=N``).
    content_type: str = "application/octet-stream"
    #: The page that plays a recording, below ``/console/{protocol}/`` (``playback/``);
    #: it gets the token in its query. Empty: no page (the parts are still served).
    page: str = ""
    #: Whether each part plays alone (asciicast: yes; an RFB stream: no, it is decoded
    #: from the session's start, so a recording plays from its first part on).
    parts_play_alone: bool = True


def new_recording_id() -> str:
    """A fresh recording id: 8 random hex digits (recordings are named by domain too)."""
    return secrets.token_hex(4)


def stamp(moment: float) -> str:
    """*moment* as file names hold a recording's start: ``20300101T000000Z``."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y%m%dT%H%M%SZ")


def part_name(started: float, recording: str, part: int, suffix: str) -> str:
    """The file name of *part* of the recording *recording* started at *started*."""
    return f"{stamp(started)}-{recording}-{part:03d}{suffix}"


def _rename_new(new: Path, path: Path) -> None:
    """Rename *new* to *path*, never over an existing file (FileExistsError)."""
    try:
        os.link(new, path)  # fails if path exists: no part is ever replaced
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(17, "File exists", str(path)) from None
        os.rename(new, path)
        return
    os.unlink(new)


class PartFile:
    """One part of a recording being written, opened by :meth:`create`.

    The file is created 0600 (its domain's directory 0700) under a name that does not
    end with the suffix (``....new``), held (:func:`broker.retention.hold`: no pruner,
    in any process, deletes it while it is open) and renamed: so retention never sees
    it unheld. Creating a part after the first wakes this process' pruners of the
    directory (a recording that rotates often cannot outrun the hourly pass).
    :meth:`close` closes and releases it.
    """

    def __init__(self, path: Path, file: IO[bytes], release: Any) -> None:
        #: Where it is.
        self.path = path
        #: The open file (binary, buffered): write, then :meth:`flush`.
        self.file = file
        self._release = release

    @classmethod
    def create(
        cls,
        directory: Path,
        domain_uuid: str,
        recording: str,
        started: float,
        part: int,
        suffix: str,
    ) -> PartFile:
        """Create *part* of *recording* in ``directory/domain_uuid``; OSError if it
        cannot be (and then nothing is left behind)."""
        if not RECORDING_ID.fullmatch(recording) or not 1 <= part <= MAX_PARTS:
            raise ValueError(f"no such recording part: {recording!r} {part}")
        where = directory / domain_uuid
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = where / part_name(started, recording, part, suffix)
        new = path.with_name(path.name + ".new")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        release = None
        try:
            release = hold(fd)
            _rename_new(new, path)
        except OSError:
            os.close(fd)
            if release is not None:
                release()
            with contextlib.suppress(OSError):
                os.unlink(new)
            raise
        if part > 1:
            wake_pruners(directory)
        return cls(path, os.fdopen(fd, "wb"), release)

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        """Close the file (errors ignored: what could be written is) and release it."""
        try:
            with contextlib.suppress(OSError):
                self.file.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


# --- listing ------------------------------------------------------------------------------


@attrs.frozen
class RecordingInfo:
    """One part of a recording, as ``console-broker recordings`` lists it."""

    path: Path
    #: The protocol whose session it recorded (its kind's).
    protocol: str
    #: Its kind's format (``asciicast v2``).
    format: str
    domain_uuid: str
    domain_name: str
    device: str | None
    recording: str
    part: int
    #: The part's start, seconds since the epoch.
    started: int
    size: int
    #: Seconds from the part's start to its last event.
    duration: float
    input: bool
    #: Seconds from the recording's start to this part's (0: the part has its own clock).
    offset: float = 0.0
    width: int | None = None
    height: int | None = None
    #: Whether some process is writing this part right now (retention keeps it).
    live: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "protocol": self.protocol,
            "format": self.format,
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "device": self.device,
            "recording": self.recording,
            "part": self.part,
            "started": iso(self.started),
            "width": self.width,
            "height": self.height,
            "size": self.size,
            "duration": self.duration,
            "offset": self.offset,
            "input": self.input,
            "live": self.live,
        }


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def _last_time(handle: IO[bytes], size: int, header_end: int) -> float:
    """The first item of the part's last line (the start of the line is looked for
    backwards, at most :data:`_MAX_TAIL` bytes; a line cut short by a crash counts)."""
    end = size
    while end > header_end and size - end < _MAX_TAIL:
        start = max(header_end, end - _TAIL_CHUNK)
        handle.seek(start)
        chunk = handle.read(end - start)
        trimmed = chunk.rstrip(b"\n") if end == size else chunk
        newline = trimmed.rfind(b"\n")
        if newline >= 0 or start == header_end:
            line_start = start + newline + 1
            handle.seek(line_start)
            match = _LEADING_TIME.match(handle.read(64))
            return float(match[1]) if match else 0.0
        end = start
    return 0.0


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_part(path: Path, kind: RecordingKind) -> RecordingInfo | None:
    """What *path*'s first and last lines say, or None if it is not a recording part."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return None
            first = handle.readline(_MAX_HEADER)
            header = json.loads(first)
            meta = header.get(META) or {}
            domain = meta.get("domain") or {}
            offset = float(meta.get("offset") or 0.0)
            last = _last_time(handle, info.st_size, len(first))
            return RecordingInfo(
                path=path,
                protocol=kind.protocol,
                format=kind.title,
                domain_uuid=str(domain.get("uuid") or path.parent.name),
                domain_name=str(domain.get("name") or ""),
                device=meta.get("device"),
                recording=str(meta.get("recording") or ""),
                part=int(meta.get("part") or 1),
                started=int(header["timestamp"]),
                size=info.st_size,
                duration=round(max(0.0, last - offset), 6) if last else 0.0,
                input=bool(meta.get("input")),
                offset=offset,
                width=_int_or_none(header.get("width")),
                height=_int_or_none(header.get("height")),
                live=is_being_written(path),
            )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def kind_of(name: str, kinds: Iterable[RecordingKind]) -> RecordingKind | None:
    """The kind whose suffix *name* ends with (the longest suffix that fits)."""
    fitting = [kind for kind in kinds if name.endswith(kind.suffix)]
    return max(fitting, key=lambda kind: len(kind.suffix), default=None)


def _parts(directory: Path, kinds: Sequence[RecordingKind]) -> Iterator[tuple[Path, RecordingKind]]:
    if not directory.exists():
        return  # nothing recorded yet; anything else that is no directory raises
    for sub in directory.iterdir():  # symbolic links are not followed out of the directory
        if sub.is_symlink() or not sub.is_dir():
            continue
        for path in sub.iterdir():
            kind = kind_of(path.name, kinds)
            if kind is not None and not path.is_symlink():
                yield path, kind


def _order(info: RecordingInfo) -> tuple[str, str, int, str]:
    """Oldest recording first (its start, from its parts' file names), its parts in order."""
    head = info.path.name.split("-", 1)[0]
    start = head if _STAMP.fullmatch(head) else stamp(info.started - info.offset)
    return (start, info.recording, info.part, str(info.path))


def list_recordings(
    directory: Path, kinds: Sequence[RecordingKind], domain: str | None = None
) -> list[RecordingInfo]:
    """The parts of every kind's recordings under *directory*, oldest recording first
    (its parts in order); *domain*: a name or UUID."""
    wanted = domain.lower() if domain is not None else None
    found = []
    for path, kind in _parts(directory, kinds):
        info = read_part(path, kind)
        if info is None:
            continue
        if wanted is not None and wanted not in (info.domain_uuid.lower(),
                                                 info.domain_name.lower()):
            continue
        found.append(info)
    return sorted(found, key=_order)


def _named(name: str, recording: str, suffix: str) -> int | None:
    """The part number *name* gives for *recording*, if it is one of its parts exactly."""
    head, _, tail = name.partition(f"-{recording}-")
    if not _STAMP.fullmatch(head) or not tail.endswith(suffix):
        return None
    number = tail[: -len(suffix)]
    if len(number) != 3 or not number.isdigit() or number == "000":
        return None
    return int(number)


def find_recording(
    directory: Path, kinds: Sequence[RecordingKind], domain_uuid: str, recording: str
) -> list[RecordingInfo]:
    """The parts of *recording* of the domain *domain_uuid* (both as a token names them),
    in order; empty if there are none.

    Only ``directory/domain_uuid`` is looked in, for regular files whose names are
    exactly those :func:`part_name` gives for *recording* and a kind's suffix: a
    malformed id or UUID, a symbolic link (the domain's directory or a file), a name
    that merely resembles one, finds nothing.
    """
    if not RECORDING_ID.fullmatch(recording) or not re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", domain_uuid
    ):
        return []
    try:
        top = os.open(directory, _DIR_FLAGS)
    except OSError:
        return []
    try:
        try:
            sub = os.open(domain_uuid, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=top)
        except OSError:
            return []
        try:
            with os.scandir(sub) as entries:
                names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        finally:
            os.close(sub)
    finally:
        os.close(top)
    found = []
    for name in names:
        kind = kind_of(name, kinds)
        if kind is None or _named(name, recording, kind.suffix) is None:
            continue
        info = read_part(directory / domain_uuid / name, kind)
        if info is not None and info.recording == recording:
            found.append(info)
    return sorted(found, key=_order)


def find_recording_anywhere(
    directory: Path, kinds: Sequence[RecordingKind], recording: str
) -> list[RecordingInfo]:
    """The parts of *recording* whatever its domain (``console-broker token
    --recording ID``); one domain's only (the first found) should two share an id."""
    if not RECORDING_ID.fullmatch(recording) or not directory.is_dir():
        return []
    for sub in sorted(directory.iterdir()):
        if sub.is_symlink() or not sub.is_dir():
            continue
        found = find_recording(directory, kinds, sub.name, recording)
        if found:
            return found
    return []


def read_part_bytes(info: RecordingInfo) -> bytes:
    """The whole of a part *info* found (opened without following a link); OSError."""
    fd = os.open(info.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{info.path.name} is no regular file")
        return handle.read()


def recording_index(parts: Sequence[RecordingInfo], kind: RecordingKind) -> dict[str, Any]:
    """What ``GET /recording?token=`` answers: the recording and its parts (no path)."""
    first = parts[0]
    numbers = [info.part for info in parts]
    return {
        "recording": first.recording,
        "protocol": kind.protocol,
        "format": kind.title,
        "domain": {"name": first.domain_name, "uuid": first.domain_uuid},
        "device": first.device,
        "started": iso(first.started - first.offset),
        "input": any(info.input for info in parts),
        "parts_play_alone": kind.parts_play_alone,
        "complete": numbers == list(range(1, len(numbers) + 1)),
        "parts": [
            {
                "part": info.part,
                "size": info.size,
                "offset": info.offset,
                "duration": info.duration,
                "live": info.live,
            }
            for info in parts
        ],
    }


# --- retention while the broker serves ------------------------------------------------------


def policy_of(config: Config) -> Policy:
    """The retention policy of ``[recordings]``."""
    return Policy(config.recordings.keep_days, config.recordings.max_total)


@contextlib.asynccontextmanager
async def retention(
    config: Config, kinds: Sequence[RecordingKind]
) -> AsyncIterator[Pruner | None]:
    """Run the retention while the context lives (a pass now, every
    ``recordings.prune_interval`` seconds, after a recording moves on to its next part),
    in a thread: nothing without a policy or without kinds."""
    policy = policy_of(config)
    if not policy.active or not kinds:
        yield None
        return
    pruner = Pruner(
        config.recordings_dir, policy, config.recordings.prune_interval,
        suffixes=[kind.suffix for kind in kinds],
    )
    pruner.start()
    try:
        yield pruner
    finally:
        with anyio.CancelScope(shield=True):  # a pass under way finishes first
            await anyio.to_thread.run_sync(lambda: pruner.stop(timeout=30))
