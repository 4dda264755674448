"""The thread-safe libvirt event implementation: registrations from threads reach the loop."""

from __future__ import annotations

import asyncio
import os
import threading

import anyio
import anyio.to_thread
import libvirt
import pytest

from broker.service._eventloop import ThreadSafeAsyncIOImpl

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_handles_and_timeouts_added_from_a_thread_fire_on_the_loop() -> None:
    impl = ThreadSafeAsyncIOImpl(asyncio.get_running_loop())  # not registered with libvirt
    loop_thread = threading.get_ident()
    fired: list[tuple[str, int]] = []
    readable = anyio.Event()
    timed_out = anyio.Event()

    def on_fd(watch: int, fd: int, events: int, opaque: object) -> None:
        assert threading.get_ident() == loop_thread
        fired.append(("fd", watch))
        readable.set()

    def on_timeout(timer: int, opaque: object) -> None:
        assert threading.get_ident() == loop_thread
        fired.append(("timeout", timer))
        timed_out.set()

    read_fd, write_fd = os.pipe()
    try:

        def register() -> tuple[int, int]:
            watch = impl._add_handle(read_fd, 0, on_fd, None)
            impl._update_handle(watch, libvirt.VIR_EVENT_HANDLE_READABLE)  # queued behind the add
            timer = impl._add_timeout(10, on_timeout, None)
            return watch, timer

        watch, timer = await anyio.to_thread.run_sync(register)
        assert watch != timer
        os.write(write_fd, b"!")
        with anyio.fail_after(2):
            await readable.wait()
            await timed_out.wait()
        assert ("fd", watch) in fired and ("timeout", timer) in fired
        # Switched off from a thread, the handle stays quiet.
        await anyio.to_thread.run_sync(impl._update_handle, watch, 0)
        await anyio.to_thread.run_sync(impl._update_timeout, timer, -1)
        await anyio.sleep(0.05)
        fired.clear()
        await anyio.sleep(0.1)
        assert fired == []
        assert impl._queued == set()
        loop = asyncio.get_running_loop()
        loop.remove_reader(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
