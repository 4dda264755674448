"""Parsers and builders of the SPICE structs the broker handles, one pure function each.

The parsers take complete byte strings (the side objects in ``_connection`` collect
them, bounded) and raise :class:`WireError`, which the side objects turn into a
:class:`SpiceProtocolError` naming the peer. The builders take events and return
bytes. Layouts are spice-protocol's ``spice/protocol.h``; all little-endian.
"""

from __future__ import annotations

import struct

from ._constants import (
    AUTH_MECHANISM_SIZE,
    DISPLAY_INIT_SIZE,
    FULL_HEADER_SIZE,
    LINK_HEADER_SIZE,
    LINK_MESS_SIZE,
    LINK_REPLY_SIZE,
    LINK_RESULT_SIZE,
    MAGIC,
    MAIN_INIT_SIZE,
    MAX_CAPS,
    MAX_LINK_SIZE,
    MINI_HEADER_SIZE,
    PUBKEY_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    AuthMechanism,
    ChannelType,
    LinkError,
)
from ._errors import Peer, SpiceProtocolError, SpiceUsageError
from ._events import DisplayInit, LinkMessage, LinkReply, MainInit
from ._ticket import load_ticket_key

_LINK_HEADER = struct.Struct("<4sIII")
_LINK_MESS = struct.Struct("<IBBIII")
_REPLY_TAIL = struct.Struct("<III")
_U32 = struct.Struct("<I")
_FULL_HEADER = struct.Struct("<QHII")
_MINI_HEADER = struct.Struct("<HI")
_MAIN_INIT = struct.Struct("<8I")
_DISPLAY_INIT = struct.Struct("<BqBi")

assert _LINK_MESS.size == LINK_MESS_SIZE and _FULL_HEADER.size == FULL_HEADER_SIZE
assert _MINI_HEADER.size == MINI_HEADER_SIZE and _DISPLAY_INIT.size == DISPLAY_INIT_SIZE
assert _MAIN_INIT.size == MAIN_INIT_SIZE


class WireError(Exception):
    """Bytes that break the protocol; *link_error* is the answer spice-server would give."""

    def __init__(self, message: str, link_error: LinkError | None = None) -> None:
        super().__init__(message)
        self.link_error = link_error

    def for_peer(self, peer: Peer) -> SpiceProtocolError:
        return SpiceProtocolError(str(self), peer=peer, link_error=self.link_error)


# --- link header ------------------------------------------------------------------


def parse_link_header(data: bytes, *, max_size: int, min_size: int) -> tuple[int, int]:
    """(minor version, size) of a 16-byte ``SpiceLinkHeader``, size within the bounds."""
    magic, major, minor, size = _LINK_HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"bad link magic {magic!r}", LinkError.INVALID_MAGIC)
    if major != VERSION_MAJOR:
        raise WireError(f"unsupported protocol version {major}.{minor}", LinkError.VERSION_MISMATCH)
    if not min_size <= size <= max_size:
        raise WireError(
            f"link body of {size} bytes, expected {min_size}..{max_size}", LinkError.INVALID_DATA
        )
    return minor, size


def _link_header(size: int) -> bytes:
    return _LINK_HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, size)


