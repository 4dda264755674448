"""Worker processes: ``serve --workers N`` (``service.workers``).

Theory of operation. The supervisor (the ``serve`` process) forks N workers. Each is a
whole broker: its own event loop, its own libvirt connection, its own listeners,
bound to the same addresses with ``SO_REUSEPORT`` so that the kernel spreads new
connections over them. What must be one thing across the workers is shared in one of
two ways:

* **In the state directory**: the used tokens (the replay store) and the session counts
  the limits are checked against (global, per domain, per client), in SQLite files
  every worker opens (:mod:`broker.service._sharedstate`); the supervisor clears the
  counts of a worker that died.
* **By routing**: everything about one domain lives in one worker, its *owner*
  (:meth:`WorkerLink.owner`: a hash of the domain's UUID, so every worker agrees
  without asking). A shared serial session, SPICE's channels of one session, a
  graphical console's presence and its one keyboard, the handoff handles a session
  issued: all of it is the owner's. A connection that lands on another worker is
  passed to the owner as soon as its request head has been read, before its token is
  checked: the head names the domain (a token's ``sub``, read without checking the
  signature, which the owner does); a handoff handle names its issuer (a worker
  issues only handles that hash to itself).

Passing a connection. Each worker has an inbox, a ``SOCK_SEQPACKET`` socket pair made by
the supervisor before the workers (so a restarted worker has the same one, and no
other process can reach it): a message is a small JSON header (which listener, the
client's address, the bytes already read) and a file descriptor. A connection in
the clear is passed as it is (its own socket: nothing is copied afterwards); one in
TLS (``[tls]``) cannot be, since its keys live in the receiving worker's TLS layer: the
receiving worker passes one end of a new socket pair and relays the plaintext
between the two (one local copy more, for that connection). A connection the owner
gets is never passed on again.

``/metrics`` answers for every worker: the worker asked collects the others' through
their inboxes (a socket pair each, the text written back) and labels every sample
with ``worker``. The admin socket's session listing and ending ask the same way
(:meth:`WorkerLink.ask_others`, answered by what :meth:`WorkerLink.answer` registered;
:mod:`broker.service._admin`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import attrs
import structlog

from broker.service import _notify as notify

_log = structlog.get_logger("broker.service")

#: Largest inbox message: the header and the bytes read before the connection moved.
MAX_MESSAGE = 1024 * 1024
#: How long a worker waits for room in a busy (or restarting) owner's inbox.
SEND_PATIENCE = 2.0
#: How long the worker answering ``/metrics`` waits for each other worker's.
METRICS_TIMEOUT = 2.0

#: The listeners a connection can be passed from.
HTTP = "http"
CONNECT = "connect"

#: What a worker reports to the supervisor (:meth:`WorkerLink.report`), which tells the
#: service manager for all of them (broker.service._notify).
LISTENING = b"L"
RELOADED = b"R"
RELOAD_FAILED = b"F"
#: How long the supervisor waits for every worker's reload before it says it is done.
RELOAD_PATIENCE = 10.0

_BEARER = re.compile(rb"^authorization:[ \t]*bearer[ \t]+([^\s]+)", re.IGNORECASE | re.MULTILINE)


def owner_index(key: str, count: int) -> int:
    """The worker (0 to *count* - 1) that owns *key* (a domain UUID, a handle)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


def routing_key(token: str) -> str | None:
    """What decides the owner of a request carrying *token*: a handoff handle itself, a
    token's ``sub`` (its domain), read without checking anything; None when it is
    neither (the worker it landed on refuses it, as any would)."""
    if token.startswith("h."):
        return token
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub if isinstance(sub, str) and sub else None


def head_token(head: bytes) -> str | None:
    """The token an HTTP request head carries: its target's ``token`` parameter, else an
    ``Authorization: Bearer`` header; None without one."""
    line, _, rest = head.partition(b"\r\n")
    fields = line.split(b" ")
    if len(fields) == 3:
        query = urlsplit(fields[1].decode("latin-1")).query
        found = parse_qs(query).get("token")
        if found and len(found) == 1:
            return found[0]
    match = _BEARER.search(rest)
    return match.group(1).decode("latin-1") if match else None


