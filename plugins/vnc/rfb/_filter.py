"""The client-to-server message filter (after both handshakes).

Every message the client sends is framed and classified before it may reach
the server, so that a view-only session can drop input: what cannot be parsed
cannot be enforced, so an unknown message type (or a QEMU submessage, audio
operation or length the filter does not know) ends the session with an
:class:`RFBProtocolError`. The server-to-client direction is never parsed: it
is forwarded raw, which is safe because the filter strips from SetEncodings the
pseudo-encodings that would change how client messages are framed (see
:data:`STRIPPED_ENCODINGS`).

Two ways to drive it, with the same decisions and errors:

* ``receive_data()`` + ``next_event()``: one :class:`ClientMessage` per
  message (for logging, limits, tests); forward ``event.data`` when
  ``event.forward``.
* ``filter_data(data) -> bytes``: the fast path. It frames runs of fixed-size
  messages with one precompiled regular expression (in C), builds no event
  objects, and returns the bytes to forward, as slices of what was fed (often
  the very object fed). Use it on the hot path.

Input is dropped while :attr:`ClientMessageFilter.view_only` is set, which the
session may change between two feeds (a console whose input one session holds at a
time switches it as the holder changes). With a :attr:`ClientMessageFilter.claim`
callback, a *press* about to be dropped (a key going down, a pointer event with a
button held) asks it first: when it answers True (the session may have the input
now: nobody held it), ``view_only`` is cleared and the press and everything after
it are forwarded.

Buffering: a bytearray and a read offset; the consumed prefix is dropped only
once it is at least half the buffer, so many small messages in a big feed stay
linear. With ``filter_data`` and nothing pending, the fed bytes are framed in
place and only an incomplete tail is copied.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from ._errors import RFBProtocolError, RFBUsageError, Side
from ._events import NEED_DATA, ConnectionClosed, Event, NeedData, PixelFormat
from ._messages import (
    XVP,
    ClientCutText,
    ClientFence,
    ClientMessage,
    EnableContinuousUpdates,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    QEMUAudio,
    QEMUExtendedKeyEvent,
    Screen,
    SetDesktopSize,
    SetEncodings,
    SetPixelFormat,
    cut_text_is_input,
)
from ._state import FILTER_TRANSITIONS, FilterState, Machine
from ._wire import STRIPPED_ENCODINGS, U16, U32, ClientMessageType

Buffer = bytes | bytearray | memoryview

#: Default bound of a ClientCutText payload (QEMU refuses more than 1 MiB).
DEFAULT_MAX_CUT_TEXT: Final = 1 << 20
#: Default bound of a SetEncodings count (noVNC sends about 30).
DEFAULT_MAX_ENCODINGS: Final = 1024
#: Default bound of the screens of a SetDesktopSize.
DEFAULT_MAX_SCREENS: Final = 16
#: A ClientFence payload is at most 64 bytes (rfbproto, "ClientFence").
MAX_FENCE_PAYLOAD: Final = 64
#: The consumed prefix is dropped once it is this long and at least half the buffer.
COMPACT_AT: Final = 65536

_T = ClientMessageType
_FBUR = struct.Struct(">xBHHHH")
_KEY = struct.Struct(">xBxxI")
_POINTER = struct.Struct(">xBHH")
_CUT_HEADER = struct.Struct(">xxxxi")
_ECU = struct.Struct(">xBHHHH")
_FENCE_HEADER = struct.Struct(">xxxxIB")
_XVP = struct.Struct(">xxBB")
_DESKTOP_HEADER = struct.Struct(">xxHHBx")
_SCREEN = struct.Struct(">IHHHHI")
_EXT_KEY = struct.Struct(">xxHII")
_AUDIO_FORMAT = struct.Struct(">xxxxBBI")


def _run(parts: Iterable[bytes]) -> re.Pattern[bytes]:
    """A pattern matching a run (possibly empty) of complete messages.

    The repeat is possessive (``*+``, Python 3.11): the alternatives start with
    distinct bytes, so there is nothing to backtrack into, and a greedy ``*``
    would keep backtracking state per message (hundreds of MB for a feed of
    millions of messages)."""
    return re.compile(b"(?:" + b"|".join(parts) + b")*+", re.DOTALL)


# The fixed-size messages, as regular-expression alternatives (most frequent first).
_POINTER_RE = b"\\x05.{5}"
_KEY_RE = b"\\x04.{7}"
_FBUR_RE = b"\\x03.{9}"
_EXT_KEY_RE = b"\\xff\\x00.{10}"
_XVP_RE = b"\\xfa.{3}"
_PIXEL_FORMAT_RE = b"\\x00.{19}"
_ECU_RE = b"\\x96.{9}"
_AUDIO_RE = b"\\xff\\x01\\x00[\\x00\\x01]|\\xff\\x01\\x00\\x02.{6}"
_INPUT_RES = (_POINTER_RE, _KEY_RE, _EXT_KEY_RE, _XVP_RE)
_OTHER_RES = (_FBUR_RE, _PIXEL_FORMAT_RE, _ECU_RE, _AUDIO_RE)
#: Full-rights session: every fixed-size message is forwarded.
_FULL_RUN: Final = _run((_POINTER_RE, _FBUR_RE, _KEY_RE, _EXT_KEY_RE, *_OTHER_RES[1:], _XVP_RE))
#: View-only session: runs of forwarded and of dropped fixed-size messages.
_VIEW_FORWARDED_RUN: Final = _run(_OTHER_RES)
_VIEW_DROPPED_RUN: Final = _run(_INPUT_RES)
#: The sizes of the fixed-size input messages (a dropped run is made of them), by their
#: first byte; a QEMU message here is an extended key event (``_EXT_KEY_RE``).
_INPUT_SIZES: Final[dict[int, int]] = {
    ClientMessageType.POINTER_EVENT: 6,
    ClientMessageType.KEY_EVENT: 8,
    ClientMessageType.QEMU: 12,
    ClientMessageType.XVP: 4,
}


def _press_at(src: Buffer, pos: int) -> bool:
    """Whether the input message at *pos* is a press: a key going down (KeyEvent, QEMU
    extended key event) or a pointer event with a button held."""
    kind = src[pos]
    if kind in (ClientMessageType.KEY_EVENT, ClientMessageType.POINTER_EVENT):
        return src[pos + 1] != 0
    if kind == ClientMessageType.QEMU:
        return src[pos + 2] != 0 or src[pos + 3] != 0
    return False


def _is_press(message: ClientMessage) -> bool:
    if isinstance(message, KeyEvent | QEMUExtendedKeyEvent):
        return message.down
    return isinstance(message, PointerEvent) and message.button_mask != 0


class ClientMessageFilter:
    """Frames, classifies and filters the client-to-server RFB message stream.

    *view_only* drops input (KeyEvent, PointerEvent, ClientCutText except
    extended-clipboard caps/request/peek, QEMU extended key events, xvp,
    SetDesktopSize); it may be changed at any time (:attr:`view_only`). *claim*,
    if given, is asked before a press is dropped (see the module's notes).
    *max_cut_text*, *max_encodings* and *max_screens* bound the variable-length
    messages; a longer one is an :class:`RFBProtocolError` as soon as its
    header arrives. *stripped_encodings* are removed from SetEncodings.
    """

    def __init__(
        self,
        *,
        view_only: bool = False,
        max_cut_text: int = DEFAULT_MAX_CUT_TEXT,
        max_encodings: int = DEFAULT_MAX_ENCODINGS,
        max_screens: int = DEFAULT_MAX_SCREENS,
        stripped_encodings: Iterable[int] = STRIPPED_ENCODINGS,
        claim: Callable[[], bool] | None = None,
    ) -> None:
        if not 0 <= max_cut_text < 1 << 31:
            raise RFBUsageError("max_cut_text must be within 0 .. 2**31 - 1")
        if not 0 <= max_encodings <= 0xFFFF or not 0 <= max_screens <= 0xFF:
            raise RFBUsageError("max_encodings must fit a u16 and max_screens a u8")
        self.view_only = view_only
        #: Asked before a press is dropped; True: the input is this session's now.
        self.claim = claim
        self._max_cut_text = max_cut_text
        self._max_encodings = max_encodings
        self._max_screens = max_screens
        self._stripped = frozenset(stripped_encodings)
        self._machine = Machine(FILTER_TRANSITIONS, FilterState.MESSAGES, FilterState.FAILED)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    def __repr__(self) -> str:
        mode = "view-only" if self.view_only else "full"
        return f"<ClientMessageFilter {self.state.name} {mode}>"

    @property
    def state(self) -> FilterState:
        return self._machine.state

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete message are held."""
        return len(self._buf) - self._pos

    # --- the event path --------------------------------------------------------

    def receive_data(self, data: Buffer | None) -> None:
        """Feed bytes from the client; ``None`` means the client closed (as in
        wsproto; ``b""`` is just no data)."""
        if data is not None and not data:
            return
        self._check_open()
        if data is None:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next :class:`ClientMessage`, :data:`NEED_DATA`, or (once)
        :class:`ConnectionClosed` when the client closed between messages;
        calling it again after that is a usage error, so a driver loop that
        misses the end cannot spin."""
        if self.state is FilterState.FAILED:
            raise RFBUsageError("the filter failed; the session must end")
        if self.state is FilterState.CLOSED:
            raise RFBUsageError("next_event() after ConnectionClosed")
        buf, pos = self._buf, self._pos
        end = len(buf)
        if pos == end:
            if self._eof:
                self._machine.advance("eof")
                return ConnectionClosed()
            return NEED_DATA
        parsed = self._parse(buf, pos, end)
        if parsed is None:
            if self._eof:
                raise self._fail(f"closed the connection inside a message ({end - pos} bytes)")
            return NEED_DATA
        size, message, _ = parsed
        self._consume(pos + size)
        self._machine.advance("message")
        if (
            not message.forward and self.view_only and self.claim is not None
            and _is_press(message) and self.claim()
        ):
            self.view_only = False
            message = attrs.evolve(message, forward=True)
        return message

    # --- the fast path ------------------------------------------------------------

    def filter_data(self, data: Buffer | None) -> bytes:
        """Feed *data* from the client; return the bytes to forward to the server.

        The same framing, bounds, errors and policy as the event path; an
        incomplete last message is kept for the next call. ``None`` means the
        client closed: it returns ``b""`` (an error if a message was cut short).
        """
        if data is not None and not data:
            return b""
        self._check_open()
        buf = self._buf
        if data is None:
            self._eof = True
            if self._pos != len(buf):
                raise self._fail(f"closed the connection inside a message ({self.buffered} bytes)")
            self._machine.advance("eof")
            return b""
        src: Buffer
        if self._pos == len(buf):
            src, pos = data, 0  # nothing pending: frame the caller's bytes in place
        else:
            buf += data
            src, pos = buf, self._pos
        end = len(src)
        out: list[Buffer] = []
        run = pos  # start of the current run of bytes to forward
        view_only = self.view_only
        while pos < end:
            if view_only:
                pos = _VIEW_FORWARDED_RUN.match(src, pos).end()  # type: ignore[union-attr]
                if pos == end:
                    break
                dropped_end = _VIEW_DROPPED_RUN.match(src, pos).end()  # type: ignore[union-attr]
                if dropped_end != pos:
                    if pos != run:
                        out.append(src[run:pos])
                    press = self._claimed(src, pos, dropped_end)
                    if press is None:
                        pos = run = dropped_end
                    else:  # the input is ours from the press on
                        pos = run = press
                        view_only = False
                    continue
            else:
                pos = _FULL_RUN.match(src, pos).end()  # type: ignore[union-attr]
                if pos == end:
                    break
            parsed = self._parse(src, pos, end)
            if parsed is None:
                break
            size, message, rewritten = parsed
            if message.forward and not rewritten:
                pos += size
                continue
            if pos != run:
                out.append(src[run:pos])
            if message.forward:
                out.append(message.data)
            pos = run = pos + size
        if pos != run:
            out.append(src[run:pos])
        if src is buf:
            self._consume(pos)
        elif pos != end:
            buf += src[pos:end]
        if len(out) == 1 and type(out[0]) is bytes:
            return out[0]
        return b"".join(out)

    def _claimed(self, src: Buffer, pos: int, end: int) -> int | None:
        """The position of the first press in the dropped run ``src[pos:end]`` when
        :attr:`claim` gave this session the input on it (``view_only`` cleared), else
        None: the run is dropped."""
        if self.claim is None:
            return None
        while pos < end:
            if _press_at(src, pos):
                if not self.claim():
                    return None
                self.view_only = False
                return pos
            pos += _INPUT_SIZES[src[pos]]
        return None

    # --- framing ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is FilterState.FAILED:
            raise RFBUsageError("the filter failed; the session must end")
        if self._eof:
            raise RFBUsageError("data after the end of the stream (None)")

    def _consume(self, pos: int) -> None:
        buf = self._buf
        if pos == len(buf):
            buf.clear()
            self._pos = 0
        elif pos >= COMPACT_AT and pos * 2 >= len(buf):
            del buf[:pos]
            self._pos = 0
        else:
            self._pos = pos

    def _fail(self, message: str) -> RFBProtocolError:
        self._machine.fail()
        return RFBProtocolError(message, side=Side.CLIENT)

    def _parse(self, src: Buffer, pos: int, end: int) -> tuple[int, ClientMessage, bool] | None:
        """Frame the message at *pos*: (size, message, data rewritten?), or None
        while it is incomplete. Raises RFBProtocolError for what cannot be framed."""
        avail = end - pos
        kind = src[pos]
        view_only = self.view_only
        size: int
        message: ClientMessage
        if kind == _T.POINTER_EVENT:
            if avail < 6:
                return None
            mask, x, y = _POINTER.unpack_from(src, pos)
            size = 6
            message = PointerEvent(
                data=bytes(src[pos : pos + size]), forward=not view_only, button_mask=mask, x=x, y=y
            )
        elif kind == _T.KEY_EVENT:
            if avail < 8:
                return None
            down, keysym = _KEY.unpack_from(src, pos)
            size = 8
            message = KeyEvent(
                data=bytes(src[pos : pos + size]),
                forward=not view_only,
                down=down != 0,
                keysym=keysym,
            )
        elif kind == _T.FRAMEBUFFER_UPDATE_REQUEST:
            if avail < 10:
                return None
            incremental, x, y, w, h = _FBUR.unpack_from(src, pos)
            size = 10
            message = FramebufferUpdateRequest(
                data=bytes(src[pos : pos + size]),
                forward=True,
                incremental=incremental != 0,
                x=x,
                y=y,
                width=w,
                height=h,
            )
        elif kind == _T.SET_ENCODINGS:
            return self._parse_set_encodings(src, pos, avail)
        elif kind == _T.SET_PIXEL_FORMAT:
            if avail < 20:
                return None
            size = 20
            pixel_format = PixelFormat.from_bytes(bytes(src[pos + 4 : pos + 20]))
            message = SetPixelFormat(
                data=bytes(src[pos : pos + size]), forward=True, pixel_format=pixel_format
            )
        elif kind == _T.CLIENT_CUT_TEXT:
            if avail < 8:
                return None
            (length,) = _CUT_HEADER.unpack_from(src, pos)
            payload = -length if length < 0 else length
            if payload > self._max_cut_text:
                raise self._fail(f"ClientCutText of {payload} bytes (limit {self._max_cut_text})")
            if length < 0 and payload < 4:
                raise self._fail(f"extended ClientCutText of {payload} bytes (at least 4)")
            size = 8 + payload
            if avail < size:
                return None
            flags = U32.unpack_from(src, pos + 8)[0] if length < 0 else None
            message = ClientCutText(
                data=bytes(src[pos : pos + size]),
                forward=not (view_only and cut_text_is_input(flags)),
                length=length,
                flags=flags,
            )
        elif kind == _T.QEMU:
            return self._parse_qemu(src, pos, avail)
        elif kind == _T.SET_DESKTOP_SIZE:
            if avail < 8:
                return None
            width, height, count = _DESKTOP_HEADER.unpack_from(src, pos)
            if count > self._max_screens:
                raise self._fail(f"SetDesktopSize with {count} screens (limit {self._max_screens})")
            size = 8 + 16 * count
            if avail < size:
                return None
            screens = tuple(
                Screen(*_SCREEN.unpack_from(src, pos + 8 + 16 * i)) for i in range(count)
            )
            message = SetDesktopSize(
                data=bytes(src[pos : pos + size]),
                forward=not view_only,
                width=width,
                height=height,
                screens=screens,
            )
        elif kind == _T.ENABLE_CONTINUOUS_UPDATES:
            if avail < 10:
                return None
            enable, x, y, w, h = _ECU.unpack_from(src, pos)
            size = 10
            message = EnableContinuousUpdates(
                data=bytes(src[pos : pos + size]),
                forward=True,
                enable=enable != 0,
                x=x,
                y=y,
                width=w,
                height=h,
            )
        elif kind == _T.CLIENT_FENCE:
            if avail < 9:
                return None
            fence_flags, length = _FENCE_HEADER.unpack_from(src, pos)
            if length > MAX_FENCE_PAYLOAD:
                raise self._fail(f"ClientFence payload of {length} bytes (limit 64)")
            size = 9 + length
            if avail < size:
                return None
            message = ClientFence(
                data=bytes(src[pos : pos + size]),
                forward=True,
                flags=fence_flags,
                payload=bytes(src[pos + 9 : pos + size]),
            )
        elif kind == _T.XVP:
            if avail < 4:
                return None
            version, code = _XVP.unpack_from(src, pos)
            size = 4
            message = XVP(
                data=bytes(src[pos : pos + size]), forward=not view_only, version=version, code=code
            )
        else:
            raise self._fail(
                f"unknown message type {kind}: the broker cannot parse it, so it cannot"
                " enforce the session's policy"
            )
        return size, message, False

    def _parse_set_encodings(
        self, src: Buffer, pos: int, avail: int
    ) -> tuple[int, ClientMessage, bool] | None:
        if avail < 4:
            return None
        (count,) = U16.unpack_from(src, pos + 2)
        if count > self._max_encodings:
            raise self._fail(f"SetEncodings with {count} encodings (limit {self._max_encodings})")
        size = 4 + 4 * count
        if avail < size:
            return None
        encodings = struct.unpack_from(f">{count}i", src, pos + 4)
        stripped = tuple(e for e in encodings if e in self._stripped)
        if stripped:
            kept = [e for e in encodings if e not in self._stripped]
            data = struct.pack(f">BxH{len(kept)}i", _T.SET_ENCODINGS, len(kept), *kept)
        else:
            data = bytes(src[pos : pos + size])
        message = SetEncodings(data=data, forward=True, encodings=encodings, stripped=stripped)
        return size, message, bool(stripped)

    def _parse_qemu(
        self, src: Buffer, pos: int, avail: int
    ) -> tuple[int, ClientMessage, bool] | None:
        if avail < 2:
            return None
        submessage = src[pos + 1]
        message: ClientMessage
        if submessage == 0:
            if avail < 12:
                return None
            down, keysym, keycode = _EXT_KEY.unpack_from(src, pos)
            size = 12
            message = QEMUExtendedKeyEvent(
                data=bytes(src[pos : pos + size]),
                forward=not self.view_only,
                down=down != 0,
                keysym=keysym,
                keycode=keycode,
            )
        elif submessage == 1:
            if avail < 4:
                return None
            (operation,) = U16.unpack_from(src, pos + 2)
            if operation in (0, 1):
                size = 4
                message = QEMUAudio(
                    data=bytes(src[pos : pos + size]), forward=True, operation=operation
                )
            elif operation == 2:
                if avail < 10:
                    return None
                sample_format, channels, frequency = _AUDIO_FORMAT.unpack_from(src, pos)
                size = 10
                message = QEMUAudio(
                    data=bytes(src[pos : pos + size]),
                    forward=True,
                    operation=operation,
                    sample_format=sample_format,
                    channels=channels,
                    frequency=frequency,
                )
            else:
                raise self._fail(f"unknown QEMU audio operation {operation}")
        else:
            raise self._fail(f"unknown QEMU client submessage {submessage}")
        return size, message, False
