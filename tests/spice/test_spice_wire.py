"""Parsers and builders of the link structs, the message headers and the two bodies."""

from __future__ import annotations

import struct

import attrs
import pytest
from broker_spice.protocol import (
    ChannelType,
    CommonCap,
    DisplayInit,
    LinkError,
    LinkMessage,
    LinkReply,
    MainInit,
    Peer,
    SpiceProtocolError,
    SpiceUsageError,
    build_display_init,
    build_link_error_reply,
    build_link_message,
    build_link_reply,
    build_link_result,
    build_main_init,
    build_message,
    caps_with,
    has_cap,
    parse_link_message,
    parse_link_reply,
)
from broker_spice.protocol._wire import (
    WireError,
    parse_display_init,
    parse_header,
    parse_link_result,
    parse_main_init,
)
from spicekit import CLIENT_COMMON, link_message, public_der, raw_link, server_reply

# --- the client's link message ------------------------------------------------------


def test_link_message_as_spice_html5_sends_it() -> None:
    # A display channel link: connection id 0x12345678, channel id 1, one common caps
    # word (auth selection | auth spice | mini header), one display caps word.
    data = raw_link(
        connection_id=0x12345678,
        channel_type=2,
        channel_id=1,
        num_common=1,
        num_channel=1,
        caps=(0b1011, 0x1F2),
    )
    assert data[:16] == b"REDQ" + struct.pack("<III", 2, 2, 26)
    link = parse_link_message(data)
    assert link == LinkMessage(
        channel_type=ChannelType.DISPLAY,
        channel_id=1,
        connection_id=0x12345678,
        common_caps=(0b1011,),
        channel_caps=(0x1F2,),
    )
    assert link.has_common_cap(CommonCap.MINI_HEADER)
    assert link.has_common_cap(CommonCap.PROTOCOL_AUTH_SELECTION)
    assert not link.has_common_cap(CommonCap.AUTH_SASL)
    assert build_link_message(link) == data


@pytest.mark.parametrize("channel_type", list(ChannelType))
def test_link_message_round_trip_for_every_channel_type(channel_type: ChannelType) -> None:
    link = link_message(channel_type, connection_id=7, channel_id=3, channel=(1, 2))
    assert parse_link_message(build_link_message(link)) == link


def test_link_message_without_caps_and_with_trailing_bytes() -> None:
    link = parse_link_message(raw_link(num_common=0, caps=(), caps_offset=0, tail=b"xyz"))
    assert link.common_caps == () and link.channel_caps == ()


def test_caps_may_sit_after_padding() -> None:
    # caps_offset is honoured, not assumed to be 18
    data = raw_link(caps_offset=22, caps=(0xDEAD, 0b1000), num_common=1)
    # the first word (0xDEAD) is padding at offset 18; the caps word is at offset 22
    assert parse_link_message(data).common_caps == (0b1000,)


@pytest.mark.parametrize(
    ("fields", "link_error", "what"),
    [
        ({"magic": b"REDX"}, LinkError.INVALID_MAGIC, "magic"),
        ({"major": 1}, LinkError.VERSION_MISMATCH, "version"),
        ({"size": 5000, "tail": bytes(5000 - 22)}, LinkError.INVALID_DATA, "5000"),
        ({"size": 0xFFFFFFFF}, LinkError.INVALID_DATA, "4294967295"),
        ({"size": 17, "caps": (), "num_common": 0}, LinkError.INVALID_DATA, "17"),
        ({"num_common": 1025, "caps": ()}, LinkError.INVALID_DATA, "1025"),
        ({"num_channel": 2000, "caps": ()}, LinkError.INVALID_DATA, "2000"),
        ({"caps_offset": 4000}, LinkError.INVALID_DATA, "offset 4000"),
        ({"caps_offset": 20}, LinkError.INVALID_DATA, "offset 20"),  # 20 + 4 > 22
        ({"caps_offset": 4}, LinkError.INVALID_DATA, "offset 4"),  # inside SpiceLinkMess
        ({"num_common": 2}, LinkError.INVALID_DATA, "2 words"),  # one word sent
        ({"channel_type": 0}, LinkError.CHANNEL_NOT_AVAILABLE, "channel type 0"),
        ({"channel_type": 12}, LinkError.CHANNEL_NOT_AVAILABLE, "channel type 12"),
    ],
)
def test_link_message_bounds(fields: dict[str, object], link_error: LinkError, what: str) -> None:
    data = raw_link(**fields)  # type: ignore[arg-type]
    with pytest.raises(SpiceProtocolError) as info:
        parse_link_message(data)
    assert info.value.link_error is link_error
    assert info.value.peer is Peer.CLIENT
    assert what in str(info.value)


def test_link_message_length_must_match_its_header() -> None:
    with pytest.raises(SpiceProtocolError, match="announces"):
        parse_link_message(raw_link() + b"extra")


def test_link_message_values_are_checked_on_construction() -> None:
    with pytest.raises(SpiceUsageError):
        LinkMessage(channel_type=42)
    with pytest.raises(SpiceUsageError):
        LinkMessage(channel_type=ChannelType.MAIN, channel_id=256)
    with pytest.raises(SpiceUsageError):
        LinkMessage(channel_type=ChannelType.MAIN, connection_id=-1)
    with pytest.raises(SpiceUsageError):
        LinkMessage(channel_type=ChannelType.MAIN, common_caps=(1 << 32,))
    with pytest.raises(SpiceUsageError):
        LinkMessage(channel_type=ChannelType.MAIN, common_caps=(0,) * 1025)


