"""Recording VNC sessions: the RFB stream the browser gets, from the session's first byte.

Theory of operation. With ``vnc.record`` (or the domain in ``vnc.record_domains``)
each VNC session is recorded by a :class:`SessionRecorder` that the session handler
puts between itself and the client (:class:`RecordedClient`): every message the
broker sends the client is recorded as it is sent, from the broker's own
ProtocolVersion on. So the recording holds the handshake as the client saw it,
security type None included, and QEMU's ServerInit: a player needs no password. In
websocket mode it holds QEMU's own handshake, as the browser saw it. What the client
sends is recorded only with ``vnc.record_input`` (keystrokes: passwords typed into
the VM are in it).

The format (docs/vnc.md#recording), JSON lines in the layout every plugin's
recordings share (``{recordings.dir}/{uuid}/{start}-{id}-{part}.rfb.jsonl``):

* line 1, the header: ``{"format": "console-broker-rfb", "version": 1,
  "timestamp": T, "title": ..., "console_broker": {"domain": {...}, "protocol":
  "vnc", "recording": ID, "part": N, "offset": S, "input": bool, ...}}``;
* then one event per message: ``[t, "o", BASE64]`` (to the client), ``[t, "i",
  BASE64]`` (from the client, with ``record_input``), and last ``[t, "e", WHY]``
  (``closed``, ``rotated``, ``failed: ...``). ``t`` is seconds since the session
  started, on one clock across the parts; ``offset`` is when the part starts.

The same information as websockify's recordings (``'{MS{DATA'`` frames in a
``var VNC_frame_data = [...]`` script, which noVNC's tests/playback.js plays), in a
form that is valid while it is written and after a crash, carries its own header,
and records input only when asked.

Parts: past ``vnc.recording_max_size`` bytes a recording goes on in the next part.
An RFB stream is decoded from its start (zlib and tight state, the pixel format), so a
part does not play alone: the page plays a recording's parts in order.

Bounded memory: recording is write-behind. The session queues events (timestamped as
they happen) and a writer task writes them in a worker thread. At most
``vnc.record_buffer`` bytes wait; a session whose next message does not fit waits for
the writer (RFB is pull-based: a slow disk lowers the frame rate, and nothing is
lost). If the writer takes nothing for ``limits.write_timeout`` seconds (a stuck
disk), or a write fails (a full disk), the recording stops: ``vnc.recording_failed``
is logged, an ``e`` event ``failed: ...`` is written if the disk still takes it, and
the session goes on unrecorded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import attrs
import structlog

from broker.api import PartFile, RecordingKind, new_recording_id

from ._config import TABLE

if TYPE_CHECKING:  # the module is light: the plugin's declaration loads it on any install
    from broker.api import ClientChannel, Config, Session

_log = structlog.get_logger("broker_vnc.recording")

FORMAT = "console-broker-rfb"
VERSION = 1
SUFFIX = ".rfb.jsonl"
#: What the core knows of VNC recordings: the playback page plays them, from part 1.
KIND = RecordingKind(
    protocol="vnc",
    suffix=SUFFIX,
    title="RFB (JSON lines)",
    content_type="application/x-ndjson",
    page="playback/",
    parts_play_alone=False,
)


@attrs.frozen
class RecordingSettings:
    """Which VNC sessions are recorded, and how (``[vnc]``, ``[recordings]``, ``[limits]``)."""

    record: bool = False
    record_domains: frozenset[str] = frozenset()
    record_input: bool = False
    directory: Path = Path("recordings")
    max_size: int = 64 * 1024 * 1024
    buffer: int = 8 * 1024 * 1024
    #: Seconds the writer may take nothing before the recording stops.
    stall: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> RecordingSettings:
        vnc = config.table(TABLE)
        return cls(
            record=vnc.record,
            record_domains=frozenset(d.lower() for d in vnc.record_domains),
            record_input=vnc.record_input,
            directory=config.recordings_dir,
            max_size=vnc.recording_max_size,
            buffer=vnc.record_buffer,
            stall=config.limits.write_timeout,
        )

    @property
    def active(self) -> bool:
        return self.record or bool(self.record_domains)

    def records(self, domain_name: str, domain_uuid: str) -> bool:
        """Whether the domain's VNC sessions are recorded."""
        return self.record or bool(
            {domain_name.lower(), domain_uuid.lower()} & self.record_domains
        )


