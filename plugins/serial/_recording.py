"""Recording a serial console as asciicast v2 files, and finding them again.

An asciicast v2 file (what ``asciinema play`` plays) is one JSON header
line, ``{"version": 2, "width": W, "height": H, "timestamp": T, ...}``, then
one JSON array per event: ``[seconds since the start, "o", text]`` for
output, ``"i"`` for input, ``"r"`` for a resize (``"COLSxROWS"``).

A :class:`Recording` follows one console for as long as a client is attached
to it. Output is decoded as UTF-8 incrementally (a character split between
two reads stays whole; invalid bytes become U+FFFD). Past ``max_size`` bytes
the file is closed and the recording goes on in a new part, a file with its
own header and clock, so each part plays alone. Files are created 0600 in a
0700 directory per domain UUID: ``{dir}/{uuid}/{start}-{id}-{part}.cast``.
The part being written is held (:func:`broker_serial._retention.hold`) so
that retention never deletes it; it is created as ``....cast.new`` and
renamed once held.

Writes are small appends on the event loop's thread; a recording that cannot
be written (a full disk) logs ``serial.recording_failed`` once and stops,
and the console goes on.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs
import structlog

from ._retention import hold, is_being_written

_log = structlog.get_logger("broker_serial.recording")
#: The header key holding console-broker's own facts (players ignore it).
META = "console_broker"
#: Longest header line read when listing.
_MAX_HEADER = 65536
_TAIL = 8192


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y%m%dT%H%M%SZ")


class Recording:
    """An asciicast v2 recording of one console, in parts of at most *max_size* bytes."""

    def __init__(
        self,
        directory: Path,
        *,
        domain_uuid: str,
        domain_name: str = "",
        device: str | None = None,
        record_input: bool = False,
        max_size: int = 10 * 1024 * 1024,
        size: tuple[int, int] = (80, 24),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_rotate: Callable[[Path], None] | None = None,
    ) -> None:
        self.directory = directory / domain_uuid
        self.domain_uuid = domain_uuid
        self.domain_name = domain_name
        self.device = device
        self.record_input = record_input
        self.max_size = max_size
        self.size = size
        self.id = secrets.token_hex(4)
        self.started = clock()
        self.paths: list[Path] = []
        self.failed = False
        self._clock = clock
        self._monotonic = monotonic
        self._on_rotate = on_rotate
        self._file: IO[str] | None = None
        self._release: Callable[[], None] | None = None
        self._written = 0
        self._part_start = 0.0
        self._decoders = {
            kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in "oi"
        }
        self._guard(self._open_part)

    @property
    def path(self) -> Path | None:
        """The file being written (None when failed or closed)."""
        return self.paths[-1] if self._file is not None else None

    def _guard(self, action: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            action()
        except OSError as exc:
            self.failed = True
            _log.error(
                "serial.recording_failed",
                domain=self.domain_uuid,
                path=str(self.paths[-1]) if self.paths else str(self.directory),
                error=exc.strerror or str(exc),
            )
            self._close_file()

    def _open_part(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = self._clock()
        part = len(self.paths) + 1
        path = self.directory / f"{_stamp(self.started)}-{self.id}-{part:03d}.cast"
        new = path.with_name(path.name + ".new")  # not *.cast: unseen by retention till held
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            self._release = hold(fd)
            os.rename(new, path)
        except OSError:
            os.close(fd)
            self._unhold()
            with contextlib.suppress(OSError):
                os.unlink(new)
            raise
        self._file = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self.paths.append(path)
        self._part_start = self._monotonic()
        self._written = 0
        title = " ".join(filter(None, [self.domain_name or self.domain_uuid, self.device]))
        header = {
            "version": 2,
            "width": self.size[0],
            "height": self.size[1],
            "timestamp": int(now),
            "title": f"{title} (serial console)",
            META: {
                "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
                "device": self.device,
                "recording": self.id,
                "part": part,
                "input": self.record_input,
            },
        }
        self._line(json.dumps(header, ensure_ascii=False))
        _log.info("serial.recording", domain=self.domain_uuid, path=str(path), part=part)

    def _line(self, text: str) -> None:
        assert self._file is not None
        data = text + "\n"
        self._file.write(data)
        self._file.flush()
        self._written += len(data.encode())

    def _event(self, kind: str, data: str) -> None:
        if self._file is None:
            return
        if self._written >= self.max_size:
            self._close_file()
            self._open_part()
            if self._on_rotate is not None:
                self._on_rotate(self.paths[-2])
        elapsed = round(self._monotonic() - self._part_start, 6)
        self._line(json.dumps([elapsed, kind, data], ensure_ascii=False))

    def output(self, data: bytes) -> None:
        text = self._decoders["o"].decode(data)
        if text:
            self._guard(lambda: self._event("o", text))

    def input(self, data: bytes) -> None:
        if not self.record_input:
            return
        text = self._decoders["i"].decode(data)
        if text:
            self._guard(lambda: self._event("i", text))

    def resize(self, cols: int, rows: int) -> None:
        self.size = (cols, rows)
        self._guard(lambda: self._event("r", f"{cols}x{rows}"))

    def _unhold(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        self._unhold()

    def close(self) -> None:
        for kind, decoder in self._decoders.items():
            rest = decoder.decode(b"", final=True)
            if rest and (kind == "o" or self.record_input):
                self._guard(functools.partial(self._event, kind, rest))
        self._close_file()


# --- listing ----------------------------------------------------------------------------


@attrs.frozen
class RecordingFile:
    """One part of a recording, as ``console-broker recordings`` lists it."""

    path: Path
    domain_uuid: str
    domain_name: str
    device: str | None
    recording: str
    part: int
    started: int
    width: int
    height: int
    size: int
    #: Seconds from the part's start to its last event.
    duration: float
    input: bool
    #: Whether some process is writing this part right now (retention keeps it).
    live: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
            "device": self.device,
            "recording": self.recording,
            "part": self.part,
            "started": datetime.fromtimestamp(self.started, UTC).isoformat().replace(
                "+00:00", "Z"
            ),
            "width": self.width,
            "height": self.height,
            "size": self.size,
            "duration": self.duration,
            "input": self.input,
            "live": self.live,
        }


def _last_time(handle: IO[bytes], size: int) -> float:
    handle.seek(max(0, size - _TAIL))
    lines = handle.read(_TAIL).splitlines()
    for line in reversed(lines[1:] if size > _TAIL else lines):
        with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
            event = json.loads(line)
            if isinstance(event, list):
                return float(event[0])
    return 0.0


def read_recording(path: Path) -> RecordingFile | None:
    """What *path*'s header says, or None if it is not a console-broker recording."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(_MAX_HEADER)
            size = os.fstat(handle.fileno()).st_size
            header = json.loads(first)
            meta = header.get(META) or {}
            domain = meta.get("domain") or {}
            return RecordingFile(
                path=path,
                domain_uuid=str(domain.get("uuid") or path.parent.name),
                domain_name=str(domain.get("name") or ""),
                device=meta.get("device"),
                recording=str(meta.get("recording") or ""),
                part=int(meta.get("part") or 1),
                started=int(header["timestamp"]),
                width=int(header["width"]),
                height=int(header["height"]),
                size=size,
                duration=_last_time(handle, size),
                input=bool(meta.get("input")),
                live=is_being_written(path),
            )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _files(directory: Path) -> Iterator[Path]:
    if not directory.exists():
        return  # nothing recorded yet; anything else that is no directory raises
    for sub in directory.iterdir():  # symbolic links are not followed out of the directory
        if not sub.is_symlink() and sub.is_dir():
            yield from (path for path in sub.glob("*.cast") if not path.is_symlink())


def list_recordings(directory: Path, domain: str | None = None) -> list[RecordingFile]:
    """The recordings under *directory*, oldest first; *domain*: a name or UUID."""
    wanted = domain.lower() if domain is not None else None
    found = []
    for path in _files(directory):
        info = read_recording(path)
        if info is None:
            continue
        names = (info.domain_uuid.lower(), info.domain_name.lower())
        if wanted is not None and wanted not in names:
            continue
        found.append(info)
    return sorted(found, key=lambda r: (r.started, r.recording, r.part, str(r.path)))
