"""View-only main channel: the client's agent and mouse-mode messages are dropped whole."""

from __future__ import annotations

import random
import struct
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
import structlog
from broker_spice._session import ChannelProxy
from broker_spice.protocol import (
    MSGC_ACK,
    MSGC_MAIN_AGENT_DATA,
    MSGC_MAIN_AGENT_START,
    MSGC_MAIN_AGENT_TOKEN,
    MSGC_MAIN_ATTACH_CHANNELS,
    MSGC_MAIN_MOUSE_MODE_REQUEST,
    MSGC_PONG,
    VIEW_ONLY_MAIN_DROPPED,
    ChannelPolicy,
    ChannelType,
    ClientSide,
    Data,
    Message,
    MessageFilter,
    build_message,
)
from spicekit import FULL_HEADER_COMMON, linked_client, linked_server

from broker.service import ClientClosed
from broker.service._pump import Traffic

MSGC_DISCONNECTING = 6
MSGC_MAIN_MIGRATE_END = 109

#: A main-channel client stream: (type, body); the agent messages and the mouse-mode
#: request are what a view-only session must not send.
STREAM = [
    (MSGC_MAIN_ATTACH_CHANNELS, b""),
    (MSGC_MAIN_AGENT_START, struct.pack("<I", 10)),
    (MSGC_ACK, b""),
    (MSGC_MAIN_AGENT_DATA, bytes(range(256)) * 40),  # clipboard / file transfer
    (MSGC_PONG, struct.pack("<IQ", 1, 123456789)),
    (MSGC_MAIN_MOUSE_MODE_REQUEST, struct.pack("<H", 2)),
    (MSGC_MAIN_AGENT_TOKEN, struct.pack("<I", 5)),
    (MSGC_MAIN_AGENT_DATA, b""),
    (MSGC_MAIN_MIGRATE_END, b""),
    (MSGC_DISCONNECTING, struct.pack("<QI", 0, 0)),
]


def _wire(stream: list[tuple[int, bytes]], *, mini_header: bool) -> bytes:
    return b"".join(
        build_message(t, body, mini_header=mini_header, serial=i + 1)
        for i, (t, body) in enumerate(stream)
    )


def _kept(*, mini_header: bool) -> bytes:
    kept = [(t, body) for t, body in STREAM if t not in VIEW_ONLY_MAIN_DROPPED]
    return _wire(kept, mini_header=mini_header)  # serials 1, 2, 3, ... again


def _chunks(data: bytes, sizes: str) -> list[bytes]:
    if sizes == "whole":
        return [data]
    if sizes == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(sizes)
    out, pos = [], 0
    while pos < len(data):
        step = rng.randint(1, 700)
        out.append(data[pos : pos + step])
        pos += step
    return out


def _through_client_side(chunks: list[bytes], *, mini_header: bool,
                         drop: MessageFilter | None) -> bytes:
    """Feed *chunks* through a linked ClientSide (what the broker forwards) and the filter."""
    common = (0b1011,) if mini_header else FULL_HEADER_COMMON
    client = linked_client(ChannelType.MAIN, common=common)
    server = linked_server(ChannelType.MAIN, common=common)
    out = bytearray()
    for chunk in chunks:
        client.receive_data(chunk)
        for event in client.available_events():
            if isinstance(event, Data):
                data = event.data if drop is None else drop.feed(event.data)
                if data:
                    out += server.send(Data(data))  # a valid message stream again
    return bytes(out)


@pytest.mark.parametrize("mini_header", [True, False])
@pytest.mark.parametrize("sizes", ["whole", "bytes", "seed-1", "seed-2", "seed-3"])
def test_view_only_drops_agent_and_mouse_mode_messages(mini_header: bool, sizes: str) -> None:
    data = _wire(STREAM, mini_header=mini_header)
    drop = MessageFilter(VIEW_ONLY_MAIN_DROPPED, mini_header=mini_header)
    out = _through_client_side(_chunks(data, sizes), mini_header=mini_header, drop=drop)
    assert out == _kept(mini_header=mini_header)
    assert drop.dropped == {
        MSGC_MAIN_AGENT_START: 1,
        MSGC_MAIN_AGENT_DATA: 2,
        MSGC_MAIN_MOUSE_MODE_REQUEST: 1,
        MSGC_MAIN_AGENT_TOKEN: 1,
    }


@pytest.mark.parametrize("mini_header", [True, False])
def test_full_rights_forward_everything(mini_header: bool) -> None:
    data = _wire(STREAM, mini_header=mini_header)
    for sizes in ("whole", "bytes", "seed-4"):
        out = _through_client_side(_chunks(data, sizes), mini_header=mini_header, drop=None)
        assert out == data


def test_the_dropped_set_is_agent_and_mouse_mode_only() -> None:
    assert {105, 106, 107, 108} == VIEW_ONLY_MAIN_DROPPED


