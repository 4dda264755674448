"""``GET /screenshot``: a domain's screen as PNG, off the event loop and bounded.

Theory of operation. The broker's part of a screenshot (what a token grants, the
answer) is in ``_app``; the capture and the PNG are :mod:`broker.screenshots`'s, run
here in a worker thread, because libvirt's call waits on QEMU (and on the domain's job
lock, which a snapshot or a migration holds for seconds) and the PNG costs CPU:

* at most :data:`AT_ONCE` screenshots at once on a broker; one more is refused at once
  (``screenshot_busy``, 429) rather than queued. A slot is taken before the token is used
  up, and given back by the worker thread when the capture really ends, so a capture
  the broker stopped waiting for still counts until libvirt returns: a hung libvirtd
  cannot make the broker start ever more threads;
* the answer is awaited for at most :data:`TIMEOUT` seconds (``screenshot_timeout``, 504);
* the image is bounded (:data:`broker.screenshots.MAX_BYTES` from libvirt,
  :data:`broker.screenshots.MAX_PIXELS` decoded).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import anyio.to_thread
import attrs

from broker.screenshots import MAX_BYTES, MAX_PIXELS, ScreenshotError, Shot, to_png
from broker.service._libvirt import Resolver, Target
from broker.service._refusals import (
    NO_SCREEN,
    SCREENSHOT_BUSY,
    SCREENSHOT_FAILED,
    SCREENSHOT_TIMEOUT,
    SCREENSHOT_TOO_LARGE,
    UNKNOWN_DOMAIN,
    VM_NOT_RUNNING,
    Refusal,
    Refused,
)

#: Screenshots taken at once on one broker, at most.
AT_ONCE = 4
#: Seconds a screenshot is waited for.
TIMEOUT = 10.0

_REFUSALS: dict[str, Refusal] = {
    "unknown_domain": UNKNOWN_DOMAIN,
    "not_running": VM_NOT_RUNNING,
    "no_screen": NO_SCREEN,
    "failed": SCREENSHOT_FAILED,
    "too_large": SCREENSHOT_TOO_LARGE,
}


@attrs.frozen
class Taken:
    """A screenshot and how long it took (milliseconds, capture and PNG)."""

    shot: Shot
    duration_ms: float


class Screenshots:
    """The screenshots of one broker: *resolver* captures (in a worker thread), at most
    *at_once* at a time, each waited for *timeout* seconds."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        at_once: int = AT_ONCE,
        timeout: float = TIMEOUT,
        max_bytes: int = MAX_BYTES,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self._resolver = resolver
        self.at_once = at_once
        self.timeout = timeout
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """Captures under way (those the broker stopped waiting for included)."""
        return self._running

    def _reserve(self) -> None:
        with self._lock:
            if self._running >= self.at_once:
                raise Refused(
                    SCREENSHOT_BUSY,
                    f"{self._running} screenshots under way (at most {self.at_once})",
                )
            self._running += 1

    def _release(self) -> None:
        with self._lock:
            self._running -= 1

    async def take(
        self, target: Target, *, max_width: int | None, before: Callable[[], None]
    ) -> Taken:
        """A screenshot of *target*'s domain, no wider than *max_width*.

        *before* is called once a slot is taken and before the capture starts (it uses
        the token up, and may raise :class:`Refused`: the slot is given back). Raises
        :class:`Refused`: ``screenshot_busy``, ``screenshot_timeout``, and the capture's
        own (``vm_not_running``, ``no_screen``, ``screenshot_failed``, ...)."""
        self._reserve()
        try:
            before()
        except BaseException:
            self._release()
            raise
        started = time.monotonic()
        try:
            with anyio.fail_after(self.timeout):
                shot = await anyio.to_thread.run_sync(
                    self._work, target, max_width, abandon_on_cancel=True
                )
        except TimeoutError:
            raise Refused(
                SCREENSHOT_TIMEOUT, f"no screenshot within {self.timeout:g} s"
            ) from None
        except ScreenshotError as exc:
            raise Refused(_REFUSALS[exc.kind], str(exc)) from None
        return Taken(shot, (time.monotonic() - started) * 1000)

    def _work(self, target: Target, max_width: int | None) -> Shot:
        """In a worker thread: capture and encode, then give the slot back."""
        try:
            captured = self._resolver.capture_screenshot(target, max_bytes=self._max_bytes)
            return to_png(captured, max_width=max_width, max_pixels=self._max_pixels)
        finally:
            self._release()
