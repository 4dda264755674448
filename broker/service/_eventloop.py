"""libvirt's event loop on the running asyncio loop, safe for libvirt calls from worker threads.

libvirtaio runs libvirt's events (lifecycle events, keepalive, console
streams) on an asyncio loop, but its handle and timeout functions touch the
loop directly, which is only safe from the loop's own thread. libvirt's
remote driver calls them from whichever thread makes a call (it switches its
socket watch off and on around each RPC), so a libvirt call in a worker
thread (:func:`anyio.to_thread.run_sync`) would touch the loop from that
thread. :class:`ThreadSafeAsyncIOImpl` hands every such call made off the
loop thread to the loop with ``call_soon_threadsafe`` and returns at once, as
libvirt's own default event loop does (it, too, only records the change and
wakes its loop); watch and timer ids are allocated immediately, and an
operation on an id whose registration is still queued is queued behind it.

It must be registered inside the running loop, before ``libvirt.open``
(registered elsewhere, it binds another loop and stream callbacks never fire).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import libvirtaio


class ThreadSafeAsyncIOImpl(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]
    """libvirtaio's implementation, callable from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()
        self._queued: set[int] = set()
        self._queued_lock = threading.Lock()

    def _off_loop(self) -> bool:
        return threading.get_ident() != self._loop_thread

    def _defer(self, iden: int, function: Callable[..., Any], *args: Any) -> bool:
        """Queue *function* if called off the loop or *iden* is still queued; True if queued."""
        with self._queued_lock:
            queued = iden in self._queued
        if self._off_loop():
            self.loop.call_soon_threadsafe(function, *args)
            return True
        if queued:
            self.loop.call_soon(function, *args)
            return True
        return False

    # --- registrations: an id now, the work on the loop ----------------------------------

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        if not self._off_loop():
            return int(super()._add_handle(fd, event, cb, opaque))
        iden = int(next(libvirtaio.Callback._iden_counter))
        with self._queued_lock:
            self._queued.add(iden)
        self.loop.call_soon_threadsafe(self._add_handle_as, iden, fd, event, cb, opaque)
        return iden

    def _add_handle_as(self, iden: int, fd: int, event: int, cb: Any, opaque: Any) -> None:
        callback = libvirtaio.FDCallback(
            self, cb, opaque, descriptor=self.descriptors[fd], event=event
        )
        callback.iden = iden
        self.callbacks[iden] = callback
        self.descriptors[fd].add_handle(callback)
        self._pending_inc()
        with self._queued_lock:
            self._queued.discard(iden)

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        if not self._off_loop():
            return int(super()._add_timeout(timeout, cb, opaque))
        iden = int(next(libvirtaio.Callback._iden_counter))
        with self._queued_lock:
            self._queued.add(iden)
        self.loop.call_soon_threadsafe(self._add_timeout_as, iden, timeout, cb, opaque)
        return iden

    def _add_timeout_as(self, iden: int, timeout: int, cb: Any, opaque: Any) -> None:
        callback = libvirtaio.TimeoutCallback(self, cb, opaque)
        callback.iden = iden
        self.callbacks[iden] = callback
        callback.update(timeout=timeout)
        self._pending_inc()
        with self._queued_lock:
            self._queued.discard(iden)

    # --- changes ---------------------------------------------------------------------------

    def _update_handle(self, watch: int, event: int) -> None:
        if not self._defer(watch, self._update_handle, watch, event):
            super()._update_handle(watch, event)

    def _remove_handle(self, watch: int) -> int:
        if not self._defer(watch, self._remove_handle, watch):
            return int(super()._remove_handle(watch))
        return 0

    def _update_timeout(self, timer: int, timeout: int) -> None:
        if not self._defer(timer, self._update_timeout, timer, timeout):
            super()._update_timeout(timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        if not self._defer(timer, self._remove_timeout, timer):
            return int(super()._remove_timeout(timer))
        return 0


    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Move to *loop* (the running one): libvirt takes one implementation per
        process, so a process that runs a new loop (tests) moves the one it has.
        Watches and timers still registered are re-attached to the new loop."""
        self.loop = loop
        self._loop_thread = threading.get_ident()
        self._finished = None
        for descriptor in list(self.descriptors.values()):
            descriptor.update()
        for callback in list(self.callbacks.values()):
            if isinstance(callback, libvirtaio.TimeoutCallback):
                callback._task = None
                callback.update(timeout=callback.timeout)


_registered: ThreadSafeAsyncIOImpl | None = None


def register_event_loop() -> ThreadSafeAsyncIOImpl:
    """Run libvirt's events on the running asyncio loop.

    libvirt accepts one event implementation per process, for good: the first
    call registers it, later calls from another loop move it there.
    """
    global _registered
    loop = asyncio.get_running_loop()
    if _registered is None:
        _registered = ThreadSafeAsyncIOImpl(loop).register()
        libvirtaio._current_impl = _registered
    elif _registered.loop is not loop:
        _registered.rebind(loop)
    return _registered