def _parse_caps(
    body: bytes, fixed: int, num_common: int, num_channel: int, offset: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two capability lists of a link message or reply, with spice-server's checks."""
    if num_common > MAX_CAPS or num_channel > MAX_CAPS:
        raise WireError(
            f"{num_common} + {num_channel} capability words (at most {MAX_CAPS} each)",
            LinkError.INVALID_DATA,
        )
    total = num_common + num_channel
    if total == 0:
        return (), ()
    if offset < fixed or offset + 4 * total > len(body):
        raise WireError(
            f"capabilities at offset {offset} ({total} words) outside the {len(body)}-byte "
            "link body",
            LinkError.INVALID_DATA,
        )
    words = struct.unpack_from(f"<{total}I", body, offset)
    return tuple(words[:num_common]), tuple(words[num_common:])


def _caps_bytes(common: tuple[int, ...], channel: tuple[int, ...]) -> bytes:
    words = common + channel
    return struct.pack(f"<{len(words)}I", *words)


# --- SpiceLinkMess ----------------------------------------------------------------


def parse_link_message_body(body: bytes, minor_version: int = VERSION_MINOR) -> LinkMessage:
    """A ``SpiceLinkMess`` with its caps (the bytes after the link header)."""
    if len(body) < LINK_MESS_SIZE:
        raise WireError(f"link message of {len(body)} bytes is too short", LinkError.INVALID_DATA)
    connection_id, channel_type, channel_id, num_common, num_channel, offset = (
        _LINK_MESS.unpack_from(body)
    )
    common, channel = _parse_caps(body, LINK_MESS_SIZE, num_common, num_channel, offset)
    try:
        kind = ChannelType(channel_type)
    except ValueError:
        raise WireError(
            f"unknown channel type {channel_type}", LinkError.CHANNEL_NOT_AVAILABLE
        ) from None
    return LinkMessage(
        channel_type=kind,
        channel_id=channel_id,
        connection_id=connection_id,
        common_caps=common,
        channel_caps=channel,
        minor_version=minor_version,
    )


def parse_link_message(data: bytes, *, peer: Peer = Peer.CLIENT) -> LinkMessage:
    """A whole link message (header and body, nothing after it); raises
    :class:`SpiceProtocolError` naming *peer*."""
    try:
        if len(data) < LINK_HEADER_SIZE:
            raise WireError("link message shorter than its header", LinkError.INVALID_DATA)
        minor, size = parse_link_header(
            data[:LINK_HEADER_SIZE], max_size=MAX_LINK_SIZE, min_size=LINK_MESS_SIZE
        )
        if len(data) != LINK_HEADER_SIZE + size:
            raise WireError(f"link header announces {size} bytes", LinkError.INVALID_DATA)
        return parse_link_message_body(data[LINK_HEADER_SIZE:], minor)
    except WireError as exc:
        raise exc.for_peer(peer) from None


def build_link_message(message: LinkMessage) -> bytes:
    """The bytes of *message*: header (version 2.2), ``SpiceLinkMess``, caps at offset 18."""
    caps = _caps_bytes(message.common_caps, message.channel_caps)
    body = _LINK_MESS.pack(
        message.connection_id,
        message.channel_type,
        message.channel_id,
        len(message.common_caps),
        len(message.channel_caps),
        LINK_MESS_SIZE,
    )
    size = LINK_MESS_SIZE + len(caps)
    if size > MAX_LINK_SIZE:
        raise SpiceUsageError(f"a link message is at most {MAX_LINK_SIZE} bytes")
    return _link_header(size) + body + caps


# --- SpiceLinkReply ----------------------------------------------------------------


def parse_link_reply_body(body: bytes) -> LinkReply:
    """A ``SpiceLinkReply`` with its caps (the bytes after the link header). With error
    OK the key must be a 1024-bit RSA key; a refusal's key and caps are not looked at."""
    if len(body) < LINK_REPLY_SIZE:
        raise WireError(f"link reply of {len(body)} bytes is too short")
    (error,) = _U32.unpack_from(body)
    try:
        link_error = LinkError(error)
    except ValueError:
        raise WireError(f"unknown link error {error}") from None
    if link_error is not LinkError.OK:
        return LinkReply(error=link_error)
    public_key = bytes(body[4 : 4 + PUBKEY_SIZE])
    try:
        load_ticket_key(public_key)
    except ValueError as exc:
        raise WireError(str(exc)) from None
    num_common, num_channel, offset = _REPLY_TAIL.unpack_from(body, 4 + PUBKEY_SIZE)
    common, channel = _parse_caps(body, LINK_REPLY_SIZE, num_common, num_channel, offset)
    return LinkReply(
        error=link_error, public_key=public_key, common_caps=common, channel_caps=channel
    )


def parse_link_reply(data: bytes, *, peer: Peer = Peer.SERVER) -> LinkReply:
    """A whole link reply (header and body); raises :class:`SpiceProtocolError`."""
    try:
        if len(data) < LINK_HEADER_SIZE:
            raise WireError("link reply shorter than its header")
        _, size = parse_link_header(
            data[:LINK_HEADER_SIZE], max_size=MAX_LINK_SIZE, min_size=LINK_REPLY_SIZE
        )
        if len(data) != LINK_HEADER_SIZE + size:
            raise WireError(f"link header announces {size} bytes")
        return parse_link_reply_body(data[LINK_HEADER_SIZE:])
    except WireError as exc:
        raise exc.for_peer(peer) from None


def build_link_reply(reply: LinkReply) -> bytes:
    """The bytes of *reply*. A refusal is laid out as spice-server's
    ``reds_send_link_error``: a zero key, no caps, caps offset 0."""
    if reply.error is not LinkError.OK:
        return _link_header(LINK_REPLY_SIZE) + _U32.pack(reply.error) + bytes(LINK_REPLY_SIZE - 4)
    if not reply.public_key:
        raise SpiceUsageError("a link reply with error OK needs the server's public key")
    caps = _caps_bytes(reply.common_caps, reply.channel_caps)
    tail = _REPLY_TAIL.pack(len(reply.common_caps), len(reply.channel_caps), LINK_REPLY_SIZE)
    size = LINK_REPLY_SIZE + len(caps)
    if size > MAX_LINK_SIZE:
        raise SpiceUsageError(f"a link reply is at most {MAX_LINK_SIZE} bytes")
    return _link_header(size) + _U32.pack(reply.error) + reply.public_key + tail + caps


def build_link_error_reply(error: LinkError) -> bytes:
    """The link reply that refuses a channel with *error* (not OK), as QEMU would."""
    if LinkError(error) is LinkError.OK:
        raise SpiceUsageError("a refusal needs an error other than OK")
    return build_link_reply(LinkReply(error=error))


# --- auth mechanism, link result ----------------------------------------------------


def parse_auth_mechanism(data: bytes) -> AuthMechanism:
    (value,) = _U32.unpack(data)
    if value != AuthMechanism.SPICE:
        raise WireError(
            f"auth mechanism {value}: the broker offers only SPICE tickets (1)",
            LinkError.INVALID_DATA,
        )
    return AuthMechanism.SPICE


def build_auth_mechanism(mechanism: AuthMechanism = AuthMechanism.SPICE) -> bytes:
    assert _U32.size == AUTH_MECHANISM_SIZE
    return _U32.pack(mechanism)


def parse_link_result(data: bytes) -> LinkError:
    (value,) = _U32.unpack(data)
    try:
        return LinkError(value)
    except ValueError:
        raise WireError(f"unknown link result {value}") from None


def build_link_result(error: LinkError) -> bytes:
    assert _U32.size == LINK_RESULT_SIZE
    return _U32.pack(LinkError(error))


# --- message headers and the two bodies the broker reads -----------------------------


def header_size(mini_header: bool) -> int:
    return MINI_HEADER_SIZE if mini_header else FULL_HEADER_SIZE


def parse_header(data: bytes, mini_header: bool) -> tuple[int, int, int | None, int]:
    """(type, size, serial, sub_list) of a message header; serial is ``None`` and
    sub_list 0 under the mini header."""
    if mini_header:
        msg_type, size = _MINI_HEADER.unpack(data)
        return msg_type, size, None, 0
    serial, msg_type, size, sub_list = _FULL_HEADER.unpack(data)
    return msg_type, size, serial, sub_list


def build_header(
    msg_type: int, size: int, *, mini_header: bool, serial: int = 0, sub_list: int = 0
) -> bytes:
    try:
        if mini_header:
            return _MINI_HEADER.pack(msg_type, size)
        return _FULL_HEADER.pack(serial, msg_type, size, sub_list)
    except struct.error as exc:
        raise SpiceUsageError(f"header field out of range: {exc}") from None


def build_message(
    msg_type: int, body: bytes = b"", *, mini_header: bool, serial: int = 0, sub_list: int = 0
) -> bytes:
    """A whole message: header (mini or full) and *body*."""
    head = build_header(
        msg_type, len(body), mini_header=mini_header, serial=serial, sub_list=sub_list
    )
    return head + body


def parse_main_init(body: bytes) -> MainInit:
    """``SpiceMsgMainInit`` from the first 32 bytes of *body*."""
    if len(body) < MAIN_INIT_SIZE:
        raise WireError(f"MAIN_INIT of {len(body)} bytes is too short")
    return MainInit(*_MAIN_INIT.unpack_from(body))


def build_main_init(init: MainInit) -> bytes:
    return _MAIN_INIT.pack(
        init.session_id,
        init.display_channels_hint,
        init.supported_mouse_modes,
        init.current_mouse_mode,
        init.agent_connected,
        init.agent_tokens,
        init.multi_media_time,
        init.ram_hint,
    )


def parse_display_init(body: bytes) -> DisplayInit:
    """``SpiceMsgcDisplayInit`` from the first 14 bytes of *body*."""
    if len(body) < DISPLAY_INIT_SIZE:
        raise WireError(f"DISPLAY_INIT of {len(body)} bytes is too short")
    return DisplayInit(*_DISPLAY_INIT.unpack_from(body))


def build_display_init(init: DisplayInit | None = None) -> bytes:
    """The 14-byte body of ``SPICE_MSGC_DISPLAY_INIT`` (defaults: :class:`DisplayInit`)."""
    init = init or DisplayInit()
    return _DISPLAY_INIT.pack(
        init.pixmap_cache_id,
        init.pixmap_cache_size,
        init.glz_dictionary_id,
        init.glz_dictionary_window_size,
    )
