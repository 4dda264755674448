"""The SPICE page's presence panel and "Take control" (web/presence.js, the VNC page's
module; tests/vnc/test_vnc_presence.py tests the module itself), and one keyboard on the
real stack.

On the real stack (headless Chromium, a ``console-broker serve`` with ``spice.input =
"single"``, the tiny guest in fd mode with its serial console open): two spice-html5
pages on one guest. The second page shows two viewers and that the first, named by its
token, has the keyboard; keys typed on its canvas (its inputs channel) never reach the
guest's shell, while the first page's do; after **Take control** on the second page its
keys arrive, the first page says it lost the keyboard, and its keys are dropped in turn.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import SerialConsole, Testbed
from servedbroker import CLI
from spicebroker import Broker

REPO = Path(__file__).resolve().parents[2]


def test_the_page_serves_the_presence_module() -> None:
    import broker_spice

    from broker.config import Config, HTTPSection
    from broker.plugins import PluginContext

    context = PluginContext("spice", Config(http=HTTPSection(assets_dir="/nonexistent")))
    served = broker_spice.PROTOCOL.page("app/presence.js", context)
    assert served is not None
    assert served.body == (REPO / "plugins" / "spice" / "web" / "presence.js").read_bytes()
    assert served.content_type.startswith("text/javascript")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker whose SPICE displays have one keyboard."""
    broker = Broker(tmp_path_factory.mktemp("spice-single"), extra='[spice]\ninput = "single"\n')
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


#: libvirt's QEMU namespace: the process environment of the domain's QEMU.
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def multi_client(xml: str) -> str:
    """*xml* with QEMU's SPICE server in multi-client mode (``SPICE_DEBUG_ALLOW_MC=1`` in
    its environment): without it, a second client replaces the first (docs/spice.md)."""
    from lxml import etree

    root = etree.fromstring(xml.encode())
    commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline", nsmap={"qemu": QEMU_NS})
    etree.SubElement(commandline, f"{{{QEMU_NS}}}env", name="SPICE_DEBUG_ALLOW_MC", value="1")
    return etree.tostring(root, encoding="unicode")


def _guest(testbed: Testbed) -> tuple[Any, SerialConsole]:
    """The tiny guest with SPICE (fd mode) and its serial console, booted, the console open."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "spice,serial", "--mode", "fd"],
        input=testbed.guest_xml(testbed.unique_name("spice-single")), check=True,
        capture_output=True, text=True,
    ).stdout
    dom = testbed.define(multi_client(enabled))
    serial = testbed.boot(dom, console=True)
    assert serial is not None
    return dom, serial


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            seen = browser.execute_script(
                "return [document.body.dataset.state, window.consolePresence]"
            )
            raise AssertionError(f"timed out waiting for {script!r}; the page: {seen}")
        time.sleep(0.2)


#: The guest's screen drawn on the page's canvas (not black): the display channel works.
_INK = """
const canvas = document.querySelector('#spice-screen canvas');
if (!canvas || !canvas.width) { return 0; }
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 0; i < data.length; i += 16) { if (data[i] > 40) { ink++; } }
return ink;
"""
#: spice-html5's inputs channel is linked and ready for keys.
_INPUTS_READY = (
    "const sc = window.spiceConnection; return sc && sc.inputs && sc.inputs.state === 'ready'"
)


def _open(browser: Any, page: str) -> dict[str, Any]:
    """Open a page; once it draws the guest, its inputs channel is up and it shows its
    presence: that presence."""
    browser.get(page)
    _wait(browser, "return document.body.dataset.state === 'connected'")
    _wait(browser, f"return ((() => {{{_INK}}})()) > 100")
    _wait(browser, _INPUTS_READY)
    return _wait(browser, "const p = window.consolePresence; return p && p.state === 'open' && p")  # type: ignore[no-any-return]


#: Characters typed with Shift held, and the key that carries them (US layout).
SHIFTED = {">": "."} | {chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}


def _type(browser: Any, text: str) -> None:
    """Type *text* on the page's SPICE canvas (spice-html5 sends its keys on the inputs
    channel), Shift held for capitals and ``>``; a newline is Return."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("document.querySelector('#spice-screen canvas').focus()")
    assert browser.execute_script(
        "return document.activeElement === document.querySelector('#spice-screen canvas')"
    )
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
def test_two_spice_html5_pages_one_keyboard(
    single: Broker, testbed: Testbed, browser: Any
) -> None:
    dom, serial = _guest(testbed)
    first = browser.current_window_handle
    try:
        alice = _open(browser, single.token(dom.name(), "--name", "Alice")["page"])
        assert (alice["mode"], alice["input"], alice["holder"]) == ("single", True, alice["you"])
        browser.switch_to.new_window("window")
        second = browser.current_window_handle
        _open(browser, single.token(dom.name(), "--name", "Bob")["page"])
        bob = _wait(browser, "const p = window.consolePresence; "
                             "return p.viewers.length === 2 && p")
        assert bob["input"] is False and bob["holder"] == alice["you"]
        assert [(v["name"], v["you"], v["protocol"]) for v in bob["viewers"]] == [
            ("Alice", False, "spice"), ("Bob", True, "spice")
        ]
        assert browser.find_element("id", "presence").text == "Watching: Alice has the keyboard"
        assert browser.find_element("id", "ctrl-alt-del").is_enabled() is False
        browser.find_element("id", "viewers").click()
        panel = browser.find_element("id", "presence-list").text
        assert "Alice" in panel and "Bob (you)" in panel and "has the keyboard" in panel

        # Bob's keys are dropped by the broker; Alice's, typed after them, arrive alone.
        _type(browser, "echo watch-1 >/dev/ttyS0\n")
        browser.switch_to.window(first)
        _wait(browser, "return window.consolePresence.viewers.length === 2")
        _type(browser, "echo held-1 >/dev/ttyS0\n")
        assert _serial_has(serial, "held-1", 60), serial.output[-300:]
        assert b"watch-1" not in serial.output

        # Bob takes control: his keys arrive; Alice's page says she lost the keyboard.
        browser.switch_to.window(second)
        browser.find_element("id", "take-control").click()
        _wait(browser, "return window.consolePresence.input === true")
        assert browser.find_element("id", "take-control").text == "Release"
        _type(browser, "echo typed-2 >/dev/ttyS0\n")
        assert _serial_has(serial, "typed-2", 60), serial.output[-300:]
        browser.switch_to.window(first)
        lost = _wait(browser, "const p = window.consolePresence; return p.lost && p")
        assert lost["input"] is False and lost["holder"] == bob["you"]
        assert browser.find_element("id", "presence").text == (
            "Bob took the keyboard: you are watching"
        )
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
        time.sleep(2.0)  # the channels close (through the guard) before the VM goes
        serial.close()
        testbed.remove(dom)
    holders = [e["reason"] for e in single.events("input.holder")
               if e.get("domain") == dom.UUIDString()]
    assert holders[:2] == ["joined", "taken"]
    dropped = [e for e in single.events("spice.input_dropped")
               if e.get("domain") == dom.UUIDString()]
    assert {e["message_type"] for e in dropped} >= {101, 102}  # key down and up, dropped
