"""The admin socket: the running broker's live sessions, for the operator on its host.

A Unix stream socket (``service.admin_socket``; by default ``admin/admin.sock`` in the
state directory), mode 0600 in a directory that only its owner may write (made 0700),
never on the network. Each connection's peer is checked with ``SO_PEERCRED``: root and
the broker's own user only. The protocol is line-delimited JSON: one request object a
line, one answer object a line, as many as the client likes on one connection
(docs/service.md, "The admin socket")::

    {"op": "sessions", "domain": "web1"}            -> {"ok": true, "sessions": [...]}
    {"op": "end", "session": "3f2a9c0d11b2",
     "reason": "maintenance"}                        -> {"ok": true, "ended": [...]}
    {"op": "end", "domain": "web1"}                  -> {"ok": true, "ended": [...]}
    {"op": "status"}                                 -> {"ok": true, "version": ..., ...}

A request that is not one JSON object, names an unknown ``op`` or a bad field is
answered ``{"ok": false, "error": "..."}``; a line longer than :data:`MAX_LINE` bytes
is answered so and the connection closed.

With worker processes (``serve --workers N``) the supervisor binds the socket before it
forks, so every worker accepts on the same one (whichever the kernel wakes), and it
outlives a worker's restart. The worker that accepted asks the others through their
inboxes, as ``/metrics`` does (:meth:`WorkerLink.ask_others`), and answers for all: the
client sees one broker. This keeps one socket, one path and no stale files per worker.

:class:`Admin` is also what the core's own pages ask (:meth:`Admin.live_sessions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

import broker
from broker.service._audit import SessionRecord, session_record
from broker.service._refusals import ended_by_operator

if TYPE_CHECKING:
    from broker.service._sessions import Live, SessionRunner
    from broker.service._workers import WorkerLink

_log = structlog.get_logger("broker.service")

#: Longest request line, in bytes (a request is a few fields).
MAX_LINE = 64 * 1024
#: Longest operator's reason accepted (the close frame carries at most 123 bytes of it).
MAX_REASON = 1000
#: The inbox question one worker asks the others.
_KIND = "admin"
#: Unix socket paths longer than this are bound and reached through the directory's
#: descriptor (sun_path holds 108 bytes).
_SUN_PATH = 100
_OPS = ("sessions", "end", "status")


class AdminError(Exception):
    """A request the admin socket refuses: its text is the answer's ``error``."""


def _matches(live: Live, domain: str | None) -> bool:
    if domain is None:
        return True
    return domain == live.domain_name or domain.lower() == live.domain.lower()


