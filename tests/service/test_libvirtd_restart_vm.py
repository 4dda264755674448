"""The broker across a libvirtd restart, on the real stack: the libvirt connection is lost
while sessions are open, and comes back.

What must hold (docs/service.md, "Lifecycle"): sessions on a libvirt console stream end
with ``hypervisor_lost`` (4103), because their stream went with the connection; a VNC
session on a socket from ``openGraphicsFD`` goes on (QEMU never noticed); ``/healthz``
reports the outage and the broker reconnects by itself; once it has, new sessions open
and the lifecycle events are back (stopping the VM closes the surviving session with
4100). The ``libvirtd_restart`` marker makes this run last with the other tests that
restart libvirtd (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path

import pytest
from console_broker_testbed import Testbed, restart_libvirtd
from servedbroker import ServedBroker, enabled_guest, read_at_least, serial_answers
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

pytestmark = [pytest.mark.vm, pytest.mark.libvirtd_restart]
RFB_BANNER = b"RFB 003.008\n"


def _close_code(ws: ClientConnection, timeout: float = 15.0) -> int | None:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    return ws.close_code


def _rfb_login(ws: ClientConnection) -> tuple[int, int]:
    """RFB 3.8 through the broker, which offers security None: the screen's size."""
    assert read_at_least(ws, len(RFB_BANNER)) == RFB_BANNER
    ws.send(RFB_BANNER)
    types = read_at_least(ws, 2)
    assert types == b"\x01\x01"
    ws.send(b"\x01")
    assert read_at_least(ws, 4) == bytes(4)  # SecurityResult OK
    ws.send(b"\x01")  # ClientInit, shared
    init = read_at_least(ws, 24)  # ServerInit, and the name (in one message or more)
    width, height, name_length = struct.unpack(">HH16xI", init[:24])
    if len(init) < 24 + name_length:
        read_at_least(ws, 24 + name_length - len(init))
    return width, height


def test_sessions_across_a_libvirtd_restart(testbed: Testbed, tmp_path: Path) -> None:
    served = ServedBroker(tmp_path, grace=3.0)
    dom = enabled_guest(testbed, "--consoles", "vnc,serial", "--mode", "fd")
    try:
        with (
            served.connect(dom.name(), protocol="vnc") as vnc,
            served.connect(dom.name(), protocol="serial") as serial,
        ):
            width, height = _rfb_login(vnc)
            serial_answers(serial)

            restart_libvirtd()
            testbed.reconnect()

            # the console stream went with the connection
            assert _close_code(serial) == 4103
            assert serial.close_reason == "hypervisor connection lost"
            # the broker reconnects by itself (its backoff starts at half a second)
            deadline = time.monotonic() + 30
            while served.get("/healthz")[0] != 200:
                assert time.monotonic() < deadline, served.log_text()[-3000:]
                time.sleep(0.2)
            # the VNC session's socket came from QEMU and never depended on the
            # connection: the screen still comes (FramebufferUpdateRequest, whole screen)
            vnc.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
            assert read_at_least(vnc, 1)[0] == 0  # FramebufferUpdate
            # new sessions open on the new connection
            with served.connect(dom.name(), protocol="serial") as again:
                serial_answers(again)
            # the lifecycle events are registered again: stopping the VM ends the session
            dom = testbed.conn.lookupByUUIDString(dom.UUIDString())
            dom.destroy()
            assert _close_code(vnc) == 4100
    finally:
        served.stop()
        testbed.remove(dom)
    lost = served.events("libvirt.connection_lost")
    reconnected = [e for e in served.events("libvirt.connected") if e.get("reconnected")]
    assert len(lost) == 1 and len(reconnected) == 1, served.log_text()[-3000:]
    served.assert_no_token_logged()
