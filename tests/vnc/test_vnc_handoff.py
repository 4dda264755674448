"""The VNC page's "Open in native client": the page asks the broker for a handoff handle
for its live session and shows the ``console-broker open`` command that uses it.

Without a VM: the page serves its handoff module, the same file as the SPICE page's.
On the real stack (headless Chromium, a ``console-broker serve`` subprocess, the tiny
guest in fd mode): the button's command names this page's own address and a fresh
handle; that handle reaches the guest's VNC display (RFB's handshake to QEMU's
ServerInit through the broker), once; the page's session is not disturbed; a session
with enough handles waiting says so; and ``console-broker open --no-viewer --listen``
given the command's URL bridges a VNC client on a local port to the guest.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from servedbroker import CLI, free_port
from vncstack import CANVAS, RFBSocket, Served, enabled_guest, settled_server_init
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from broker.handoff import handle_id

REPO = Path(__file__).resolve().parents[2]
#: The command the dialog shows: the page's own URL with a handle.
COMMAND = re.compile(
    r"console-broker open '(?P<url>(?P<base>http://127\.0\.0\.1:\d+)/console/vnc/"
    r"\?token=(?P<handle>h\.[A-Za-z0-9_-]{32}))'"
)
READY = "return window.consoleHandoff && window.consoleHandoff.state"


def test_the_handoff_module_is_served_and_shared_with_the_spice_page() -> None:
    vnc = (REPO / "plugins" / "vnc" / "web" / "handoff.js").read_bytes()
    spice = (REPO / "plugins" / "spice" / "web" / "handoff.js").read_bytes()
    assert vnc == spice, "plugins/{vnc,spice}/web/handoff.js must stay the same file"
    html = (REPO / "plugins" / "vnc" / "web" / "console.html").read_text()
    for part in ("native", "native-dialog", "native-status", "native-ready", "native-command",
                 "native-note", "native-copy", "native-close"):
        assert f'id="{part}"' in html, part
    import broker_vnc

    from broker.config import Config, HTTPSection
    from broker.plugins import PluginContext

    context = PluginContext("vnc", Config(http=HTTPSection(assets_dir="/nonexistent")))
    served = broker_vnc.PROTOCOL.page("app/handoff.js", context)
    assert served is not None and served.body == vnc
    assert served.content_type.startswith("text/javascript")


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    dom, _ = enabled_guest(testbed, "fd")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = browser.execute_script(
                "return [window.consoleStatus, window.consoleHandoff]"
            )
            raise AssertionError(f"timed out waiting for {script!r}; the page: {state}")
        time.sleep(0.2)


def _connected(browser: Any, page: str) -> None:
    browser.get(page)
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'connected'")
    _wait(browser, f"const r = (() => {{{CANVAS}}})(); return r && r[2] > 1;")


def _ask(browser: Any) -> str:
    """Click "Open in native client"; the dialog's state once the broker answered."""
    browser.find_element("id", "native").click()
    return str(_wait(browser, f"const s = ({READY.removeprefix('return ')}); "
                              "return s !== 'asking' && s !== 'idle' && s"))


def _close_dialog(browser: Any) -> None:
    """Close the dialog and wait for the page's close handler: ``open`` turns false at
    once, but the dialog's close event (which clears the command) is a task queued after."""
    browser.find_element("id", "native-close").click()
    _wait(browser, "return !document.getElementById('native-dialog').open"
                   " && window.consoleHandoff.state === 'idle'")


def _ws_url(page_url: str) -> str:
    return page_url.replace("http://", "ws://", 1).replace("/console/vnc/?", "/ws/vnc?", 1)


