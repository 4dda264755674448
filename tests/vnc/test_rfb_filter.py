"""ClientMessageFilter: every client message type, view-only, bounds, errors."""

from __future__ import annotations

import struct
import time

import pytest
from broker_vnc.rfb import (
    NEED_DATA,
    XVP,
    ClientCutText,
    ClientFence,
    ClientMessage,
    ClientMessageFilter,
    ConnectionClosed,
    EnableContinuousUpdates,
    FilterState,
    FramebufferUpdateRequest,
    KeyEvent,
    PixelFormat,
    PointerEvent,
    QEMUAudio,
    QEMUExtendedKeyEvent,
    RFBProtocolError,
    RFBUsageError,
    Screen,
    SetDesktopSize,
    SetEncodings,
    SetPixelFormat,
    Side,
)
from rfb_transcripts import bytewise, filter_events

# Each message as the spec lays it out (RFC 6143 7.5; rfbproto for the extensions).
PIXEL_FORMAT = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
SET_PIXEL_FORMAT = b"\x00\x00\x00\x00" + PIXEL_FORMAT.to_bytes()
SET_ENCODINGS = struct.pack(">BxH3i", 2, 3, 7, -223, -258)
FBUR = struct.pack(">BBHHHH", 3, 1, 0, 0, 720, 400)
KEY = struct.pack(">BBxxI", 4, 1, 0x61)
POINTER = struct.pack(">BBHH", 5, 1, 100, 200)
CUT_TEXT = struct.pack(">BxxxI", 6, 5) + b"hello"
EXT_CUT_CAPS = struct.pack(">Bxxxi", 6, -8) + struct.pack(">II", (1 << 24) | 1, 0)
EXT_CUT_REQUEST = struct.pack(">BxxxiI", 6, -4, (1 << 25) | 1)
EXT_CUT_PEEK = struct.pack(">BxxxiI", 6, -4, 1 << 26)
EXT_CUT_NOTIFY = struct.pack(">BxxxiI", 6, -4, (1 << 27) | 1)
EXT_CUT_PROVIDE = struct.pack(">BxxxiI", 6, -9, (1 << 28) | 1) + b"zlib!"
ECU = struct.pack(">BBHHHH", 150, 1, 0, 0, 720, 400)
FENCE = struct.pack(">BxxxIB", 248, (1 << 31) | 1, 3) + b"abc"
XVP_REBOOT = struct.pack(">BxBB", 250, 1, 3)
SCREEN = struct.pack(">IHHHHI", 1, 0, 0, 1024, 768, 0)
DESKTOP_SIZE = struct.pack(">BxHHBx", 251, 1024, 768, 1) + SCREEN
EXT_KEY = struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E)
AUDIO_ENABLE = struct.pack(">BBH", 255, 1, 0)
AUDIO_DISABLE = struct.pack(">BBH", 255, 1, 1)
AUDIO_FORMAT = struct.pack(">BBHBBI", 255, 1, 2, 3, 2, 44100)

