"""noVNC in a real browser (headless Chromium): the broker's console page, opened with
a fresh token from the CLI, shows the guest's screen; a used link tells why it fails."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from console_broker_testbed import Testbed
from vncstack import CANVAS, Served, enabled_guest, settled_server_init

pytestmark = pytest.mark.vm


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
            status = browser.execute_script("return window.consoleStatus")
            raise AssertionError(f"timed out waiting for {script!r}; page status {status}")
        time.sleep(0.2)


def test_novnc_shows_the_guests_screen(browser: Any, served: Served, guest: Any) -> None:
    init = settled_server_init(guest)
    page = served.token(guest.name())["page"]
    browser.get(page)
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'connected'")
    assert "token=" not in browser.current_url  # taken out of the address bar
    deadline = time.monotonic() + 60
    while True:
        found = browser.execute_script(CANVAS)
        if found and found[2] > 1:
            break
        assert time.monotonic() < deadline, f"the canvas stayed blank: {found}"
        time.sleep(0.5)
    width, height, colours = found
    assert (width, height) == (init.width, init.height)
    assert colours > 1
    status = browser.execute_script("return window.consoleStatus")
    assert status["name"] == init.name_text and status["viewOnly"] is False
    assert browser.find_element("id", "view-only").is_displayed() is False

    # The same link again: the broker closes with 4004 and the page says why.
    browser.get(page)
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'disconnected'")
    status = browser.execute_script("return window.consoleStatus")
    assert status["code"] == 4004
    message = browser.find_element("id", "message-text").text
    assert "already used" in message, message


def test_a_view_only_link_says_so(browser: Any, served: Served, guest: Any) -> None:
    browser.get(served.token(guest.name(), view_only=True)["page"])
    _wait(browser, "return window.consoleStatus && window.consoleStatus.state === 'connected'")
    assert browser.find_element("id", "view-only").is_displayed()
    assert browser.find_element("id", "ctrl-alt-del").is_enabled() is False
    found = _wait(browser, f"const r = (() => {{{CANVAS}}})(); return r && r[2] > 1 && r;")
    assert found[2] > 1