@pytest.mark.vm
def test_the_page_shows_a_command_whose_handle_reaches_the_console(
    browser: Any, served: Served, guest: Any
) -> None:
    init = settled_server_init(guest)
    _connected(browser, served.token(guest.name())["page"])
    button = browser.find_element("id", "native")
    assert button.text == "Open in native client" and button.is_enabled()

    assert _ask(browser) == "ready"
    dialog = browser.find_element("id", "native-dialog")
    assert dialog.is_displayed()
    command = browser.find_element("id", "native-command").get_property("value")
    assert command == browser.execute_script("return window.consoleHandoff.command")
    found = COMMAND.fullmatch(command)
    assert found is not None, command
    assert found["base"] == served.url  # the page's own address
    handle = found["handle"]
    note = browser.find_element("id", "native-note").text
    assert note.startswith("Single use, valid 60 s") and "docs/native.md" in note
    browser.find_element("id", "native-copy").click()
    status = _wait(browser, "return document.getElementById('native-status').textContent")
    assert status.startswith(("Copied.", "Select the command")), status

    # The handle reaches the guest's display: RFB through the broker to QEMU's ServerInit.
    with connect(_ws_url(found["url"]), subprotocols=["binary"], open_timeout=10) as ws:  # type: ignore[list-item]
        seen = RFBSocket(ws).handshake()
        assert (seen.width, seen.height, seen.name_text) == (
            init.width, init.height, init.name_text,
        )
        # once: a second use is refused (close code 4004: http.refusals = "close")
        with connect(_ws_url(found["url"]), open_timeout=10) as again:
            with pytest.raises(ConnectionClosed) as closed:
                again.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
    # the page's own session went on meanwhile
    assert browser.execute_script("return window.consoleStatus.state") == "connected"
    _close_dialog(browser)
    assert browser.find_element("id", "native-command").get_property("value") == ""

    handoffs = served.events("token.handoff")
    assert [e["handoff"] for e in handoffs][-1] == handle_id(handle)
    assert handoffs[-1]["domain"] == guest.UUIDString() and handoffs[-1]["rights"] == "full"
    served.assert_no_token_logged(handle, handle[2:])
    browser.get("about:blank")


@pytest.mark.vm
def test_a_session_with_enough_handles_waiting_says_so(
    browser: Any, served: Served, guest: Any
) -> None:
    _connected(browser, served.token(guest.name(), view_only=True)["page"])
    handles = []
    for _ in range(4):  # the broker keeps at most 4 unused handles per session
        assert _ask(browser) == "ready"
        handles.append(browser.execute_script("return window.consoleHandoff.command"))
        _close_dialog(browser)
    assert len(set(handles)) == 4  # a new handle each time
    assert _ask(browser) == "failed"
    status = browser.find_element("id", "native-status").text
    assert "Enough links are waiting" in status and "(429" in status, status
    _close_dialog(browser)
    assert served.events("token.handoff")[-1]["rights"] == "view"
    # the session ended: no more button
    browser.get("about:blank")
    served.assert_no_token_logged(*(COMMAND.fullmatch(c)["handle"] for c in handles))  # type: ignore[index]


@pytest.mark.vm
def test_console_broker_open_bridges_the_commands_url(
    browser: Any, served: Served, guest: Any, tmp_path: Path
) -> None:
    init = settled_server_init(guest)
    _connected(browser, served.token(guest.name())["page"])
    assert _ask(browser) == "ready"
    found = COMMAND.fullmatch(browser.execute_script("return window.consoleHandoff.command"))
    assert found is not None
    port = free_port()
    err = (tmp_path / "open.err").open("wb")
    process = subprocess.Popen(
        [*CLI, "open", found["url"], "--no-viewer", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=err,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "open.err").read_text()
                assert time.monotonic() < deadline, "console-broker open never listened"
                time.sleep(0.2)
        with sock:
            seen = _rfb_server_init(sock)
        assert (seen.width, seen.height) == (init.width, init.height)
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=15)
        err.close()
    served.assert_no_token_logged(found["handle"])
    assert found["handle"] not in (tmp_path / "open.err").read_text()
    browser.get("about:blank")


def _rfb_server_init(sock: socket.socket) -> Any:
    """RFB's handshake as a VNC viewer does it on *sock*, to the ServerInit."""
    from broker_vnc.rfb import NEED_DATA, RFBClient, ServerInit

    client = RFBClient(shared=True)
    sock.settimeout(30)
    while True:
        event = client.next_event()
        out = client.data_to_send()
        if out:
            sock.sendall(out)
        if event is NEED_DATA:
            data = sock.recv(65536)
            assert data, "the bridge closed before ServerInit"
            client.receive_data(data)
            continue
        if isinstance(event, ServerInit):
            return event