class SessionRecorder:
    """One session's recording: :meth:`output` and :meth:`input` queue events on the
    event loop, a thread of the recording's own writes them in order (:meth:`running`);
    see the module's notes."""

    def __init__(
        self,
        settings: RecordingSettings,
        *,
        domain_uuid: str,
        domain_name: str = "",
        session_id: str = "",
        details: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.domain_uuid = domain_uuid
        self.domain_name = domain_name
        self.session_id = session_id
        self.details = dict(details or {})
        self.id = new_recording_id()
        self.started = clock()
        self._monotonic = monotonic
        self._start = monotonic()
        #: The parts written so far.
        self.paths: list[Path] = []
        #: Why the recording stopped early (None while it goes on, or once closed well).
        self.failed: str | None = None
        #: Events written.
        self.events = 0
        # The event loop's side: events wait in _jobs (bytes counted in _queued) for the
        # writer thread, which takes them in order and says when there is room again.
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._room = anyio.Event()
        self._opened = anyio.Event()
        self._finished = anyio.Event()
        self._token: Any = None
        self._closing = False
        # The writer thread's: the part being written.
        self._file: PartFile | None = None
        self._written = 0

    # --- the session's side (the event loop) ---------------------------------------------

    def _now(self) -> float:
        return round(self._monotonic() - self._start, 6)

    async def output(self, data: bytes) -> None:
        """Record *data*, sent to the client now (waits while the queue is full)."""
        await self._put("o", data)

    async def input(self, data: bytes) -> None:
        """Record *data*, received from the client now, with ``record_input``."""
        if self.settings.record_input:
            await self._put("i", data)

    async def _put(self, kind: str, data: bytes) -> None:
        if self.failed is not None or self._closing or not data:
            return
        moment = self._now()
        while self._backlog() and self._backlog() + len(data) > self.settings.buffer:
            room = self._room
            with anyio.move_on_after(self.settings.stall) as waited:
                await room.wait()
            if waited.cancelled_caught:
                self._fail(f"stalled: the disk took nothing for {self.settings.stall:g} s")
                return
            if self._stopped():
                return
        with self._lock:
            self._queued += len(data)
        self._jobs.put((moment, kind, data))

    def _backlog(self) -> int:
        with self._lock:
            return self._queued

    def _stopped(self) -> bool:
        return self.failed is not None

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            _log.error(
                "vnc.recording_failed", domain=self.domain_uuid, recording=self.id,
                path=str(self.paths[-1]) if self.paths else None, error=why,
            )
        self._room.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SessionRecorder]:
        """The writer thread, while the context lives. The first part is created before
        the session starts (within ``stall``): the recording holds the session from its
        first byte. At its end (the session's, however it ends) what is queued is
        written and the recording closed; the session waits ``stall`` seconds for that
        at most (the thread goes on with it if the disk is that slow)."""
        self._token = anyio.lowlevel.current_token()
        thread = threading.Thread(target=self._run, name="vnc-recording", daemon=True)
        thread.start()
        with anyio.move_on_after(self.settings.stall):
            await self._opened.wait()
        if not self._opened.is_set():
            self._fail(f"stalled: the disk took nothing for {self.settings.stall:g} s")
        try:
            yield self
        finally:
            self._closing = True
            self._jobs.put(_CLOSE)
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.settings.stall):
                    await self._finished.wait()
                if not self._finished.is_set():
                    self._fail(f"stalled: the disk took nothing for {self.settings.stall:g} s")

    def _signal(self, event: anyio.Event) -> None:
        """Set *event* (the loop's) from the writer thread; nothing once the loop is gone."""
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(event.set, token=self._token)

    def _room_now(self) -> None:
        room, self._room = self._room, anyio.Event()
        room.set()

    # --- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        self._guarded(lambda: self._open_part(0.0))
        self._signal(self._opened)
        try:
            while True:
                batch = [self._jobs.get()]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 256:
                        batch.append(self._jobs.get_nowait())
                events = [job for job in batch if job is not _CLOSE]
                if events and self.failed is None:
                    self._guarded(lambda events=events: self._write(events))  # type: ignore[misc]
                size = sum(len(job[2]) for job in events)
                with self._lock:
                    self._queued -= size
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(self._room_now, token=self._token)
                if _CLOSE in batch:
                    self._guarded(self._close)
                    return
        finally:
            self._close_file()
            self._signal(self._finished)

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as exc:
            why = f"failed: {exc.strerror or exc}"
            if self.failed is None:
                self.failed = why
                _log.error(
                    "vnc.recording_failed", domain=self.domain_uuid, recording=self.id,
                    path=str(self.paths[-1]) if self.paths else None,
                    error=exc.strerror or str(exc),
                )
            self._close_file()

    def _open_part(self, offset: float) -> None:
        part = len(self.paths) + 1
        file = PartFile.create(
            self.settings.directory, self.domain_uuid, self.id, self.started, part, SUFFIX
        )
        self._file = file
        self.paths.append(file.path)
        self._written = 0
        title = self.domain_name or self.domain_uuid
        header = {
            "format": FORMAT,
            "version": VERSION,
            "timestamp": int(self.started + offset),
            "title": f"{title} (VNC)",
            "console_broker": {
                "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
                "protocol": "vnc",
                "device": None,
                "recording": self.id,
                "part": part,
                "offset": offset,
                "input": self.settings.record_input,
                "session": self.session_id,
                **self.details,
            },
        }
        self._line(json.dumps(header))
        file.flush()
        _log.info("vnc.recording", domain=self.domain_uuid, recording=self.id,
                  path=str(file.path), part=part)

    def _line(self, text: str) -> None:
        assert self._file is not None
        data = text.encode() + b"\n"
        self._file.write(data)
        self._written += len(data)

    def _write(self, batch: list[tuple[float, str, bytes]]) -> None:
        for moment, kind, data in batch:
            if self._file is None:
                return
            if self._written >= self.settings.max_size:
                self._line(json.dumps([moment, "e", "rotated"]))
                self._close_file()
                self._open_part(moment)
            encoded = base64.b64encode(data).decode()
            self._line(f'[{json.dumps(moment)}, "{kind}", "{encoded}"]')
            self.events += 1
        if self._file is not None:
            self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._line(json.dumps([self._now(), "e", self.failed or "closed"]))
            self._file.flush()
        self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


