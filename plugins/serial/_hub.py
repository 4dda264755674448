"""The fan-out hub: one console stream, any number of clients.

Theory of operation. libvirt lets one stream at a time attach to a console,
so the broker holds one per console (``Protocol.shared_console``) and every
session on that console attaches to the same :class:`Hub`:

* **Output** read from the console is :meth:`Hub.publish`\\ ed: appended to
  the :class:`Scrollback` ring, given to the recorder, and then queued for
  each client (so whatever a client is sent is in the recording first).
  ``publish`` never waits: each client's queue holds at most
  ``client_queue`` bytes of output; a client that falls further behind loses
  the output queued and is marked to *resync*: its next item after the
  control messages queued before is the scrollback, the current screen,
  preceded by a notice. So a slow client costs the others nothing, and its
  memory stays within the bound.
* **Control messages** to a client (``role``, ``clients``, ``pong``,
  ``error``) are state, not a log: at most one of each type (an ``error``:
  of each code) waits in a client's queue, and a newer one replaces it (the
  older leaves the queue, the newer goes to its end). A client that sends
  ``ping``\\ s, or makes the others send ``clients``, and never reads holds
  no more than that (:data:`CONTROL_KINDS` messages), however many it asks
  for.
* **Reading** is done by the sessions themselves, one at a time: each runs a
  reader that takes :attr:`Hub.read_lock`, reads one chunk and publishes it.
  Whichever sessions remain keep reading when one leaves; no task outlives
  its session. The console is read as fast as the *fastest* client takes the
  output (:meth:`Hub.room`): a lone client loses nothing, and the guest's
  output waits (in libvirt, then in the guest) when every client is behind.
* **Input**: one client at a time is the *writer*. A client with a full token
  becomes the writer when it attaches or types while nobody is; another full
  client takes the role over explicitly (:meth:`Hub.takeover`), and the
  previous writer is told. View-only clients never write. Input of anyone
  else is dropped, and the client is told once.
* **Attaching** queues, in order: the ``hello`` control message (framed
  clients), the scrollback, then live output. **Detaching** the last client
  closes the hub (the recorder with it); the broker closes the console stream
  when the last session has ended.

Clients come in two kinds: *framed* ones speak the control protocol
(:mod:`broker_serial._control`: binary frames are terminal bytes, text frames
JSON control messages) and are sent control messages; *raw* ones (xterm.js'
attach addon, websocat) get terminal bytes only, and notices as terminal
text. Everything here runs on the event loop's thread; nothing blocks.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio
import attrs

from . import _control as control

#: Room in a client's queue beyond the scrollback it is sent on attach.
MIN_QUEUE = 4096
#: RIS (reset to initial state): sent to a raw client before it is given the screen again.
RESET = b"\x1bc"
#: Output reads smaller than this are copied onto the end of a client's queue (one buffer
#: per run of output) instead of being queued one by one: an emulated UART is read a byte
#: or two at a time, and a queue of such pieces would cost many times its bytes.
MERGE = 4096
#: The kinds of control message that may wait in a client's queue at once, one of each:
#: ``hello``, ``role``, ``clients``, ``pong``, and ``error`` once per code (``not_writer``,
#: ``view_only``, ``bad_message``, ``unknown_type``).
CONTROL_KINDS = 8


def notice(text: str) -> bytes:
    """A notice for a raw client, as terminal text on a line of its own."""
    return f"\r\n[console-broker: {text}]\r\n".encode()


#: What terminals send on their own in answer to the guest's queries: cursor position
#: (CSI row;col R), status (CSI 0 n), device attributes (CSI ? ... c, CSI > ... c),
#: mode reports (CSI ? ... $ y), window reports (CSI ... t), colours (OSC ... BEL/ST).
_REPORTS = re.compile(
    rb"(?:\x1b\[[?>]?[0-9;]*\$?[Rncyt]|\x1b\][0-9]+;[^\x07\x1b]{0,256}(?:\x07|\x1b\\))+"
)


def is_report(data: bytes) -> bool:
    """Whether *data* is only a terminal's automatic answers to the guest's queries."""
    return _REPORTS.fullmatch(data) is not None


class Role(enum.StrEnum):
    WRITER = "writer"
    WATCHER = "watcher"


class Recorder(Protocol):
    """What the hub records to (:class:`broker_serial._recording.Recording`)."""

    def output(self, data: bytes) -> None: ...
    def input(self, data: bytes) -> None: ...
    def resize(self, cols: int, rows: int) -> None: ...
    def close(self) -> None: ...


class Scrollback:
    """The last *limit* bytes of output, replayed to clients that attach.

    Appends are amortised O(1): the buffer may grow to twice the limit before
    its head is cut. :meth:`snapshot` starts at a line start when older output
    was cut, so a replay does not begin inside a line (or an escape sequence
    or a UTF-8 character, which rarely span lines).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the scrollback limit must not be negative")
        self.limit = limit
        self._buffer = bytearray()
        self._cut = False

    def __len__(self) -> int:
        return min(len(self._buffer), self.limit)

    def append(self, data: bytes) -> None:
        if not self.limit:
            return
        self._buffer += data
        if len(self._buffer) > 2 * self.limit:
            del self._buffer[: len(self._buffer) - self.limit]
            self._cut = True

    def snapshot(self) -> bytes:
        """The replay: at most *limit* bytes, the newest."""
        start = max(0, len(self._buffer) - self.limit)
        if start or self._cut:
            newline = self._buffer.find(b"\n", start)
            if newline != -1:
                start = newline + 1
            else:  # one long line: at least do not begin inside a UTF-8 character
                while start < len(self._buffer) and self._buffer[start] & 0xC0 == 0x80:
                    start += 1
        return bytes(self._buffer[start:])


