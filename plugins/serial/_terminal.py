"""The serial console in a terminal: what ``console-broker open`` does for ``serial``.

Theory of operation. ``console-broker open URL`` hands the protocol a native client
(``broker.api.NativeClient``); :func:`open_serial` then either attaches the terminal it
runs in (:func:`attach`) or, with ``--listen``, serves the console on a local TCP port
(:func:`serve_port`). Both speak the framed protocol of docs/serial.md: binary frames are
terminal bytes both ways, text frames JSON control messages.

* **The terminal.** When standard input is a terminal it is put in raw mode (no echo,
  no line editing, no signals from Ctrl+C or Ctrl+Z: every key goes to the guest) and
  restored however the attachment ends: a detach, the broker closing the session, an
  exception, SIGTERM or SIGHUP (:class:`Terminal`). ``Ctrl+]`` (:data:`DETACH`)
  detaches. The window size goes to the broker as a ``resize`` at the start and on
  SIGWINCH, so recordings keep it.
* **The user is told** what the broker says about roles (:class:`Attachment`, which is
  sans-I/O: it reads control messages and keys, and answers status lines and whether
  the keys go out): status lines on the standard error, ``[console-broker] ...``, with
  the page's words. A watcher's keys are not sent (the broker would drop them): the
  user is told once per change of role. ``--take`` sends ``takeover`` at once.
* **Pipe mode.** Standard input that is no terminal (a pipe, a file) is sent as it is,
  with no detach key and no window size; at its end the attachment waits until the
  console has been quiet for :data:`QUIET` seconds, so the answer to the last command
  is printed, and detaches.
* **--listen.** No terminal: the console is a local TCP port, raw bytes both ways, one
  TCP client at a time; the WebSocket session (a token is used once) lives as long as
  the command, and the next TCP client finds the console as the previous one left it
  (with the output that came meanwhile). Status lines are the command's own
  (``console-broker: ...``, ``NativeClient.status``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import stat
import termios
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
from websockets.exceptions import ConnectionClosed

from ._control import MAX_SIZE, SUBPROTOCOL
from ._hub import is_report

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from broker.api import LocalListener, NativeClient

#: The key that detaches: Ctrl+] (GS), as telnet and ``virsh console`` have it.
DETACH = b"\x1d"
#: What status lines start with.
PREFIX = "[console-broker]"
#: Seconds the console must be quiet after the end of piped input before detaching.
QUIET = 1.0
#: Bytes read from the terminal (or a TCP client) at once.
READ_SIZE = 65536
#: The hint on taking the keyboard over: it is done when attaching.
TAKE_HINT = "(--take to take the keyboard)"

WATCHING = f"you are watching: another client is typing {TAKE_HINT}"
WRITER = "you have the keyboard"
VIEW_ONLY = "view only: your keys are not sent"
NOT_WRITER = f"another client has the keyboard: your keys are not sent {TAKE_HINT}"
TAKEN_OVER = "another client took the keyboard over: your keys are not sent now"
FREE = "the keyboard is free: type to take it"
CANNOT_TAKE = "view only: this token cannot take the keyboard"
SKIPPED = "this terminal fell behind the console: the screen was sent again"


def takeover() -> str:
    """The ``takeover`` control message."""
    return json.dumps({"type": "takeover"})


def resize(cols: int, rows: int) -> str:
    """The ``resize`` control message (sizes kept within what the broker accepts)."""
    cols, rows = (min(max(1, n), MAX_SIZE) for n in (cols, rows))
    return json.dumps({"type": "resize", "cols": cols, "rows": rows})


@attrs.define
class Attachment:
    """What a terminal user is told and which keys go out (sans-I/O).

    *take*: ``--take`` was asked for (:meth:`start` sends ``takeover``); *framed*: the
    broker chose the framed subprotocol (a raw session has no control messages: every
    key goes out); *detach_hint*: said in the first line (empty in pipe mode).
    """

    take: bool = False
    framed: bool = True
    detach_hint: str = "Ctrl+] detaches"
    #: ``full`` or ``view`` once the ``hello`` came; None before.
    rights: str | None = None
    #: ``writer`` or ``watcher`` once the ``hello`` came; None before.
    role: str | None = None
    #: Whether some client (this one or another) has the keyboard.
    writer: bool = False
    #: A ``takeover`` was sent and not answered yet.
    taking: bool = False
    #: The user was told that keys are not sent (once per change of role).
    told: bool = False

    def start(self) -> list[str]:
        """The control messages to send once connected."""
        if self.take and self.framed:
            self.taking = True
            return [takeover()]
        return []

    def control(self, text: str) -> list[str]:
        """A control message from the broker: the status lines to show."""
        try:
            doc: Any = json.loads(text)
        except ValueError:
            return []
        if not isinstance(doc, dict):
            return []
        kind = doc.get("type")
        if kind == "hello":
            return self._hello(doc)
        if kind == "role":
            return self._role(str(doc.get("role")), str(doc.get("reason")))
        if kind == "clients":
            return self._writer(bool(doc.get("writer")))
        if kind == "skipped":
            self.role = str(doc.get("role"))
            self._writer(bool(doc.get("writer")))
            return [SKIPPED]
        if kind == "error":
            return self._error(str(doc.get("error")), str(doc.get("message")))
        return []

    def _hello(self, doc: dict[str, Any]) -> list[str]:
        self.rights = str(doc.get("rights"))
        self.role = str(doc.get("role"))
        # Attaching makes a full client the writer when nobody is: a full watcher has
        # someone else typing.
        self.writer = self.role == "writer" or self.rights == "full"
        domain = doc.get("domain")
        name = ""
        if isinstance(domain, dict):
            name = str(domain.get("name") or domain.get("uuid") or "")
        where = f"connected to {name or 'the console'}"
        if doc.get("device"):
            where += f" ({doc['device']})"
        if doc.get("recording"):
            where += ", recorded"
        lines = [f"{where}; {self.detach_hint}" if self.detach_hint else where]
        if self.rights == "view":
            if self.taking:  # the broker's refusal follows; it was said here
                lines.append(CANNOT_TAKE)
            lines.append(VIEW_ONLY)
        elif self.role == "writer":
            self.taking = False
            lines.append(WRITER)
        elif not self.taking:
            lines.append(WATCHING)
        return lines

    def _role(self, role: str, reason: str) -> list[str]:
        previous, self.role = self.role, role
        self.told = False
        if role == "writer":
            self.taking = False
            self.writer = True
            return [WRITER] if previous != "writer" or reason == "takeover" else []
        if reason == "taken_over":
            self.writer = True
            return [TAKEN_OVER]
        if reason == "released":
            self.writer = False
            return ["you gave the keyboard up"]
        return []

    def _writer(self, writer: bool) -> list[str]:
        changed, self.writer = writer != self.writer, writer
        if not changed or self.role != "watcher" or self.rights != "full" or self.taking:
            return []
        self.told = False
        return [WATCHING] if writer else [FREE]

    def _error(self, code: str, message: str) -> list[str]:
        if code == "view_only" and self.taking:
            self.taking = False
            return [] if self.rights == "view" else [CANNOT_TAKE]
        if code in ("view_only", "not_writer"):
            if self.told:
                return []
            self.told = True
            return [VIEW_ONLY if code == "view_only" else NOT_WRITER]
        return [f"the broker said: {message}"]

    def keys(self, data: bytes) -> tuple[bool, list[str]]:
        """Keys the user typed: whether they go out, and the status lines to show.

        They go out from the writer, before the ``hello`` came, while a ``takeover`` is
        on its way (the broker takes it first), and from a full client while nobody has
        the keyboard (typing claims it). A watcher's are not sent, and the user is told
        once; a terminal's automatic answers to the guest's queries (cursor position
        reports) are dropped silently.
        """
        if not self.framed or self.role is None:
            return True, []
        if self.rights == "full" and (self.role == "writer" or self.taking or not self.writer):
            return True, []
        if is_report(data) or self.told:
            return False, []
        self.told = True
        return False, [VIEW_ONLY if self.rights == "view" else NOT_WRITER]


def split_detach(data: bytes) -> tuple[bytes, bool]:
    """The keys before the detach key, and whether it was pressed (what follows it is
    dropped)."""
    head, found, _ = data.partition(DETACH)
    return head, bool(found)


class Terminal:
    """The standard input, output and error of the command (*stdin*, *stdout*, *stderr*:
    file descriptors): raw mode, the window size, output and status lines."""

    def __init__(self, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        #: Whether standard input is a terminal (else: pipe mode).
        self.tty = os.isatty(stdin)
        self.raw = False
        #: Whether the cursor is at a line start, as far as this program wrote to it.
        self._line_start = True
        #: Whether standard output and error are the same terminal (so a status line
        #: follows the output on the screen).
        self._shared = _same_terminal(stdout, stderr)
        self._pollable = _pollable(stdin)

    @contextlib.contextmanager
    def raw_mode(self) -> Iterator[None]:
        """Raw mode on standard input while the block runs (if it is a terminal), and
        its settings as they were afterwards, however the block ends."""
        if not self.tty:
            yield
            return
        saved = termios.tcgetattr(self.stdin)
        try:
            tty.setraw(self.stdin, termios.TCSANOW)
            self.raw = True
            yield
        finally:
            self.raw = False
            with contextlib.suppress(termios.error, OSError):  # a terminal hung up
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)

    def size(self) -> tuple[int, int] | None:
        """The terminal's (columns, rows), or None (no terminal, or no size)."""
        if not self.tty:
            return None
        try:
            cols, rows = os.get_terminal_size(self.stdin)
        except OSError:
            return None
        return (cols, rows) if cols > 0 and rows > 0 else None

    async def read(self) -> bytes:
        """What standard input has (b"" at its end)."""
        if self._pollable:
            await anyio.wait_readable(self.stdin)
        else:  # a regular file (or /dev/null): reading it does not block
            await anyio.lowlevel.checkpoint()
        try:
            return os.read(self.stdin, READ_SIZE)
        except OSError:  # EIO: the terminal hung up
            return b""

    def output(self, data: bytes) -> None:
        """Console output to standard output, all of it."""
        _write_all(self.stdout, data)
        if data and self._shared:
            self._line_start = data.endswith(b"\n")

    def status(self, text: str) -> None:
        """A status line on standard error, on a line of its own."""
        end = "\r\n" if self.raw else "\n"
        lead = "" if self._line_start or not self._shared else end
        with contextlib.suppress(OSError):  # a terminal that hung up has no reader
            _write_all(self.stderr, f"{lead}{PREFIX} {text}{end}".encode())
        self._line_start = True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _same_terminal(first: int, second: int) -> bool:
    try:
        a, b = os.fstat(first), os.fstat(second)
    except OSError:
        return False
    return os.isatty(first) and os.isatty(second) and a.st_rdev == b.st_rdev


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait for *fd* (not for regular files or /dev/null)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return False
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def _close_reason(ws: ClientConnection) -> str:
    return f"the console closed ({ws.close_code}): {ws.close_reason or 'no reason given'}"


