"""Issue 3 on the real stack: the tiny guest, edited by the CLI in each mode,
defines and starts in libvirt, and its consoles are reachable as the mode says."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import libvirt
import pytest
from console_broker_testbed import SerialConsole, Testbed, booted
from lxml import etree
from websockets.sync.client import connect as ws_connect

from broker.xml import NAMESPACE

CLI = [sys.executable, "-m", "broker.cli"]
RFB_BANNER = b"RFB 003.008\n"
# A SPICE link message for the main channel: "REDQ", version 2.2, size, then
# SpiceLinkMess (connection id 0, channel 1 = main, id 0, no caps, caps offset 18).
SPICE_LINK = struct.pack("<4sIII", b"REDQ", 2, 2, 18) + struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    sock.settimeout(20)
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def graphics(dom: Any) -> list[etree._Element]:
    return list(etree.fromstring(dom.XMLDesc(0)).iterfind("devices/graphics"))


def graphics_index(dom: Any, kind: str) -> int:
    kinds = [g.get("type") for g in graphics(dom)]
    return kinds.index(kind)


def open_graphics(dom: Any, kind: str) -> socket.socket:
    """A new client connection to the domain's *kind* graphics, via libvirt."""
    skipauth = libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH
    return socket.socket(fileno=dom.openGraphicsFD(graphics_index(dom, kind), skipauth))


def live_attr(dom: Any, kind: str, attr: str) -> str:
    value = graphics(dom)[graphics_index(dom, kind)].get(attr)
    assert value is not None, f"{kind} graphics has no {attr}"
    return value


@contextmanager
def enabled_guest(testbed: Testbed, mode: str) -> Iterator[tuple[Any, SerialConsole]]:
    """The guest without any console, enabled by `xml enable` in *mode*, booted."""
    plain = testbed.guest_xml(testbed.unique_name(mode), serial=False)
    done = cli("xml", "enable", "--consoles", "vnc,spice,serial", "--mode", mode, "-", stdin=plain)
    assert done.returncode == 0, done.stderr
    with booted(testbed, done.stdout) as running:  # serial: a libvirt console stream
        yield running


def assert_serial_shell(serial: SerialConsole) -> None:
    assert serial.run("echo hello-$((6*7))").strip() == "hello-42"


@pytest.mark.vm
def test_fd_mode_listens_nowhere_and_opens_by_graphics_fd(testbed: Testbed) -> None:
    with enabled_guest(testbed, "fd") as (dom, serial):
        for g in graphics(dom):
            assert g.get("port") is None
            assert [listen.get("type") for listen in g.iterfind("listen")] == ["none"]
        with closing(open_graphics(dom, "vnc")) as sock:
            assert recv_exactly(sock, 12) == RFB_BANNER
        with closing(open_graphics(dom, "spice")) as sock:
            sock.sendall(SPICE_LINK)
            assert recv_exactly(sock, 4) == b"REDQ"
        assert_serial_shell(serial)


@pytest.mark.vm
def test_tcp_mode_listens_on_loopback_ports(testbed: Testbed) -> None:
    with enabled_guest(testbed, "tcp") as (dom, serial):
        assert live_attr(dom, "vnc", "listen") == "127.0.0.1"
        vnc_port = int(live_attr(dom, "vnc", "port"))
        with socket.create_connection(("127.0.0.1", vnc_port), timeout=20) as sock:
            assert recv_exactly(sock, 12) == RFB_BANNER
        spice_port = int(live_attr(dom, "spice", "port"))
        with socket.create_connection(("127.0.0.1", spice_port), timeout=20) as sock:
            sock.sendall(SPICE_LINK)
            assert recv_exactly(sock, 4) == b"REDQ"
        assert_serial_shell(serial)


@pytest.mark.vm
def test_websocket_mode_serves_vnc_over_qemus_websocket(testbed: Testbed) -> None:
    with enabled_guest(testbed, "websocket") as (dom, serial):
        ws_port = int(live_attr(dom, "vnc", "websocket"))
        assert ws_port > 0
        url = f"ws://127.0.0.1:{ws_port}"
        with ws_connect(url, subprotocols=["binary"], open_timeout=20) as ws:
            assert ws.recv(timeout=20) == RFB_BANNER
        # SPICE has no WebSocket in QEMU: in this mode it listens on TCP.
        spice_port = int(live_attr(dom, "spice", "port"))
        with socket.create_connection(("127.0.0.1", spice_port), timeout=20) as sock:
            sock.sendall(SPICE_LINK)
            assert recv_exactly(sock, 4) == b"REDQ"
        assert_serial_shell(serial)


@pytest.mark.vm
def test_enable_and_disable_a_defined_domain_through_libvirt(testbed: Testbed) -> None:
    name = testbed.unique_name("live")
    original = testbed.guest_xml(name, serial=False)
    dom = testbed.define(original)

    done = cli("enable", name, "--consoles", "vnc,serial", "--connect", testbed.uri)
    assert done.returncode == 0, done.stderr
    shown = cli("xml", "show", "--json", "-", stdin=dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert shown.returncode == 0, shown.stderr
    assert '"vnc"' in shown.stdout and '"serial"' in shown.stdout

    serial = testbed.boot(dom)
    assert serial is not None
    try:
        assert_serial_shell(serial)
        with closing(open_graphics(dom, "vnc")) as sock:
            assert recv_exactly(sock, 12) == RFB_BANNER
        # A running domain keeps its consoles until restarted: the command says so.
        done = cli("disable", name, "--connect", testbed.uri)
        assert done.returncode == 0, done.stderr
        assert "restart" in (done.stdout + done.stderr).lower()
    finally:
        serial.close()
    dom.destroy()
    after = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert etree.fromstring(after).find("devices/graphics") is None
    assert etree.fromstring(after).find("devices/serial") is None
    assert NAMESPACE not in after  # the metadata of ours is gone too

    missing = cli("enable", "no-such-domain-here", "--consoles", "vnc", "--connect", testbed.uri)
    assert missing.returncode != 0
    assert "no-such-domain-here" in missing.stderr
