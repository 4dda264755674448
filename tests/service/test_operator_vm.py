"""The operator page on the real stack, in headless Chromium: opened with a fresh
``console-broker token --operator`` link, it lists the tiny guest (its state, its VNC,
SPICE and serial consoles, its live sessions) and opens each console in a new tab in one
click; each tab shows the guest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pagekit
import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker, enabled_guest

pytestmark = pytest.mark.vm

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    broker = ServedBroker(tmp_path_factory.mktemp("operator-vm"), protocol="vnc")
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = enabled_guest(testbed, "--consoles", "vnc,spice,serial")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def _row(browser: Any, name: str) -> dict[str, Any] | None:
    """The operator page's row of the domain *name*: state, console buttons, sessions."""
    found: dict[str, Any] | None = browser.execute_script(
        """
        const row = document.querySelector(`tr[data-name='${arguments[0]}']`);
        if (!row) { return null; }
        return {
          uuid: row.dataset.uuid,
          state: row.querySelector('td.state').textContent,
          consoles: Array.from(row.querySelectorAll('button.console'))
            .map((b) => [b.dataset.protocol, b.disabled]),
          sessions: Array.from(row.querySelectorAll('td.sessions li')).map((li) => li.textContent),
        };
        """,
        name,
    )
    return found


def _open(browser: Any, name: str, protocol: str) -> str:
    """Click *protocol*'s button in *name*'s row; the new tab's handle, switched to."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    before = set(browser.window_handles)
    button = f"tr[data-name='{name}'] button[data-protocol='{protocol}']"
    for _ in range(5):  # the list is redrawn when its sessions change
        try:
            browser.find_element(By.CSS_SELECTOR, button).click()
            break
        except StaleElementReferenceException:
            continue
    handle = pagekit.wait_until(
        browser, f"the {protocol} tab", lambda: set(browser.window_handles) - before, 30
    ).pop()
    browser.switch_to.window(handle)
    pagekit.wait_until(browser, f"the {protocol} page",
                       lambda: f"/console/{protocol}/" in browser.current_url, 30)
    return str(handle)


def _shows_vnc(browser: Any) -> None:
    pagekit.wait_until(
        browser, "VNC connected",
        lambda: browser.execute_script(
            "return window.consoleStatus && window.consoleStatus.state === 'connected'"))
    found = pagekit.wait_until(
        browser, "the guest's screen on the VNC page",
        lambda: (lambda r: r if r and r[2] > 1 else None)(
            browser.execute_script(pagekit.VNC_CANVAS)))
    assert found[0] > 0 and found[1] > 0


def _shows_spice(browser: Any) -> None:
    pagekit.wait_until(
        browser, "the guest's screen on the SPICE page",
        lambda: browser.execute_script(pagekit.SPICE_INK) > 100)
    assert browser.execute_script("return document.body.dataset.state") == "connected"


def _shows_serial(browser: Any) -> None:
    pagekit.wait_until(
        browser, "serial connected",
        lambda: browser.execute_script("return window.consoleBroker.state") == "connected")
    pagekit.serial_type(browser, "\n")
    pagekit.wait_until(browser, "the guest's prompt",
                       lambda: "guest# " in pagekit.serial_screen(browser), 90)
    pagekit.serial_type(browser, "echo operator-$((6*7))\n")
    pagekit.wait_until(browser, "the guest's answer",
                       lambda: "\noperator-42" in pagekit.serial_screen(browser))


SHOWS = {"vnc": _shows_vnc, "spice": _shows_spice, "serial": _shows_serial}


def test_the_operator_page_lists_the_guest_and_opens_each_console(
    served: ServedBroker, guest: Any, browser: Any
) -> None:
    name = guest.name()
    doc = json.loads(served.cli("token", "--operator", "--name", "Ops on call", "--json"))
    served.tokens.append(doc["token"])
    operator = browser.current_window_handle
    browser.get(doc["page"])
    pagekit.wait_until(
        browser, "the operator session",
        lambda: browser.execute_script("return window.consoleBroker.state") == "connected")
    pagekit.wait_until(  # single use: out of the address bar
        browser, "the token out of the address bar",
        lambda: "token=" not in browser.current_url)
    row = pagekit.wait_until(browser, f"{name} listed", lambda: _row(browser, name))
    assert row["uuid"] == guest.UUIDString() and row["state"] == "running"
    assert sorted(row["consoles"]) == [["serial", False], ["spice", False], ["vnc", False]]
    assert row["sessions"] == []
    for protocol in ("vnc", "spice", "serial"):
        browser.switch_to.window(operator)
        tab = _open(browser, name, protocol)
        try:
            assert f"/console/{protocol}/" in browser.current_url
            pagekit.wait_until(  # the console page takes it out once it has read it
                browser, "the token out of the address bar",
                lambda: "token=" not in browser.current_url)
            SHOWS[protocol](browser)
            # the operator page lists the session it opened, with the operator's name
            browser.switch_to.window(operator)
            pagekit.wait_until(
                browser, f"the {protocol} session listed",
                lambda p=protocol: any(s.startswith(f"{p}: Ops on call (full control)")
                                       for s in (_row(browser, name) or {}).get("sessions", [])),
                30)
        finally:
            browser.switch_to.window(tab)
            browser.close()
            # the shared browser is left on a window that exists, whatever happened
            browser.switch_to.window(operator)
    browser.switch_to.window(operator)
    # The link again: its token was used; the page says how to get a new one.
    browser.get(doc["page"])
    pagekit.wait_until(
        browser, "the refusal",
        lambda: browser.execute_script("return window.consoleBroker.state") == "closed")
    notice = browser.find_element("id", "notice").text
    assert "console-broker token --operator" in notice and "single use" in notice, notice
    minted = served.events("operator.minted")
    assert [e["protocol"] for e in minted] == ["vnc", "spice", "serial"]
    assert all(e["name"] == "Ops on call" and e["domain"] == guest.UUIDString()
               for e in minted)
    assert served.events("operator.opened")
