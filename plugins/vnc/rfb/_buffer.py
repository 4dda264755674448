"""The receive buffer of the handshake parsers.

A bytearray and a read offset: consuming moves the offset, and the consumed
prefix is dropped only when it is at least half the buffer (or all of it), so
feeding many small pieces and consuming many small elements stays linear.
"""

from __future__ import annotations

from ._errors import RFBUsageError

#: The consumed prefix is dropped once it is this long and at least half the buffer.
COMPACT_AT = 4096


class ReceiveBuffer:
    __slots__ = ("_data", "_pos", "eof")

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0
        self.eof = False

    def __len__(self) -> int:
        return len(self._data) - self._pos

    def feed(self, data: bytes | bytearray | memoryview | None) -> None:
        """Append *data*; None marks the end of the stream (empty data is nothing)."""
        if self.eof:
            raise RFBUsageError("receive_data() after the end of the stream (None)")
        if data is None:
            self.eof = True
        else:
            self._data += data

    def peek(self, size: int) -> bytes | None:
        """The next *size* bytes without consuming them, or None if fewer are buffered."""
        if len(self._data) - self._pos < size:
            return None
        return bytes(self._data[self._pos : self._pos + size])

    def take(self, size: int) -> bytes | None:
        """Consume and return the next *size* bytes, or None if fewer are buffered."""
        data = self.peek(size)
        if data is not None:
            self._pos += size
            self._compact()
        return data

    def take_all(self) -> bytes:
        """Consume and return everything buffered."""
        data = bytes(self._data[self._pos :])
        self._data.clear()
        self._pos = 0
        return data

    def _compact(self) -> None:
        if self._pos == len(self._data):
            self._data.clear()
            self._pos = 0
        elif self._pos >= COMPACT_AT and self._pos * 2 >= len(self._data):
            del self._data[: self._pos]
            self._pos = 0
