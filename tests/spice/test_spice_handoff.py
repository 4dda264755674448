"""The SPICE page's "Open in native client": the page asks the broker for a handoff handle
for its live session and shows the ``console-broker open`` command that uses it.

Without a VM: the page serves the handoff module and holds the dialog. On the real stack
(headless Chromium on spice-html5, a ``console-broker serve`` subprocess with a CONNECT
listener, the tiny guest in fd mode): the command names this page's own address and a
fresh handle; the handle's channels (main, display, inputs) link over WebSockets and
draw, bound to one session of their own while the page's goes on; another handle's
``.vv`` file, fetched from the broker, links the same channels through CONNECT tunnels,
as remote-viewer would; no handle reaches the broker's log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker
from spicebroker import Broker, connect_client, link_session, spice_guest, ws_client

from broker.handoff import handle_id

REPO = Path(__file__).resolve().parents[2]
COMMAND = re.compile(
    r"console-broker open '(?P<url>(?P<base>http://127\.0\.0\.1:\d+)/console/spice/"
    r"\?token=(?P<handle>h\.[A-Za-z0-9_-]{32}))'"
)


def test_the_page_serves_the_handoff_module_and_holds_the_dialog() -> None:
    import broker_spice

    from broker.config import Config, HTTPSection
    from broker.plugins import PluginContext

    html = (REPO / "plugins" / "spice" / "web" / "console.html").read_text()
    for part in ("native", "native-dialog", "native-status", "native-ready", "native-command",
                 "native-note", "native-copy", "native-close"):
        assert f'id="{part}"' in html, part
    context = PluginContext("spice", Config(http=HTTPSection(assets_dir="/nonexistent")))
    served = broker_spice.PROTOCOL.page("app/handoff.js", context)
    assert served is not None
    assert served.body == (REPO / "plugins" / "spice" / "web" / "handoff.js").read_bytes()
    assert served.content_type.startswith("text/javascript")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    served = Broker(tmp_path_factory.mktemp("spice-handoff"))
    try:
        yield served
    finally:
        served.stop()
    served.assert_no_token_logged()


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = browser.execute_script(
                "return [document.body.dataset.state, window.consoleHandoff]"
            )
            raise AssertionError(f"timed out waiting for {script!r}; the page: {state}")
        time.sleep(0.2)


def _ask(browser: Any) -> re.Match[str]:
    """Click "Open in native client"; the command once the broker answered."""
    browser.find_element("id", "native").click()
    _wait(browser, "return window.consoleHandoff.state === 'ready'")
    command = browser.find_element("id", "native-command").get_property("value")
    found = COMMAND.fullmatch(command)
    assert found is not None, command
    browser.find_element("id", "native-close").click()
    return found


@pytest.mark.vm
def test_the_page_hands_its_console_to_native_clients(
    broker: Broker, testbed: Testbed, browser: Any
) -> None:
    dom = spice_guest(testbed, "fd")
    try:
        browser.get(broker.token(dom.name())["page"])
        _wait(browser, "return document.body.dataset.state === 'connected'")
        assert browser.find_element("id", "native").is_enabled()
        first = _ask(browser)
        assert first["base"] == broker.url  # the page's own address
        # the handle's channels link over WebSockets, as spice-html5 opens them
        url = first["url"].replace("http://", "ws://", 1).replace("/console/spice/?",
                                                                "/ws/spice?", 1)
        channels = link_session(lambda: ws_client(url))
        channels.close()
        # another handle's .vv file: the same channels through CONNECT tunnels
        second = _ask(browser)
        status, vv = broker.get(f"/file/spice?token={second['handle']}")
        assert status == 200, vv
        tunneled = link_session(lambda: connect_client(vv.decode()))
        tunneled.close()
        assert browser.execute_script("return document.body.dataset.state") == "connected"
        browser.get("about:blank")  # closes the page's channels
        time.sleep(2.0)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        testbed.remove(dom)
    handles = [first["handle"], second["handle"]]
    linked = broker.events("spice.channel_linked")
    for handle in handles:
        mine = {e["channel"] for e in linked if e.get("jti") == handle_id(handle)}
        assert {"main", "display", "inputs"} <= mine, (handle_id(handle), mine)
    issued = {e["handoff"] for e in broker.events("token.handoff")}
    assert {handle_id(h) for h in handles} <= issued
    ServedBroker.assert_no_token_logged(broker, *handles, *(h[2:] for h in handles),
                                        jwt_shape=False)