@attrs.frozen
class Passed:
    """A connection another worker passed to this one."""

    #: :data:`HTTP` or :data:`CONNECT`.
    listener: str
    #: The client's address (the worker that accepted it saw the TCP peer, a PROXY
    #: header's client, ...).
    peer: tuple[str, int]
    #: The bytes read from the connection before it moved (its request head).
    head: bytes
    #: The connection: its own TCP socket, or a socket pair's end relaying it.
    sock: socket.socket


class WorkerLink:
    """One worker's view of the others: who owns what, and the inboxes.

    Made by the supervisor before forking (every inbox), used in each worker after
    (:meth:`attach` there, on the running loop).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.index = -1
        #: The workers' reports to the supervisor (:meth:`report`): a pipe, read there.
        self.reports, self._reporting = os.pipe()
        os.set_blocking(self.reports, False)
        self._inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                         for _ in range(count)]
        for receiving, sending in self._inboxes:
            for sock in (receiving, sending):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
                # Never a wait inside a call (a default socket timeout would make Python
                # poll before recvmsg whatever MSG_DONTWAIT says): EAGAIN at once.
                sock.setblocking(False)
        self._on_connection: Callable[[Passed], None] | None = None
        self._on_metrics: Callable[[], bytes] | None = None
        #: What answers the other kinds of questions (:meth:`answer`), by kind.
        self._answers: dict[str, Callable[[Mapping[str, Any]], bytes]] = {}
        #: The admin socket the supervisor bound for every worker to accept on
        #: (:mod:`broker.service._admin`), or None.
        self.admin_socket: socket.socket | None = None

    # --- ownership ---------------------------------------------------------------------

    def close(self) -> None:
        """Close every inbox and the reports' pipe (the supervisor, once its workers are
        gone)."""
        for pair in self._inboxes:
            for sock in pair:
                sock.close()
        for fd in (self.reports, self._reporting):
            with contextlib.suppress(OSError):
                os.close(fd)

    def owner(self, key: str) -> int:
        return owner_index(key, self.count)

    def owns(self, key: str) -> bool:
        return self.owner(key) == self.index

    def route(self, token: str | None) -> int | None:
        """The worker a request with *token* belongs to, when not this one; else None."""
        key = routing_key(token) if token else None
        if key is None:
            return None
        owner = self.owner(key)
        return owner if owner != self.index else None

    # --- in a worker -------------------------------------------------------------------

    def become(self, index: int) -> None:
        """This process is worker *index* (just forked)."""
        self.index = index

    def report(self, kind: bytes) -> None:
        """Tell the supervisor *kind* (:data:`LISTENING`, :data:`RELOADED`,
        :data:`RELOAD_FAILED`) happened in this worker (two bytes: atomic in a pipe)."""
        with contextlib.suppress(OSError):
            os.write(self._reporting, kind + bytes([self.index]))

    def attach(
        self, on_connection: Callable[[Passed], None], on_metrics: Callable[[], bytes]
    ) -> Callable[[], None]:
        """Read this worker's inbox on the running loop; returns how to stop."""
        self._on_connection = on_connection
        self._on_metrics = on_metrics
        inbox = self._inboxes[self.index][0]
        loop = asyncio.get_running_loop()
        loop.add_reader(inbox.fileno(), self._read_inbox)

        def stop() -> None:
            loop.remove_reader(inbox.fileno())

        return stop

    def _read_inbox(self) -> None:
        inbox = self._inboxes[self.index][0]
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    inbox, MAX_MESSAGE, 1, socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            if not data or not socks or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for sock in socks:
                    sock.close()
                _log.warning("worker.bad_message", size=len(data), fds=len(fds))
                continue
            try:
                self._deliver(data, socks[0])
            except Exception:  # one bad message must not stop the inbox
                socks[0].close()
                _log.exception("worker.message_failed")

    def _deliver(self, data: bytes, sock: socket.socket) -> None:
        size = int.from_bytes(data[:4], "big")
        meta = json.loads(data[4:4 + size])
        head = data[4 + size:]
        answer = self._answers.get(meta["kind"])
        if answer is not None:
            asyncio.get_running_loop().create_task(_write_and_close(sock, answer(meta)))
            return
        if meta["kind"] == "metrics":
            assert self._on_metrics is not None
            text = self._on_metrics()
            asyncio.get_running_loop().create_task(_write_and_close(sock, text))
            return
        assert self._on_connection is not None
        host, port = meta["peer"]
        sock.setblocking(False)
        self._on_connection(Passed(meta["kind"], (str(host), int(port)), head, sock))

    async def send(self, index: int, meta: Mapping[str, Any], head: bytes, fd: int) -> bool:
        """Put *fd* (with *meta* and *head*) in worker *index*'s inbox; False when it has
        had no room for :data:`SEND_PATIENCE` seconds (or the message is too large)."""
        header = json.dumps(meta).encode()
        data = len(header).to_bytes(4, "big") + header + head
        if len(data) > MAX_MESSAGE:
            return False
        sending = self._inboxes[index][1]
        deadline = time.monotonic() + SEND_PATIENCE
        while True:
            try:
                socket.send_fds(sending, [data], [fd], socket.MSG_DONTWAIT)
                return True
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.01)

    def answer(self, kind: str, handler: Callable[[Mapping[str, Any]], bytes]) -> None:
        """Answer the other workers' questions of *kind* (:meth:`ask_others`) with
        *handler*, given the question's JSON header (``kind`` and what the asker put
        there), on this worker's loop."""
        self._answers[kind] = handler

    async def ask_others(self, question: Mapping[str, Any]) -> dict[int, bytes]:
        """Every other worker's answer to *question* (a JSON header with a ``kind`` some
        :meth:`answer` handles), by index; one that does not answer within
        :data:`METRICS_TIMEOUT` seconds is left out. How ``/metrics`` asks, too."""
        async def one(index: int) -> tuple[int, bytes | None]:
            mine, theirs = socket.socketpair()
            with mine:
                try:
                    sent = await self.send(index, question, b"", theirs.fileno())
                finally:
                    theirs.close()
                if not sent:
                    return index, None
                mine.setblocking(False)
                loop = asyncio.get_running_loop()
                chunks = []
                try:
                    async with asyncio.timeout(METRICS_TIMEOUT):
                        while chunk := await loop.sock_recv(mine, 65536):
                            chunks.append(chunk)
                except (TimeoutError, OSError):
                    return index, None
                return index, b"".join(chunks)

        others = [i for i in range(self.count) if i != self.index]
        found = await asyncio.gather(*(one(i) for i in others))
        return {index: text for index, text in found if text is not None}

    async def collect_metrics(self) -> dict[int, bytes]:
        """Every other worker's metrics text, by index (a worker that does not answer in
        :data:`METRICS_TIMEOUT` seconds is left out)."""
        return await self.ask_others({"kind": "metrics"})