#: A job of the writer thread: an event (when, kind, bytes), or the end.
_Job = tuple[float, str, bytes]
_CLOSE: Any = ("close",)


class RecordedClient:
    """The session's client, recorded: what is sent to it (and, with ``record_input``,
    what it sends) goes to the recorder first. Everything else is the client's."""

    def __init__(self, client: ClientChannel, recorder: SessionRecorder) -> None:
        self._client = client
        self._recorder = recorder

    @property
    def subprotocol(self) -> str | None:
        return self._client.subprotocol

    @property
    def request_headers(self) -> Mapping[str, str]:
        return self._client.request_headers

    async def send(self, data: bytes) -> None:
        await self._recorder.output(data)
        await self._client.send(data)

    async def send_text(self, text: str) -> None:
        await self._client.send_text(text)

    async def receive(self) -> bytes:
        data = await self._client.receive()
        await self._recorder.input(data)
        return data

    async def receive_message(self) -> bytes | str:
        message = await self._client.receive_message()
        if isinstance(message, bytes):
            await self._recorder.input(message)
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def recorder_for(settings: RecordingSettings, session: Session) -> SessionRecorder | None:
    """A recorder for *session* when its domain's VNC sessions are recorded, else None."""
    uuid = session.claims.domain_uuid
    if not settings.records(session.domain_name, uuid):
        return None
    kind = session.endpoint.kind if session.endpoint is not None else None
    return SessionRecorder(
        settings,
        domain_uuid=uuid,
        domain_name=session.domain_name,
        session_id=session.id,
        details={"view_only": session.view_only, "mode": kind},
    )
