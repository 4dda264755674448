"""Client-to-server messages, as the filter reports them.

Each carries ``data``, the exact bytes to forward to the server (the message
as the client sent it; only a SetEncodings whose stripped pseudo-encodings
were removed differs), and ``forward``, false when the session's policy drops
it. ``is_input`` says whether the message acts on the guest (keyboard, mouse,
clipboard, display size, power): those are dropped in a view-only session.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from ._events import Event, PixelFormat
from ._wire import (
    CLIPBOARD_ACTIONS,
    CLIPBOARD_CAPS,
    CLIPBOARD_PEEK,
    CLIPBOARD_REQUEST,
    ClientMessageType,
)


@attrs.frozen(kw_only=True)
class ClientMessage(Event):
    """Base class of the client-to-server messages."""

    #: The bytes to forward to the server.
    data: bytes
    #: Whether the policy lets the message through (false: drop ``data``).
    forward: bool

    MESSAGE_TYPE: ClassVar[int]
    _INPUT: ClassVar[bool] = False

    @property
    def is_input(self) -> bool:
        """Whether a view-only session drops this message."""
        return self._INPUT


@attrs.frozen(kw_only=True)
class SetPixelFormat(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.SET_PIXEL_FORMAT
    pixel_format: PixelFormat


@attrs.frozen(kw_only=True)
class SetEncodings(ClientMessage):
    """``encodings`` as the client sent them; ``stripped`` those removed from
    ``data`` (pseudo-encodings that would let the client send messages the
    filter cannot frame, see ``ClientMessageFilter``)."""

    MESSAGE_TYPE = ClientMessageType.SET_ENCODINGS
    encodings: tuple[int, ...]
    stripped: tuple[int, ...] = ()


@attrs.frozen(kw_only=True)
class FramebufferUpdateRequest(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.FRAMEBUFFER_UPDATE_REQUEST
    incremental: bool
    x: int
    y: int
    width: int
    height: int


@attrs.frozen(kw_only=True)
class KeyEvent(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.KEY_EVENT
    _INPUT = True
    down: bool
    keysym: int


@attrs.frozen(kw_only=True)
class PointerEvent(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.POINTER_EVENT
    _INPUT = True
    button_mask: int
    x: int
    y: int


@attrs.frozen(kw_only=True)
class ClientCutText(ClientMessage):
    """``length`` is the signed length field as sent: negative for the extended
    clipboard form (``flags`` then holds its flags word), whose payload is
    ``-length`` bytes. The text or payload is ``data[8:]``."""

    MESSAGE_TYPE = ClientMessageType.CLIENT_CUT_TEXT
    length: int
    flags: int | None = None

    @property
    def extended(self) -> bool:
        return self.flags is not None

    @property
    def is_input(self) -> bool:
        return cut_text_is_input(self.flags)


def cut_text_is_input(flags: int | None) -> bool:
    """Whether a ClientCutText with these extended-clipboard *flags* (None: the
    legacy form) acts on the guest. Legacy text, and the extended *notify* and
    *provide* (or unknown) actions, push the client's clipboard into the guest;
    extended *caps*, *request* and *peek* only ask about the guest's clipboard."""
    if flags is None:
        return True
    actions = flags & CLIPBOARD_ACTIONS
    if actions & CLIPBOARD_CAPS:
        return False
    return actions == 0 or bool(actions & ~(CLIPBOARD_REQUEST | CLIPBOARD_PEEK))


@attrs.frozen(kw_only=True)
class EnableContinuousUpdates(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.ENABLE_CONTINUOUS_UPDATES
    enable: bool
    x: int
    y: int
    width: int
    height: int


@attrs.frozen(kw_only=True)
class ClientFence(ClientMessage):
    MESSAGE_TYPE = ClientMessageType.CLIENT_FENCE
    flags: int
    payload: bytes


@attrs.frozen(kw_only=True)
class XVP(ClientMessage):
    """An xvp power request (2 shutdown, 3 reboot, 4 reset): input."""

    MESSAGE_TYPE = ClientMessageType.XVP
    _INPUT = True
    version: int
    code: int


@attrs.frozen
class Screen:
    """One SCREEN of a SetDesktopSize."""

    id: int
    x: int
    y: int
    width: int
    height: int
    flags: int


@attrs.frozen(kw_only=True)
class SetDesktopSize(ClientMessage):
    """A request to resize the guest's display: input."""

    MESSAGE_TYPE = ClientMessageType.SET_DESKTOP_SIZE
    _INPUT = True
    width: int
    height: int
    screens: tuple[Screen, ...]


@attrs.frozen(kw_only=True)
class QEMUExtendedKeyEvent(ClientMessage):
    """QEMU client message 255, submessage 0: a key with its XT keycode."""

    MESSAGE_TYPE = ClientMessageType.QEMU
    _INPUT = True
    down: bool
    keysym: int
    keycode: int


@attrs.frozen(kw_only=True)
class QEMUAudio(ClientMessage):
    """QEMU client message 255, submessage 1: ``operation`` 0 enable, 1 disable,
    2 set format (with ``sample_format``, ``channels``, ``frequency``)."""

    MESSAGE_TYPE = ClientMessageType.QEMU
    operation: int
    sample_format: int | None = None
    channels: int | None = None
    frequency: int | None = None
