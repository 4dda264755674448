"""Byte builders and drivers shared by the RFB tests."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

from broker_vnc.rfb import (
    NEED_DATA,
    ClientInit,
    ClientMessageFilter,
    ConnectionClosed,
    Event,
    HandshakeRejected,
    PixelFormat,
    RFBClient,
    RFBServer,
    ServerInit,
    StartTLS,
)

V33, V37, V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
QEMU_PIXEL_FORMAT = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
CHALLENGE = bytes(range(0x10, 0x20))


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(text: bytes) -> bytes:
    return u32(len(text)) + text


def server_init(width: int = 720, height: int = 400, name: bytes = b"QEMU (vm)") -> bytes:
    return struct.pack(">HH", width, height) + QEMU_PIXEL_FORMAT.to_bytes() + string(name)


def drive_client(client: RFBClient, pieces: Iterable[bytes | None]) -> tuple[list[Event], bytes]:
    """Feed *pieces* (and then nothing more) to *client*, draining events after
    each, answering StartTLS at once; return the events and all bytes sent."""
    events: list[Event] = []
    sent = bytearray()

    def drain() -> None:
        while True:
            event = client.next_event()
            sent.extend(client.data_to_send())
            if event is NEED_DATA:
                return
            events.append(event)
            if isinstance(event, StartTLS):
                client.tls_established()
            if isinstance(event, ServerInit):
                return

    drain()
    for piece in pieces:
        client.receive_data(piece)
        drain()
    return events, bytes(sent)


def drive_server(
    server: RFBServer, pieces: Iterable[bytes | None], init: ServerInit | None = None
) -> tuple[list[Event], bytes]:
    """Feed *pieces* to *server*, answering ClientInit with *init*."""
    events: list[Event] = []
    sent = bytearray(server.data_to_send())
    for piece in pieces:
        if server.state.name in ("CONNECTED", "REJECTED"):
            break
        server.receive_data(piece)
        while True:
            event = server.next_event()
            sent.extend(server.data_to_send())
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, ClientInit) and init is not None:
                server.send_server_init(init)
                sent.extend(server.data_to_send())
            if isinstance(event, HandshakeRejected):
                break
    return events, bytes(sent)


def filter_events(flt: ClientMessageFilter, pieces: Iterable[bytes | None]) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        flt.receive_data(piece)
        while (event := flt.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events
    return events


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """*data* cut at the given offsets (any order, duplicates ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]
