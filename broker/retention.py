"""Retention of recordings: deleting the files a policy no longer keeps.

The core's, for every plugin's recordings (:mod:`broker.recordings`): a
:class:`Policy` keeps a file for ``keep_days`` after its last write (its mtime)
and all files together under ``max_total`` bytes, deleting the files written
longest ago first. :func:`prune` applies it once to a recordings directory; a
:class:`Pruner` applies it in a background thread while the broker runs (on
start, every ``interval`` seconds, and when woken after a recording moves on
to its next part: :func:`wake_pruners`).

What is looked at: the regular files one level down whose names end with one of
the registered recordings' suffixes (``.cast``, ``.rfb.jsonl``),
``{dir}/{subdirectory}/{file}{suffix}``, which is where
:class:`broker.recordings.PartFile` creates them. Symbolic links are never
followed below the directory itself (the subdirectories and files are opened
``O_NOFOLLOW`` relative to their parent's descriptor, and a symlink is neither
counted nor deleted), other files are left alone, and directories are never
removed.

A part being written is never deleted, whoever prunes (the broker, or
``console-broker recordings --prune`` in another process): its writer holds
an exclusive ``flock`` on it (:func:`hold`), and the pruner takes that lock
without waiting before it deletes a file, skipping files it cannot lock. In
the broker's own process the parts are also registered by inode
(:func:`live`), for file systems without ``flock``. A new part is created
under a name that does not end in its suffix (``....new``) and renamed once
locked, so no pruner sees it unlocked.

Errors are per file: a file or subdirectory that cannot be read or deleted
(permissions) is reported in :attr:`PruneResult.errors` and the pass goes on. One
that is gone by the time the pass looks at it (another pass, the broker's and one by
hand, deleted it meanwhile) is no error: it is simply not there any more.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import structlog

_log = structlog.get_logger("broker.recordings")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DAY = 86400

# --- the parts being written in this process ---------------------------------------------

_live: set[tuple[int, int]] = set()
_live_lock = threading.Lock()


def hold(fd: int) -> Callable[[], None]:
    """Mark the open file *fd* as being written; returns the function that unmarks it.

    Takes an exclusive ``flock`` (seen by pruners in any process) and registers
    the file's inode (seen by this process' pruners even where ``flock`` fails).
    """
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    with _live_lock:
        _live.add(key)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release() -> None:
        with _live_lock:
            _live.discard(key)

    return release


def _being_written(fd: int, info: os.stat_result) -> bool:
    """Whether the file open at *fd* is a part being written; if not, *fd* holds it locked."""
    with _live_lock:
        if (info.st_dev, info.st_ino) in _live:
            return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock on this file system: the registry above is all there is
    return False


def is_being_written(path: Path) -> bool:
    """Whether *path* is a recording part some process is writing right now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _being_written(fd, os.fstat(fd))
    finally:
        os.close(fd)


# --- the policy and one pass --------------------------------------------------------------


@attrs.frozen
class Policy:
    """What to keep: files written in the last *keep_days*, at most *max_total* bytes."""

    #: Days a file is kept after its last write; 0: forever.
    keep_days: float = 0
    #: Bytes all files may take together; 0: no limit.
    max_total: int = 0

    @property
    def active(self) -> bool:
        return self.keep_days > 0 or self.max_total > 0

    def describe(self) -> str:
        rules = []
        if self.keep_days > 0:
            rules.append(f"keep {self.keep_days:g} days")
        if self.max_total > 0:
            rules.append(f"at most {self.max_total} bytes")
        return ", ".join(rules) or "keep everything"


@attrs.frozen
class Deleted:
    """A file a pass deleted (or, in a dry run, would delete)."""

    path: Path
    size: int
    #: The file's last write (its mtime), seconds since the epoch.
    mtime: float
    #: ``age`` (older than keep_days) or ``total`` (over max_total).
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "mtime": self.mtime,
                "reason": self.reason}


@attrs.define
class PruneResult:
    """What one pass did."""

    directory: Path
    policy: Policy
    dry_run: bool = False
    deleted: list[Deleted] = attrs.Factory(list)
    #: Files left, and their bytes (the parts being written included).
    kept: int = 0
    kept_bytes: int = 0
    #: Files the policy would have deleted but which are being written.
    in_use: list[Path] = attrs.Factory(list)
    #: (path, reason) of what could not be read or deleted.
    errors: list[tuple[Path, str]] = attrs.Factory(list)

    @property
    def freed(self) -> int:
        return sum(d.size for d in self.deleted)

    @property
    def over_limit(self) -> bool:
        """Still over max_total (the parts being written alone take more)."""
        return 0 < self.policy.max_total < self.kept_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "dry_run": self.dry_run,
            "keep_days": self.policy.keep_days,
            "max_total": self.policy.max_total,
            "deleted": [d.to_json() for d in self.deleted],
            "freed": self.freed,
            "kept": self.kept,
            "kept_bytes": self.kept_bytes,
            "in_use": [str(p) for p in self.in_use],
            "over_limit": self.over_limit,
            "errors": [{"path": str(p), "error": e} for p, e in self.errors],
        }


