"""Reading inputs with a size cap, writing files atomically, showing diffs."""

from __future__ import annotations

import codecs
import contextlib
import difflib
import os
import stat
import sys
import tempfile

from broker.xml._constants import STDIN
from broker.xml._errors import InputError
from broker.xml._source import MAX_BYTES


def read_input(path: str, *, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of *path* (``-``: standard input), at most ``max_bytes + 1`` of them
    (so that an oversized input is detected without reading it all)."""
    if path == STDIN:
        return sys.stdin.buffer.read(max_bytes + 1)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise InputError(f"refusing {path}: it is larger than {max_bytes} bytes")
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def write_atomic(path: str, data: bytes) -> None:
    """Replace the file *path* with *data*: all of it or nothing.

    Writes a temporary file in the same directory with the same permission
    bits (and owner, where allowed), flushes it to disk, renames it over the
    target (following a symbolic link to its target) and flushes the
    directory.
    """
    target = os.path.realpath(path)
    directory = os.path.dirname(target) or "."
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
        owner = os.stat(target)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            with contextlib.suppress(PermissionError):
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def unified_diff(before: bytes, after: bytes, encoding: str, name: str) -> str:
    """A unified diff of two versions of a document, as text."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        codec = "utf-8"
    old = before.decode(codec, errors="replace").splitlines(keepends=True)
    new = after.decode(codec, errors="replace").splitlines(keepends=True)
    lines = difflib.unified_diff(old, new, fromfile=name, tofile=f"{name} (edited)")
    return "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    )