class _Control:
    """A control message waiting in a client's queue; *key* is its kind (``error:CODE``
    for an error), of which one at most waits."""

    __slots__ = ("key", "text")

    def __init__(self, key: str, text: str) -> None:
        self.key = key
        self.text = text


class _Skip:
    """Where in a client's queue it fell behind: the ``skipped`` notice and the screen are
    sent there."""


_SKIP = _Skip()
_Item = bytes | bytearray | _Control | _Skip


@attrs.define(eq=False)
class Attached:
    """One client attached to a hub, as the hub sees it."""

    #: The token grants input (not view-only).
    full: bool
    #: Speaks the control protocol: gets control messages as text frames.
    framed: bool
    #: For the log (the session's id).
    name: str = ""
    role: Role = Role.WATCHER
    #: Output bytes dropped for this client, over its life.
    skipped: int = 0
    #: How many times it skipped to the scrollback.
    resyncs: int = 0
    _items: deque[_Item] = attrs.field(factory=deque)
    #: Bytes of output in ``_items``.
    _output: int = 0
    #: The control messages in ``_items``, by kind, and their characters.
    _controls: dict[str, _Control] = attrs.field(factory=dict)
    _control_size: int = 0
    #: Waiting for the screen again (a :data:`_SKIP` is in ``_items``).
    _resync: bool = False
    _wakeup: anyio.Event = attrs.field(factory=anyio.Event)
    _told_dropped: bool = False

    @property
    def queued(self) -> int:
        """Bytes of output and characters of control messages waiting to be sent."""
        return self._output + self._control_size

    @property
    def queued_output(self) -> int:
        """Bytes of output waiting to be sent (at most the hub's ``client_queue``)."""
        return self._output

    @property
    def queued_controls(self) -> int:
        """Control messages waiting to be sent (at most :data:`CONTROL_KINDS`)."""
        return len(self._controls)

    @property
    def pending(self) -> bool:
        """Whether something waits to be sent (output, control messages, or the screen
        after a skip)."""
        return bool(self._items)