async def attach(
    ws: ClientConnection,
    terminal: Terminal,
    *,
    take: bool = False,
    close_text: Callable[[ClientConnection], str] = _close_reason,
) -> int:
    """Attach *terminal* to the console session *ws* until the user detaches (0), the
    broker closes the session (1, its reason shown) or SIGTERM or SIGHUP ends it (128
    and the signal's number). The terminal is in raw mode meanwhile, if it is one."""
    attachment = Attachment(
        take=take,
        framed=ws.subprotocol == SUBPROTOCOL,
        detach_hint="Ctrl+] detaches" if terminal.tty else "",
    )
    status: list[int] = []
    last_output = anyio.current_time()

    async def from_broker(done: Callable[[int], None]) -> None:
        nonlocal last_output
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, bytes):
                    terminal.output(message)
                    last_output = anyio.current_time()
                elif attachment.framed:
                    for line in attachment.control(message):
                        terminal.status(line)
                else:  # a raw session's text is terminal text
                    terminal.output(message.encode())
        except ConnectionClosed:
            terminal.status(close_text(ws))
            done(1)
        except OSError as exc:  # the output cannot be written (a closed pipe)
            terminal.status(f"cannot write the output: {exc.strerror or exc}")
            done(1)

    async def send(message: bytes | str) -> None:
        with contextlib.suppress(ConnectionClosed):  # from_broker tells why
            await ws.send(message)

    async def from_keyboard(done: Callable[[int], None]) -> None:
        while True:
            data = await terminal.read()
            if not data:
                break
            detach = False
            if terminal.tty:
                data, detach = split_detach(data)
            if data:
                out, lines = attachment.keys(data)
                for line in lines:
                    terminal.status(line)
                if out:
                    await send(data)
            if detach:
                terminal.status("detached")
                done(0)
                return
        if terminal.tty:  # the terminal hung up
            done(128 + signal.SIGHUP)
            return
        while (idle := anyio.current_time() - last_output) < QUIET:
            await anyio.sleep(QUIET - idle)
        terminal.status("end of input: detached")
        done(0)

    async def send_size() -> None:
        size = terminal.size()
        if size is not None and attachment.framed:
            await send(resize(*size))

    async def on_signals(done: Callable[[int], None], signals: AsyncIterator[int]) -> None:
        async for number in signals:
            if number == signal.SIGWINCH:
                await send_size()
            else:
                terminal.status(f"ended by {signal.Signals(number).name}")
                done(128 + number)

    # The signal handlers are in place before raw mode starts and until it has ended: a
    # SIGTERM at any moment in between restores the terminal.
    with (
        anyio.open_signal_receiver(signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP) as signals,
        terminal.raw_mode(),
    ):
        try:
            async with anyio.create_task_group() as group:

                def done(code: int) -> None:
                    if not status:
                        status.append(code)
                    group.cancel_scope.cancel()

                group.start_soon(on_signals, done, signals)
                group.start_soon(from_broker, done)
                for message in attachment.start():
                    await send(message)
                await send_size()
                group.start_soon(from_keyboard, done)
        except BaseExceptionGroup as failed:  # one task's error: raised as it is
            if len(failed.exceptions) == 1:
                raise failed.exceptions[0] from None
            raise
    return status[0] if status else 1


