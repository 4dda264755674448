"""Telling the service manager what the broker is doing: sd_notify(3), for the systemd
unit's ``Type=notify``.

The protocol (sd_notify(3); systemd's "The sd_notify() protocol"): the service manager
passes the path of an ``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET`` (a name starting
with ``@`` is in the abstract namespace); each datagram is newline-separated
``VARIABLE=VALUE`` assignments. The broker sends:

* ``READY=1`` once it listens (with ``serve --workers N``: the supervisor, once every
  worker listens), with a ``STATUS=`` line;
* ``RELOADING=1`` and ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, as systemd asks of a reload's
  start) on SIGHUP, and ``READY=1`` once the reload is done, failed or not (a failed one
  keeps the old keys and certificates: the service goes on);
* ``STOPPING=1`` when SIGTERM or SIGINT begins the shutdown.

Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent. A message that
cannot be sent is dropped: the broker does not depend on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable

import attrs

#: The environment variable naming the service manager's socket.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send *assignments* (``READY=1``, ...) to ``$NOTIFY_SOCKET``; False when there is
    none or it cannot be reached."""
    address = os.environ.get(NOTIFY_SOCKET, "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message, target)
        except OSError:
            return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading keys and certificates")


def reloaded(ok: bool) -> bool:
    status = "serving" if ok else "serving; the last reload failed (broker.reload_failed)"
    return notify("READY=1", f"STATUS={status}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: ending the sessions")


def forget() -> None:
    """This process is not the one the service manager started (a forked worker): what it
    would say goes to the supervisor instead, which speaks for all."""
    with contextlib.suppress(KeyError):
        del os.environ[NOTIFY_SOCKET]


@attrs.frozen
class Lifecycle:
    """What a broker process says, and to whom, as it comes up, reloads and stops: the
    service manager (:data:`SYSTEMD`), or a worker's supervisor, which speaks for all."""

    #: Listening, with a status line.
    listening: Callable[[str], object]
    #: A reload (SIGHUP) begins.
    reload_started: Callable[[], object]
    #: It is done: True when the new material is in place.
    reload_done: Callable[[bool], object]
    #: The shutdown begins.
    stopping: Callable[[], object]


#: A broker process that systemd started (``$NOTIFY_SOCKET``; nothing without it).
SYSTEMD = Lifecycle(ready, reloading, reloaded, stopping)