def test_rewriting_a_link_message() -> None:
    link = link_message(ChannelType.DISPLAY, connection_id=5)
    rewritten = attrs.evolve(
        link, connection_id=9, common_caps=caps_with(link.common_caps, 3, False)
    )
    data = build_link_message(rewritten)
    assert parse_link_message(data) == rewritten
    assert not parse_link_message(data).has_common_cap(CommonCap.MINI_HEADER)


# --- the server's link reply -----------------------------------------------------------


def test_link_reply_as_qemu_sends_it() -> None:
    reply = server_reply(channel=(15,))
    data = build_link_reply(reply)
    assert len(data) == 16 + 178 + 8
    assert data[:16] == b"REDQ" + struct.pack("<III", 2, 2, 186)
    assert data[16:20] == bytes(4)  # error OK
    assert data[20:182] == public_der()
    assert struct.unpack("<III", data[182:194]) == (1, 1, 178)
    assert parse_link_reply(data) == reply


def test_refusal_is_laid_out_like_spice_server() -> None:
    data = build_link_error_reply(LinkError.PERMISSION_DENIED)
    assert data == b"REDQ" + struct.pack("<IIII", 2, 2, 178, 7) + bytes(174)
    assert parse_link_reply(data) == LinkReply(error=LinkError.PERMISSION_DENIED)
    assert build_link_reply(LinkReply(error=LinkError.BAD_CONNECTION_ID))[16:20] == bytes(
        [8, 0, 0, 0]
    )


def test_refusal_needs_an_error() -> None:
    with pytest.raises(SpiceUsageError):
        build_link_error_reply(LinkError.OK)
    with pytest.raises(SpiceUsageError):
        build_link_reply(LinkReply())  # OK without a key


def test_link_reply_key_must_be_a_1024_bit_rsa_key() -> None:
    data = bytearray(build_link_reply(server_reply()))
    data[40] ^= 0xFF  # damage the DER inside the modulus header area
    data[21] ^= 0xFF
    with pytest.raises(SpiceProtocolError) as info:
        parse_link_reply(bytes(data))
    assert info.value.peer is Peer.SERVER
    with pytest.raises(SpiceUsageError):
        LinkReply(public_key=b"short")


def test_link_reply_bounds() -> None:
    good = build_link_reply(server_reply())
    with pytest.raises(SpiceProtocolError, match="177"):
        parse_link_reply(good[:12] + struct.pack("<I", 177) + good[16:193])
    with pytest.raises(SpiceProtocolError, match="offset"):
        parse_link_reply(good[:182] + struct.pack("<III", 1, 1, 190) + good[194:])
    with pytest.raises(SpiceProtocolError, match="unknown link error 10"):
        parse_link_reply(good[:16] + struct.pack("<I", 10) + good[20:])


# --- result, auth, caps --------------------------------------------------------------------


def test_link_result() -> None:
    assert build_link_result(LinkError.OK) == bytes(4)
    assert build_link_result(LinkError.BAD_CONNECTION_ID) == b"\x08\0\0\0"
    for error in LinkError:
        assert parse_link_result(build_link_result(error)) is error
    with pytest.raises(WireError):
        parse_link_result(b"\x0a\0\0\0")


def test_caps_helpers() -> None:
    assert has_cap(CLIENT_COMMON, CommonCap.MINI_HEADER)
    assert not has_cap((), 0)
    assert caps_with((), 33) == (0, 2)
    assert caps_with((0, 2), 33, False) == (0, 0)
    assert caps_with((1,), 40, False) == (1,)


# --- message headers, MAIN_INIT, DISPLAY_INIT --------------------------------------------


def test_mini_header() -> None:
    data = build_message(101, b"body", mini_header=True)
    assert data == struct.pack("<HI", 101, 4) + b"body"
    assert parse_header(data[:6], True) == (101, 4, None, 0)


def test_full_header() -> None:
    data = build_message(101, b"body", mini_header=False, serial=0x0102030405060708, sub_list=9)
    assert data == struct.pack("<QHII", 0x0102030405060708, 101, 4, 9) + b"body"
    assert parse_header(data[:18], False) == (101, 4, 0x0102030405060708, 9)


def test_header_fields_are_checked() -> None:
    with pytest.raises(SpiceUsageError):
        build_message(70000, mini_header=True)


def test_display_init_bytes() -> None:
    init = DisplayInit(
        pixmap_cache_id=1,
        pixmap_cache_size=-2,
        glz_dictionary_id=3,
        glz_dictionary_window_size=-4,
    )
    body = build_display_init(init)
    assert body == b"\x01" + struct.pack("<q", -2) + b"\x03" + struct.pack("<i", -4)
    assert len(body) == 14
    assert parse_display_init(body) == init
    assert parse_display_init(body + b"more") == init
    assert parse_display_init(build_display_init()) == DisplayInit()
    assert DisplayInit() == DisplayInit(1, 10 * 1024 * 1024, 0, 0)  # spice-html5's values
    with pytest.raises(WireError):
        parse_display_init(body[:13])
    with pytest.raises(SpiceUsageError):
        DisplayInit(pixmap_cache_id=256)
    with pytest.raises(SpiceUsageError):
        DisplayInit(pixmap_cache_size=1 << 63)


def test_main_init_bytes() -> None:
    init = MainInit(session_id=0xF5FE_4FFD, agent_tokens=10, ram_hint=50323456)
    body = build_main_init(init)
    assert len(body) == 32 and body[:4] == struct.pack("<I", 0xF5FE_4FFD)
    assert parse_main_init(body) == init
    with pytest.raises(WireError):
        parse_main_init(body[:31])
