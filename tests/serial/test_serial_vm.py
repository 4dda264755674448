"""The serial console on the real stack, through a real ``console-broker serve``: tokens from
the CLI, the tiny guest's serial port through a libvirt console stream, websockets clients.

The module's broker records every serial console (output only), so each test also leaves
a recording behind; one test reads it back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from serialkit import Client, Served, serial_guest
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("serial"), "record = true\nscrollback = 8192\n")
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


@pytest.fixture
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = serial_guest(testbed)
    try:
        yield dom
    finally:
        testbed.remove(dom)


def test_echo_through_the_broker(served: Served, guest: Any) -> None:
    with served.connect(guest.name()) as ws:
        client = Client(ws)
        assert ws.subprotocol == "console-broker.serial.v1"
        hello = client.wait_control("hello")
        assert hello["domain"] == {"name": guest.name(), "uuid": guest.UUIDString()}
        assert hello["rights"] == "full" and hello["role"] == "writer"
        client.shell_ready()
        client.send(b"echo hello-$((6*7))\n")
        client.wait_for(b"\r\nhello-42\r\n")


def test_two_clients_share_the_console_one_writes_one_watches(
    served: Served, guest: Any
) -> None:
    name = guest.name()
    with served.connect(name) as ws_writer, served.connect(name, "--view-only") as ws_viewer:
        writer, viewer = Client(ws_writer), Client(ws_viewer)
        assert viewer.wait_control("hello")["rights"] == "view"
        writer.shell_ready()
        # The viewer's keys never reach the guest (the shell would echo them) ...
        viewer.send(b"echo viewer-$((1+1))\n")
        viewer.wait_control("error", error="view_only")
        # ... while the writer's do, and both see the output.
        writer.send(b"echo shared-$((40+2))\n")
        writer.wait_for(b"\r\nshared-42\r\n")
        viewer.wait_for(b"\r\nshared-42\r\n")
        assert b"viewer-" not in writer.output and b"viewer-" not in viewer.output

        # A third client, full rights, takes the keyboard over; the writer is told.
        with served.connect(name) as ws_third:
            third = Client(ws_third)
            hello = third.wait_control("hello")
            assert hello["role"] == "watcher" and hello["clients"] == 3
            third.send(b"echo ignored-$((1+2))\n")  # not the writer: dropped
            third.wait_control("error", error="not_writer")
            third.control(type="takeover")
            third.wait_control("role", role="writer", reason="takeover")
            writer.wait_control("role", role="watcher", reason="taken_over")
            writer.send(b"echo old-writer-$((2+2))\n")  # dropped now
            writer.wait_control("error", error="not_writer")
            third.send(b"echo took-over-$((3+4))\n")
            for client in (writer, viewer, third):
                client.wait_for(b"\r\ntook-over-7\r\n")
            for client in (writer, viewer, third):
                assert b"ignored-" not in client.output and b"old-writer-" not in client.output
    log = served.log_text()
    assert '"event": "serial.takeover"' in log


def test_a_late_client_gets_the_scrollback_first(served: Served, guest: Any) -> None:
    name = guest.name()
    with served.connect(name) as ws:
        first = Client(ws)
        first.shell_ready()
        first.send(b"echo before-$((5*5))\n")
        first.wait_for(b"\r\nbefore-25\r\n")
        with served.connect(name, "--view-only") as ws_late:
            late = Client(ws_late)
            late.wait_for(b"before-25")
            hello = late.messages[0]
            assert isinstance(hello, dict) and hello["type"] == "hello"
            assert hello["scrollback"] > 0
            replay = late.messages[1]
            assert isinstance(replay, bytes) and b"\r\nbefore-25\r\n" in replay
            # The replay is the screen as it is: the command, its output, the prompt.
            assert b"\r\nbefore-25\r\nguest# " in bytes(late.output[: hello["scrollback"]])
        # A raw client (xterm.js' attach addon, websocat) gets it too, as bytes only.
        with served.connect(name, framed=False) as ws_raw:
            raw = Client(ws_raw)
            raw.wait_for(b"\r\nbefore-25\r\nguest# ")
            assert not raw.controls


def test_stopping_the_vm_closes_every_client_with_the_reason(
    served: Served, testbed: Testbed
) -> None:
    dom = serial_guest(testbed)
    try:
        name = dom.name()
        with (
            served.connect(name) as a,
            served.connect(name, "--view-only") as b,
            served.connect(name, framed=False) as c,
        ):
            first = Client(a)
            first.shell_ready()
            dom.destroy()
            stopped = time.monotonic()
            for ws in (a, b, c):
                with pytest.raises(ConnectionClosed):
                    while True:
                        ws.recv(timeout=5)
                assert (ws.close_code, ws.close_reason) == (4100, "VM stopped")
            assert time.monotonic() - stopped < 3.0
    finally:
        testbed.remove(dom)


def test_a_session_is_recorded_as_asciicast_v2(served: Served, guest: Any) -> None:
    name = guest.name()
    with served.connect(name) as ws:
        client = Client(ws)
        assert client.wait_control("hello")["recording"] is True
        client.shell_ready()
        client.send(b"echo recorded-$((6*7))\n")
        client.wait_for(b"\r\nrecorded-42\r\n")
    # The last client left: the hub closed its recording. The CLI lists it.
    deadline = time.monotonic() + 10
    while True:
        listed = json.loads(served.cli("recordings", "--domain", name, "--json"))
        if listed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(listed) == 1, listed
    entry = listed[0]
    assert entry["domain"] == {"name": name, "uuid": guest.UUIDString()}
    assert entry["part"] == 1 and entry["input"] is False and entry["duration"] > 0
    path = Path(entry["path"])
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] > 0 and header["height"] > 0
    assert isinstance(header["timestamp"], int)
    events = [json.loads(line) for line in lines[1:]]
    assert events and all(
        isinstance(t, float | int) and kind in ("o", "r") and isinstance(data, str)
        for t, kind, data in events
    )
    times = [t for t, _, _ in events]
    assert times == sorted(times)
    output = "".join(data for _, kind, data in events if kind == "o")
    assert "\r\nrecorded-42\r\n" in output
    # asciinema itself reads it back.
    played = subprocess.run(
        [str(Path(sys.executable).with_name("asciinema")), "cat", str(path)],
        check=True, capture_output=True, timeout=30,
    ).stdout
    assert b"recorded-42" in played
    # By domain UUID too, and the plain listing names the file.
    assert str(path) in served.cli("recordings", "--domain", guest.UUIDString())


def test_a_token_chooses_the_console_device(served: Served, testbed: Testbed) -> None:
    dom = serial_guest(testbed, devices="    <serial type='pty'><target port='1'/></serial>\n")
    try:
        name = dom.name()
        with (
            served.connect(name) as ws_shell,
            served.connect(name, "--device", "serial1") as ws_second,
            served.connect(name, "--device", "1", "--view-only") as ws_same,
        ):
            shell, second, same = Client(ws_shell), Client(ws_second), Client(ws_same)
            assert second.wait_control("hello")["device"] == "serial1"
            # "1" names the same port: its session shares serial1's stream.
            assert same.wait_control("hello")["clients"] == 2
            shell.shell_ready()
            shell.send(b"echo via-$((6*7)) > /dev/ttyS1\n")
            second.wait_for(b"via-42")
            same.wait_for(b"via-42")
            assert b"via-42" not in bytes(shell.output).replace(b"via-$((6*7))", b"")
        # Refused before the upgrade (http.refusals = "status"): the token is not used up.
        with pytest.raises(InvalidStatus) as info:
            served.connect(name, "--device", "serial7")
        response = info.value.response
        assert response.status_code == 404
        assert response.body == b"console not enabled on this domain\n"
    finally:
        testbed.remove(dom)
