"""The VNC page's presence panel and "Take control" (web/presence.js, shared with the SPICE
page), and one keyboard on the real stack.

Without a VM: the module is served and is the SPICE page's too, the page holds its parts,
and what the status says for each state (the module's own functions, run by Node).

On the real stack (headless Chromium, a ``console-broker serve`` with ``vnc.input =
"single"``, the tiny guest in fd mode with its serial console open): two noVNC pages on
one guest. The second page shows two viewers and that the first, named by its token, has
the keyboard; keys typed on its canvas never reach the guest's shell (the VGA console's
shell would write them to the serial port), while the first page's do. After **Take
control** on the second page its keys arrive, the first page says it lost the keyboard,
and its keys are dropped in turn.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import SerialConsole, Testbed
from vncstack import CANVAS, Served, enabled_guest, settled_server_init

REPO = Path(__file__).resolve().parents[2]
PRESENCE_JS = REPO / "plugins" / "vnc" / "web" / "presence.js"
PARTS = ("presence", "take-control", "viewers", "presence-panel", "presence-list")


def test_the_presence_module_is_served_and_shared_with_the_spice_page() -> None:
    vnc = PRESENCE_JS.read_bytes()
    assert vnc == (REPO / "plugins" / "spice" / "web" / "presence.js").read_bytes(), (
        "plugins/{vnc,spice}/web/presence.js must stay the same file"
    )
    import broker_vnc

    from broker.config import Config, HTTPSection
    from broker.plugins import PluginContext

    context = PluginContext("vnc", Config(http=HTTPSection(assets_dir="/nonexistent")))
    served = broker_vnc.PROTOCOL.page("app/presence.js", context)
    assert served is not None and served.body == vnc
    assert served.content_type.startswith("text/javascript")
    for plugin in ("vnc", "spice"):
        html = (REPO / "plugins" / plugin / "web" / "console.html").read_text()
        for part in PARTS:
            assert f'id="{part}"' in html, (plugin, part)
        script = (REPO / "plugins" / plugin / "web" / "console.js").read_text()
        assert "from './presence.js'" in script and f"setupPresence('{plugin}'" in script
    # names are text, never markup
    assert "innerHTML" not in PRESENCE_JS.read_text()


def _viewer(id: str, name: str | None, *, you: bool = False, input: bool = False) -> dict[str, Any]:
    return {"id": id, "name": name, "address": "10.0.0.9", "rights": "full", "protocol": "vnc",
            "since": "2030-01-01T00:00:00Z", "input": input, "you": you}


STATES = [
    ({"mode": "single", "rights": "full", "input": True, "holder": "a",
      "viewers": [_viewer("a", "Alice", you=True, input=True)]}, False,
     "You have the keyboard"),
    ({"mode": "single", "rights": "full", "input": False, "holder": "a",
      "viewers": [_viewer("a", "Alice", input=True), _viewer("b", None, you=True)]}, False,
     "Watching: Alice has the keyboard"),
    ({"mode": "single", "rights": "full", "input": False, "holder": "b",
      "viewers": [_viewer("a", "Alice", you=True), _viewer("b", None, input=True)]}, True,
     "anonymous (10.0.0.9) took the keyboard: you are watching"),
    ({"mode": "single", "rights": "full", "input": False, "holder": None,
      "viewers": [_viewer("a", "Alice", you=True)]}, False,
     "Nobody has the keyboard"),
    ({"mode": "single", "rights": "view", "input": False, "holder": None,
      "viewers": [_viewer("a", "Alice", you=True)]}, False, "Nobody has the keyboard"),
    ({"mode": "shared", "rights": "full", "input": True, "holder": None,
      "viewers": [_viewer("a", "Alice", you=True), _viewer("b", "Bob"), _viewer("c", "C")]},
     False, ""),
    ({"mode": "shared", "rights": "full", "input": True, "holder": None,
      "viewers": [_viewer("a", None, you=True)]}, False, ""),
]


def test_what_the_status_says(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js here (scripts/setup-host installs it)")
    module = tmp_path / "presence.mjs"
    shutil.copy(PRESENCE_JS, module)
    code = (
        f"import {{ statusText }} from '{module}';\n"
        f"const states = {json.dumps([[doc, lost] for doc, lost, _ in STATES])};\n"
        "console.log(JSON.stringify(states.map(([doc, lost]) => statusText(doc, lost))));\n"
    )
    out = subprocess.run([node, "--input-type=module", "-e", code], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    assert json.loads(out) == [text for _, _, text in STATES]


# --- the real stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A broker whose VNC displays have one keyboard."""
    broker = Served(tmp_path_factory.mktemp("vnc-single"), extra_config='[vnc]\ninput = "single"\n')
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_secret_logged("secret")


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            seen = browser.execute_script("return [window.consoleStatus, window.consolePresence]")
            raise AssertionError(f"timed out waiting for {script!r}; the page: {seen}")
        time.sleep(0.2)


