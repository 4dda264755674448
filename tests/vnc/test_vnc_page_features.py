"""The console page's features in a real browser against the real stack: headless
Chromium (Selenium) on the broker's noVNC page, a ``console-broker serve`` subprocess
and the tiny guest (fd mode, its serial console open).

What each feature does is proven where it lands, not in the page:

* keys typed on the page's canvas reach the guest: the shell on the VGA console (tty1)
  runs a command that writes to the serial port;
* every entry of the **Keys** menu reaches QEMU as the keys it names, pressed and
  released in order (QEMU's ``input_event_key_qcode`` trace event, switched on through
  the monitor, lands in libvirt's domain log); the guest acts on those it can show:
  Ctrl+Alt+F1/F2/F3/F7 and Alt+F4 switch its virtual terminal
  (``/sys/class/tty/tty0/active``, read on the serial console), and **Ctrl+Alt+Del**
  reboots it (the kernel's ``ctrl-alt-del`` is 1; ``on_reboot`` is destroy, so the VM
  stops). Esc, Tab, Alt+Tab, Ctrl+Alt+Backspace, Print Screen, Alt+SysRq and Super
  have no effect the tiny guest can show: for them, QEMU's trace is the proof;
* the close message: that VM stopping shows "The VM stopped." (4100); an expired link
  shows its message (4002);
* a view-only page shows its badge, keeps its controls disabled, sends no key, and keys
  it sends anyway (its view-only switch turned off) never reach QEMU: the broker drops
  them;
* the clipboard: the guest has no clipboard agent, but QEMU's VNC server shares one
  clipboard between its clients (extended clipboard, which noVNC speaks): text sent from
  one page's clipboard box shows up in another page's box; a view-only page has no
  clipboard box, and text it sends anyway reaches no one;
* **Scale** fits the screen into the window and off shows it at its native size;
  **Full screen** enters and leaves full screen; after either, keys go to the VM.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import SerialConsole, Testbed
from vncstack import CANVAS, Served, enabled_guest, settled_server_init

pytestmark = pytest.mark.vm

#: Records the type (first byte) of every message the page sends on its WebSockets,
#: run in each new document before the page's own scripts.
RECORD_SENT = """
window.sentTypes = [];
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
    const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
        : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (bytes.length) window.sentTypes.push(bytes[0]);
    return send.call(this, data);
};
"""
KEY_EVENT, CLIENT_CUT_TEXT, QEMU_MESSAGE = 4, 6, 255
#: Collects every text the page's noVNC reports from the VM's clipboard.
RECORD_CLIPBOARD = """
window.clipboardSeen = [];
window.consoleRFB.addEventListener('clipboard', (e) => window.clipboardSeen.push(e.detail.text));
"""


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[tuple[Any, SerialConsole]]:
    dom, serial = enabled_guest(testbed, "fd", serial=True)
    assert serial is not None
    try:
        yield dom, serial
    finally:
        serial.close()
        testbed.remove(dom)


@pytest.fixture
def window(browser: Any) -> Iterator[Any]:
    """The browser, left with one window (tests that open more close them)."""
    yield browser
    first = browser.window_handles[0]
    for handle in browser.window_handles[1:]:
        browser.switch_to.window(handle)
        browser.close()
    browser.switch_to.window(first)
    browser.get("about:blank")


@pytest.fixture
def recorded(window: Any) -> Iterator[Any]:
    """The browser, recording what its pages send (``window.sentTypes``)."""
    added = window.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SENT})
    yield window
    from selenium.common.exceptions import WebDriverException

    window.switch_to.window(window.window_handles[0])
    with suppress(WebDriverException):  # gone with a window the test closed
        window.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            status = browser.execute_script("return window.consoleStatus")
            raise AssertionError(f"timed out waiting for {script!r}; page status {status}")
        time.sleep(0.2)


def _open(browser: Any, page: str) -> None:
    """Open the page and wait until it is connected and shows the guest's screen."""
    browser.get(page)
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'connected'")
    _wait(browser, f"const r = (() => {{{CANVAS}}})(); return r && r[2] > 1;")