async def _write_and_close(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(sock, data)


# --- /metrics of every worker ----------------------------------------------------------------


def _labelled(line: str, label: str) -> str:
    name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
    if name_end < 0:
        return line
    if line[name_end] == "{":
        rest = line[name_end + 1:]
        joiner = "" if rest.startswith("}") else ","
        return f"{line[:name_end]}{{{label}{joiner}{rest}"
    return f"{line[:name_end]}{{{label}}}{line[name_end:]}"


def merge_metrics(texts: Mapping[int, bytes]) -> bytes:
    """One Prometheus text exposition of several workers' (*texts* by worker index): each
    family once (its ``# HELP`` and ``# TYPE`` from the first worker that has it), with
    every worker's samples labelled ``worker="N"``."""
    comments: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for index in sorted(texts):
        family, first = "", False
        for line in texts[index].decode("utf-8", "replace").splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                if name != family:
                    family, first = name, name not in comments
                    comments.setdefault(family, [])
                    samples.setdefault(family, [])
                if first:
                    comments[family].append(line)
            elif line and not line.startswith("#"):
                comments.setdefault(family, [])
                samples.setdefault(family, []).append(_labelled(line, f'worker="{index}"'))
    out: list[str] = []
    for family, described in comments.items():
        out.extend(described)
        out.extend(samples[family])
    return ("\n".join(out) + "\n").encode()


# --- the supervisor ------------------------------------------------------------------------

#: Seconds a worker must have run for its exit to count as a crash to restart at once;
#: one that dies sooner waits :data:`RESTART_BACKOFF` (doubling, up to a minute).
STEADY = 10.0
#: The exit code of a worker that could not start (its listeners, its configuration):
#: the supervisor stops the others and exits rather than start it again and again.
CANNOT_START = 2
_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = 1.0


@attrs.define
class _Child:
    index: int
    pid: int
    started: float
    backoff: float = RESTART_BACKOFF


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent (the supervisor, *parent*) dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"code": os.waitstatus_to_exitcode(status)}


