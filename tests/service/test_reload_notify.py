"""sd_notify(3) from ``console-broker serve`` (the unit's ``Type=notify``): READY=1 once it
listens, RELOADING=1 and READY=1 around a reload, STOPPING=1 at the shutdown; with
workers, from the supervisor alone (systemd's NotifyAccess=main) and once all of them
are ready. A datagram socket of the test's stands in for systemd's."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reloadkit import ReloadingBroker, install

from broker.service import _notify


class NotifySocket:
    """``$NOTIFY_SOCKET``: each datagram with the sender's PID (SCM_CREDENTIALS)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def messages(self, until: str, timeout: float = 15.0) -> list[tuple[int, dict[str, str]]]:
        """(pid, assignments) of each datagram, up to the one holding *until*."""
        found: list[tuple[int, dict[str, str]]] = []
        deadline = time.monotonic() + timeout
        while not found or until not in "\n".join(
            f"{k}={v}" for k, v in found[-1][1].items()
        ):
            assert time.monotonic() < deadline, found
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            found.append((pid, fields))
        return found

    def nothing_more(self) -> None:
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    listening = NotifySocket(path)
    monkeypatch.setenv(_notify.NOTIFY_SOCKET, str(path))
    try:
        yield listening
    finally:
        listening.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping(
    tmp_path: Path, notify_socket: NotifySocket, workers: int
) -> None:
    served = ReloadingBroker(tmp_path / "broker", extra_config=f"[service]\nworkers = {workers}\n")
    main = served.process.pid
    try:
        ((pid, ready),) = notify_socket.messages("READY=1")
        assert pid == main
        assert ready["READY"] == "1"
        expected = f"serving with {workers} workers" if workers > 1 else (
            f"serving on 127.0.0.1:{served.port}"
        )
        assert ready["STATUS"] == expected
        # Every worker listens by then (the health check may land on either).
        assert len(served.events("broker.listening")) == workers
        install(served.second, served.live)
        served.hup()
        (reloading, done) = notify_socket.messages("READY=1")
        assert reloading[0] == done[0] == main
        assert reloading[1]["RELOADING"] == "1"
        assert int(reloading[1]["MONOTONIC_USEC"]) > 0
        assert done[1] == {"READY": "1", "STATUS": "serving"}
        # READY=1 after the reload: every worker has reloaded by then.
        assert len(served.events("broker.reloaded")) == workers
        # A failed reload is reported done too, and says so.
        (served.live / "server-key.pem").write_text("not a key\n")
        served.hup()
        (_, failed) = notify_socket.messages("READY=1")
        assert failed[1]["STATUS"].startswith("serving; the last reload failed")
        assert len(served.events("broker.reload_failed")) == workers
        notify_socket.nothing_more()
    finally:
        served.stop()
    stopping = notify_socket.messages("STOPPING=1")
    assert stopping[-1][0] == main
    assert all(pid == main for pid, _ in stopping)


def test_notify_without_a_socket_and_with_an_abstract_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_notify.NOTIFY_SOCKET, raising=False)
    assert not _notify.ready("x")
    name = f"console-broker-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv(_notify.NOTIFY_SOCKET, "@" + name)
        assert _notify.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping: ending the sessions"
    monkeypatch.setenv(_notify.NOTIFY_SOCKET, "relative/path")  # not a socket address
    assert not _notify.ready("x")
