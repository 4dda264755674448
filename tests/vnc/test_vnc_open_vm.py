"""``console-broker open`` for VNC on the real stack: the module's ``console-broker serve``
(tests/vnc/conftest.py: ``http.refusals = "close"``), CLI tokens, the tiny guest with its
VNC password and its serial console, and the ``open`` command run as a user runs it.

* remote-viewer (the default) and TigerVNC (``--viewer``) on an Xvfb screen of their
  own show the guest's VGA text console; closing the viewer ends the command (0) and
  the broker's session;
* a view-only token through ``open --no-viewer --listen``: the keys a VNC client of the
  test's sends never reach the guest's shell (its serial console never shows the
  command), while a full token's do;
* a used token: one line, exit status 1, no viewer started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import SerialConsole, Testbed
from openkit import events_after, opened, screen
from servedbroker import CLI, free_port
from vncstack import GRAPHICS, RFBSocket, Served, enabled_guest
from websockets.sync.client import connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[tuple[Any, SerialConsole]]:
    """The tiny guest, VNC in fd mode, its serial console open (the keys' proof)."""
    dom, serial = enabled_guest(testbed, "fd", GRAPHICS, serial=True)
    assert serial is not None
    try:
        yield dom, serial
    finally:
        serial.close()
        testbed.remove(dom)


@pytest.fixture(scope="module")
def tigervnc() -> str:
    if shutil.which("xtigervncviewer") is None:
        why = "xtigervncviewer not installed (scripts/setup-host installs tigervnc-viewer)"
        if os.environ.get("CI"):
            pytest.fail(f"TigerVNC is required when CI is set: {why}", pytrace=False)
        pytest.skip(why)
    return "xtigervncviewer {host}::{port}"


@pytest.mark.usefixtures("remote_viewer")
@pytest.mark.parametrize("client", ["remote-viewer", "tigervnc"])
def test_a_native_viewer_shows_the_guest(
    served: Served, guest: tuple[Any, SerialConsole], tmp_path: Path, client: str,
    request: pytest.FixtureRequest,
) -> None:
    dom, _serial = guest
    page = served.token(dom.name())["page"]
    args = [page] if client == "remote-viewer" else [
        page, "--viewer", request.getfixturevalue("tigervnc")]
    before = len(served.events("session.closed"))
    with screen(tmp_path) as x, opened(tmp_path, *args, env=x.env) as command:
        x.wait_for_the_guests_screen(command.alive, command.text)
        assert "connected: the viewer shows the console" in command.text()
        assert command.end_the_viewer() == 0, command.text()
    assert "the viewer disconnected" in command.text()
    closed = events_after(served, "session.closed", before, domain_name=dom.name())
    assert [e["reason"] for e in closed] == ["client_closed"], closed


class TCPChannel:
    """A TCP socket with the two methods of a WebSocket that RFBSocket uses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> bytes:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the open command closed the connection")
        return data


def type_through_open(served: Served, dom: Any, directory: Path, text: str,
                      *, view_only: bool) -> None:
    """Type *text* with the test's VNC client through ``open --no-viewer --listen``."""
    page = served.token(dom.name(), view_only=view_only)["page"]
    port = free_port()
    with opened(directory, page, "--no-viewer", "--listen", str(port)) as command:
        command.wait_for("waiting for a VNC viewer")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            rfb = RFBSocket(TCPChannel(sock))  # type: ignore[arg-type]
            init = rfb.handshake()
            rfb.type(text)
            time.sleep(1.0)  # let anything that got through run
            rfb.request_raw_update(init)
            assert rfb.read_raw_update(init)  # the session still shows the screen
        assert command.process.wait(timeout=30) == 0, command.text()
    assert "the viewer disconnected" in command.text()


def _serial_shows(serial: SerialConsole, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text.encode() in serial.output:
            return True
        time.sleep(0.1)
    return False


def test_a_view_only_token_through_open_never_reaches_the_guest(
    served: Served, guest: tuple[Any, SerialConsole], tmp_path: Path
) -> None:
    dom, serial = guest
    type_through_open(served, dom, tmp_path, "echo open-view-leak >/dev/ttyS0\n",
                      view_only=True)
    type_through_open(served, dom, tmp_path, "echo open-key-ok >/dev/ttyS0\n",
                      view_only=False)
    assert _serial_shows(serial, "open-key-ok", 60), serial.output[-500:]
    assert b"open-view-leak" not in serial.output


def test_a_used_token_is_one_line_and_status_1(
    served: Served, guest: tuple[Any, SerialConsole], tmp_path: Path
) -> None:
    """This broker refuses after the upgrade (``http.refusals = "close"``): the command
    reads the close before it starts any viewer (``--viewer`` would leave a mark)."""
    dom, _serial = guest
    issued = served.token(dom.name())
    with connect(issued["websocket"], subprotocols=[Subprotocol("binary")],
                 open_timeout=10) as ws:
        ws.recv(timeout=10)  # the broker's RFB version: the session opened
    mark = tmp_path / "viewer-ran"
    done = subprocess.run(
        [*CLI, "open", issued["page"], "--viewer", f"touch {mark}"],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stderr) == (1, (
        "console-broker: error: the broker refused the token: token already used (4004)\n"
    ))
    assert not mark.exists()