class Admin:
    """The live sessions of this broker (every worker's, with worker processes), and how
    an operator ends them."""

    def __init__(self, runner: SessionRunner, link: WorkerLink | None = None) -> None:
        self._runner = runner
        self._link = link
        self._worker = link.index if link is not None else None
        if link is not None:
            link.answer(_KIND, self._answer_worker)

    # --- this process --------------------------------------------------------------------

    def _local_sessions(self, domain: str | None) -> list[SessionRecord]:
        return [session_record(live, self._worker)
                for live in self._runner.sessions() if _matches(live, domain)]

    def _local_end(
        self, session: str | None, domain: str | None, reason: str | None
    ) -> list[SessionRecord]:
        chosen = [live for live in self._runner.sessions()
                  if (session is None or live.session == session) and _matches(live, domain)]
        records = [session_record(live, self._worker) for live in chosen]
        if chosen:
            ending = ended_by_operator(reason)
            self._runner.end_sessions({live.session for live in chosen}, ending)
            for record in records:
                _log.info("session.ended_by_operator", session=record["id"],
                          domain=record["domain"], protocol=record["protocol"],
                          reason=ending.text)
        return records

    def _answer_worker(self, question: Mapping[str, Any]) -> bytes:
        """Another worker's question (inbox): this worker's part of the answer."""
        request = question.get("request") or {}
        if request.get("op") == "end":
            found = self._local_end(request.get("session"), request.get("domain"),
                                    request.get("reason"))
        else:
            found = self._local_sessions(request.get("domain"))
        return json.dumps(found).encode()

    async def _everywhere(
        self, request: Mapping[str, Any], mine: list[SessionRecord]
    ) -> list[SessionRecord]:
        """*mine* and the other workers' answers to *request*, oldest session first."""
        found = list(mine)
        if self._link is not None and self._link.count > 1:
            answers = await self._link.ask_others({"kind": _KIND, "request": dict(request)})
            for index in sorted(answers):
                try:
                    found.extend(json.loads(answers[index]))
                except ValueError:
                    _log.warning("admin.bad_answer", worker=index)
        # Stable: this worker's are in order already; the others' merged by the second.
        return sorted(found, key=lambda record: record["started"])

    # --- the API -------------------------------------------------------------------------

    async def live_sessions(self, domain: str | None = None) -> list[SessionRecord]:
        """Every live session of the broker, across its workers, oldest first; only those
        of *domain* (a name or a UUID) when given. A worker that does not answer within
        2 s is left out."""
        return await self._everywhere(
            {"op": "sessions", "domain": domain}, self._local_sessions(domain)
        )

    async def end_sessions(
        self, *, session: str | None = None, domain: str | None = None,
        reason: str | None = None,
    ) -> list[SessionRecord]:
        """End the session *session*, or every session of *domain* (both: that session,
        if it is *domain*'s), with close code 4109 (``ended_by_operator``) and *reason*;
        the sessions ended, as they were just before."""
        if session is None and domain is None:
            raise AdminError("name a session or a domain")
        request = {"op": "end", "session": session, "domain": domain, "reason": reason}
        return await self._everywhere(request, self._local_end(session, domain, reason))

    async def handle(self, request: object) -> dict[str, Any]:
        """The answer to one decoded request (see the module's notes)."""
        if not isinstance(request, dict):
            raise AdminError("a request is one JSON object")
        op = request.get("op")
        if op not in _OPS:
            raise AdminError(f"unknown op {op!r}: one of {', '.join(_OPS)}")
        fields = {"sessions": {"op", "domain"}, "end": {"op", "session", "domain", "reason"},
                  "status": {"op"}}[op]
        unknown = sorted(set(request) - fields)
        if unknown:
            raise AdminError(f"unknown field {unknown[0]!r} for op {op!r}")
        for key in ("session", "domain", "reason"):
            value = request.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise AdminError(f"{key!r} must be a non-empty string")
        if op == "status":
            return {"ok": True, "version": broker.__version__, "pid": os.getpid(),
                    "worker": self._worker,
                    "workers": self._link.count if self._link is not None else 1}
        if op == "sessions":
            return {"ok": True, "sessions": await self.live_sessions(request.get("domain"))}
        reason = request.get("reason")
        if reason is not None and len(reason) > MAX_REASON:
            raise AdminError(f"'reason' is longer than {MAX_REASON} characters")
        ended = await self.end_sessions(
            session=request.get("session"), domain=request.get("domain"), reason=reason
        )
        return {"ok": True, "ended": ended}

    # --- the socket ----------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client of the admin socket: its peer checked, then its requests."""
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            allowed = uid in (0, os.getuid())
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        return
                    line = exc.partial
                except asyncio.LimitOverrunError:
                    await _send(writer, {"ok": False,
                                         "error": f"request longer than {MAX_LINE} bytes"})
                    return
                if not line.strip():
                    continue
                if not allowed:  # answered after its request: closing on unread data
                    _log.warning("admin.refused", uid=uid)  # would reset the connection
                    await _send(writer, {"ok": False, "error": "permission denied: root or "
                                         "the broker's own user only"})
                    return
                try:
                    answer = await self.handle(json.loads(line))
                except ValueError as exc:  # also UnicodeDecodeError
                    answer = {"ok": False, "error": f"not JSON: {exc}"}
                except AdminError as exc:
                    answer = {"ok": False, "error": str(exc)}
                await _send(writer, answer)
        except (ConnectionError, OSError):
            pass
        except Exception:
            _log.exception("admin.failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
    writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def peer_uid(sock: Any) -> int:
    """The user id of a Unix socket's peer (``SO_PEERCRED``; -1 when unknown)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return -1
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


# --- binding and reaching the socket --------------------------------------------------------


class _At:
    """*path* as a Unix socket address: itself, or when too long for ``sun_path``,
    through its directory's descriptor (``/proc/self/fd/N/NAME``) while open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= _SUN_PATH:
            return str(self.path)
        self._fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{self.path.name}"

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)