EXPECTED: list[tuple[bytes, ClientMessage]] = [
    (
        SET_PIXEL_FORMAT,
        SetPixelFormat(data=SET_PIXEL_FORMAT, forward=True, pixel_format=PIXEL_FORMAT),
    ),
    (SET_ENCODINGS, SetEncodings(data=SET_ENCODINGS, forward=True, encodings=(7, -223, -258))),
    (
        FBUR,
        FramebufferUpdateRequest(
            data=FBUR, forward=True, incremental=True, x=0, y=0, width=720, height=400
        ),
    ),
    (KEY, KeyEvent(data=KEY, forward=True, down=True, keysym=0x61)),
    (POINTER, PointerEvent(data=POINTER, forward=True, button_mask=1, x=100, y=200)),
    (CUT_TEXT, ClientCutText(data=CUT_TEXT, forward=True, length=5)),
    (EXT_CUT_CAPS, ClientCutText(data=EXT_CUT_CAPS, forward=True, length=-8, flags=(1 << 24) | 1)),
    (
        ECU,
        EnableContinuousUpdates(
            data=ECU, forward=True, enable=True, x=0, y=0, width=720, height=400
        ),
    ),
    (FENCE, ClientFence(data=FENCE, forward=True, flags=(1 << 31) | 1, payload=b"abc")),
    (XVP_REBOOT, XVP(data=XVP_REBOOT, forward=True, version=1, code=3)),
    (
        DESKTOP_SIZE,
        SetDesktopSize(
            data=DESKTOP_SIZE,
            forward=True,
            width=1024,
            height=768,
            screens=(Screen(1, 0, 0, 1024, 768, 0),),
        ),
    ),
    (
        EXT_KEY,
        QEMUExtendedKeyEvent(data=EXT_KEY, forward=True, down=True, keysym=0x61, keycode=0x1E),
    ),
    (AUDIO_ENABLE, QEMUAudio(data=AUDIO_ENABLE, forward=True, operation=0)),
    (AUDIO_DISABLE, QEMUAudio(data=AUDIO_DISABLE, forward=True, operation=1)),
    (
        AUDIO_FORMAT,
        QEMUAudio(
            data=AUDIO_FORMAT,
            forward=True,
            operation=2,
            sample_format=3,
            channels=2,
            frequency=44100,
        ),
    ),
]
ALL = b"".join(raw for raw, _ in EXPECTED)
INPUT = {KEY, POINTER, CUT_TEXT, EXT_CUT_NOTIFY, EXT_CUT_PROVIDE, EXT_KEY, DESKTOP_SIZE, XVP_REBOOT}
NOT_INPUT = {
    SET_PIXEL_FORMAT,
    SET_ENCODINGS,
    FBUR,
    ECU,
    FENCE,
    EXT_CUT_CAPS,
    EXT_CUT_REQUEST,
    EXT_CUT_PEEK,
    AUDIO_ENABLE,
    AUDIO_DISABLE,
    AUDIO_FORMAT,
}


@pytest.mark.parametrize(("raw", "expected"), EXPECTED, ids=lambda v: type(v).__name__)
def test_each_message_type_whole_and_byte_by_byte(raw: bytes, expected: ClientMessage) -> None:
    assert filter_events(ClientMessageFilter(), [raw]) == [expected]
    assert filter_events(ClientMessageFilter(), bytewise(raw)) == [expected]
    flt = ClientMessageFilter()
    assert b"".join(flt.filter_data(piece) for piece in bytewise(raw)) == raw
    assert flt.buffered == 0


def test_a_stream_of_all_types_is_forwarded_verbatim() -> None:
    flt = ClientMessageFilter()
    events = filter_events(flt, [ALL])
    assert events == [expected for _, expected in EXPECTED]
    assert ClientMessageFilter().filter_data(ALL) == ALL


@pytest.mark.parametrize("raw", sorted(INPUT | NOT_INPUT))
def test_view_only_drops_exactly_the_input(raw: bytes) -> None:
    (event,) = filter_events(ClientMessageFilter(view_only=True), [raw])
    assert isinstance(event, ClientMessage)
    assert event.is_input is (raw in INPUT)
    assert event.forward is (raw not in INPUT)
    assert event.data == raw
    expected = b"" if raw in INPUT else raw
    assert ClientMessageFilter(view_only=True).filter_data(raw) == expected
    assert ClientMessageFilter(view_only=False).filter_data(raw) == raw


def test_view_only_keeps_order_of_what_it_forwards() -> None:
    stream = FBUR + POINTER + KEY + FBUR + EXT_KEY + SET_ENCODINGS + POINTER + AUDIO_ENABLE + KEY
    expected = FBUR + FBUR + SET_ENCODINGS + AUDIO_ENABLE
    assert ClientMessageFilter(view_only=True).filter_data(stream) == expected
    events = filter_events(ClientMessageFilter(view_only=True), [stream])
    assert (
        b"".join(e.data for e in events if isinstance(e, ClientMessage) and e.forward) == expected
    )


