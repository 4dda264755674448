"""Message framing after the link: find message boundaries, never copy a body.

A :class:`MessageScanner` walks a one-direction stream of SPICE messages chunk by chunk.
Only headers are parsed (6 bytes under the mini header, 18 without); a body is skipped
by counting, so a large display message costs nothing but the arithmetic, and the
chunk is handed back as :class:`Data` -- the caller's own object when it can be
forwarded whole, else a ``memoryview`` slice of it.

Two rules make the ``Data`` events safe to forward:

- a ``Data`` never ends inside a header: the bytes of a header split across chunks
  are held back (at most 17 bytes) and sent on as one small ``Data`` with the rest of
  the header once it is complete;
- a header is checked before any of its bytes are handed out: a message larger than
  ``max_message_size`` (or a decoded message of the wrong size) stops the scan right
  before that header, so what was forwarded is exactly the valid prefix.

The few message types the broker reads (``MAIN_INIT``, ``DISPLAY_INIT``) are listed in
*decoders*: their bodies are collected (bounded by ``max_decoded_size``) and parsed
when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from ._events import Data, DisplayInit, MainInit, Message
from ._wire import WireError, header_size, parse_header

#: A decoder: (smallest allowed body size, parser of the complete body).
Decoder = tuple[int, Callable[[bytes], MainInit | DisplayInit]]

#: The largest body the scanner collects for decoding.
MAX_DECODED_SIZE = 4096


class ScanResult(NamedTuple):
    """The events of one chunk, in order (``Data`` first, then the messages it
    completed), and the error that stopped the scan, if any."""

    events: list[Data | Message | MainInit | DisplayInit]
    error: WireError | None


class MessageScanner:
    """Boundaries of the messages in one direction of a channel (see the module doc)."""

    def __init__(
        self,
        *,
        mini_header: bool,
        max_message_size: int,
        decoders: Mapping[int, Decoder] | None = None,
        max_decoded_size: int = MAX_DECODED_SIZE,
    ) -> None:
        self.mini_header = mini_header
        self.max_message_size = max_message_size
        self._decoders = dict(decoders or {})
        self._max_decoded = max_decoded_size
        self._header_size = header_size(mini_header)
        self._held = bytearray()  # the start of a header split across chunks
        self._remaining = 0  # body bytes of the current message still to come
        self._current: Message | None = None
        self._body: bytearray | None = None  # the body of a message being decoded
        #: The serial of the last full header seen (0 before any, and under the mini header).
        self.last_serial = 0
        #: Messages whose header passed, in total.
        self.messages = 0

    @property
    def at_boundary(self) -> bool:
        """Whether the stream so far ends between two messages."""
        return self._remaining == 0 and not self._held

    @property
    def body_remaining(self) -> int:
        """Bytes still missing from the body of the message in progress."""
        return self._remaining

    @property
    def header_held(self) -> int:
        """Bytes of an incomplete header held back (not yet handed out as ``Data``)."""
        return len(self._held)

    def scan(self, chunk: bytes | memoryview) -> ScanResult:
        """Scan *chunk*, the next bytes of the stream."""
        n = len(chunk)
        events: list[Data | Message | MainInit | DisplayInit] = []
        done: list[Message | MainInit | DisplayInit] = []
        error: WireError | None = None
        start = 0  # first byte of chunk not yet handed out
        end = n  # bytes of chunk that may be handed out
        pos = 0
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                if self._body is not None:
                    self._body += chunk[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    done.extend(self._finish())
                continue
            need = self._header_size - len(self._held)
            if n - pos < need:
                self._held += chunk[pos:]
                end = pos
                break
            straddles = bool(self._held)
            header = bytes(self._held) + bytes(chunk[pos : pos + need])
            try:
                self._start(header)
            except WireError as exc:
                error = exc
                end = pos
                self._held.clear()
                break
            self._held.clear()
            pos += need
            if straddles:
                events.append(Data(header))
                start = pos
            if not self._remaining:
                done.extend(self._finish())
        if end > start:
            whole = start == 0 and end == n and isinstance(chunk, bytes)
            events.append(Data(chunk if whole else memoryview(chunk)[start:end]))
        events.extend(done)
        return ScanResult(events, error)

    def _start(self, header: bytes) -> None:
        msg_type, size, serial, _sub_list = parse_header(header, self.mini_header)
        if size > self.max_message_size:
            raise WireError(
                f"message type {msg_type} of {size} bytes exceeds the limit of "
                f"{self.max_message_size}"
            )
        decoder = self._decoders.get(msg_type)
        if decoder is not None:
            if not decoder[0] <= size <= self._max_decoded:
                raise WireError(
                    f"message type {msg_type} of {size} bytes, expected {decoder[0]}.."
                    f"{self._max_decoded}"
                )
            self._body = bytearray()
        else:
            self._body = None
        if serial is not None:
            self.last_serial = serial
        self.messages += 1
        self._current = Message(type=msg_type, size=size, serial=serial)
        self._remaining = size

    def _finish(self) -> list[Message | MainInit | DisplayInit]:
        message = self._current
        assert message is not None
        self._current = None
        if self._body is None:
            return [message]
        body, self._body = bytes(self._body), None
        return [message, self._decoders[message.type][1](body)]