def test_a_chunk_that_keeps_every_message_is_returned_as_is() -> None:
    drop = MessageFilter(VIEW_ONLY_MAIN_DROPPED, mini_header=True)
    chunk = build_message(MSGC_ACK, mini_header=True) + build_message(
        MSGC_PONG, bytes(12), mini_header=True
    )
    assert drop.feed(chunk) is chunk
    view = memoryview(chunk)
    assert drop.feed(view) is view


def test_serials_before_the_first_drop_are_untouched_and_later_ones_count_on() -> None:
    drop = MessageFilter(VIEW_ONLY_MAIN_DROPPED, mini_header=False)
    first = build_message(MSGC_ACK, mini_header=False, serial=7)
    assert drop.feed(first) is first
    dropped = build_message(MSGC_MAIN_AGENT_DATA, b"x" * 10, mini_header=False, serial=8)
    assert drop.feed(dropped[:5]) == b""  # a header split across chunks: held
    assert drop.feed(dropped[5:20]) == b""
    after = build_message(MSGC_PONG, bytes(12), mini_header=False, serial=9)
    assert drop.feed(dropped[20:] + after) == build_message(
        MSGC_PONG, bytes(12), mini_header=False, serial=8
    )


def test_a_dropped_body_split_across_chunks() -> None:
    drop = MessageFilter(VIEW_ONLY_MAIN_DROPPED, mini_header=True)
    ack = build_message(MSGC_ACK, mini_header=True)
    agent = build_message(MSGC_MAIN_AGENT_DATA, b"a" * 100, mini_header=True)
    assert bytes(drop.feed(ack + agent[:50])) == ack
    assert drop.feed(agent[50:]) == b""
    assert drop.feed(agent[:3]) == b""  # half a header: held, then dropped
    assert bytes(drop.feed(agent[3:] + ack)) == ack


# --- the plugin: ChannelProxy forwarding -------------------------------------------------


class _Client:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive(self) -> bytes:
        if not self.chunks:
            raise ClientClosed
        return self.chunks.pop(0)

    async def send(self, data: bytes) -> None:  # pragma: no cover - not used here
        pass


class _Stream:
    def __init__(self) -> None:
        self.sent = bytearray()

    async def send(self, data: bytes) -> None:
        self.sent += data


def _proxy(chunks: list[bytes], *, view_only: bool, channel: ChannelType,
           mini_header: bool = True) -> tuple[ChannelProxy, _Stream]:
    stream = _Stream()
    endpoint = SimpleNamespace(stream=stream, kind="fd")
    session: Any = SimpleNamespace(
        endpoint=endpoint,
        console_endpoint=endpoint,
        client=_Client(chunks),
        group=None,
        log=structlog.get_logger("test"),
        traffic=Traffic(),
        view_only=view_only,
        may_input=not view_only,
        seat=None,
        joined=channel is not ChannelType.MAIN,
        read_size=65536,
    )
    proxy = ChannelProxy(session, ChannelPolicy(view_only=view_only))
    common = (0b1011,) if mini_header else FULL_HEADER_COMMON
    proxy.client = linked_client(channel, common=common)
    proxy.server = linked_server(channel, common=common)
    return proxy, stream


async def _run(proxy: ChannelProxy) -> None:
    with anyio.CancelScope() as scope:
        await proxy._client_to_server(scope)


@pytest.mark.parametrize("mini_header", [True, False])
@pytest.mark.parametrize(
    ("view_only", "channel", "filtered"),
    [
        (True, ChannelType.MAIN, True),
        (False, ChannelType.MAIN, False),
        (True, ChannelType.DISPLAY, False),  # the filter is for the main channel only
    ],
)
def test_the_channel_proxy_filters_only_a_view_only_main_channel(
    view_only: bool, channel: ChannelType, filtered: bool, mini_header: bool
) -> None:
    data = _wire(STREAM, mini_header=mini_header)
    proxy, stream = _proxy(_chunks(data, "seed-5"), view_only=view_only, channel=channel,
                           mini_header=mini_header)
    anyio.run(_run, proxy)
    assert bytes(stream.sent) == (_kept(mini_header=mini_header) if filtered else data)
    assert proxy.session.traffic.to_console == len(stream.sent)


def test_a_chunk_dropped_whole_still_counts_as_activity() -> None:
    agent = build_message(MSGC_MAIN_AGENT_DATA, b"clipboard", mini_header=True)
    proxy, stream = _proxy([agent], view_only=True, channel=ChannelType.MAIN)
    proxy.session.traffic.last_activity = 0.0
    anyio.run(_run, proxy)
    assert stream.sent == b""
    assert proxy.session.traffic.last_activity > 0.0


def test_client_side_is_unchanged_by_the_filter() -> None:
    """The filter works on ClientSide's Data; the side itself still sees every message."""
    client: ClientSide = linked_client(ChannelType.MAIN)
    client.receive_data(_wire(STREAM, mini_header=True))
    types = [e.type for e in client.available_events() if isinstance(e, Message)]
    assert types == [t for t, _ in STREAM]
