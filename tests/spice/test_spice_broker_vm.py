"""The SPICE plugin on the real stack: ``console-broker serve``, CLI tokens, the tiny guest.

Every channel is its own WebSocket with the token's URL, as spice-html5 opens them; the
test client is the sans-I/O layer's (``spicerelay.TestClient``) over a WebSocket.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from broker_spice.protocol import (
    MSGC_DISPLAY_INIT,
    MSGC_MAIN_AGENT_DATA,
    MSGC_MAIN_AGENT_START,
    MSGC_MAIN_AGENT_TOKEN,
    MSGC_MAIN_ATTACH_CHANNELS,
    MSGC_MAIN_MOUSE_MODE_REQUEST,
    ChannelType,
    LinkError,
    MainInit,
    Message,
    build_display_init,
    build_message,
)
from servedbroker import CLI
from spicebroker import Broker, WebSocketSock, connect_client, spice_guest, ws_client
from spicerelay import TestClient, spice_port
from websockets.exceptions import InvalidStatus

from broker.testbed import Testbed

pytestmark = pytest.mark.vm
#: spice-server's display messages (SPICE_MSG_DISPLAY_*) start at 101.
FIRST_DISPLAY_MSG = 101
CHANNEL_REFUSED = 4107
#: SPICE_MSG_MAIN_CHANNELS_LIST: QEMU's answer to ATTACH_CHANNELS.
MSG_MAIN_CHANNELS_LIST = 104


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    served = Broker(tmp_path_factory.mktemp("spice-serve"))
    try:
        yield served
    finally:
        served.stop()
    served.assert_no_token_logged()


def _link_main(client: TestClient) -> int:
    assert client.link(ChannelType.MAIN, 0) is LinkError.OK
    init = client.wait_for(lambda e: isinstance(e, MainInit), timeout=20)
    assert isinstance(init, MainInit) and init.session_id != 0
    return init.session_id


def _display_init(client: TestClient) -> None:
    client.send(build_message(MSGC_DISPLAY_INIT, build_display_init(), mini_header=True, serial=1))


def _close_code(client: TestClient, timeout: float = 5.0) -> int | None:
    sock = client.sock
    assert isinstance(sock, WebSocketSock)
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while sock.close_code is None and time.monotonic() < deadline:
        try:
            sock.recv(65536)
        except TimeoutError:
            continue
    return sock.close_code


@pytest.mark.parametrize("mode", ["fd", "tcp"])
def test_channels_link_through_the_broker_and_are_bound_to_their_session(
    broker: Broker, testbed: Testbed, mode: str
) -> None:
    dom = spice_guest(testbed, mode)
    try:
        url = broker.token(dom.name())["websocket"]
        main = ws_client(url)
        session_id = _link_main(main)

        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        _display_init(display)
        drawn = display.wait_for(
            lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, timeout=30
        )
        assert isinstance(drawn, Message)

        inputs = ws_client(url)
        assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.OK

        # a channel naming another session is refused by the broker itself
        foreign = ws_client(url)
        assert foreign.link(ChannelType.CURSOR, session_id ^ 0x5A5A) is LinkError.BAD_CONNECTION_ID
        assert _close_code(foreign) == CHANNEL_REFUSED
        # a second main channel would start another session with the same token
        second_main = ws_client(url)
        assert second_main.link(ChannelType.MAIN, 0) is LinkError.PERMISSION_DENIED

        for client in (inputs, display, main):
            client.close()
        # once the session's main channel is gone, its token admits nothing more
        time.sleep(1.0)
        with pytest.raises(InvalidStatus) as refused:
            ws_client(url)
        assert refused.value.response.status_code == 401
        assert refused.value.response.body == b"token already used\n"
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)
    uuid = dom.UUIDString()
    linked = [e for e in broker.events("spice.channel_linked") if e.get("domain") == uuid]
    assert {e["channel"] for e in linked} >= {"main", "display", "inputs"}


def test_a_view_only_session_gets_no_inputs_channel(broker: Broker, testbed: Testbed) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        url = broker.token(dom.name(), "--view-only")["websocket"]
        main = ws_client(url)
        session_id = _link_main(main)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        _display_init(display)
        inputs = ws_client(url)
        assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.PERMISSION_DENIED
        assert _close_code(inputs) == CHANNEL_REFUSED
        display.close()
        main.close()
    finally:
        testbed.remove(dom)


def test_a_view_only_main_channel_drops_agent_messages_and_stays_up(
    broker: Broker, testbed: Testbed
) -> None:
    """Agent and mouse-mode messages are dropped by the broker; what follows them still
    reaches QEMU (ATTACH_CHANNELS is answered with the channel list) and the session
    carries on (a display channel links after them)."""
    dom = spice_guest(testbed, "fd")
    try:
        url = broker.token(dom.name(), "--view-only")["websocket"]
        main = ws_client(url)
        session_id = _link_main(main)
        main.send(
            build_message(MSGC_MAIN_AGENT_START, struct.pack("<I", 10), mini_header=True)
            + build_message(MSGC_MAIN_MOUSE_MODE_REQUEST, struct.pack("<H", 2), mini_header=True)
            + build_message(MSGC_MAIN_AGENT_DATA, bytes(64), mini_header=True)
            + build_message(MSGC_MAIN_AGENT_TOKEN, struct.pack("<I", 5), mini_header=True)
            + build_message(MSGC_MAIN_ATTACH_CHANNELS, mini_header=True)
        )
        listed = main.wait_for(
            lambda e: isinstance(e, Message) and e.type == MSG_MAIN_CHANNELS_LIST, timeout=20
        )
        assert isinstance(listed, Message)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        _display_init(display)
        drawn = display.wait_for(
            lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, timeout=30
        )
        assert isinstance(drawn, Message)
        display.close()
        main.close()
        time.sleep(1.0)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)
    uuid = dom.UUIDString()
    dropped = [e for e in broker.events("spice.view_only_dropped") if e.get("domain") == uuid]
    assert {e["message_type"] for e in dropped} == {105, 106, 107, 108}


def test_a_client_vanishing_before_display_init_leaves_the_vm_running(
    broker: Broker, testbed: Testbed
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        url = broker.token(dom.name())["websocket"]
        main = ws_client(url)
        session_id = _link_main(main)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        display.close()  # gone before DISPLAY_INIT: the broker's guard completes it
        time.sleep(1.0)
        main.close()  # the session ends: without the guard, QEMU 7.2 crashes the VM here
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            state, reason = dom.state()
            assert state == libvirt.VIR_DOMAIN_RUNNING, (state, reason)
            time.sleep(0.25)
    finally:
        testbed.remove(dom)
    assert any(e.get("domain") == dom.UUIDString() for e in broker.events("spice.guard_sent"))


_CANVAS_INK = """
const canvas = document.querySelector('#spice-screen canvas');
if (!canvas || !canvas.width) { return -1; }
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 40 || data[i + 1] > 40 || data[i + 2] > 40) { ink++; }
}
return ink;
"""


def test_spice_html5_in_a_browser_shows_the_guests_screen(
    broker: Broker, testbed: Testbed, browser: Any
) -> None:
    status, body = broker.get("/console/spice/spice-html5/src/main.js")
    assert status == 200 and b"SpiceMainConn" in body
    assert broker.get("/console/spice/spice-html5/../package.json")[0] == 404
    dom = spice_guest(testbed, "fd")
    try:
        browser.get(broker.token(dom.name())["page"])
        deadline = time.monotonic() + 60
        ink = -1
        while time.monotonic() < deadline:
            ink = browser.execute_script(_CANVAS_INK)
            if ink > 100:
                break
            time.sleep(0.5)
        state = browser.execute_script("return document.body.dataset.state")
        assert ink > 100, (ink, state, browser.get_log("browser"))
        assert state == "connected"
        browser.get("about:blank")  # closes every channel
        time.sleep(2.0)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)
    uuid = dom.UUIDString()
    events = broker.events("spice.channel_linked")
    linked = {e["channel"] for e in events if e.get("domain") == uuid}
    assert {"main", "display", "inputs", "cursor"} <= linked, linked


def test_native_channels_link_through_connect_with_what_the_vv_file_says(
    broker: Broker, testbed: Testbed
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        vv = broker.token(dom.name())["vv"]
        assert "type=spice" in vv and f"proxy=http://127.0.0.1:{broker.connect_port}" in vv
        assert "delete-this-file=1" in vv and "127.0.0.1:59" not in vv
        main = connect_client(vv)
        session_id = _link_main(main)
        display = connect_client(vv)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        _display_init(display)
        drawn = display.wait_for(
            lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, timeout=30
        )
        assert isinstance(drawn, Message)
        inputs = connect_client(vv)
        assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.OK
        foreign = connect_client(vv)
        assert foreign.link(ChannelType.CURSOR, session_id ^ 0x5A5A) is LinkError.BAD_CONNECTION_ID
        for client in (foreign, inputs, display, main):
            client.close()
        time.sleep(1.0)
        with pytest.raises(ConnectionRefusedError, match="401"):
            connect_client(vv)  # the session is over: its token admits nothing more
        # a handle that stands for no token
        bogus = vv.replace("host=", "host=x")
        with pytest.raises(ConnectionRefusedError, match="401"):
            connect_client(bogus)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)


def _free_display() -> int:
    for number in range(90, 200):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(
            f"/tmp/.X{number}-lock"
        ).exists():
            return number
    raise AssertionError("no free X display number")


def _xwd_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the 32-bit pixels of Xvfb's screen dump (XWD, -fbdir)."""
    data = path.read_bytes()
    fields = struct.unpack(">25I", data[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    bits_per_pixel, bytes_per_line, ncolors = fields[11], fields[12], fields[19]
    assert bits_per_pixel == 32, bits_per_pixel
    start = header_size + ncolors * 12
    pixels = data[start : start + bytes_per_line * height]
    return width, height, pixels


@pytest.mark.skipif(not shutil.which("remote-viewer") or not shutil.which("Xvfb"),
                    reason="remote-viewer and Xvfb are needed")
def test_remote_viewer_shows_the_guests_screen_with_the_vv_file(
    broker: Broker, testbed: Testbed, tmp_path: Path
) -> None:
    number = _free_display()
    xvfb = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1024x768x24", "-wr", "-nolisten", "tcp",
         "-fbdir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    dom = spice_guest(testbed, "fd")
    viewer = None
    try:
        vv = tmp_path / "console.vv"
        broker.token(dom.name(), "--vv", str(vv))
        assert vv.stat().st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            assert time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.1)
        env = {**os.environ, "DISPLAY": f":{number}"}
        viewer = subprocess.Popen(
            ["remote-viewer", str(vv)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        colors: collections.Counter[bytes] = collections.Counter()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1.0)
            _width, _height, pixels = _xwd_pixels(tmp_path / "Xvfb_screen0")
            colors = collections.Counter(pixels[i : i + 3] for i in range(0, len(pixels), 4))
            # the root is white (-wr), GTK's chrome light; the guest's VGA text console is
            # black with text in VGA grey (0xA8A8A8: the 6-bit palette)
            if colors[b"\0\0\0"] > 100_000 and colors[b"\xa8\xa8\xa8"] > 500:
                break
        assert colors[b"\0\0\0"] > 100_000, colors.most_common(8)
        assert colors[b"\xa8\xa8\xa8"] > 500, colors.most_common(8)
        assert not vv.exists()  # delete-this-file=1: remote-viewer removed it
        assert viewer.poll() is None
    finally:
        if viewer is not None:
            viewer.terminate()
            viewer.wait(timeout=10)
        time.sleep(1.0)
        try:
            assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        finally:
            testbed.remove(dom)
            xvfb.terminate()
            xvfb.wait(timeout=10)
    uuid = dom.UUIDString()
    events = broker.events("spice.channel_linked")
    linked = {e["channel"] for e in events if e.get("domain") == uuid}
    assert {"main", "display", "inputs", "cursor"} <= linked, linked
    opened = [e for e in broker.events("session.opened") if e.get("domain") == uuid]
    assert opened and all(e.get("subprotocol") is None for e in opened)  # CONNECT tunnels


def test_tcp_mode_with_a_spice_password_the_broker_logs_in_and_the_client_never_knows(
    broker: Broker, testbed: Testbed
) -> None:
    from lxml import etree

    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "spice", "--mode", "tcp"],
        input=testbed.guest_xml(), check=True, capture_output=True, text=True,
    ).stdout
    root = etree.fromstring(enabled.encode())
    graphics = root.find("devices/graphics[@type='spice']")
    assert graphics is not None
    graphics.set("passwd", "s3cret-spice")
    dom = testbed.define(etree.tostring(root).decode())
    testbed.boot(dom, console=False)
    try:
        assert "s3cret-spice" not in dom.XMLDesc(0)  # only the secure XML holds it
        direct = TestClient(socket.create_connection(("127.0.0.1", spice_port(dom)), timeout=10))
        # QEMU does want the password: without it, it refuses
        assert direct.link(ChannelType.MAIN, 0) is LinkError.PERMISSION_DENIED
        direct.close()
        url = broker.token(dom.name())["websocket"]
        main = ws_client(url)
        # the client's ticket is the wrong password: the broker drops it and sends its own
        session_id = _link_main(main)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id, ticket=bytes(128)) is LinkError.OK
        _display_init(display)
        display.wait_for(lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, 30)
        display.close()
        main.close()
    finally:
        testbed.remove(dom)
    assert "s3cret-spice" not in broker.log_text()


def test_the_vv_file_over_http(broker: Broker) -> None:
    status, body = broker.get("/console/spice/vv/" + "abc.def-ghi")
    assert status == 200
    text = body.decode()
    assert "[virt-viewer]" in text and f"proxy=http://127.0.0.1:{broker.connect_port}" in text
    assert "host=mfrggltemvtc2z3ine\n" in text  # base32 of the token, lower case