@attrs.frozen
class _File:
    sub: str
    name: str
    path: Path
    size: int
    mtime: float
    inode: tuple[int, int]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _opened(path: str | Path, flags: int, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _scan(
    top: int, directory: Path, suffixes: tuple[str, ...], result: PruneResult
) -> list[_File]:
    files = []
    with os.scandir(top) as entries:
        subs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    for sub in subs:
        try:
            with _opened(sub, _DIR_FLAGS | os.O_NOFOLLOW, top) as fd, os.scandir(fd) as entries:
                for entry in entries:
                    if not entry.name.endswith(suffixes):
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted since the listing (another pass): nothing to do
                    except OSError as exc:
                        result.errors.append((directory / sub / entry.name, _reason(exc)))
                        continue
                    files.append(_File(
                        sub, entry.name, directory / sub / entry.name, info.st_size,
                        info.st_mtime, (info.st_dev, info.st_ino),
                    ))
        except FileNotFoundError:
            continue  # removed since the listing
        except OSError as exc:
            result.errors.append((directory / sub, _reason(exc)))
    return sorted(files, key=lambda f: (f.mtime, f.name))


def _delete(top: int, file: _File, reason: str, result: PruneResult) -> bool:
    """Delete *file* unless it is being written; whether it is gone (or would be)."""
    try:
        with _opened(file.sub, _DIR_FLAGS | os.O_NOFOLLOW, top) as sub, _opened(
            file.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, sub
        ) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != file.inode:
                return False  # replaced since the scan: leave it to the next pass
            if _being_written(fd, info):
                if file.path not in result.in_use:
                    result.in_use.append(file.path)
                return False
            if not result.dry_run:
                os.unlink(file.name, dir_fd=sub)  # still holding the lock
    except FileNotFoundError:
        return True  # someone else deleted it
    except OSError as exc:
        result.errors.append((file.path, _reason(exc)))
        return False
    result.deleted.append(Deleted(file.path, file.size, file.mtime, reason))
    return True


def prune(
    directory: Path,
    policy: Policy,
    *,
    suffixes: Iterable[str],
    dry_run: bool = False,
    now: float | None = None,
) -> PruneResult:
    """Apply *policy* once to the recordings in *directory*: the files whose names end
    with one of *suffixes* (the registered recordings'); with *dry_run*, delete nothing.

    A missing directory has nothing to prune; one that cannot be read is an error
    in the result (the pass does nothing more).
    """
    result = PruneResult(directory=directory, policy=policy, dry_run=dry_run)
    if not policy.active:
        return result
    now = time.time() if now is None else now
    try:
        top = os.open(directory, _DIR_FLAGS)
    except FileNotFoundError:
        return result
    except OSError as exc:
        result.errors.append((directory, _reason(exc)))
        return result
    try:
        try:
            files = _scan(top, directory, tuple(suffixes), result)
        except OSError as exc:
            result.errors.append((directory, _reason(exc)))
            return result
        left = []
        cutoff = now - policy.keep_days * _DAY
        for file in files:
            if policy.keep_days > 0 and file.mtime < cutoff and _delete(top, file, "age", result):
                continue
            left.append(file)
        total = sum(f.size for f in left)
        kept = []
        for file in left:
            if 0 < policy.max_total < total and _delete(top, file, "total", result):
                total -= file.size
                continue
            kept.append(file)
        result.kept = len(kept)
        result.kept_bytes = total
    finally:
        os.close(top)
    return result


# --- while the broker runs ---------------------------------------------------------------

#: The pruners running in this process (:func:`wake_pruners` finds them by directory).
_running: weakref.WeakSet[Pruner] = weakref.WeakSet()
_running_lock = threading.Lock()


def wake_pruners(directory: Path, trigger: str = "rotation") -> int:
    """Wake the pruners of this process that prune *directory* (a recording moved on to
    its next part there); how many there were."""
    with _running_lock:
        pruners = [p for p in _running if p.directory == directory]
    for pruner in pruners:
        pruner.wake(trigger)
    return len(pruners)


class Pruner:
    """Applies a policy in a daemon thread: at once, every *interval* seconds, when woken.

    Looks at the files ending with one of *suffixes*. Each pass logs
    ``recordings.pruned`` (and ``recordings.prune_failed`` per error).
    """

    def __init__(
        self,
        directory: Path,
        policy: Policy,
        interval: float = 3600.0,
        *,
        suffixes: Iterable[str],
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.interval = interval
        self.suffixes = tuple(suffixes)
        self.passes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._trigger = "start"
        self._thread = threading.Thread(
            target=self._run, name="recordings-retention", daemon=True
        )

    def start(self) -> None:
        with _running_lock:
            _running.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether its thread runs."""
        return self._thread.is_alive()

    def wake(self, trigger: str = "rotation") -> None:
        """Run a pass soon (a recording moved on to its next part)."""
        self._trigger = trigger
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        with _running_lock:
            _running.discard(self)
        self._stop.set()
        self._wake.set()
        if timeout is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        trigger = "start"
        while not self._stop.is_set():
            self.run_pass(trigger)
            woken = self._wake.wait(self.interval)
            self._wake.clear()
            trigger = self._trigger if woken else "interval"

    def run_pass(self, trigger: str) -> PruneResult | None:
        try:
            result = prune(self.directory, self.policy, suffixes=self.suffixes)
        except Exception:  # never let a surprise end the thread
            _log.exception("recordings.prune_failed", path=str(self.directory), trigger=trigger)
            return None
        for path, error in result.errors:
            _log.warning("recordings.prune_failed", path=str(path), error=error)
        _log.info(
            "recordings.pruned",
            trigger=trigger,
            dir=str(self.directory),
            deleted=len(result.deleted),
            freed=result.freed,
            kept=result.kept,
            kept_bytes=result.kept_bytes,
            in_use=len(result.in_use),
            errors=len(result.errors),
            over_limit=result.over_limit,
        )
        self.passes += 1
        return result
