"""Recording a serial console as asciicast v2 files.

An asciicast v2 file (what ``asciinema play`` plays) is one JSON header
line, ``{"version": 2, "width": W, "height": H, "timestamp": T, ...}``, then
one JSON array per event: ``[seconds since the start, "o", text]`` for
output, ``"i"`` for input, ``"r"`` for a resize (``"COLSxROWS"``).

A :class:`Recording` follows one console for as long as a client is attached
to it. Output is decoded as UTF-8 incrementally (a character split between
two reads stays whole; invalid bytes become U+FFFD). Past ``max_size`` bytes
the file is closed and the recording goes on in a new part, a file with its
own header and clock, so each part plays alone. The files are in the layout
every plugin's recordings share (``{recordings.dir}/{uuid}/{start}-{id}-{part}.cast``),
created by :class:`broker.api.PartFile` (0600, held while written so that
retention never deletes it); the core lists, prunes and serves them
(:data:`KIND`, docs/recordings.md).

Writes are small appends on the event loop's thread; a recording that cannot
be written (a full disk) logs ``serial.recording_failed`` once and stops,
and the console goes on.
"""

from __future__ import annotations

import codecs
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from broker.api import PartFile, RecordingKind, new_recording_id

_log = structlog.get_logger("broker_serial.recording")
#: The header key holding console-broker's own facts (players ignore it).
META = "console_broker"
SUFFIX = ".cast"
#: What the core knows of serial recordings: asciinema plays a part alone; no page.
KIND = RecordingKind(
    protocol="serial",
    suffix=SUFFIX,
    title="asciicast v2",
    content_type="application/x-asciicast",
)


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
    ) -> None:
        #: The recordings directory (``recordings.dir``).
        self.directory = directory
        self.domain_uuid = domain_uuid
        self.domain_name = domain_name
        self.device = device
        self.record_input = record_input
        self.max_size = max_size
        self.size = size
        self.id = new_recording_id()
        self.started = clock()
        self.paths: list[Path] = []
        self.failed = False
        self._clock = clock
        self._monotonic = monotonic
        self._file: PartFile | None = None
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
                path=str(self.paths[-1]) if self.paths else str(self.directory / self.domain_uuid),
                error=exc.strerror or str(exc),
            )
            self._close_file()

    def _open_part(self) -> None:
        now = self._clock()
        part = len(self.paths) + 1
        self._file = PartFile.create(
            self.directory, self.domain_uuid, self.id, self.started, part, SUFFIX
        )
        path = self._file.path
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
        encoded = data.encode()
        self._file.write(encoded)
        self._file.flush()
        self._written += len(encoded)

    def _event(self, kind: str, data: str) -> None:
        if self._file is None:
            return
        if self._written >= self.max_size:
            self._close_file()
            self._open_part()  # wakes the broker's retention (PartFile)
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

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def close(self) -> None:
        for kind, decoder in self._decoders.items():
            rest = decoder.decode(b"", final=True)
            if rest and (kind == "o" or self.record_input):
                self._guard(functools.partial(self._event, kind, rest))
        self._close_file()