def _open(browser: Any, page: str) -> dict[str, Any]:
    """Open a page; once it shows the guest and its presence: that presence."""
    browser.get(page)
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'connected'")
    _wait(browser, f"const r = (() => {{{CANVAS}}})(); return r && r[2] > 1;")
    return _wait(browser, "const p = window.consolePresence; return p && p.state === 'open' && p")  # type: ignore[no-any-return]


#: Characters typed with Shift held, and the key that carries them (US layout).
SHIFTED = {">": "."} | {chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}


def _type(browser: Any, text: str) -> None:
    """Type *text* on the page's canvas, key by key, Shift held for capitals and ``>``
    (a newline is Return)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("window.consoleRFB.focus()")
    for char in text:
        actions = ActionChains(browser)
        if char in SHIFTED:
            actions.key_down(Keys.SHIFT).send_keys(SHIFTED[char]).key_up(Keys.SHIFT)
        else:
            actions.send_keys(char)
        actions.perform()


def _serial_has(serial: SerialConsole, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text.encode() in serial.output:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.vm
def test_two_pages_one_keyboard(single: Served, testbed: Testbed, browser: Any) -> None:
    dom, serial = enabled_guest(testbed, "fd", serial=True)
    assert serial is not None
    first = browser.current_window_handle
    try:
        settled_server_init(dom)
        alice = _open(browser, single.issue(dom.name(), "--name", "Alice")["page"])
        assert (alice["mode"], alice["input"], alice["holder"]) == ("single", True, alice["you"])
        browser.switch_to.new_window("window")
        second = browser.current_window_handle
        bob = _open(browser, single.issue(dom.name(), "--name", "Bob")["page"])
        # The second page: two viewers, Alice has the keyboard, Bob watches.
        bob = _wait(browser, "const p = window.consolePresence; "
                             "return p.viewers.length === 2 && p")
        assert bob["input"] is False and bob["holder"] == alice["you"]
        assert [(v["name"], v["you"], v["input"]) for v in bob["viewers"]] == [
            ("Alice", False, True), ("Bob", True, False)
        ]
        assert browser.find_element("id", "presence").text == "Watching: Alice has the keyboard"
        assert browser.find_element("id", "take-control").text == "Take control"
        assert browser.find_element("id", "ctrl-alt-del").is_enabled() is False
        browser.find_element("id", "viewers").click()
        panel = browser.find_element("id", "presence-list").text
        assert "Alice" in panel and "Bob (you)" in panel and "has the keyboard" in panel
        assert panel.index("Alice") < panel.index("has the keyboard") < panel.index("Bob")

        # Bob's keys are dropped by the broker; Alice's, typed after them, arrive alone.
        _type(browser, "echo watch-1 >/dev/ttyS0\n")
        browser.switch_to.window(first)
        _wait(browser, "return window.consolePresence.viewers.length === 2")
        _type(browser, "echo held-1 >/dev/ttyS0\n")
        assert _serial_has(serial, "held-1", 60), serial.output[-300:]
        assert b"watch-1" not in serial.output

        # Bob takes control: his keys arrive, and Alice's page says she lost the keyboard.
        browser.switch_to.window(second)
        browser.find_element("id", "take-control").click()
        _wait(browser, "return window.consolePresence.input === true")
        assert browser.find_element("id", "take-control").text == "Release"
        assert browser.find_element("id", "presence").text == "You have the keyboard"
        _type(browser, "echo typed-2 >/dev/ttyS0\n")
        assert _serial_has(serial, "typed-2", 60), serial.output[-300:]
        browser.switch_to.window(first)
        lost = _wait(browser, "const p = window.consolePresence; return p.lost && p")
        assert lost["input"] is False and lost["holder"] == bob["you"]
        assert browser.find_element("id", "presence").text == (
            "Bob took the keyboard: you are watching"
        )
        assert browser.find_element("id", "take-control").text == "Take control"
        # and now Alice's keys are the ones dropped
        _type(browser, "echo lost-3 >/dev/ttyS0\n")
        browser.switch_to.window(second)
        _type(browser, "echo after-3 >/dev/ttyS0\n")
        assert _serial_has(serial, "after-3", 60), serial.output[-300:]
        assert b"lost-3" not in serial.output
    finally:
        for handle in browser.window_handles:
            if handle != first:
                browser.switch_to.window(handle)
                browser.close()
        browser.switch_to.window(first)
        browser.get("about:blank")
        serial.close()
        testbed.remove(dom)
    holders = [e["reason"] for e in single.events("input.holder")
               if e.get("domain") == dom.UUIDString()]
    assert holders[:2] == ["joined", "taken"]
    opened = [e["name"] for e in single.events("session.opened")
              if e.get("domain") == dom.UUIDString()]
    assert opened == ["Alice", "Bob"]