class Hub:
    """The clients of one console and the state they share.

    *scrollback*: bytes replayed on attach; *client_queue*: the bound on each
    client's queue; *recorder*: where output (and input) is recorded, or None;
    *on_close*: called once when the last client has detached.
    """

    def __init__(
        self,
        *,
        scrollback: int = 65536,
        client_queue: int = 262144,
        recorder: Recorder | None = None,
        on_close: Callable[[Hub], None] | None = None,
        domain_name: str = "",
        domain_uuid: str = "",
        device: str | None = None,
    ) -> None:
        self.scrollback = Scrollback(scrollback)
        #: A client's queue holds at least the screen sent on attach, and some output.
        self.client_queue = max(client_queue, scrollback + MIN_QUEUE)
        self.recorder = recorder
        self.domain_name = domain_name
        self.domain_uuid = domain_uuid
        self.device = device
        self.clients: list[Attached] = []
        self.writer: Attached | None = None
        #: Set when the console ended (or broke): no more output will come.
        self.ended = False
        self.closed = False
        #: Held by the session reading the console; one reader at a time.
        self.read_lock = anyio.Lock()
        #: Held while input is written to the console, so writes never interleave.
        self.write_lock = anyio.Lock()
        self._on_close = on_close
        self._room = anyio.Event()
        #: Terminal size the writer last reported (cols, rows).
        self.size: tuple[int, int] | None = None

    # --- queueing ----------------------------------------------------------------------

    def _queue(self, client: Attached, data: bytes, *, bounded: bool = True) -> None:
        """Queue output (or a raw client's notice); past ``client_queue`` bytes the output
        queued is dropped and the client will be sent the screen instead."""
        if client._resync:
            return  # the screen it will be sent holds this already
        items = client._items
        if bounded and client._output + len(data) > self.client_queue:
            client.skipped += client._output + len(data)
            client.resyncs += 1
            kept = [item for item in items if isinstance(item, _Control)]
            items.clear()
            items.extend(kept)
            client._output = 0
            client._resync = True
            items.append(_SKIP)
        else:
            tail = items[-1] if items else None
            if len(data) < MERGE and isinstance(tail, bytearray):
                tail += data
            else:
                items.append(bytearray(data) if len(data) < MERGE else data)
            client._output += len(data)
        client._wakeup.set()

    def _queue_control(self, client: Attached, key: str, message: str) -> None:
        """Queue a control message of kind *key*, replacing the one of that kind still
        waiting: the older leaves the queue, the newer goes to its end."""
        items = client._items
        older = client._controls.pop(key, None)
        if older is not None:
            client._control_size -= len(older.text)
            at = next(i for i, item in enumerate(items) if item is older)
            del items[at]
            if 0 < at < len(items):  # two runs of output meet: one buffer again
                left, right = items[at - 1], items[at]
                if isinstance(left, bytes | bytearray) and isinstance(right, bytes | bytearray):
                    merged = left if isinstance(left, bytearray) else bytearray(left)
                    merged += right
                    items[at - 1] = merged
                    del items[at]
        entry = _Control(key, message)
        client._controls[key] = entry
        client._control_size += len(message)
        items.append(entry)
        client._wakeup.set()

    def _control(self, client: Attached, key: str, message: str) -> None:
        if client.framed:
            self._queue_control(client, key, message)

    def _tell(self, client: Attached, key: str, message: str, text: str) -> None:
        """A control message to a framed client, a terminal notice to a raw one."""
        if client.framed:
            self._queue_control(client, key, message)
        else:
            self._queue(client, notice(text))

    def _presence(self) -> None:
        for client in self.clients:
            self._control(
                client, "clients", control.clients(len(self.clients), self.writer is not None)
            )

    def _set_writer(self, client: Attached | None) -> None:
        previous = self.writer
        if previous is not None:
            previous.role = Role.WATCHER
            previous._told_dropped = False
        self.writer = client
        if client is not None:
            client.role = Role.WRITER
            client._told_dropped = False

    # --- clients -----------------------------------------------------------------------

    def attach(self, *, full: bool, framed: bool, name: str = "") -> Attached:
        """Add a client: it becomes the writer if it may and nobody is; it is queued
        the hello (framed), the scrollback and from then on every output."""
        if self.closed:
            raise RuntimeError("attach to a closed hub")
        client = Attached(full=full, framed=framed, name=name)
        self.clients.append(client)
        if full and self.writer is None:
            self._set_writer(client)
        screen = self.scrollback.snapshot()
        self._control(
            client,
            "hello",
            control.hello(
                domain_name=self.domain_name,
                domain_uuid=self.domain_uuid,
                device=self.device,
                rights="full" if full else "view",
                role=client.role.value,
                clients=len(self.clients),
                scrollback=len(screen),
                recording=self.recorder is not None,
            ),
        )
        if screen:
            self._queue(client, screen, bounded=False)
        for other in self.clients:
            if other is not client:
                self._control(
                    other, "clients", control.clients(len(self.clients), self.writer is not None)
                )
        return client

    def detach(self, client: Attached) -> None:
        """Remove a client; the last one closes the hub."""
        if client not in self.clients:
            return
        self.clients.remove(client)
        client._wakeup.set()
        self._room.set()
        if self.writer is client:
            self._set_writer(None)
        self._presence()
        if not self.clients:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ended = True
        self._room.set()
        for client in self.clients:
            client._wakeup.set()
        if self.recorder is not None:
            self.recorder.close()
        if self._on_close is not None:
            self._on_close(self)

    # --- the writer role ---------------------------------------------------------------

    def takeover(self, client: Attached) -> bool:
        """*client* asks for the writer role; False (and it is told why) if it may not."""
        if not client.full:
            self._control(
                client, "error:view_only", control.error("view_only", "this token is view-only")
            )
            return False
        previous = self.writer
        if previous is client:
            self._control(client, "role", control.role(Role.WRITER.value, "takeover"))
            return True
        self._set_writer(client)
        if previous is not None:
            self._tell(
                previous,
                "role",
                control.role(Role.WATCHER.value, "taken_over"),
                "another client took over the keyboard; your keys are ignored now",
            )
        self._control(client, "role", control.role(Role.WRITER.value, "takeover"))
        self._presence()
        return True

    def release(self, client: Attached) -> None:
        """The writer gives the role up (anyone with a full token may then claim it)."""
        if self.writer is client:
            self._set_writer(None)
            self._control(client, "role", control.role(Role.WATCHER.value, "released"))
            self._presence()

    def may_write(self, client: Attached, data: bytes = b"") -> bool:
        """Whether *client*'s input *data* goes to the console now. A full client claims
        the role when nobody holds it; anyone else's input is dropped (told once).

        A terminal's automatic answers to the guest's queries (:func:`is_report`:
        cursor position, device attributes) are passed on from the writer only, and
        dropped silently from anyone else: every attached terminal answers, and those
        answers are nobody's typing."""
        if self.writer is client:
            return True
        if is_report(data):
            return False
        if self.writer is None and client.full:
            self._set_writer(client)
            self._control(client, "role", control.role(Role.WRITER.value, "claimed"))
            self._presence()
            return True
        if not client._told_dropped:
            client._told_dropped = True
            if client.full:
                self._tell(
                    client,
                    "error:not_writer",
                    control.error("not_writer", "another client has the keyboard"),
                    "another client has the keyboard; your keys are ignored",
                )
            else:
                self._tell(
                    client,
                    "error:view_only",
                    control.error("view_only", "this token is view-only"),
                    "view only; your keys are ignored",
                )
        return False

    def wrote(self, client: Attached, data: bytes) -> None:
        """Input of the writer reached the console (for the recording)."""
        if self.recorder is not None:
            self.recorder.input(data)

    def resize(self, client: Attached, cols: int, rows: int) -> None:
        """A client's terminal size; the writer's is recorded."""
        if self.writer is client and self.size != (cols, rows):
            self.size = (cols, rows)
            if self.recorder is not None:
                self.recorder.resize(cols, rows)

    def pong(self, client: Attached, data: str | None) -> None:
        self._control(client, "pong", control.pong(data))

    def error(self, client: Attached, code: str, message: str) -> None:
        self._control(client, f"error:{code}", control.error(code, message))

    # --- output ------------------------------------------------------------------------

    def room(self) -> int:
        """Bytes the console may be read now: what the least-behind client's queue has
        room for (the console is read as fast as the fastest client takes it; slower
        ones skip). The whole bound when no client is attached or every one is
        waiting for the screen again."""
        queued = [c._output for c in self.clients if not c._resync]
        return self.client_queue - min(queued, default=0)

    async def wait_for_room(self) -> int:
        """Wait until the least-behind client's queue is at most half full; return
        :meth:`room`. Returns at once once the hub has ended."""
        while not self.ended and self.room() < self.client_queue // 2:
            self._room = anyio.Event()
            await self._room.wait()
        return self.room()

    def publish(self, data: bytes) -> None:
        """Output from the console: to the scrollback, the recorder and every client."""
        if not data or self.closed:
            return
        self.scrollback.append(data)
        if self.recorder is not None:
            self.recorder.output(data)
        for client in self.clients:
            self._queue(client, data)

    def end(self) -> None:
        """The console ended: clients get what is queued, then their sessions end."""
        self.ended = True
        self._room.set()
        for client in self.clients:
            client._wakeup.set()

    async def next_item(self, client: Attached) -> bytes | str | None:
        """The next thing to send *client*: output (bytes) or a control message (str);
        None once the console has ended (or *client* detached) and nothing is left."""
        items = client._items
        while True:
            if not items:
                if self.ended or client not in self.clients:
                    return None
                client._wakeup = anyio.Event()
                await client._wakeup.wait()
                continue
            item = items.popleft()
            if isinstance(item, _Control):
                del client._controls[item.key]
                client._control_size -= len(item.text)
                return item.text
            if isinstance(item, _Skip):
                client._resync = False
                screen = self.scrollback.snapshot()
                if not client.framed:
                    return RESET + notice("output skipped: this client fell behind") + screen
                if screen:
                    items.appendleft(screen)
                    client._output += len(screen)
                return control.skipped(
                    client.skipped, role=client.role.value, clients=len(self.clients),
                    writer=self.writer is not None, scrollback=len(screen),
                )
            # Output: what is queued next to it goes in the same message.
            parts: list[bytes | bytearray] = [item]
            while items:
                following = items[0]
                if not isinstance(following, bytes | bytearray):
                    break
                parts.append(following)
                items.popleft()
            data = b"".join(parts)
            client._output -= len(data)
            self._room.set()
            return data
