"""The RFB layer against real QEMU (the test bed): VNC authentication with the
bit-reversed DES key, ServerInit, a first FramebufferUpdate, and the whole
sans-I/O chain (browser-side RFBServer and filter, QEMU-side RFBClient)."""

from __future__ import annotations

import socket
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
from broker_vnc.rfb import (
    NEED_DATA,
    ClientInit,
    ClientMessageFilter,
    RFBClient,
    RFBSecurityError,
    RFBServer,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    SetEncodings,
    Side,
    VersionNegotiated,
)
from console_broker_testbed import Testbed

pytestmark = pytest.mark.vm

GRAPHICS = (
    "<graphics type='vnc' port='-1' autoport='yes' passwd='secret'>"
    "<listen type='address' address='127.0.0.1'/></graphics>"
    "<video><model type='vga'/></video>"
)
FULL_UPDATE_REQUEST = struct.pack(">BBHHHH", 3, 0, 0, 0, 0xFFFF, 0xFFFF)


@pytest.fixture(scope="module")
def vnc_port(testbed: Testbed) -> Iterator[int]:
    """A booted guest whose VNC server wants the password 'secret'."""
    dom = testbed.define(testbed.guest_xml(devices=GRAPHICS))
    serial = testbed.boot(dom)
    try:
        graphics = ET.fromstring(dom.XMLDesc(0)).find("devices/graphics[@type='vnc']")
        assert graphics is not None
        yield int(graphics.get("port", "-1"))
    finally:
        if serial is not None:
            serial.close()
        testbed.remove(dom)


def handshake(sock: socket.socket, client: RFBClient) -> list[object]:
    events: list[object] = []
    while True:
        event = client.next_event()
        sock.sendall(client.data_to_send())
        if event is NEED_DATA:
            client.receive_data(sock.recv(65536) or None)  # None: QEMU closed
            continue
        events.append(event)
        if isinstance(event, ServerInit):
            return events


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, "QEMU closed the connection"
        data += more
    return data


def test_vnc_auth_against_qemu_then_a_framebuffer_update(vnc_port: int) -> None:
    with socket.create_connection(("127.0.0.1", vnc_port), timeout=60) as sock:
        client = RFBClient(password="secret")
        events = handshake(sock, client)
        assert events[:3] == [
            VersionNegotiated((3, 8), (3, 8)),
            SecurityTypeSelected(2, (2,)),  # QEMU with a password offers only VNC auth
            SecuritySucceeded(2),  # QEMU accepted our DES response: the key quirk is right
        ]
        init = events[3]
        assert isinstance(init, ServerInit)
        assert (init.width, init.height) in {(720, 400), (640, 480)}
        assert init.pixel_format.bits_per_pixel == 32 and init.pixel_format.true_colour
        assert init.name_text.startswith("QEMU")
        leftover = client.take_trailing_data()

        sock.sendall(FULL_UPDATE_REQUEST)
        head = leftover + recv_exactly(sock, 4 + 12 - len(leftover))
        message_type, count = struct.unpack_from(">BxH", head)
        x, y, w, h, encoding = struct.unpack_from(">HHHHi", head, 4)
        assert message_type == 0  # FramebufferUpdate
        assert count >= 1
        assert encoding == 0 and x + w <= init.width and y + h <= init.height  # raw


def test_wrong_password_is_refused_with_qemus_reason(vnc_port: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", vnc_port), timeout=60) as sock,
        pytest.raises(RFBSecurityError, match="Authentication failed") as caught,
    ):
        handshake(sock, RFBClient(password="wrong"))
    assert caught.value.side is Side.SERVER


def test_browser_to_qemu_through_the_sans_io_chain(vnc_port: int) -> None:
    """QEMU <-socket-> RFBClient | RFBServer + filter <-memory-> a browser (an RFBClient)."""
    with socket.create_connection(("127.0.0.1", vnc_port), timeout=60) as sock:
        upstream = RFBClient(password="secret", shared=True)
        qemu_init = handshake(sock, upstream)[-1]
        assert isinstance(qemu_init, ServerInit)

        downstream, browser = RFBServer(), RFBClient()
        browser_init = None
        while browser_init is None:
            if data := downstream.data_to_send():
                browser.receive_data(data)
            while (event := browser.next_event()) is not NEED_DATA:
                if isinstance(event, ServerInit):
                    browser_init = event
            if data := browser.data_to_send():
                downstream.receive_data(data)
            while (event := downstream.next_event()) is not NEED_DATA:
                if isinstance(event, ClientInit):
                    downstream.send_server_init(qemu_init)
        assert browser_init == qemu_init  # the browser sees QEMU's size and name

        flt = ClientMessageFilter(view_only=True)
        flt.receive_data(downstream.take_trailing_data())
        # noVNC asks for ExtendedMouseButtons (-316): stripped, the rest forwarded.
        set_encodings = struct.pack(">BxH3i", 2, 3, 0, -316, -223)
        pointer = struct.pack(">BBHH", 5, 1, 10, 10)
        forwarded = flt.filter_data(set_encodings + pointer + FULL_UPDATE_REQUEST)
        assert forwarded == struct.pack(">BxH2i", 2, 2, 0, -223) + FULL_UPDATE_REQUEST
        flt2 = ClientMessageFilter()
        flt2.receive_data(set_encodings)
        assert isinstance(flt2.next_event(), SetEncodings)

        sock.sendall(forwarded)
        head = recv_exactly(sock, 4)
        assert head[0] == 0  # a FramebufferUpdate, forwarded raw to the browser
