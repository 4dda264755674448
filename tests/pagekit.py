"""Waiting on a console page in headless Chromium (the ``browser`` fixture): the checks
the page tests of every plugin share, and what each built-in page shows of the guest (run
with ``browser.execute_script``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The page's own state (``window.consoleBroker``) and notice, for a failure message.
PAGE_STATE_JS = (
    "const cb = window.consoleBroker || {}; return [cb.state, cb.role, cb.closeCode, "
    "cb.closeReason, (document.getElementById('notice') || {}).textContent]"
)

#: The VNC page (noVNC): its canvas's size and how many colours a sample of its pixels has.
VNC_CANVAS = """
const canvas = document.querySelector('#screen canvas');
if (!canvas || !canvas.width) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const colours = new Set();
for (let i = 0; i < data.length; i += 4 * 7) {
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
}
return [canvas.width, canvas.height, colours.size];
"""
#: The SPICE page (spice-html5): how many of its canvas's pixels are not black (-1: no
#: canvas yet).
SPICE_INK = """
const canvas = document.querySelector('#spice-screen canvas');
if (!canvas || !canvas.width) { return -1; }
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let ink = 0;
for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 40 || data[i + 1] > 40 || data[i + 2] > 40) { ink++; }
}
return ink;
"""
#: The serial page (xterm.js): the text of its terminal's buffer (null before it has one).
SERIAL_SCREEN = """
const term = window.consoleBroker && window.consoleBroker.term;
if (!term) { return null; }
const buffer = term.buffer.active;
const lines = [];
for (let i = 0; i < buffer.length; i++) {
  lines.push(buffer.getLine(i).translateToString(true));
}
return lines.join("\\n");
"""


def wait_until(
    browser: Any, what: str, check: Callable[[], Any], timeout: float = 60.0,
    shows: Callable[[], str] = lambda: "",
) -> Any:
    """Poll *check* until it is truthy (its value returned); past *timeout*, fail naming
    *what*, with the page's state and what *shows* says the page shows."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            state = browser.execute_script(PAGE_STATE_JS)
            raise AssertionError(f"{what}: not seen; the page: {state}\n{shows()}")
        time.sleep(0.2)


def serial_screen(browser: Any) -> str:
    """What the serial page's terminal shows (:data:`SERIAL_SCREEN`), or ""."""
    return browser.execute_script(SERIAL_SCREEN) or ""


def serial_type(browser: Any, text: str) -> None:
    """Type *text* into the serial page's terminal (xterm.js's textarea)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(text)
