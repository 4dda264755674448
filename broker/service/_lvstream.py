"""A libvirt console stream as an anyio byte stream, driven by libvirt's stream events.

The stream is opened with ``VIR_STREAM_NONBLOCK``; libvirt's event loop
(libvirtaio, on the running asyncio loop) calls :meth:`LibvirtByteStream._on_event`
when it can be read or written. Received data is queued up to *buffer_limit*
bytes; then the stream is no longer watched for reading, so the guest's output
waits in libvirt (and, past libvirt's own buffer, in the guest) until the
client has taken what is queued: backpressure instead of an unbounded buffer.
Writes that libvirt cannot take at once wait for the writable event.

Everything here runs on the event loop's thread (the libvirt callbacks too).
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import anyio
import anyio.abc
import libvirt

#: Queued bytes from the console before reading pauses.
DEFAULT_BUFFER_LIMIT = 256 * 1024
_RECV_SIZE = 64 * 1024
_AGAIN = -2

_READABLE = libvirt.VIR_STREAM_EVENT_READABLE
_WRITABLE = libvirt.VIR_STREAM_EVENT_WRITABLE
_ERROR = libvirt.VIR_STREAM_EVENT_ERROR
_HANGUP = libvirt.VIR_STREAM_EVENT_HANGUP


class LibvirtByteStream(anyio.abc.ByteStream):
    """Wraps a ``virStream`` opened ``VIR_STREAM_NONBLOCK`` (and already attached)."""

    def __init__(self, stream: Any, *, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self._stream = stream
        self._limit = buffer_limit
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: str | None = None
        self._closed = False
        self._data = anyio.Event()
        self._writable = anyio.Event()
        self._events = _READABLE | _ERROR | _HANGUP
        stream.eventAddCallback(self._events, self._on_event, None)

    @property
    def buffered(self) -> int:
        """Bytes received from libvirt and not yet taken by :meth:`receive`."""
        return self._buffered

    # --- libvirt's side (callbacks on the loop thread) ------------------------------------

    def _watch(self, events: int) -> None:
        if events != self._events and not self._closed:
            self._events = events
            try:
                self._stream.eventUpdateCallback(events)
            except libvirt.libvirtError as exc:
                self._fail(exc.get_error_message() or "stream event update failed")

    def _fail(self, message: str) -> None:
        if self._error is None:
            self._error = message
        self._data.set()
        self._writable.set()

    def _on_event(self, _stream: Any, events: int, _opaque: object) -> None:
        if events & _READABLE:
            self._read_available()
        if events & _WRITABLE:
            self._writable.set()
            self._watch(self._events & ~_WRITABLE)
        if events & (_ERROR | _HANGUP) and not events & _READABLE:
            self._eof = True
            self._data.set()
            self._writable.set()

    def _read_available(self) -> None:
        while self._buffered < self._limit and not self._eof and self._error is None:
            try:
                data = self._stream.recv(_RECV_SIZE)
            except libvirt.libvirtError as exc:
                self._fail(exc.get_error_message() or "stream receive failed")
                break
            if isinstance(data, int):
                if data != _AGAIN:
                    self._fail(f"stream receive returned {data}")
                break
            if not data:
                self._eof = True
                break
            self._chunks.append(data)
            self._buffered += len(data)
        if self._buffered >= self._limit:
            self._watch(self._events & ~_READABLE)
        if self._chunks or self._eof or self._error is not None:
            self._data.set()

    # --- the anyio side -------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._error is not None:
                raise anyio.BrokenResourceError(self._error)
            if self._eof:
                raise anyio.EndOfStream
            self._data = anyio.Event()
            await self._data.wait()
        first = self._chunks[0]
        if len(first) > max_bytes:
            self._chunks[0] = first[max_bytes:]
            data = first[:max_bytes]
        else:
            parts = [self._chunks.popleft()]
            size = len(first)
            while self._chunks and size + len(self._chunks[0]) <= max_bytes:
                part = self._chunks.popleft()
                parts.append(part)
                size += len(part)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(data)
        if not self._events & _READABLE and self._buffered <= self._limit // 2:
            self._watch(self._events | _READABLE)
        return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._error is not None or self._eof:
                raise anyio.BrokenResourceError(self._error or "the console stream ended")
            try:
                sent = self._stream.send(bytes(view[:_RECV_SIZE]))
            except libvirt.libvirtError as exc:
                self._fail(exc.get_error_message() or "stream send failed")
                continue
            if sent == _AGAIN:
                self._writable = anyio.Event()
                self._watch(self._events | _WRITABLE)
                await self._writable.wait()
            elif sent < 0:
                self._fail(f"stream send returned {sent}")
            else:
                view = view[sent:]

    async def send_eof(self) -> None:
        raise NotImplementedError("a console stream cannot be half-closed")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._data.set()
        self._writable.set()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        await anyio.lowlevel.checkpoint()
