"""The installed wheel serves its console pages by itself: the browser clients it bundles.

The broker runs from the wheel's own ``console-broker`` script (this environment's, as a
user who installed the wheel into a venv runs it), with no ``http.assets_dir`` and no
node or npm on its PATH. It serves the VNC, SPICE and serial pages with their browser
clients from the wheel (``broker.assets.BUNDLED_ASSETS``), and headless Chromium shows
the tiny guest on each: noVNC's canvas, spice-html5's canvas, xterm.js's terminal with the
guest's shell answering.

Like tests/test_packaging.py's checks of the installed copy, these run against the wheel
(``scripts/test``): run from the checkout (the editable ``.venv``, whose broker reads the
source tree's node_modules) they are skipped, and fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pagekit
import pytest
from console_broker_testbed import Testbed
from distributions import installed_wheel
from servedbroker import ServedBroker, enabled_guest

from broker.assets import BUNDLED_ASSETS, assets_dir

pytestmark = pytest.mark.vm

#: A VGA display for the graphical consoles (the VNC tests' guests have one too).
VIDEO = "<video><model type='vga'/></video>\n"
#: Each page's own browser client, as served (below ``/console/``) and in the bundle.
CLIENT_FILES = {
    "vnc/novnc/core/rfb.js": "@novnc/novnc/core/rfb.js",
    "spice/spice-html5/src/main.js": "@spice-project/spice-html5/src/main.js",
    "serial/xterm/xterm.js": "@xterm/xterm/lib/xterm.js",
    "serial/xterm/xterm.css": "@xterm/xterm/css/xterm.css",
    "serial/xterm/addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
}


def without_node(path: str) -> str:
    """*path* (a PATH) without every directory holding node or npm."""
    return os.pathsep.join(
        directory for directory in path.split(os.pathsep)
        if directory and not any((Path(directory) / tool).exists() for tool in ("node", "npm"))
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    """``console-broker serve`` from the installed wheel's script: no http.assets_dir, no
    node nor npm on its PATH (nor on its token commands')."""
    installed_wheel()  # skipped (failed under CI) on the editable checkout
    script = Path(sysconfig.get_path("scripts")) / "console-broker"
    assert script.is_file(), script
    path = without_node(os.environ.get("PATH", ""))
    assert shutil.which("npm", path=path) is None and shutil.which("node", path=path) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", path)  # ServedBroker's environment, taken as it starts
        broker = ServedBroker(
            tmp_path_factory.mktemp("wheel"), command=[str(script)], assets_dir=None
        )
    try:
        yield broker
    finally:
        broker.stop()
    for page in ("vnc", "spice", "serial"):
        assert broker.events(f"{page}.assets_missing") == [], page
    broker.assert_no_token_logged()


@pytest.fixture(scope="module")
def guest(testbed: Testbed, served: ServedBroker) -> Iterator[Any]:
    """The tiny guest with its VNC, SPICE and serial consoles (fd mode), booted."""
    dom = enabled_guest(
        testbed, "--consoles", "vnc,spice,serial", "--mode", "fd", devices=VIDEO
    )
    try:
        yield dom
    finally:
        testbed.remove(dom)


def test_the_pages_and_their_clients_come_from_the_wheel(served: ServedBroker) -> None:
    assert assets_dir("") == BUNDLED_ASSETS  # this environment's broker is the wheel's
    for page in ("vnc", "spice", "serial"):
        status, body = served.get(f"/console/{page}/")
        assert status == 200 and b"<html" in body.lower(), page
    for url, bundled in CLIENT_FILES.items():
        assert served.get(f"/console/{url}") == (200, (BUNDLED_ASSETS / bundled).read_bytes())
    # the bundle's package.json and licences are in the wheel, not served
    assert served.get("/console/serial/xterm/../package.json")[0] == 404
    assert served.get("/console/vnc/novnc/LICENSE.txt")[0] == 404


def test_the_vnc_page_shows_the_guest(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    browser.get(served.token(guest.name(), protocol="vnc")["page"])
    pagekit.wait_until(
        browser, "noVNC connected",
        lambda: browser.execute_script(
            "return window.consoleStatus && window.consoleStatus.state === 'connected'"),
    )
    width, height, colours = pagekit.wait_until(
        browser, "the guest's screen on noVNC's canvas",
        lambda: (found := browser.execute_script(pagekit.VNC_CANVAS)) and found[2] > 1 and found,
        timeout=90,
    )
    assert width > 0 and height > 0 and colours > 1
    browser.get("about:blank")


def test_the_spice_page_shows_the_guest(
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


def test_the_serial_page_shows_the_guest(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    browser.get(served.token(guest.name(), protocol="serial")["page"])
    pagekit.wait_until(
        browser, "xterm.js connected",
        lambda: browser.execute_script("return window.consoleBroker.state") == "connected",
    )
    # The guest's shell answers what is typed on the page (it may still be booting: the
    # line is typed again every few seconds).
    deadline = time.monotonic() + 90
    while "wheel-42" not in pagekit.serial_screen(browser):
        assert time.monotonic() < deadline, pagekit.serial_screen(browser)[-500:]
        pagekit.serial_type(browser, "echo wheel-$((6*7))\n")
        end = time.monotonic() + 3
        while time.monotonic() < end and "wheel-42" not in pagekit.serial_screen(browser):
            time.sleep(0.2)
    browser.get("about:blank")
