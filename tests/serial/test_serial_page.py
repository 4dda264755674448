"""The serial console page in a real browser: headless Chromium runs xterm.js from the broker,
connected through a real ``console-broker serve`` to the tiny guest's serial console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pagekit
import pytest
from console_broker_testbed import Testbed
from serialkit import Client, Served, serial_guest
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.vm

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("serial-page"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


screen = pagekit.serial_screen
type_into = pagekit.serial_type


def wait_until(browser: Any, what: str, check: Any, timeout: float = 60.0) -> Any:
    return pagekit.wait_until(browser, what, check, timeout,
                              shows=lambda: f"screen:\n{screen(browser)}")


def test_the_page_shows_the_guest_and_takes_keys(
    served: Served, testbed: Testbed, browser: Any
) -> None:
    dom = serial_guest(testbed)
    try:
        stack = contextlib.ExitStack()
        name = dom.name()
        # The guest's shell is up (another client presses Enter until the prompt shows).
        with served.connect(name) as ws:
            Client(ws).shell_ready()
        doc = served.token(name)
        browser.get(doc["page"])
        wait_until(
            browser, "connected",
            lambda: browser.execute_script("return window.consoleBroker.state") == "connected",
        )
        # The token left the address bar at once (it is single use).
        assert "token=" not in browser.current_url
        assert name in browser.title
        from selenium.webdriver.common.by import By

        assert name in browser.find_element(By.ID, "domain").text
        # The prompt: from the scrollback, or typed for.
        type_into(browser, "\n")
        wait_until(browser, "the prompt", lambda: "guest# " in screen(browser))
        type_into(browser, "echo page-$((6*7))\n")
        wait_until(browser, "the command's output", lambda: "\npage-42" in screen(browser))
        assert browser.execute_script("return window.consoleBroker.role") == "writer"
        # The terminal fills the window.
        cols, rows = browser.execute_script(
            "return [window.consoleBroker.term.cols, window.consoleBroker.term.rows]"
        )
        assert cols > 80 and rows > 24
        # A token that fails closes the page's session; a pasted link reconnects it. (A
        # watcher stays attached meanwhile, so the console's scrollback lives on.)
        watcher = stack.enter_context(served.connect(name, "--view-only"))
        Client(watcher).wait_for(b"page-42")
        browser.execute_script("window.location.hash = '#token=not-a-token'")
        wait_until(
            browser, "the failed reconnect",
            lambda: browser.execute_script("return window.consoleBroker.state") == "closed",
            timeout=15,
        )
        assert browser.find_element(By.ID, "reconnect").is_displayed()
        assert "token=" not in browser.current_url
        field = browser.find_element(By.ID, "link")
        field.send_keys(served.token(name)["page"])
        browser.find_element(By.ID, "reconnect-button").click()
        wait_until(
            browser, "connected again",
            lambda: browser.execute_script("return window.consoleBroker.state") == "connected",
        )
        wait_until(browser, "the screen again", lambda: "\npage-42" in screen(browser))
        type_into(browser, "echo again-$((6*7))\n")
        wait_until(browser, "typing again", lambda: "\nagain-42" in screen(browser))
        # Stopping the VM: the page shows the reason and offers to reconnect.
        dom.destroy()
        wait_until(
            browser, "the close reason",
            lambda: browser.execute_script("return window.consoleBroker.closeCode") == 4100,
            timeout=15,
        )
        assert "VM stopped" in browser.find_element(By.ID, "state").text
        assert browser.find_element(By.ID, "reconnect").is_displayed()
        with pytest.raises(ConnectionClosed):
            while True:
                watcher.recv(timeout=5)
        assert watcher.close_code == 4100
        stack.close()
    finally:
        testbed.remove(dom)


def test_the_page_and_its_assets_are_served(served: Served) -> None:
    status, body = served.get("/console/serial/")
    assert status == 200 and b"xterm/xterm.js" in body and b"console.js" in body
    for path in ("xterm/xterm.js", "xterm/xterm.css", "xterm/addon-fit.js", "console.js"):
        status, body = served.get(f"/console/serial/{path}")
        assert status == 200 and body, path
    status, _ = served.get("/console/serial/xterm/../../package.json")
    assert status == 404
    status, _ = served.get("/console/serial/node_modules/@xterm/xterm/package.json")
    assert status == 404