class Supervisor:
    """Forks the workers, restarts one that dies, passes SIGTERM and SIGINT on to all and
    returns once every worker has exited; passes SIGHUP (reload) on to all.

    *run_worker(link)* runs in each forked worker (``link.index`` set) and returns its
    exit code (:data:`CANNOT_START` when it could not start: then the supervisor stops
    them all); *forget(index)* is called after a worker died, before it is restarted
    (its sessions no longer count).
    """

    def __init__(
        self,
        count: int,
        run_worker: Callable[[WorkerLink], int],
        forget: Callable[[int], None] = lambda index: None,
    ) -> None:
        self.link = WorkerLink(count)
        self._run_worker = run_worker
        self._forget = forget
        self._children: dict[int, _Child] = {}
        self._stopping = 0
        #: True once a worker could not start: the supervisor stops them all, exits 1.
        self._failed = False
        #: Workers to start again, by index: when.
        self._pending: dict[int, float] = {}
        #: The delay before a worker's next restart, should it die young again.
        self._backoffs: dict[int, float] = {}
        #: The workers that reported listening; True once the service manager was told.
        self._listening: set[int] = set()
        self._ready = False
        #: A reload under way: the workers still to report, the results, the deadline.
        self._reloading: set[int] = set()
        self._reload_failed = False
        self._reload_deadline = 0.0

    def _spawn(self, index: int, backoff: float = RESTART_BACKOFF) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                # SIGHUP (a reload) stays blocked until the worker's broker listens for
                # it (broker.service.cli.run_until_signalled): one passed on while the
                # worker starts waits for it instead of ending the worker.
                signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGHUP})
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_DFL)
                # Signals come from the supervisor alone: not a terminal's Ctrl+C to the
                # whole group (the supervisor passes it on), and SIGTERM if it dies.
                os.setpgid(0, 0)
                _die_with_parent(supervisor)
                self.link.become(index)
                notify.forget()  # the supervisor speaks to the service manager
                structlog.contextvars.bind_contextvars(worker=index)
                code = self._run_worker(self.link)
            except BaseException:
                _log.exception("worker.failed", worker=index)
            finally:
                os._exit(code)
        self._children[pid] = _Child(index, pid, time.monotonic(), backoff)
        _log.info("worker.started", worker=index, pid=pid)

    def run(self) -> int:
        watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            for index in range(self.link.count):
                self._spawn(index)
            while self._children or (self._pending and not self._stopping):
                self._restart_due()
                waiting = not self._ready or self._reloading
                info = signal.sigtimedwait(watched, 0.1 if waiting else 0.5)
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self._signal(signal.Signals(info.si_signo))
                elif info is not None and info.si_signo == signal.SIGHUP:
                    self._reload()
                self._reap()
                self._read_reports()
        finally:
            # SIGHUP stays blocked: a late reload must not end the process as it exits.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched - {signal.SIGHUP})
        _log.info("broker.workers_stopped")
        return 1 if self._failed else 0

    def _read_reports(self) -> None:
        """The workers' reports: READY=1 once all listen, READY=1 after a reload once all
        reloaded (or :data:`RELOAD_PATIENCE` passed)."""
        try:
            data = os.read(self.link.reports, 4096)
        except BlockingIOError:
            data = b""
        for at in range(0, len(data) - 1, 2):
            kind, index = data[at:at + 1], data[at + 1]
            if kind == LISTENING:
                self._listening.add(index)
            elif kind in (RELOADED, RELOAD_FAILED):
                self._reloading.discard(index)
                self._reload_failed |= kind == RELOAD_FAILED
        if self._stopping:
            return
        if not self._ready and len(self._listening) >= self.link.count:
            self._ready = True
            notify.ready(f"serving with {self.link.count} workers")
        if self._reload_deadline and (
            not self._reloading or time.monotonic() > self._reload_deadline
        ):
            self._reload_deadline = 0.0
            self._reloading.clear()
            notify.reloaded(not self._reload_failed)

    def _signal(self, signum: signal.Signals) -> None:
        if not self._stopping:
            notify.stopping()
        self._stopping += 1
        self._pending.clear()
        _log.info("broker.signal", signal=signum.name, workers=len(self._children),
                  again=self._stopping > 1)
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    def _reload(self) -> None:
        """SIGHUP: every worker reloads its keys and certificates (each logs
        ``broker.reloaded`` or ``broker.reload_failed``); a worker started later reads
        the files anew anyway. Not a stop: ignored once stopping."""
        if self._stopping:
            return
        _log.info("broker.signal", signal="SIGHUP", workers=len(self._children))
        notify.reloading()
        self._reloading = {child.index for child in self._children.values()}
        self._reload_failed = False
        self._reload_deadline = time.monotonic() + RELOAD_PATIENCE
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._children.clear()
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            self._forget(child.index)
            if self._stopping:
                _log.info("worker.stopped", worker=child.index, pid=pid, **_describe(status))
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == CANNOT_START:
                # It could not start (it logged why): neither could its replacement.
                _log.error("worker.cannot_start", worker=child.index, pid=pid)
                self._failed = True
                self._signal(signal.SIGTERM)
                continue
            ran = time.monotonic() - child.started
            backoff = RESTART_BACKOFF if ran >= STEADY else min(child.backoff * 2, 60.0)
            delay = 0.0 if ran >= STEADY else child.backoff
            _log.error("worker.died", worker=child.index, pid=pid, ran_s=round(ran, 1),
                       restart_in_s=delay, **_describe(status))
            self._pending[child.index] = time.monotonic() + delay
            self._backoffs[child.index] = backoff

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._pending.items()):
            if when <= now and not self._stopping:
                del self._pending[index]
                self._spawn(index, self._backoffs.get(index, RESTART_BACKOFF))