def test_view_only_can_change_mid_session() -> None:
    flt = ClientMessageFilter()
    assert flt.filter_data(POINTER) == POINTER
    flt.view_only = True
    assert flt.filter_data(POINTER + FBUR) == FBUR
    flt.view_only = False
    assert flt.filter_data(KEY) == KEY


def test_extended_mouse_buttons_and_gii_are_stripped_from_set_encodings() -> None:
    raw = struct.pack(">BxH4i", 2, 4, 7, -316, -258, -305)
    (event,) = filter_events(ClientMessageFilter(), [raw])
    assert isinstance(event, SetEncodings)
    assert event.encodings == (7, -316, -258, -305)
    assert event.stripped == (-316, -305)
    assert event.data == struct.pack(">BxH2i", 2, 2, 7, -258)
    assert ClientMessageFilter().filter_data(FBUR + raw + FBUR) == FBUR + event.data + FBUR
    assert ClientMessageFilter(stripped_encodings=()).filter_data(raw) == raw


def test_filter_data_returns_the_fed_object_when_all_passes() -> None:
    data = POINTER * 100 + FBUR
    assert ClientMessageFilter().filter_data(data) is data


def test_incomplete_message_waits_for_the_rest() -> None:
    flt = ClientMessageFilter()
    assert flt.filter_data(FBUR + POINTER[:3]) == FBUR
    assert flt.buffered == 3
    assert flt.filter_data(POINTER[3:] + KEY[:1]) == POINTER
    assert flt.filter_data(KEY[1:]) == KEY


# --- what cannot be parsed ends the session ---------------------------------------------


@pytest.mark.parametrize("kind", [1, 7, 8, 127, 249, 252, 253, 254])
def test_unknown_message_types_end_the_session(kind: int) -> None:
    flt = ClientMessageFilter()
    with pytest.raises(RFBProtocolError, match=f"unknown message type {kind}") as caught:
        flt.filter_data(FBUR + bytes([kind]) + bytes(20))
    assert caught.value.side is Side.CLIENT
    assert flt.state is FilterState.FAILED
    with pytest.raises(RFBUsageError):
        flt.filter_data(FBUR)
    with pytest.raises(RFBUsageError):
        flt.next_event()
    with pytest.raises(RFBProtocolError, match="unknown message type"):
        filter_events(ClientMessageFilter(), [bytes([kind])])


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack(">BB", 255, 2) + bytes(10), "QEMU client submessage 2"),
        (struct.pack(">BBH", 255, 1, 3) + bytes(6), "audio operation 3"),
    ],
)
def test_unknown_qemu_submessages_end_the_session(raw: bytes, match: str) -> None:
    with pytest.raises(RFBProtocolError, match=match):
        ClientMessageFilter().filter_data(raw)


# --- bounds: the error comes with the header, never after buffering -------------------


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (struct.pack(">BxH", 2, 0xFFFF), "SetEncodings with 65535 encodings"),
        (struct.pack(">BxxxI", 6, 0x7FFFFFFF), "ClientCutText of 2147483647 bytes"),
        (struct.pack(">Bxxxi", 6, -(2**31)), "ClientCutText of 2147483648 bytes"),
        (struct.pack(">BxxxI", 6, (1 << 20) + 1), "ClientCutText of 1048577 bytes"),
        (struct.pack(">Bxxxi", 6, -3), "extended ClientCutText of 3 bytes"),
        (struct.pack(">BxxxI", 6, 0xFFFFFFFF), "extended ClientCutText of 1 bytes"),
        (struct.pack(">BxHHBx", 251, 1, 1, 17), "SetDesktopSize with 17 screens"),
        (struct.pack(">BxxxIB", 248, 0, 65), "ClientFence payload of 65 bytes"),
    ],
)
def test_length_bounds(header: bytes, match: str) -> None:
    with pytest.raises(RFBProtocolError, match=match):
        ClientMessageFilter().filter_data(header)
    with pytest.raises(RFBProtocolError, match=match):
        filter_events(ClientMessageFilter(), bytewise(header))