def _serial_has(serial: SerialConsole, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text.encode() in serial.output:
            return True
        time.sleep(0.1)
    return False


def _expect_serial(browser: Any, serial: SerialConsole, text: str) -> None:
    """*text* arrives on the guest's serial port; if not, the page is saved as a
    screenshot (the guest's screen shows what its shell got)."""
    if _serial_has(serial, text, 60):
        return
    shot = Path(tempfile.mkdtemp(prefix="vnc-page-")) / "screen.png"
    browser.save_screenshot(str(shot))
    raise AssertionError(f"{text!r} never reached the serial port (the page: {shot}); "
                         f"its last output: {serial.output[-300:]!r}")


#: Characters typed with Shift held, and the key that carries them (US layout).
SHIFTED = {">": ".", "$": "4", "(": "9", ")": "0", "*": "8", "|": "\\", "_": "-"} | {
    chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)
}


def _type(browser: Any, text: str, *, focus: bool = True) -> None:
    """Type *text* on the page's canvas as a user would, key by key (Selenium key
    events; a newline is Return). Capitals and shifted characters are typed with Shift
    held, as on a keyboard: chromedriver's own "type '>'" (or 'S') sends the key without
    a Shift press, so the scan code noVNC sends (QEMU's extended key event) would be the
    unshifted key's. Without *focus*, the canvas must have the keyboard already."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    if focus:
        browser.execute_script("window.consoleRFB.focus()")
    assert browser.execute_script(
        "return document.activeElement === document.querySelector('#screen canvas')"
    )
    for char in text:
        actions = ActionChains(browser)
        if char in SHIFTED:
            actions.key_down(Keys.SHIFT).send_keys(SHIFTED[char]).key_up(Keys.SHIFT)
        else:
            actions.send_keys(char)  # "\n": Enter (Keys.ENTER would be the keypad's)
        actions.perform()


def _choose_key(browser: Any, value: str) -> None:
    """Open the Keys menu and choose *value* (its button's ``data-combo``)."""
    browser.find_element("id", "keys").click()
    browser.find_element("css selector", f"#keys-menu button[data-combo='{value}']").click()


#: What QEMU's input layer receives for each entry of the page's key menu (QEMU's key
#: names, "qcodes"), pressed in order, released in reverse. Print Screen and SysRq are
#: one key: noVNC sends the scan code 0x54 for both (what a keyboard sends for it with
#: Alt held), which QEMU names print.
MENU_KEYS = {
    "ctrl-alt-backspace": ("ctrl", "alt", "backspace"),
    "ctrl-alt-f1": ("ctrl", "alt", "f1"),
    "ctrl-alt-f2": ("ctrl", "alt", "f2"),
    "ctrl-alt-f3": ("ctrl", "alt", "f3"),
    "ctrl-alt-f7": ("ctrl", "alt", "f7"),
    "alt-tab": ("alt", "tab"),
    "alt-f4": ("alt", "f4"),
    "escape": ("esc",),
    "tab": ("tab",),
    "print": ("print",),
    "alt-sysrq": ("alt", "print"),
    "super": ("meta_l",),
}
CTRL_ALT_DEL = ("ctrl", "alt", "delete")
KEY_TRACE = re.compile(rb"input_event_key_qcode con -?\d+, key qcode (\w+), down (\d)")


def _pressed_and_released(codes: tuple[str, ...]) -> list[tuple[str, int]]:
    return [(c, 1) for c in codes] + [(c, 0) for c in reversed(codes)]


def _hmp(dom: Any, command: str) -> str:
    import libvirt_qemu

    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    return str(libvirt_qemu.qemuMonitorCommand(dom, command, flags))


class KeyTrace:
    """The key events QEMU's input layer receives (its trace event, which libvirt's
    domain log collects), from the moment this is made."""

    def __init__(self, dom: Any) -> None:
        self.log = Path("/var/log/libvirt/qemu") / f"{dom.name()}.log"
        _hmp(dom, "trace-event input_event_key_qcode on")
        self.start = self.log.stat().st_size

    def keys(self) -> list[tuple[str, int]]:
        with self.log.open("rb") as log:
            log.seek(self.start)
            text = log.read()
        return [(code.decode(), int(down)) for code, down in KEY_TRACE.findall(text)]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while len(found := self.keys()) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return found


def _active_vt(serial: SerialConsole) -> str:
    return serial.run("cat /sys/class/tty/tty0/active").strip()


def test_typed_and_menu_keys_reach_the_guest(
    window: Any, served: Served, guest: tuple[Any, SerialConsole]
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    dom, serial = guest
    settled_server_init(dom)
    _open(window, served.token(dom.name())["page"])
    # Typed on the canvas: the VGA console's shell runs it.
    _type(window, "echo page-typed >/dev/ttyS0\n")
    _expect_serial(window, serial, "page-typed")

    # Every entry of the menu reaches QEMU as the keys it names, in order.
    trace = KeyTrace(dom)
    expected: list[tuple[str, int]] = []
    for value, codes in MENU_KEYS.items():
        _choose_key(window, value)
        expected += _pressed_and_released(codes)
        assert window.find_element("id", "keys-menu").is_displayed() is False  # closed
    assert trace.wait_for(len(expected)) == expected

    # From the keyboard: moving onto the menu sends nothing (a <select> sent a
    # combination per arrow key); Enter opens it, Enter sends the first entry.
    trace = KeyTrace(dom)
    window.execute_script("document.getElementById('keys').focus()")
    ActionChains(window).send_keys(Keys.ARROW_DOWN).send_keys(Keys.ARROW_DOWN).perform()
    time.sleep(1)
    assert trace.keys() == []
    ActionChains(window).send_keys(Keys.RETURN).perform()
    assert window.find_element("id", "keys-menu").is_displayed()
    ActionChains(window).send_keys(Keys.RETURN).perform()
    first = _pressed_and_released(next(iter(MENU_KEYS.values())))
    assert trace.wait_for(len(first)) == first
    assert window.find_element("id", "keys-menu").is_displayed() is False

    # And the guest acts on them: Ctrl+Alt+Fn (and Alt+Fn) switch its virtual terminal
    # (to one that exists: opening a VT allocates it).
    serial.run(": </dev/tty2 </dev/tty3 </dev/tty4 </dev/tty7")
    assert _active_vt(serial) == "tty1"
    for value, vt in (
        ("ctrl-alt-f2", "tty2"),
        ("ctrl-alt-f3", "tty3"),
        ("alt-f4", "tty4"),
        ("ctrl-alt-f7", "tty7"),
        ("ctrl-alt-f1", "tty1"),
    ):
        _choose_key(window, value)
        deadline = time.monotonic() + 30
        while (active := _active_vt(serial)) != vt:
            assert time.monotonic() < deadline, f"{value}: the guest shows {active}"
            time.sleep(0.5)
    # After a menu key the canvas has the keyboard again: typing goes on (Ctrl+C first
    # drops what Esc and Tab left on the shell's line).
    ActionChains(window).key_down(Keys.CONTROL).send_keys("c").key_up(Keys.CONTROL).perform()
    _type(window, "echo after-menu >/dev/ttyS0\n", focus=False)
    _expect_serial(window, serial, "after-menu")


def _message(browser: Any) -> tuple[int, str]:
    """Wait for the page to end its session: the close code and the message shown."""
    _wait(browser, "return window.consoleStatus.state === 'disconnected'")
    status = browser.execute_script("return window.consoleStatus")
    shown = browser.find_element("id", "message")
    assert shown.is_displayed()
    text = browser.find_element("id", "message-text").text
    assert text == status["message"]
    detail = browser.find_element("id", "message-detail").text
    assert detail.startswith(f"close code {status['code']}"), detail
    return status["code"], text


def test_ctrl_alt_del_reboots_the_guest_and_the_page_says_it_stopped(
    window: Any, served: Served, testbed: Testbed
) -> None:
    dom, serial = enabled_guest(testbed, "fd", serial=True)
    assert serial is not None
    try:
        # The kernel reboots on Ctrl+Alt+Del when kernel.ctrl-alt-del is 1 (its default;
        # the tiny guest has no init that changes it); on_reboot is destroy: the VM stops.
        assert serial.run("cat /proc/sys/kernel/ctrl-alt-del").strip() == "1"
        settled_server_init(dom)
        _open(window, served.token(dom.name())["page"])
        trace = KeyTrace(dom)
        window.find_element("id", "ctrl-alt-del").click()
        code, text = _message(window)
        assert (code, text) == (4100, "The VM stopped.")
        assert dom.isActive() == 0
        assert trace.keys()[:3] == [(key, 1) for key in CTRL_ALT_DEL]
        # Nothing can be sent any more.
        for control in ("ctrl-alt-del", "keys", "clipboard-send"):
            assert window.find_element("id", control).is_enabled() is False
    finally:
        serial.close()
        testbed.remove(dom)


def test_an_expired_link_says_so(
    window: Any, served: Served, guest: tuple[Any, SerialConsole]
) -> None:
    dom, _serial = guest
    page = served.issue(dom.name(), "--ttl", "1")["page"]
    time.sleep(1 + 5 + 1.5)  # the lifetime and the default leeway (tokens.leeway) passed
    window.get(page)
    code, text = _message(window)
    assert (code, text) == (4002, "This console link has expired. Ask for a new one.")


def test_a_view_only_page_sends_no_input_and_the_broker_drops_it_anyway(
    recorded: Any, served: Served, guest: tuple[Any, SerialConsole]
) -> None:
    window = recorded
    dom, serial = guest
    settled_server_init(dom)
    _open(window, served.token(dom.name(), view_only=True)["page"])
    assert window.execute_script("return window.consoleStatus.viewOnly") is True
    assert window.find_element("id", "view-only").is_displayed()
    for control in ("ctrl-alt-del", "keys", "clipboard-send"):
        assert window.find_element("id", control).is_enabled() is False
    trace = KeyTrace(dom)
    # Typed on the canvas: the page itself sends nothing.
    _type(window, "echo view-typed >/dev/ttyS0\n")
    time.sleep(1)
    sent = window.execute_script("return window.sentTypes")
    assert KEY_EVENT not in sent and QEMU_MESSAGE not in sent, sent
    # A page that ignores view-only (its switch turned off, as anyone can in the
    # developer tools) sends the keys: the broker drops them, QEMU never sees them.
    window.execute_script("window.consoleRFB.viewOnly = false")
    _type(window, "echo view-leak >/dev/ttyS0\n")
    time.sleep(1)
    sent = window.execute_script("return window.sentTypes")
    assert sent.count(QEMU_MESSAGE) >= 2 * len("echo view-leak >/dev/ttyS0\n"), sent
    # The same keys from a full page arrive: only the view-only page's never did.
    _open(window, served.token(dom.name())["page"])
    assert trace.keys() == []
    _type(window, "echo full-typed >/dev/ttyS0\n")
    _expect_serial(window, serial, "full-typed")
    assert trace.keys()
    assert b"view-typed" not in serial.output and b"view-leak" not in serial.output


def _paste(browser: Any, text: str) -> None:
    """Put *text* in the page's clipboard box and press "Send to the VM"."""
    toggle = browser.find_element("id", "clipboard-toggle")
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    assert browser.find_element("id", "clipboard").is_displayed()
    box = browser.find_element("id", "clipboard-text")
    box.clear()
    box.send_keys(text)
    browser.find_element("id", "clipboard-send").click()


def _clipboard_box(browser: Any) -> str:
    return str(browser.find_element("id", "clipboard-text").get_attribute("value"))


def test_the_clipboard_goes_from_page_to_page_through_qemu(
    recorded: Any, served: Served, guest: tuple[Any, SerialConsole]
) -> None:
    window = recorded
    dom, _serial = guest
    settled_server_init(dom)
    # Page B, with full rights, records what reaches it from the VM's clipboard.
    _open(window, served.token(dom.name())["page"])
    window.execute_script(RECORD_CLIPBOARD)
    page_b = window.current_window_handle
    # Page A, in another window, sends: B shows it in its clipboard box.
    window.switch_to.new_window("window")
    page_a = window.current_window_handle
    window.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_SENT})
    _open(window, served.token(dom.name())["page"])
    _paste(window, "copied from page A")
    window.switch_to.window(page_b)
    _wait(window, "return window.clipboardSeen.includes('copied from page A')", timeout=30)
    assert _clipboard_box(window) == "copied from page A"

    # A view-only page has no clipboard box (noVNC ignores the VM's clipboard in
    # view-only mode). Sending anyway, with view-only turned off in the page, reaches
    # no one: the broker drops it.
    window.switch_to.window(page_a)
    _open(window, served.token(dom.name(), view_only=True)["page"])
    assert window.find_element("id", "clipboard-toggle").is_enabled() is False
    window.execute_script(
        "window.consoleRFB.viewOnly = false;"
        "window.consoleRFB.clipboardPasteFrom('leaked from a view-only page');"
    )
    _wait(window, f"return window.sentTypes.includes({CLIENT_CUT_TEXT})", timeout=10)
    # Page C, with full rights, in the same window: B gets C's text, never the leak.
    _open(window, served.token(dom.name())["page"])
    _paste(window, "copied from page C")
    window.switch_to.window(page_b)
    _wait(window, "return window.clipboardSeen.includes('copied from page C')", timeout=30)
    seen = window.execute_script("return window.clipboardSeen")
    assert seen == ["copied from page A", "copied from page C"]
    assert _clipboard_box(window) == "copied from page C"


