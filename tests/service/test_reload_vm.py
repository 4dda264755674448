"""On the real stack: a serial console session through a TLS broker goes on across SIGHUP
with a renewed certificate (one broker process, and two workers), while a new session
is shown the new certificate and a client trusting only the old CA is refused."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from reloadkit import ReloadingBroker, certificate, install, shown_certificate
from servedbroker import enabled_guest, serial_answers
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.vm


@pytest.fixture
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = enabled_guest(testbed, "--consoles", "serial")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def trusting(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the certificate names 127.0.0.1, the URL its node
    return context


def session(served: ReloadingBroker, domain: str, ca: Path) -> ClientConnection:
    url = served.token(domain)["websocket"]
    assert url.startswith("wss://")
    return connect(url, subprotocols=["binary"], ssl=trusting(ca),  # type: ignore[list-item]
                   open_timeout=10)


def answers(ws: ClientConnection, word: str, timeout: float = 30.0) -> None:
    """Type ``echo WORD-$((6*7))`` on a raw serial session until ``WORD-42`` comes back."""
    seen = b""
    deadline = time.monotonic() + timeout
    while f"{word}-42".encode() not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        ws.send(f"echo {word}-$((6*7))\n".encode())
        end = time.monotonic() + 2
        while time.monotonic() < end and f"{word}-42".encode() not in seen:
            with contextlib.suppress(TimeoutError):
                message = ws.recv(timeout=0.5)
                assert isinstance(message, bytes)
                seen += message


def shows(ws: ClientConnection, text: bytes, timeout: float = 30.0) -> None:
    """Read *ws* until *text* came."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        with contextlib.suppress(TimeoutError):
            message = ws.recv(timeout=0.5)
            assert isinstance(message, bytes)
            seen += message


@pytest.mark.parametrize("workers", [1, 2])
def test_a_serial_session_survives_sighup_with_a_renewed_certificate(
    guest: Any, tmp_path: Path, workers: int
) -> None:
    served = ReloadingBroker(tmp_path, protocol="serial", libvirt="",
                             extra_config=f"[service]\nworkers = {workers}\n")
    try:
        with session(served, guest.name(), served.first["ca"]) as before:
            serial_answers(before)
            install(served.second, served.live)
            served.hup()
            lines = served.wait_events("broker.reloaded", workers)
            assert all(line["changed"] == ["tls.cert", "tls.key"] for line in lines)
            # The session made with the old certificate goes on.
            answers(before, "after")
            # New connections are shown the new certificate...
            assert shown_certificate(served.port) == certificate(served.second["server"])
            with pytest.raises(ssl.SSLCertVerificationError):
                session(served, guest.name(), served.first["ca"])
            # ... and a session made with it watches the console the old one types on
            # (a shared serial console: the first session holds the keyboard).
            with session(served, guest.name(), served.second["ca"]) as after:
                answers(before, "renewed")
                shows(after, b"renewed-42")
        assert len(served.events("session.opened")) == 2
        closed = served.wait_events("session.closed", 2)
        assert [line["reason"] for line in closed] == ["client_closed", "client_closed"]
    finally:
        served.stop()
    assert served.process.returncode == 0
    served.assert_no_token_logged(require_tokens=True)
