"""The VNC plugin on the real stack: a ``console-broker serve`` subprocess, tokens from
the CLI, the tiny guest provisioned with ``xml enable`` (its VNC password kept).

* fd and tcp mode: the browser sees security None and QEMU's ServerInit, and gets
  pixels, although the guest's VNC server wants the password ``secret`` (in fd mode
  libvirt's socket skips QEMU's authentication; in tcp mode the broker logs in).
* websocket mode: QEMU's own handshake, passed through.
* view-only, proven on the guest: keys typed in a full session reach the shell on
  the VGA console (its command writes to the serial port), keys from a view-only
  session do not.
* two sessions on one VM stay connected, whatever shared flag the browsers send.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from broker_vnc.rfb import SecuritySucceeded, SecurityTypeSelected, VersionNegotiated
from console_broker_testbed import SerialConsole, Testbed
from vncstack import (
    GRAPHICS,
    GRAPHICS_NO_PASSWORD,
    RFBSocket,
    Served,
    distinct_pixels,
    enabled_guest,
    settled_server_init,
)
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.vm


class Guests(dict[str, tuple[Any, SerialConsole | None]]):
    """Guests by mode, booted when first asked for; only the fd guest has its serial
    console open (the key test reads it)."""

    def __init__(self, testbed: Testbed) -> None:
        super().__init__()
        self.testbed = testbed

    def __missing__(self, mode: str) -> tuple[Any, SerialConsole | None]:
        devices = GRAPHICS_NO_PASSWORD if mode == "websocket" else GRAPHICS
        self[mode] = enabled_guest(self.testbed, mode, devices, serial=mode == "fd")
        return self[mode]


@pytest.fixture(scope="module")
def guests(testbed: Testbed) -> Iterator[Guests]:
    made = Guests(testbed)
    try:
        yield made
    finally:
        for dom, serial in made.values():
            if serial is not None:
                serial.close()
            testbed.remove(dom)


@pytest.mark.parametrize("mode", ["fd", "tcp"])
def test_a_password_guest_shows_its_screen_with_security_none(
    served: Served, guests: Guests, mode: str
) -> None:
    dom, _serial = guests[mode]
    expected = settled_server_init(dom)
    with served.connect(dom.name()) as ws:
        rfb = RFBSocket(ws)
        init = rfb.handshake()
        assert rfb.events[:3] == [
            VersionNegotiated((3, 8), (3, 8)),
            SecurityTypeSelected(1, (1,)),  # the broker offers only None
            SecuritySucceeded(1),
        ]
        assert init == expected  # QEMU's size, pixel format and name
        assert (init.width, init.height) in {(720, 400), (640, 480)}
        pixels = rfb.screen(init)
        assert len(pixels) == init.width * init.height * 4  # a full update
        assert distinct_pixels(pixels) > 1  # the console's text, not a blank screen
    connected = [e for e in served.log_events("vnc.connected") if e["domain_name"] == dom.name()]
    assert connected, served.log_text()[-2000:]
    # fd: libvirt's socket skips QEMU's authentication; tcp: the broker did VNC auth.
    assert connected[-1]["security_type"] == (1 if mode == "fd" else 2)
    assert "secret" not in served.log_text()


def test_websocket_mode_passes_qemus_own_handshake_through(
    served: Served, guests: Guests
) -> None:
    dom, _serial = guests["websocket"]
    expected = settled_server_init(dom)
    with served.connect(dom.name()) as ws:
        rfb = RFBSocket(ws)
        init = rfb.handshake()
        assert rfb.events[1] == SecurityTypeSelected(1, (1,))  # QEMU's list, unchanged
        assert init == expected
        assert distinct_pixels(rfb.screen(init)) > 1
    with served.connect(dom.name(), view_only=True) as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4009


def _serial_has(serial: SerialConsole, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text.encode() in serial.output:
            return True
        time.sleep(0.1)
    return False


def test_view_only_keys_never_reach_the_guest(
    served: Served, guests: Guests
) -> None:
    dom, serial = guests["fd"]
    assert serial is not None
    with served.connect(dom.name(), view_only=True) as ws:
        rfb = RFBSocket(ws)
        rfb.handshake()
        rfb.type("echo vnc-view-leak >/dev/ttyS0\n")
        time.sleep(1.0)  # let anything that got through run
        rfb.request_raw_update(rfb.client.server_init)  # type: ignore[arg-type]
        rfb.read_raw_update(rfb.client.server_init)  # type: ignore[arg-type]  # still served
    with served.connect(dom.name()) as ws:
        rfb = RFBSocket(ws)
        rfb.handshake()
        rfb.type("echo vnc-key-ok >/dev/ttyS0\n")
        assert _serial_has(serial, "vnc-key-ok", 60), serial.output[-500:]
    assert b"vnc-view-leak" not in serial.output


def test_two_sessions_on_one_vm_stay_connected(
    served: Served, guests: Guests
) -> None:
    dom, _serial = guests["tcp"]
    with served.connect(dom.name()) as first, served.connect(dom.name()) as second:
        one = RFBSocket(first, shared=False)  # asks QEMU for exclusive access: not passed on
        init = one.handshake()
        two = RFBSocket(second, shared=False)
        assert two.handshake() == init
        for rfb in (one, two, one):
            rfb.request_raw_update(init)
            assert len(rfb.read_raw_update(init)) == init.width * init.height * 4
    shared = [e["shared"] for e in served.log_events("vnc.connected")]
    assert shared and all(shared)


def test_the_page_is_served(served: Served) -> None:
    status, body = served.get("/console/vnc/")
    assert status == 200 and b"app/console.js" in body
    status, body = served.get("/console/vnc/novnc/core/rfb.js")
    assert status == 200 and b"export default class RFB" in body