def reuse_port_free(addresses: Iterable[tuple[str, int]]) -> None:
    """Fail (OSError) when another process listens on any of *addresses* already: with
    ``SO_REUSEPORT`` a second broker would otherwise share its port silently."""
    for host, port in addresses:
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(sockaddr)


# --- relaying a TLS connection to the worker it was passed to ---------------------------------


class _RelayEnd(asyncio.Protocol):
    """One end of a relay between two transports: what it reads, the other end writes;
    a full write buffer there pauses reading here."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _RelayEnd | None = None
        self._done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        assert self.other is not None and self.other.transport is not None
        other = self.other.transport
        if not other.can_write_eof():  # TLS: its close_notify, then the connection ends
            other.close()
            return False
        other.write_eof()
        # Half open until the other side ends too; a TLS transport cannot stay so.
        assert self.transport is not None
        return self.transport.get_extra_info("ssl_object") is None

    def pause_writing(self) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.other is not None and self.other.transport is not None
        if not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        if not self._done.done():
            self._done.set_result(None)


async def relay_transport(client: asyncio.Transport, sock: socket.socket, buffer: int) -> None:
    """Relay *client* (a transport whose reading is paused, no protocol of its own) and
    *sock* both ways, at most *buffer* bytes waiting to be written each way, until both
    are closed."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    outer = _RelayEnd(done)
    outer.transport = client
    client.set_protocol(outer)
    try:
        sock.setblocking(False)
        _, inner = await loop.connect_accepted_socket(lambda: _RelayEnd(done), sock)
    except OSError:
        sock.close()
        client.abort()
        return
    outer.other, inner.other = inner, outer
    assert inner.transport is not None
    for transport in (client, inner.transport):
        transport.set_write_buffer_limits(high=buffer)
    client.resume_reading()
    await done


async def relay_streams(
    outer: anyio.abc.ByteStream, inner: anyio.abc.ByteStream, read_size: int
) -> None:
    """Relay two anyio streams both ways until either side ends."""
    async def pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError, OSError):
            while True:
                await sink.send(await source.receive(read_size))
        with contextlib.suppress(Exception):
            await sink.send_eof()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(pump, outer, inner)
            group.start_soon(pump, inner, outer)
    finally:
        with anyio.CancelScope(shield=True):
            for stream in (inner, outer):
                with contextlib.suppress(Exception):
                    await stream.aclose()