def bind_admin_socket(path: Path) -> socket.socket:
    """A listening Unix socket at *path*, mode 0600, its directory made 0700 when
    missing (not its parents). OSError with a clear text when the directory is writable
    by others, or another broker answers there; a stale socket file is replaced."""
    directory = path.parent
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)  # its own directory only: the state directory exists
    info = directory.stat()
    if info.st_mode & 0o022:
        raise OSError(f"{directory} is writable by others (mode "
                      f"{stat.S_IMODE(info.st_mode):04o}): make it 0700")
    if path.is_socket():
        try:
            with _At(path) as address, socket.socket(socket.AF_UNIX) as probe:
                probe.connect(address)
        except OSError:
            path.unlink()  # nothing answers: a stale socket
        else:
            raise OSError(f"another broker answers on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            with _At(path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def admin_listener(path: Path) -> Iterator[socket.socket | None]:
    """The admin socket at *path* bound while the context lives (the supervisor of
    worker processes binds it once for all of them), then closed and its file removed;
    None, logged as ``admin.unavailable``, when it cannot be bound."""
    try:
        sock = bind_admin_socket(path)
    except OSError as exc:
        _log.error("admin.unavailable", socket=str(path), error=str(exc))
        yield None
        return
    inode = socket_inode(path)
    try:
        yield sock
    finally:
        sock.close()
        remove_socket(path, inode)


def socket_inode(path: Path) -> int:
    """The inode of the socket file at *path* (0: none): a broker removes its socket
    file at exit only while it is still the one it bound."""
    try:
        return os.stat(path).st_ino if path.is_socket() else 0
    except OSError:
        return 0


def remove_socket(path: Path, inode: int) -> None:
    """Remove the socket file at *path* if it is still the one of *inode*."""
    if inode and socket_inode(path) == inode:
        with contextlib.suppress(OSError):
            path.unlink()


class BrokerNotReachable(Exception):
    """The admin socket cannot be reached: its text says why and what to do."""


def ask(path: Path, request: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send *request* to the broker's admin socket at *path*; its answer (``ok`` false
    with an ``error`` included). :class:`BrokerNotReachable` when nothing answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            with _At(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise BrokerNotReachable(
                f"the broker is not running (nothing answers on {path}; "
                "service.admin_socket names it)"
            ) from None
        except PermissionError:
            raise BrokerNotReachable(
                f"cannot reach {path}: permission denied (run as root or as the broker's user)"
            ) from None
        except OSError as exc:
            raise BrokerNotReachable(f"cannot reach {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(dict(request)).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise BrokerNotReachable(
                f"the broker did not answer on {path}: {exc.strerror or exc}"
            ) from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise BrokerNotReachable(f"the broker's answer on {path} is not JSON") from None
    if not isinstance(answer, dict):
        raise BrokerNotReachable(f"the broker's answer on {path} is not a JSON object")
    return answer


async def live_sessions(admin: Admin, domain: str | None = None) -> list[SessionRecord]:
    """:meth:`Admin.live_sessions`: the broker's live sessions, across its workers."""
    return await admin.live_sessions(domain)


__all__ = [
    "MAX_LINE",
    "Admin",
    "AdminError",
    "BrokerNotReachable",
    "SessionRecord",
    "ask",
    "bind_admin_socket",
    "live_sessions",
    "peer_uid",
]
