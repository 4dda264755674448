"""State that the broker's worker processes share: used tokens and session counts.

``serve --workers N`` runs N processes, each a full broker. Two things must hold across
them, and the first also across a crash and a restart:

- single use: a token used on one worker is refused on every other, and still after a
  worker crashed or the broker restarted (:class:`SharedReplayCache`, the file
  ``replay.sqlite3`` of the state directory);
- the session limits: ``limits.max_sessions`` and the caps per domain and per client
  count every worker's sessions (:class:`SharedSessionCounts`, ``sessions.sqlite3``).

Each is an SQLite database (the standard library's ``sqlite3``) in the state directory
(0700, beside the signing keys), created 0600, in WAL mode with ``synchronous=NORMAL``: a
committed transaction survives the crash of any process (the kernel holds it); a power
loss may forget the last ones before a checkpoint. Every operation is one short
transaction, writes ``BEGIN IMMEDIATE``, so that a check and the write it allows are
atomic across processes. They run on the event loop thread, so each is bounded: a few
index look-ups and writes, no scan of the table.

Connections. Each process opens its own connection to a file on first use, and keeps it.
A connection must never cross a ``fork()`` (SQLite's locks would then be wrong in both
processes): before a fork every connection of the process is closed (an
:func:`os.register_at_fork` hook; the parent opens again on its next use) and the child
opens its own. Should a process still find a connection opened by another process id (a
fork the hook did not see), it leaves that connection alone, never uses nor closes it,
and opens a new one. A lock per file makes each object safe from several threads.

Waiting. SQLite's own busy handler sleeps 1 ms, then longer, before retrying a lock; a
writer here holds the lock some tens of microseconds, so the wait is ours: retries from
20 µs, doubling to 1 ms, until *busy_timeout* (1 s by default). Past it the operation
fails closed: a token is refused (:class:`~broker.tokens.ReplayStoreUnavailable`), a
session refused (``limit_reached``), and a release is kept and applied with the next
operation.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from broker.service._limits import Limits, SessionCounts, refuse_over_limits
from broker.service._refusals import LIMIT_REACHED, Refused
from broker.tokens import ReplayCacheFull, ReplayedToken, ReplayStoreUnavailable

__all__ = [
    "REPLAY_FILE",
    "SESSIONS_FILE",
    "SharedReplayCache",
    "SharedSessionCounts",
    "StateFileError",
]

#: The replay store's file name in the state directory.
REPLAY_FILE = "replay.sqlite3"
#: The shared session counts' file name in the state directory.
SESSIONS_FILE = "sessions.sqlite3"
#: Seconds an operation waits for another process's write lock before it fails closed.
BUSY_TIMEOUT = 1.0
#: Expired replay entries deleted by one :meth:`SharedReplayCache.consume`, at most.
SWEEP = 32
#: Seconds between two checkpoints of a file's WAL, by a thread of each process.
CHECKPOINT_INTERVAL = 1.0
#: WAL pages after which a commit checkpoints by itself: only if that thread falls behind.
AUTOCHECKPOINT = 10_000
#: Bytes a WAL file is cut back to after a checkpoint.
WAL_SIZE_LIMIT = 4 << 20

_log = structlog.get_logger("broker.service")
T = TypeVar("T")


class StateFileError(Exception):
    """A state file cannot be used; the message names the file and what to do.
    *damaged*: the file is damaged, another program's or another version's (rather than
    out of reach: permissions, a lock held too long)."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Database:
    """One SQLite file: this process's connection to it (opened on first use, never
    across a fork), its schema, and transactions retried while another process writes."""

    def __init__(
        self,
        path: Path,
        *,
        what: str,
        application_id: int,
        version: int,
        schema: tuple[str, ...],
        damaged: str,
        synchronous: str,
        busy_timeout: float,
    ) -> None:
        self.path = Path(path)
        #: What the file is, for messages ("replay store").
        self.what = what
        self._application_id = application_id
        self._version = version
        self._schema = schema
        #: What to do with a damaged or foreign file, for messages.
        self._damaged = damaged
        self._synchronous = synchronous
        self.busy_timeout = busy_timeout
        #: Held for each use of this process's connection.
        self.lock = threading.Lock()
        #: Held by the checkpoint thread while its connection is open.
        self.checkpoint_lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._stop_checkpoints = threading.Event()
        _DATABASES.add(self)

    # --- opening ---------------------------------------------------------------------------

    def _fail(self, problem: str) -> StateFileError:
        return StateFileError(f"{self.path}: {problem}; {self._damaged}", damaged=True)

    def connection(self, *, check: bool = False) -> sqlite3.Connection:
        """This process's connection (hold :attr:`lock`), opened now if need be; *check*:
        run SQLite's ``quick_check`` on opening. Raises :class:`StateFileError`."""
        if self._connection is not None:
            if self._pid == os.getpid():
                return self._connection
            _log.warning("state.inherited_connection", file=str(self.path), pid=self._pid)
            _ABANDONED.append(self._connection)  # another process's: never used nor closed
            self._connection = None
        connection = self._open(check)
        self._connection, self._pid = connection, os.getpid()
        self._stop_checkpoints = threading.Event()
        threading.Thread(
            target=self._checkpoints, args=(self._stop_checkpoints,),
            name=f"checkpoints of {self.path.name}", daemon=True,
        ).start()
        return connection

    def _checkpoints(self, stop: threading.Event) -> None:
        """Copy the WAL into the file every :data:`CHECKPOINT_INTERVAL` seconds, in this
        thread: the fsync a checkpoint costs (milliseconds) stays off the event loop's
        commits. Ends when the connection is closed."""
        while not stop.wait(CHECKPOINT_INTERVAL):
            with self.checkpoint_lock:
                if stop.is_set():
                    return
                try:
                    connection = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                    try:
                        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    finally:
                        connection.close()
                except sqlite3.Error as exc:  # busy: another process checkpoints
                    if not _busy(exc):
                        _log.warning("state.checkpoint_failed", file=str(self.path),
                                     error=str(exc))

    def _open(self, check: bool) -> sqlite3.Connection:
        try:  # created 0600 before SQLite sees it (its -wal and -shm files copy the mode)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StateFileError(
                f"{self.path}: cannot open the {self.what}: {exc.strerror}; the broker's "
                "user must be able to read and write it and its directory"
            ) from None
        try:
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StateFileError(f"{self.path}: cannot open the {self.what}: {exc}") from None
        try:
            self._prepare(connection, check)
        except sqlite3.Error as exc:
            connection.close()
            if _busy(exc):
                raise StateFileError(
                    f"{self.path}: the {self.what} stayed locked for {self.busy_timeout} s "
                    f"({exc}); is another process holding it?"
                ) from None
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
                raise StateFileError(
                    f"{self.path}: cannot write the {self.what} ({exc}); the broker's user "
                    "must be able to write it and its directory"
                ) from None
            raise self._fail(f"the {self.what} is damaged or not an SQLite database ({exc})")\
                from None
        except BaseException:
            connection.close()
            raise
        connection.execute("PRAGMA busy_timeout = 0")  # the waits are ours: see the module
        connection.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT:d}")
        connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")
        return connection

    def _prepare(self, connection: sqlite3.Connection, check: bool) -> None:
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise self._fail(f"the {self.what} cannot use SQLite's WAL mode (it is {mode!r})")
        connection.execute(f"PRAGMA synchronous = {self._synchronous}")
        if check:
            rows = connection.execute("PRAGMA quick_check").fetchall()
            if rows != [("ok",)]:
                raise self._fail(f"the {self.what} is damaged ({rows[0][0]})")
        connection.execute("BEGIN IMMEDIATE")
        try:
            (application,) = connection.execute("PRAGMA application_id").fetchone()
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            if (application, version) == (0, 0):
                (tables,) = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
                if tables:
                    raise self._fail(f"this is another program's database, not a {self.what}")
                for statement in self._schema:  # not executescript(): it would commit
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {self._application_id:d}")
                connection.execute(f"PRAGMA user_version = {self._version:d}")
            elif application != self._application_id:
                raise self._fail(f"this is another program's database, not a {self.what}")
            elif version != self._version:
                raise self._fail(
                    f"the {self.what} has version {version}, this broker knows {self._version}"
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this process's connection (opened again on the next use)."""
        with self.lock:
            self.close_locked()

    def close_locked(self) -> None:
        self._stop_checkpoints.set()
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            connection.close()
        elif connection is not None:
            _ABANDONED.append(connection)  # another process's: never used nor closed

    # --- transactions ----------------------------------------------------------------------

    def run(self, operation: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """*operation* in one transaction (``BEGIN IMMEDIATE`` with *write*), committed if
        it returns, rolled back if it raises; retried while another process holds the
        lock, up to :attr:`busy_timeout`. Raises :class:`sqlite3.Error` past it or on a
        failure, :class:`StateFileError` if the file cannot be opened."""
        with self.lock:
            connection = self.connection()
            deadline = 0.0
            delay = 20e-6
            while True:
                try:
                    connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    result = operation(connection)
                    connection.execute("COMMIT")
                    return result
                except sqlite3.Error as exc:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    if not _busy(exc):
                        raise
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + self.busy_timeout
                    elif now >= deadline:
                        raise
                    time.sleep(delay)
                    delay = min(2 * delay, 1e-3)
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise

    def value(self, sql: str, parameters: tuple[Any, ...] = ()) -> Any:
        """The first column of the first row of one query (None: no row), read outside any
        write transaction."""

        def read(connection: sqlite3.Connection) -> Any:
            row = connection.execute(sql, parameters).fetchone()
            return None if row is None else row[0]

        return self.run(read, write=False)


#: Every open-able database of this process, for the fork hooks.
_DATABASES: weakref.WeakSet[_Database] = weakref.WeakSet()
#: Connections found open in a forked child: kept, so that nothing ever closes them.
_ABANDONED: list[sqlite3.Connection] = []


#: The databases whose locks the process holds across a fork.
_FORKING: list[_Database] = []


def _close_before_fork() -> None:
    """Close every connection, and hold the locks until the fork is done, so that no
    thread opens one in between."""
    for database in list(_DATABASES):
        database.lock.acquire()
        database.close_locked()
        database.checkpoint_lock.acquire()
        _FORKING.append(database)


def _after_fork_in_parent() -> None:
    for database in _FORKING:
        database.checkpoint_lock.release()
        database.lock.release()
    _FORKING.clear()


def _after_fork_in_child() -> None:
    for database in _FORKING:
        database.lock = threading.Lock()
        database.checkpoint_lock = threading.Lock()
    _FORKING.clear()


os.register_at_fork(
    before=_close_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


# --- single use ---------------------------------------------------------------------------

_REPLAY_SCHEMA = (
    "CREATE TABLE used (jti TEXT NOT NULL PRIMARY KEY, until REAL NOT NULL)",
    "CREATE INDEX used_until ON used (until)",
    "CREATE TABLE size (n INTEGER NOT NULL)",  # len(), kept by the triggers
    "INSERT INTO size VALUES (0)",
    "CREATE TRIGGER used_added AFTER INSERT ON used BEGIN UPDATE size SET n = n + 1; END",
    "CREATE TRIGGER used_removed AFTER DELETE ON used BEGIN UPDATE size SET n = n - 1; END",
)


class SharedReplayCache:
    """:class:`~broker.tokens.ReplayCache`'s rules in a file that every process of the
    broker shares and that outlives them: the ``jti`` of every token used, each kept
    until its token can no longer verify, at most *maxsize* of them.

    A token used is refused as :class:`~broker.tokens.ReplayedToken` by every process
    that opens *path*, after a crash of the one that used it (its transaction committed
    before the token was accepted) and after a restart of the broker. When the file holds
    *maxsize* live entries a new token is refused (:class:`~broker.tokens.ReplayCacheFull`)
    rather than one forgotten. Expired entries are deleted :data:`SWEEP` at a time with
    each :meth:`consume`, and when the store is full, before it refuses; until then they
    count in ``len()`` and ``in``.

    A damaged or foreign file stops the broker at start (:meth:`open` raises
    :class:`StateFileError`, which ``serve`` reports as one line) instead of being
    replaced: a new file would forget the tokens used in the last ``tokens.max_ttl``
    seconds, and let each be used once more; the operator decides (moving the file
    aside after that long is safe), and learns that the disk or a program damaged it.
    """

    def __init__(self, path: Path, maxsize: int, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        if maxsize < 1:
            raise ValueError("the replay cache needs room for at least one entry")
        self.maxsize = maxsize
        self._db = _Database(
            path,
            what="replay store",
            application_id=0x63627270,  # "cbrp"
            version=1,
            schema=_REPLAY_SCHEMA,
            damaged=(
                "stop the broker, move the file aside with its -wal and -shm files, and start "
                "it again: the tokens used in the last tokens.max_ttl + tokens.leeway seconds "
                "before it stopped could then be used once more (wait that long to be safe)"
            ),
            synchronous="NORMAL",
            busy_timeout=busy_timeout,
        )

    @property
    def path(self) -> Path:
        return self._db.path

    def open(self) -> None:
        """Open the file in this process now and check it (``quick_check``); raises
        :class:`StateFileError`. Without it, the first use opens it, unchecked."""
        with self._db.lock:
            self._db.close_locked()
            self._db.connection(check=True)

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return int(self._db.value("SELECT n FROM size"))

    def __contains__(self, jti: object) -> bool:
        if not isinstance(jti, str):
            return False
        try:
            return self._db.value("SELECT 1 FROM used WHERE jti = ?", (jti,)) is not None
        except sqlite3.Error as exc:  # the early check only: consume() is the one that counts
            _log.error("replay_store.failed", file=str(self.path), error=str(exc))
            return False

    def consume(self, jti: str, until: float, *, now: float) -> None:
        """Record *jti* as used until *until*; refuse it if it was used already.

        Raises :class:`~broker.tokens.ReplayedToken`,
        :class:`~broker.tokens.ReplayCacheFull` when no entry can be deleted, and
        :class:`~broker.tokens.ReplayStoreUnavailable` when the file cannot record it.
        """

        def record(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT until FROM used WHERE jti = ?", (jti,)).fetchone()
            if row is not None and row[0] > now:
                raise ReplayedToken("the token was already used")
            if row is not None:  # expired, not yet deleted: a new use
                db.execute("DELETE FROM used WHERE jti = ?", (jti,))
            db.execute(
                "DELETE FROM used WHERE rowid IN "
                "(SELECT rowid FROM used WHERE until <= ? ORDER BY until LIMIT ?)",
                (now, SWEEP),
            )
            (size,) = db.execute("SELECT n FROM size").fetchone()
            if size >= self.maxsize:  # the sweep found nothing expired: all live
                raise ReplayCacheFull(
                    f"the replay cache is full ({self.maxsize} live tokens); refusing new "
                    "tokens until some expire"
                )
            db.execute("INSERT INTO used (jti, until) VALUES (?, ?)", (jti, until))

        try:
            self._db.run(record)
        except (sqlite3.Error, StateFileError) as exc:
            _log.error("replay_store.failed", file=str(self.path), error=str(exc))
            raise ReplayStoreUnavailable(
                f"the replay store cannot record the token: {exc}"
            ) from None


# --- session counts -----------------------------------------------------------------------

_SESSIONS_SCHEMA = (
    "CREATE TABLE held (worker INTEGER NOT NULL, domain TEXT NOT NULL, client TEXT NOT NULL, "
    "n INTEGER NOT NULL, PRIMARY KEY (worker, domain, client)) WITHOUT ROWID",
    "CREATE INDEX held_domain ON held (domain)",
    "CREATE INDEX held_client ON held (client)",
    # each worker's total: max_sessions is checked without summing every row of held
    "CREATE TABLE workers (worker INTEGER NOT NULL PRIMARY KEY, n INTEGER NOT NULL)",
)


class SharedSessionCounts(SessionCounts):
    """:class:`~broker.service._limits.SessionCounts` across the broker's worker
    processes: the same methods, the caps counted over every worker's sessions.

    Every count is held by a worker: *worker_index* (0 to N-1, one live process per
    index) is this process's, and the rows it acquires are its own, in *path* (the
    state directory's ``sessions.sqlite3``). :meth:`acquire` checks and counts in one
    ``BEGIN IMMEDIATE`` transaction, so two workers cannot both take a domain's last
    slot. A worker's counts go when it releases them, when the supervisor calls
    :meth:`forget_worker` after reaping it, or when a new process of the same index
    first opens the file (it holds nothing yet: whatever the file says it holds, a dead
    process held).

    The supervisor makes one with *worker_index* None, which acquires nothing: at its
    start :meth:`reset`, after reaping a worker :meth:`forget_worker`. It opens the file
    for each call and closes it after, so that it forks workers without a connection.

    Counts are state of the running broker only: :meth:`reset` replaces a damaged or
    foreign file with a new one (no worker runs then, and nothing in it needs keeping).
    """

    def __init__(
        self,
        limits: Limits,
        path: Path,
        worker_index: int | None,
        *,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        super().__init__(limits)
        self.worker_index = worker_index
        self._db = _Database(
            path,
            what="session counts file",
            application_id=0x63627373,  # "cbss"
            version=1,
            schema=_SESSIONS_SCHEMA,
            damaged="stop the broker and delete the file: it holds only the live sessions' "
            "counts, and a broker starting anew recreates it",
            synchronous="OFF",
            busy_timeout=busy_timeout,
        )
        #: This process's sessions, by (domain, client).
        self._mine: Counter[tuple[str, str]] = Counter()
        #: Releases the file could not record yet: applied with the next transaction.
        self._unreleased: list[tuple[str, str]] = []
        #: The process that cleared this index's stale rows (see :meth:`_write`).
        self._claimed_by = 0

    @property
    def path(self) -> Path:
        return self._db.path

    def close(self) -> None:
        self._db.close()

    # --- reading ---------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Sessions counted, by every worker."""
        return int(self._db.value("SELECT total(n) FROM workers"))

    def domain(self, domain: str) -> int:
        return int(self._db.value("SELECT total(n) FROM held WHERE domain = ?", (domain,)))

    def client(self, client: str) -> int:
        return int(self._db.value("SELECT total(n) FROM held WHERE client = ?", (client,)))

    @property
    def held(self) -> int:
        """Sessions this process counts."""
        return sum(self._mine.values())

    def _counts(self, db: sqlite3.Connection, domain: str, client: str) -> tuple[int, int, int]:
        total, in_domain, of_client = db.execute(
            "SELECT (SELECT total(n) FROM workers), "
            "(SELECT total(n) FROM held WHERE domain = ?), "
            "(SELECT total(n) FROM held WHERE client = ?)",
            (domain, client),
        ).fetchone()
        return int(total), int(in_domain), int(of_client)

    def check(self, domain: str, client: str) -> None:
        """Raise :class:`Refused` (``limit_reached``) if one more session would exceed a
        cap. A file that cannot be read lets the request on: :meth:`acquire` decides."""
        try:
            counts = self._db.run(lambda db: self._counts(db, domain, client), write=False)
        except (sqlite3.Error, StateFileError) as exc:
            _log.error("session_counts.failed", file=str(self.path), error=str(exc))
            return
        refuse_over_limits(self.limits, *counts)

    # --- writing ---------------------------------------------------------------------------

    def _worker(self) -> int:
        if self.worker_index is None:
            raise RuntimeError("the supervisor's session counts acquire nothing")
        return self.worker_index

    def _release_rows(self, db: sqlite3.Connection, domain: str, client: str) -> None:
        key = (self.worker_index, domain, client)
        db.execute(
            "UPDATE held SET n = n - 1 WHERE worker = ? AND domain = ? AND client = ?", key
        )
        db.execute(
            "DELETE FROM held WHERE worker = ? AND domain = ? AND client = ? AND n <= 0", key
        )
        db.execute("UPDATE workers SET n = n - 1 WHERE worker = ?", (self.worker_index,))

    def _adopt(self) -> None:
        """In a process other than the one that last wrote (a forked child): hold
        nothing yet."""
        if self._claimed_by != os.getpid():
            self._mine.clear()
            self._unreleased.clear()

    def _write(self, change: Callable[[sqlite3.Connection], None]) -> None:
        """*change* in one transaction, after the releases still owed. A process's first
        transaction first forgets what the file says this index holds: a dead process's
        sessions, since this one holds none yet."""
        pid = os.getpid()
        fresh = self._claimed_by != pid
        owed = list(self._unreleased)
        worker = self.worker_index

        def transaction(db: sqlite3.Connection) -> None:
            if fresh:
                db.execute("DELETE FROM held WHERE worker = ?", (worker,))
                db.execute("DELETE FROM workers WHERE worker = ?", (worker,))
            for domain, client in owed:
                self._release_rows(db, domain, client)
            change(db)

        self._db.run(transaction)
        self._claimed_by = pid
        del self._unreleased[: len(owed)]

    def acquire(self, domain: str, client: str) -> None:
        """Count one more session for this worker, or raise :class:`Refused` like
        :meth:`check` (also when the file cannot count it: the session is refused)."""
        worker = self._worker()
        self._adopt()

        def take(db: sqlite3.Connection) -> None:
            refuse_over_limits(self.limits, *self._counts(db, domain, client))
            db.execute(
                "INSERT INTO held VALUES (?, ?, ?, 1) "
                "ON CONFLICT DO UPDATE SET n = n + 1",
                (worker, domain, client),
            )
            db.execute(
                "INSERT INTO workers VALUES (?, 1) ON CONFLICT DO UPDATE SET n = n + 1",
                (worker,),
            )

        try:
            self._write(take)
        except (sqlite3.Error, StateFileError) as exc:
            _log.error("session_counts.failed", file=str(self.path), error=str(exc))
            raise Refused(LIMIT_REACHED, f"the session counts are unavailable: {exc}") from None
        self._mine[domain, client] += 1

    def release(self, domain: str, client: str) -> None:
        """Count one session of this worker less (each :meth:`acquire` is released
        exactly once). When the file cannot record it now, the next transaction does."""
        self._worker()
        self._adopt()
        if self._mine[domain, client] <= 0:
            raise RuntimeError("released a session that was not acquired")
        self._mine[domain, client] -= 1
        if not self._mine[domain, client]:
            del self._mine[domain, client]
        try:
            self._write(lambda db: self._release_rows(db, domain, client))
        except (sqlite3.Error, StateFileError) as exc:
            _log.error("session_counts.failed", file=str(self.path), error=str(exc),
                       hint="the release is applied with the next operation")
            self._unreleased.append((domain, client))

    # --- the supervisor --------------------------------------------------------------------

    def _supervise(self, change: Callable[[sqlite3.Connection], None]) -> None:
        try:
            self._db.run(change)
        except sqlite3.Error as exc:
            raise StateFileError(f"{self.path}: {exc}") from None
        finally:
            if self.worker_index is None:
                self._db.close()

    def forget_worker(self, worker_index: int) -> None:
        """Release every session *worker_index* held: the supervisor calls it once it has
        reaped that worker, before starting its successor. Raises :class:`StateFileError`."""

        def forget(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM held WHERE worker = ?", (worker_index,))
            db.execute("DELETE FROM workers WHERE worker = ?", (worker_index,))

        self._supervise(forget)

    def reset(self) -> None:
        """Forget every count: the supervisor calls it when it starts, before any worker.
        A damaged or foreign file is replaced. Raises :class:`StateFileError` when the
        file cannot be written."""

        def clear(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM held")
            db.execute("DELETE FROM workers")

        try:
            with self._db.lock:
                self._db.close_locked()
                self._db.connection(check=True)
        except StateFileError as exc:
            if not exc.damaged:
                raise
            _log.warning("session_counts.replaced", file=str(self.path), problem=str(exc))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._supervise(clear)
