"""What an operator sees of a session: its record, and its audit line when it ends.

:func:`session_record` is one open session as ``console-broker sessions`` lists it
(:mod:`broker.service._admin`). :class:`AuditLog` writes one line per session as it
ends: always the structlog event ``session.audit`` in the broker's log, and with
``audit.file`` set the same object as one JSON line appended to that file.

The file is opened with ``O_APPEND`` and each line goes out in one ``write(2)``: the
kernel moves to the file's end and writes under the file's lock in one step, so lines
of several worker processes appending to one file never interleave, nor overwrite each
other (POSIX ``write()``: with ``O_APPEND`` "the file offset shall be set to the end of
the file prior to each write and no intervening file modification operation shall
occur between changing the file offset and the write operation"; Linux holds the
inode's lock for a regular file's whole write).
Rotation: :meth:`AuditLog.reopen` (on SIGHUP), and before each line the path is
compared with the open file (device and inode): a file moved away by logrotate is
followed by a new one at the path without any signal.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import structlog

from broker.errors import CommandError
from broker.service._logging import scrub

if TYPE_CHECKING:
    from broker.service._refusals import Refusal
    from broker.service._sessions import Live

_log = structlog.get_logger("broker.service")


class SessionRecord(TypedDict):
    """One live session, as ``console-broker sessions --json`` prints it (docs/service.md,
    "The admin socket")."""

    #: The session's id (``session`` in its log lines).
    id: str
    #: The domain's UUID.
    domain: str
    #: The domain's name.
    domain_name: str
    protocol: str
    #: The token's rights: ``full`` or ``view``.
    rights: str
    #: The client's address as the broker sees it.
    client: str
    #: When it opened, UTC, ISO 8601 (``2026-12-07T00:31:02Z``).
    started: str
    bytes_to_client: int
    bytes_to_console: int
    #: The token's ``name`` claim, or None.
    name: str | None
    #: Its connections open now (a multi_connection protocol opens several), the first included.
    connections: int
    #: The worker process serving it (``serve --workers``), or None with one process.
    worker: int | None


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_record(live: Live, worker: int | None = None) -> SessionRecord:
    """*live* (a group's first connection) as an operator sees it."""
    to_client, to_console = live.bytes()
    claims = live.claims
    return SessionRecord(
        id=live.session,
        domain=live.domain,
        domain_name=live.domain_name,
        protocol=live.protocol,
        rights=claims.rights.value if claims is not None else "",
        client=live.client,
        started=_iso(live.started),
        bytes_to_client=to_client,
        bytes_to_console=to_console,
        name=claims.name if claims is not None else None,
        connections=live.group.connections if live.group is not None else 1,
        worker=worker,
    )


def audit_line(live: Live, ending: Refusal, worker: int | None = None) -> dict[str, Any]:
    """The audit line of *live*, ended with *ending* (docs/service.md, "The audit log"):
    who (the token's ``name``, ``sub``, ``jti``; never the token), what, from where, how
    long, how many bytes, and how it ended."""
    record = session_record(live, worker)
    claims = live.claims
    ended = time.time()
    return {
        "session": record["id"],
        "name": record["name"],
        "sub": claims.domain_uuid if claims is not None else None,
        "jti": claims.jti if claims is not None else None,
        "domain": record["domain"],
        "domain_name": record["domain_name"],
        "protocol": record["protocol"],
        "rights": record["rights"],
        "client": record["client"],
        "start": record["started"],
        "end": _iso(ended),
        "duration": round(max(0.0, ended - live.started), 3),
        "bytes_to_client": record["bytes_to_client"],
        "bytes_to_console": record["bytes_to_console"],
        "code": ending.close_code,
        "reason": ending.reason,
        "close_reason": scrub(ending.text),
        "worker": worker,
    }


class AuditLog:
    """One line per ended session: the ``session.audit`` event, and with *path* the same
    JSON object appended to that file (see the module's notes)."""

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 worker: int | None = None) -> None:
        self.path = Path(path) if path else None
        self.worker = worker
        self._fd = -1
        self._identity: tuple[int, int] | None = None

    def open(self) -> None:
        """Open the file (and make its directory, 0750, if missing); CommandError when it
        cannot be. Nothing without a path."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
        except OSError as exc:
            raise CommandError(
                f"audit.file: cannot open {self.path}: {exc.strerror or exc}"
            ) from None
        self._swap(fd)

    def _swap(self, fd: int) -> None:
        old, self._fd = self._fd, fd
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the file away): for SIGHUP. A
        failure is logged (``audit.reopen_failed``) and the open file kept."""
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
        except OSError as exc:
            _log.error("audit.reopen_failed", file=str(self.path),
                       error=exc.strerror or str(exc))
            return
        self._swap(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _moved(self) -> bool:
        assert self.path is not None
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    def session_ended(self, live: Live, ending: Refusal) -> None:
        """Write *live*'s audit line."""
        line = audit_line(live, ending, self.worker)
        _log.info("session.audit", **line)
        if self.path is None or self._fd < 0:
            return
        if self._moved():
            self.reopen()
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, data)  # one write: whole lines (the module's notes)
        except OSError as exc:
            _log.error("audit.write_failed", file=str(self.path),
                       error=exc.strerror or str(exc), session=line["session"])