def test_scale_and_full_screen(
    window: Any, served: Served, guest: tuple[Any, SerialConsole]
) -> None:
    dom, serial = guest
    init = settled_server_init(dom)
    _open(window, served.token(dom.name())["page"])
    sizes = """
        const c = document.querySelector('#screen canvas').getBoundingClientRect();
        const s = document.getElementById('screen').getBoundingClientRect();
        return [c.width, c.height, s.width, s.height];
    """

    def fits() -> bool:
        width, height, room_w, room_h = window.execute_script(sizes)
        # Scaled with its aspect kept, touching two sides of the room, inside it.
        return bool(
            width <= room_w + 1 and height <= room_h + 1
            and (abs(width - room_w) <= 1 or abs(height - room_h) <= 1)
            and abs(width / height - init.width / init.height) < 0.01
        )

    assert window.find_element("id", "scale").is_selected()
    deadline = time.monotonic() + 10
    while not fits():
        assert time.monotonic() < deadline, window.execute_script(sizes)
        time.sleep(0.2)
    window.find_element("id", "scale").click()  # off: the VM's own size
    deadline = time.monotonic() + 10
    while window.execute_script(sizes)[:2] != [init.width, init.height]:
        assert time.monotonic() < deadline, window.execute_script(sizes)
        time.sleep(0.2)
    window.find_element("id", "scale").click()  # on again
    deadline = time.monotonic() + 10
    while not fits():
        assert time.monotonic() < deadline, window.execute_script(sizes)
        time.sleep(0.2)

    button = window.find_element("id", "fullscreen")
    # The button's text follows the fullscreenchange event, which the browser fires a task
    # after document.fullscreenElement changes: wait for both.
    button.click()
    _wait(window, "return document.fullscreenElement !== null"
                  " && document.getElementById('fullscreen').textContent === 'Leave full screen'",
          timeout=10)
    button.click()
    _wait(window, "return document.fullscreenElement === null"
                  " && document.getElementById('fullscreen').textContent === 'Full screen'",
          timeout=10)
    # Each of these controls hands the keyboard back to the VM's screen: typing goes on
    # without a click on it (a key would otherwise press the control again).
    _type(window, "echo after-controls >/dev/ttyS0\n", focus=False)
    _expect_serial(window, serial, "after-controls")
