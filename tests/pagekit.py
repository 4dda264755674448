"""Waiting on a console page in headless Chromium (the ``browser`` fixture): the checks
the page tests of every plugin share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: The page's own state (``window.consoleBroker``) and notice, for a failure message.
PAGE_STATE_JS = (
    "const cb = window.consoleBroker || {}; return [cb.state, cb.role, cb.closeCode, "
    "cb.closeReason, (document.getElementById('notice') || {}).textContent]"
)


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
