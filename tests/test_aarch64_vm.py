"""The tiny guest on aarch64, on the real stack: QEMU's ``virt`` machine under TCG.

An aarch64 domain as virt-install writes one (less its UEFI firmware: the arm64 kernel
boots directly; see docs/testbed.md) gets every console the architecture has through
``console-broker enable`` on the live libvirt, is defined and started. Through a served
broker its serial console (the PL011, ``ttyAMA0``) answers, its VNC page in headless
Chromium shows the guest's screen (virtio-gpu's framebuffer, whose console, ``tty1``,
shows the text the guest writes there) and takes keys (the USB keyboard: the ``virt``
machine has no PS/2), and its SPICE page shows the screen too. A domain with no display,
no input and no USB controller gets virtio-gpu, no QXL and no USB redirection, and a
virtio keyboard and tablet, through which keys typed on its VNC page reach the guest.

The emulator comes from Debian's qemu-system-arm (``scripts/setup-host``): without it
these tests are skipped on a developer machine, and fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pagekit
import pytest
from console_broker_testbed import AARCH64_EMULATOR, Testbed
from lxml import etree
from servedbroker import CLI, ServedBroker, serial_answers
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.vm

#: Every console protocol an aarch64 ``virt`` domain can have.
CONSOLES = ("vnc", "spice", "serial")
#: The noVNC canvas's pixels that are not black (-1: no canvas yet).
VNC_INK = """
const canvas = document.querySelector('#screen canvas');
if (!canvas || !canvas.width) { return -1; }
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 40 || data[i + 1] > 40 || data[i + 2] > 40) { ink++; }
}
return ink;
"""
#: A block of text the guest writes on its screen's console: ROWS lines of COLUMNS '#'.
ROWS, COLUMNS = 20, 60


@pytest.fixture(scope="module")
def emulator() -> str:
    """qemu-system-aarch64 (Debian's qemu-system-arm): missing, the module is skipped on a
    developer machine and fails when ``CI`` is set."""
    found = shutil.which(AARCH64_EMULATOR)
    if found is None:
        why = f"{AARCH64_EMULATOR} is not installed (scripts/setup-host installs qemu-system-arm)"
        if os.environ.get("CI"):
            pytest.fail(f"{AARCH64_EMULATOR} is required when CI is set: {why}", pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    broker = ServedBroker(tmp_path_factory.mktemp("aarch64"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


@pytest.fixture(scope="module")
def guest(emulator: str, testbed: Testbed) -> Iterator[Any]:
    """The aarch64 tiny guest, its consoles enabled by ``console-broker enable`` on the
    live libvirt, defined and started (booted to its shells; its serial console closed,
    for the broker to open)."""
    dom = testbed.define(testbed.guest_xml(testbed.unique_name("aarch64"), arch="aarch64"))
    try:
        enabled = subprocess.run(
            [*CLI, "enable", dom.name(), "--consoles", ",".join(CONSOLES),
             "--connect", testbed.uri],
            capture_output=True, text=True, timeout=60,
        )
        assert enabled.returncode == 0, enabled.stderr
        serial = testbed.boot(dom)
        assert serial is not None
        serial.close()
        yield dom
    finally:
        testbed.remove(dom)


def test_the_definition_has_every_console_of_the_virt_machine(guest: Any) -> None:
    tree = etree.fromstring(guest.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert tree.get("type") == "qemu"
    assert tree.find("os/type").get("arch") == "aarch64"
    assert tree.find("os/type").get("machine").startswith("virt")
    assert tree.find("os/loader") is None  # a direct kernel boot: no firmware
    assert sorted(g.get("type") for g in tree.iterfind("devices/graphics")) == ["spice", "vnc"]
    assert [v.get("type") for v in tree.iterfind("devices/video/model")] == ["virtio"]
    [serial] = tree.iterfind("devices/serial")
    assert serial.find("target/model").get("name") == "pl011"
    # SPICE's USB redirection on the domain's own USB controller (virt-install's qemu-xhci)
    assert [c.get("model") for c in tree.iterfind("devices/controller[@type='usb']")] == [
        "qemu-xhci"]
    redirdevs = tree.findall("devices/redirdev")
    assert redirdevs and {r.get("bus") for r in redirdevs} == {"usb"}
    assert guest.isActive()


def test_the_serial_console_answers_through_the_broker(
    served: ServedBroker, guest: Any
) -> None:
    with served.connect(guest.name(), protocol="serial") as ws:
        serial_answers(ws)
        assert _shell(ws, "echo arch-$(uname -m)-end", r"arch-(\w+)-end") == "aarch64"


def test_the_vnc_page_shows_the_guests_screen(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    with served.connect(guest.name(), protocol="serial") as ws:
        size = _shell(ws, "echo fb-$(cat /sys/class/graphics/fb0/virtual_size)-end",
                      r"fb-(\d+,\d+)-end")
        # noVNC's canvas is the guest's framebuffer (virtio-gpu's), not blank: the ready
        # line and the shell's prompt the guest wrote on tty1.
        assert _vnc_page_shows_the_guest(browser, served, guest.name()) == size
        # What the guest writes on its screen's console shows: cleared, the screen holds
        # less ink than one row of the block; with the block, at least a pixel per '#'.
        _shell(ws, "printf '\\033[H\\033[J' >/dev/tty1; echo cleared-$((6*7))", r"(cleared-42)")
        cleared = pagekit.wait_until(
            browser, "the guest's cleared screen",
            lambda: (ink := browser.execute_script(VNC_INK)) < COLUMNS and str(ink),
        )
        _shell(
            ws,
            f"i=0; while [ $i -lt {ROWS} ]; do echo '{'#' * COLUMNS}'; i=$((i+1)); done"
            " >/dev/tty1; echo drawn-$((6*7))",
            r"(drawn-42)",
        )
        drawn = pagekit.wait_until(
            browser, "the text written on the guest's screen",
            lambda: (ink := browser.execute_script(VNC_INK)) >= ROWS * COLUMNS and ink,
            shows=lambda: f"ink {browser.execute_script(VNC_INK)}, cleared {cleared}",
        )
        assert drawn >= ROWS * COLUMNS > int(cleared)
    browser.get("about:blank")


def test_keys_typed_on_the_vnc_page_reach_the_guest(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    """The ``virt`` machine has no PS/2: keys typed on the VNC page reach the shell on the
    screen's console through the USB keyboard on the qemu-xhci controller, and the command
    typed there writes to the serial port."""
    with served.connect(guest.name(), protocol="serial") as ws:
        _vnc_page_shows_the_guest(browser, served, guest.name())
        _type_on_vnc_page(browser, "echo vnc-typed-on-aarch64 >/dev/ttyAMA0\n")
        _expect(ws, r"(vnc-typed-on-aarch64)")
    browser.get("about:blank")


def test_a_domain_without_a_display_gets_virtio_gpu(
    emulator: str, testbed: Testbed, served: ServedBroker, browser: Any
) -> None:
    """An aarch64 domain with no display, no input and no USB controller, VNC and serial
    enabled: the editor adds no QXL and no USB redirection, libvirt gives the VNC display
    the ``virt`` machine's video (virtio-gpu) on define, and the guest's screen shows. The
    machine has no keyboard or pointer of its own (no PS/2, and libvirt adds none): the
    editor's virtio keyboard and tablet carry the keys typed on the VNC page to the shell
    on the screen's console, which writes to the serial port."""
    tree = etree.fromstring(
        testbed.guest_xml(testbed.unique_name("aarch64-bare"), arch="aarch64").encode())
    devices = tree.find("devices")
    for device in [*devices.iterfind("video"), *devices.iterfind("input"),
                   *devices.iterfind("controller")]:
        devices.remove(device)
    dom = testbed.define(etree.tostring(tree, encoding="unicode"))
    try:
        enabled = subprocess.run(
            [*CLI, "enable", dom.name(), "--consoles", "vnc,serial", "--connect", testbed.uri],
            capture_output=True, text=True, timeout=60,
        )
        assert enabled.returncode == 0, enabled.stderr
        defined = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
        assert [g.get("type") for g in defined.iterfind("devices/graphics")] == ["vnc"]
        assert [v.get("type") for v in defined.iterfind("devices/video/model")] == ["virtio"]
        assert defined.find("devices/redirdev") is None
        assert [(i.get("type"), i.get("bus")) for i in defined.iterfind("devices/input")] == [
            ("keyboard", "virtio"), ("tablet", "virtio")]
        serial = testbed.boot(dom)
        assert serial is not None
        serial.close()
        with served.connect(dom.name(), protocol="serial") as ws:
            serial_answers(ws)
            size = _shell(ws, "echo fb-$(cat /sys/class/graphics/fb0/virtual_size)-end",
                          r"fb-(\d+,\d+)-end")
            assert _vnc_page_shows_the_guest(browser, served, dom.name()) == size
            _type_on_vnc_page(browser, "echo vnc-typed-on-bare-aarch64 >/dev/ttyAMA0\n")
            _expect(ws, r"(vnc-typed-on-bare-aarch64)")
        browser.get("about:blank")
    finally:
        testbed.remove(dom)


def test_the_spice_page_shows_the_guests_screen(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    browser.get(served.token(guest.name(), protocol="spice")["page"])
    pagekit.wait_until(
        browser, "the guest's screen on spice-html5's canvas",
        lambda: browser.execute_script(pagekit.SPICE_INK) > 100, timeout=90,
        shows=lambda: str(browser.get_log("browser")),
    )
    assert browser.execute_script("return document.body.dataset.state") == "connected"
    browser.get("about:blank")


def _vnc_page_shows_the_guest(browser: Any, served: ServedBroker, domain: str) -> str:
    """Open *domain*'s VNC page; once connected, its canvas shows something (more than one
    colour, some of it not black): the canvas's size, "WIDTH,HEIGHT"."""
    browser.get(served.token(domain, protocol="vnc")["page"])
    pagekit.wait_until(
        browser, "noVNC connected",
        lambda: browser.execute_script(
            "return window.consoleStatus && window.consoleStatus.state === 'connected'"),
    )
    width, height, _colours = pagekit.wait_until(
        browser, "the guest's screen on noVNC's canvas",
        lambda: (found := browser.execute_script(pagekit.VNC_CANVAS)) and found[2] > 1 and found,
        timeout=90,
    )
    assert browser.execute_script(VNC_INK) > 0
    return f"{width},{height}"


def _type_on_vnc_page(browser: Any, text: str) -> None:
    """Type *text* on the open VNC page, key by key: '>' and capitals with Shift held as on
    a keyboard (the scan code noVNC sends is the key's, not the character's), a newline
    as Enter."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("window.consoleRFB.focus()")
    for char in text:
        actions = ActionChains(browser)
        if char == ">" or char.isupper():
            key = "." if char == ">" else char.lower()
            actions.key_down(Keys.SHIFT).send_keys(key).key_up(Keys.SHIFT)
        else:
            actions.send_keys(Keys.ENTER if char == "\n" else char)
        actions.perform()


def _shell(ws: ClientConnection, command: str, pattern: str, timeout: float = 30.0) -> str:
    """Type *command* on a raw serial session; the first group of *pattern* in what the
    guest answers (*pattern* must not match the terminal's echo of the typed line). What
    the guest printed is read up to there, so the session's incoming queue does not fill
    (a full one keeps the client from reading the close frame when the session ends)."""
    ws.send(f"{command}\n".encode())
    return _expect(ws, pattern, timeout)


def _expect(ws: ClientConnection, pattern: str, timeout: float = 30.0) -> str:
    """Read a raw serial session until *pattern* shows; its first group."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not (match := re.search(pattern.encode(), seen)):
        assert time.monotonic() < deadline, seen[-400:]
        try:
            message = ws.recv(timeout=0.5)
        except TimeoutError:
            continue
        assert isinstance(message, bytes)
        seen += message
    return match.group(1).decode()
