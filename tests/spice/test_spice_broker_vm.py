"""The SPICE plugin on the real stack: ``console-broker serve``, CLI tokens, the tiny guest.

Every channel is its own WebSocket with the token's URL, as spice-html5 opens them; the
test client is the sans-I/O layer's (``spicerelay.TestClient``) over a WebSocket.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pagekit
import pytest
from broker_spice.protocol import (
    MSGC_MAIN_AGENT_DATA,
    MSGC_MAIN_AGENT_START,
    MSGC_MAIN_AGENT_TOKEN,
    MSGC_MAIN_ATTACH_CHANNELS,
    MSGC_MAIN_MOUSE_MODE_REQUEST,
    ChannelType,
    LinkError,
    Message,
    build_message,
)
from console_broker_testbed import Testbed
from servedbroker import CLI
from spicebroker import (
    FIRST_DISPLAY_MSG,
    Broker,
    RemoteViewer,
    close_code,
    connect_client,
    display_init,
    link_main,
    link_session,
    spice_guest,
    ws_client,
)
from spicerelay import TestClient, spice_port
from websockets.exceptions import InvalidStatus

from broker.api import PLAIN_PORT, handle_for_token

pytestmark = pytest.mark.vm
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


@pytest.mark.parametrize("mode", ["fd", "tcp"])
def test_channels_link_through_the_broker_and_are_bound_to_their_session(
    broker: Broker, testbed: Testbed, mode: str
) -> None:
    dom = spice_guest(testbed, mode)
    try:
        url = broker.token(dom.name())["websocket"]
        channels = link_session(lambda: ws_client(url))
        main, display, inputs = channels.main, channels.display, channels.inputs
        session_id = channels.session_id

        # a channel naming another session is refused by the broker itself
        foreign = ws_client(url)
        assert foreign.link(ChannelType.CURSOR, session_id ^ 0x5A5A) is LinkError.BAD_CONNECTION_ID
        assert close_code(foreign) == CHANNEL_REFUSED
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
        session_id = link_main(main)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
        display_init(display)
        inputs = ws_client(url)
        assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.PERMISSION_DENIED
        assert close_code(inputs) == CHANNEL_REFUSED
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
        session_id = link_main(main)
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
        display_init(display)
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


def test_every_channel_closes_with_4100_when_the_vm_stops(
    broker: Broker, testbed: Testbed
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        url = broker.token(dom.name())["websocket"]
        channels = link_session(lambda: ws_client(url))
        dom.destroy()
        codes = [close_code(c, timeout=10) for c in (channels.main, channels.display,
                                                     channels.inputs)]
        assert codes == [4100, 4100, 4100]
        with pytest.raises(InvalidStatus) as refused:
            ws_client(broker.token(dom.name())["websocket"])
        assert refused.value.response.status_code == 409  # vm_not_running
    finally:
        testbed.remove(dom)


def test_a_client_vanishing_before_display_init_leaves_the_vm_running(
    broker: Broker, testbed: Testbed
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        url = broker.token(dom.name())["websocket"]
        main = ws_client(url)
        session_id = link_main(main)
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
            ink = browser.execute_script(pagekit.SPICE_INK)
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
        doc = broker.token(dom.name())
        # the broker serves the same file for the token, which it does not use up
        status, served = broker.get(doc["file"].removeprefix(broker.url))
        assert status == 200 and served.decode() == doc["vv"]
        vv = doc["vv"]
        assert "type=spice" in vv and f"proxy=http://127.0.0.1:{broker.connect_port}" in vv
        assert "delete-this-file=1" in vv
        # No VM address: the host is the session handle, the only port the CONNECT target's.
        fields = dict(line.split("=", 1) for line in vv.splitlines() if "=" in line)
        assert fields["host"] == handle_for_token(doc["token"]) and "tls-port" not in fields
        assert fields["port"] == str(PLAIN_PORT)
        channels = link_session(lambda: connect_client(vv))
        main, display, inputs = channels.main, channels.display, channels.inputs
        session_id = channels.session_id
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


@pytest.mark.usefixtures("remote_viewer")
def test_remote_viewer_shows_the_guests_screen_with_the_vv_file(
    broker: Broker, testbed: Testbed, tmp_path: Path
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        vv = tmp_path / "console.vv"
        broker.token(dom.name(), "--vv", str(vv))
        assert vv.stat().st_mode & 0o777 == 0o600
        with RemoteViewer(vv, tmp_path) as viewer:
            viewer.wait_for_the_guests_screen()
            assert not vv.exists()  # delete-this-file=1: remote-viewer removed it
        time.sleep(1.0)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)
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
        session_id = link_main(main)
        display = ws_client(url)
        assert display.link(ChannelType.DISPLAY, session_id, ticket=bytes(128)) is LinkError.OK
        display_init(display)
        display.wait_for(lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, 30)
        display.close()
        main.close()
    finally:
        testbed.remove(dom)
    assert "s3cret-spice" not in broker.log_text()


def test_the_vv_file_over_http_needs_a_valid_token(broker: Broker) -> None:
    status, body = broker.get("/file/spice?token=abc.def-ghi")
    assert status == 401 and b"invalid token" in body
    status, _body = broker.get("/file/serial?token=abc.def-ghi")
    assert status == 404  # the serial console has no native clients