async def open_serial(client: NativeClient) -> int:
    """``console-broker open`` for a serial console URL: this terminal, or ``--listen``."""
    from broker.api import OpenError

    if client.viewer is not None:
        raise OpenError(
            "--viewer: a serial console opens in this terminal, or on a local port with "
            "--listen [HOST:]PORT for a program of your own"
        )
    take = bool(client.options.get("take"))
    if client.listen is not None:
        async with await client.local_listener() as local:
            ws = await client.connect()
            try:
                return await serve_port(ws, local, take=take, status=client.status,
                                        close_text=client.close_text)
            finally:
                await _close(ws)
    terminal = Terminal()
    ws = await client.connect()
    try:
        return await attach(ws, terminal, take=take, close_text=client.close_text)
    finally:
        await _close(ws)


async def _close(ws: ClientConnection) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(Exception):
        await ws.close()


#: Output kept while no TCP client is connected (``--listen``), for the next one.
REPLAY = 65536
#: Seconds a new TCP client waits for the current one to leave (it may be closing).
BUSY_WAIT = 0.5
#: What a second TCP client is told before it is closed (``--listen``).
BUSY = b"[console-broker: another client is connected to this port]\r\n"


class _Replay:
    """Output that came while no TCP client was connected: the latest :data:`REPLAY`
    bytes, from a line start when older output was cut."""

    def __init__(self, limit: int = REPLAY) -> None:
        self.limit = limit
        self.data = bytearray()

    def add(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit:
            del self.data[: len(self.data) - self.limit]
            line = self.data.find(b"\n", 0, 4096)
            if line >= 0:
                del self.data[: line + 1]

    def take(self) -> bytes:
        data = bytes(self.data)
        self.data.clear()
        return data


async def serve_port(
    ws: ClientConnection,
    local: LocalListener,
    *,
    take: bool = False,
    status: Callable[[str], None],
    close_text: Callable[[ClientConnection], str] = _close_reason,
) -> int:
    """``--listen``: the console session *ws* on *local*, raw bytes both ways, one TCP
    client at a time (another is told so and closed), until the broker closes the
    session (1). The session lives as long as the command: output that comes while
    no client is connected is kept (:class:`_Replay`) for the next one. What the
    broker says about roles goes to *status*."""
    attachment = Attachment(take=take, framed=ws.subprotocol == SUBPROTOCOL, detach_hint="")
    replay = _Replay()
    #: The client that has the port, and (once it was sent the output kept) the one
    #: the output goes to: two sends on one stream must not overlap.
    current: anyio.abc.ByteStream | None = None
    live: anyio.abc.ByteStream | None = None
    #: Set when the current client has gone.
    free = anyio.Event()
    result: list[int] = []

    async def from_broker(group: anyio.abc.TaskGroup) -> None:
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    if attachment.framed:
                        for line in attachment.control(message):
                            status(line)
                        continue
                    message = message.encode()
                if live is None:
                    replay.add(message)
                    continue
                try:
                    await live.send(message)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await live.aclose()  # its task sees it closed, and frees the port
        except ConnectionClosed:
            status(close_text(ws))
            result.append(1)
            group.cancel_scope.cancel()

    async def client(stream: anyio.abc.SocketStream) -> None:
        nonlocal current, live, free
        async with stream:
            with anyio.move_on_after(BUSY_WAIT):  # the previous client may be leaving
                while current is not None:
                    await free.wait()
            if current is not None:
                with contextlib.suppress(Exception):
                    await stream.send(BUSY)
                return
            current, free = stream, anyio.Event()
            peer = _peer(stream)
            status(f"{peer} connected")
            try:
                while pending := replay.take():  # output may come while this is sent
                    await stream.send(pending)
                live = stream
                while True:
                    data = await stream.receive(READ_SIZE)
                    out, lines = attachment.keys(data)
                    for line in lines:
                        status(line)
                    if out:
                        with contextlib.suppress(ConnectionClosed):  # from_broker says it
                            await ws.send(data)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                    OSError):
                pass
            finally:
                if current is stream:
                    current = live = None
                    free.set()
            status(f"{peer} disconnected")  # not when the session's end cancelled this

    async with anyio.create_task_group() as group:
        group.start_soon(from_broker, group)
        for message in attachment.start():
            with contextlib.suppress(ConnectionClosed):
                await ws.send(message)
        status(
            f"the console is on {local.address}: raw bytes both ways, one client at a "
            f"time (nc {local.host} {local.port}, socat - TCP:{local.address}); Ctrl+C ends"
        )
        group.start_soon(local.serve, client)
    return result[0] if result else 1


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        address = stream.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610
    except anyio.TypedAttributeLookupError:
        return "a client"
    if isinstance(address, tuple):
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