def test_bounds_are_configurable() -> None:
    flt = ClientMessageFilter(max_cut_text=4, max_encodings=2, max_screens=0)
    with pytest.raises(RFBProtocolError, match="limit 4"):
        flt.filter_data(CUT_TEXT)
    with pytest.raises(RFBProtocolError, match="limit 2"):
        ClientMessageFilter(max_encodings=2).filter_data(SET_ENCODINGS)
    with pytest.raises(RFBProtocolError, match="limit 0"):
        ClientMessageFilter(max_screens=0).filter_data(DESKTOP_SIZE)
    assert ClientMessageFilter(max_cut_text=5).filter_data(CUT_TEXT) == CUT_TEXT
    with pytest.raises(RFBUsageError):
        ClientMessageFilter(max_cut_text=-1)
    with pytest.raises(RFBUsageError):
        ClientMessageFilter(max_screens=256)


# --- end of stream ------------------------------------------------------------------------


def test_clean_end_of_stream() -> None:
    flt = ClientMessageFilter()
    assert filter_events(flt, [FBUR, b"", None]) == [
        FramebufferUpdateRequest(
            data=FBUR, forward=True, incremental=True, x=0, y=0, width=720, height=400
        ),
        ConnectionClosed(),
    ]
    assert flt.state is FilterState.CLOSED
    with pytest.raises(RFBUsageError, match="after ConnectionClosed"):
        flt.next_event()
    with pytest.raises(RFBUsageError, match="after the end"):
        flt.receive_data(FBUR)
    fast = ClientMessageFilter()
    assert fast.filter_data(FBUR) == FBUR
    assert fast.filter_data(b"") == b""  # no data, not the end
    assert fast.state is FilterState.MESSAGES
    assert fast.filter_data(None) == b""
    assert fast.state is FilterState.CLOSED


def test_end_of_stream_inside_a_message() -> None:
    with pytest.raises(RFBProtocolError, match="inside a message"):
        filter_events(ClientMessageFilter(), [FBUR[:4], None])
    fast = ClientMessageFilter()
    fast.filter_data(FBUR[:4])
    with pytest.raises(RFBProtocolError, match="inside a message"):
        fast.filter_data(None)


# --- cost ----------------------------------------------------------------------------------


def test_large_feeds_are_linear_and_the_buffer_is_compacted() -> None:
    count = 200_000  # 1.2 MB of pointer events in one feed
    flt = ClientMessageFilter()
    flt.receive_data(POINTER * count)
    start = time.perf_counter()
    seen = 0
    while flt.next_event() is not NEED_DATA:
        seen += 1
        assert len(flt._buf) <= 2 * (count * 6 - seen * 6) + 65536 + 6  # compacted as it goes
    assert seen == count
    assert time.perf_counter() - start < 20  # quadratic slicing would take many minutes

    fed = bytearray()
    stream = POINTER * count
    fast = ClientMessageFilter(view_only=True)
    for i in range(0, count * 6, 4093):  # odd chunks split messages everywhere
        fed += fast.filter_data(stream[i : i + 4093])
    assert fed == b"" and fast.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("view_only", [False, True])
def test_any_bytes_like_input(kind: type, view_only: bool) -> None:
    stream = POINTER + CUT_TEXT + FBUR + SET_ENCODINGS + KEY + EXT_KEY
    expected = ClientMessageFilter(view_only=view_only).filter_data(stream)
    flt = ClientMessageFilter(view_only=view_only)
    out = flt.filter_data(kind(stream[:13])) + flt.filter_data(kind(stream[13:]))
    assert type(out) is bytes and out == expected
    events = filter_events(ClientMessageFilter(view_only=view_only), [kind(stream)])
    assert all(type(e.data) is bytes for e in events if isinstance(e, ClientMessage))
