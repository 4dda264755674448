"""Helpers of the SPICE layer tests: a ticket key, wire bytes, and drivers for the sides."""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable

from broker_spice.protocol import (
    ChannelType,
    ClientSide,
    ClientTicket,
    CommonCap,
    Data,
    Event,
    LinkError,
    LinkMessage,
    LinkReply,
    LinkResult,
    ServerSide,
    State,
    Ticket,
    build_link_message,
    build_link_reply,
    build_link_result,
    caps_with,
    encrypt_ticket,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

#: What spice-html5 and spice-gtk advertise: auth selection, SPICE auth, mini header.
CLIENT_COMMON = (0b1011,)
#: What QEMU 7.2 answers (measured): the same three bits.
SERVER_COMMON = (0b1011,)
FULL_HEADER_COMMON = caps_with(CLIENT_COMMON, CommonCap.MINI_HEADER, False)


@functools.cache
def private_key() -> rsa.RSAPrivateKey:
    """A 1024-bit RSA key, like the one QEMU makes for every link."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@functools.cache
def public_der() -> bytes:
    der = (
        private_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert len(der) == 162
    return der


def server_reply(
    common: tuple[int, ...] = SERVER_COMMON, channel: tuple[int, ...] = (1,)
) -> LinkReply:
    return LinkReply(public_key=public_der(), common_caps=common, channel_caps=channel)


def link_message(
    channel_type: ChannelType = ChannelType.MAIN,
    *,
    connection_id: int = 0,
    channel_id: int = 0,
    common: tuple[int, ...] = CLIENT_COMMON,
    channel: tuple[int, ...] = (),
) -> LinkMessage:
    return LinkMessage(
        channel_type=channel_type,
        channel_id=channel_id,
        connection_id=connection_id,
        common_caps=common,
        channel_caps=channel,
    )


def raw_link(
    *,
    magic: bytes = b"REDQ",
    major: int = 2,
    minor: int = 2,
    size: int | None = None,
    connection_id: int = 0,
    channel_type: int = 1,
    channel_id: int = 0,
    num_common: int = 1,
    num_channel: int = 0,
    caps_offset: int = 18,
    caps: Iterable[int] = (0b1011,),
    tail: bytes = b"",
) -> bytes:
    """A client link message with every field settable, for the bounds tests."""
    words = list(caps)
    body = struct.pack(
        "<IBBIII", connection_id, channel_type, channel_id, num_common, num_channel, caps_offset
    )
    body += struct.pack(f"<{len(words)}I", *words) + tail
    return struct.pack("<4sIII", magic, major, minor, len(body) if size is None else size) + body


def client_ticket_bytes(*, auth_selection: bool = True) -> bytes:
    """What a client sends after the reply: [auth mechanism] + a 128-byte ticket."""
    ticket = encrypt_ticket(public_der(), "whatever-the-page-had")
    return (struct.pack("<I", 1) if auth_selection else b"") + ticket


def linked_client(
    channel_type: ChannelType = ChannelType.MAIN,
    *,
    common: tuple[int, ...] = CLIENT_COMMON,
    connection_id: int = 0,
    **kwargs: int,
) -> ClientSide:
    """A ClientSide in the MESSAGES state, linked the way a real client does."""
    side = ClientSide(**kwargs)
    auth = bool(common) and bool(common[0] & 1)
    side.receive_data(
        build_link_message(link_message(channel_type, common=common, connection_id=connection_id))
    )
    assert isinstance(side.next_event(), LinkMessage)
    side.send(server_reply())
    side.receive_data(client_ticket_bytes(auth_selection=auth))
    assert isinstance(side.next_event(), ClientTicket)
    side.send(LinkResult(LinkError.OK))
    return side


def linked_server(
    channel_type: ChannelType = ChannelType.MAIN,
    *,
    common: tuple[int, ...] = CLIENT_COMMON,
    connection_id: int = 0,
    **kwargs: int,
) -> ServerSide:
    """A ServerSide in the MESSAGES state, linked to a fake server."""
    side = ServerSide(**kwargs)
    side.send(link_message(channel_type, common=common, connection_id=connection_id))
    side.receive_data(build_link_reply(server_reply()))
    assert isinstance(side.next_event(), LinkReply)
    side.send(Ticket(encrypt_ticket(public_der())))
    side.receive_data(build_link_result(LinkError.OK))
    assert side.next_event() == LinkResult(LinkError.OK)
    return side


def state_of(side: ClientSide | ServerSide) -> State:
    """The side's state (a call, so that type checkers do not keep an earlier narrowing)."""
    return side.state


def data_bytes(evs: Iterable[Event]) -> bytes:
    return b"".join(bytes(e.data) for e in evs if isinstance(e, Data))


def not_data(evs: Iterable[Event]) -> list[Event]:
    return [e for e in evs if not isinstance(e, Data)]
