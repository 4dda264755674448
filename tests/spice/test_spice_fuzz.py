"""Fuzzing both sides: arbitrary bytes raise only SpiceProtocolError, and any chunking of a
stream gives the same events, the same forwarded bytes and the same verdict as the whole."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import attrs
from broker_spice.protocol import (
    NEED_DATA,
    PAUSED,
    ChannelType,
    ClientSide,
    ClientTicket,
    ConnectionClosed,
    Data,
    DisplayInit,
    Event,
    LinkError,
    LinkMessage,
    LinkReply,
    LinkResult,
    MainInit,
    ServerSide,
    SpiceProtocolError,
    Ticket,
    build_display_init,
    build_link_message,
    build_link_reply,
    build_link_result,
    build_main_init,
    build_message,
    encrypt_ticket,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spicekit import (
    client_ticket_bytes,
    link_message,
    public_der,
    server_reply,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@attrs.frozen
class Outcome:
    """What a side made of a stream: its non-Data events, the bytes it handed out as
    Data, and the protocol error it ended with (type of link error), if any."""

    events: list[Event]
    data: bytes
    error: tuple[str, LinkError | None] | None


def _drive(side: ClientSide | ServerSide, chunks: Sequence[bytes], *, refuse: bool) -> Outcome:
    """Feed *chunks* then the end of the stream, answering the link like a broker."""
    evs: list[Event] = []
    data = bytearray()

    def pump() -> None:
        while True:
            event = side.next_event()
            if event is NEED_DATA:
                return
            assert event is not PAUSED, "the driver answers every step at once"
            if isinstance(event, Data):
                data.extend(side.send(event) if isinstance(side, ClientSide) else event.data)
                continue
            evs.append(event)
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(side, ClientSide):
                if isinstance(event, LinkMessage):
                    reply = (
                        LinkReply(error=LinkError.PERMISSION_DENIED) if refuse else server_reply()
                    )
                    side.send(reply)
                elif isinstance(event, ClientTicket):
                    side.send(LinkResult(LinkError.OK))
            elif isinstance(event, LinkReply) and event.error is LinkError.OK:
                side.send(Ticket(_ticket()))

    try:
        if isinstance(side, ServerSide):
            side.send(link_message(ChannelType.MAIN))
        for chunk in chunks:
            if not chunk:
                continue  # b"" would be the end of the stream
            side.receive_data(chunk)
            pump()
        side.receive_data(b"")
        pump()
    except SpiceProtocolError as exc:  # the only error the peer can cause
        return Outcome(evs, bytes(data), (exc.peer.value, exc.link_error))
    return Outcome(evs, bytes(data), None)


@functools.cache
def _ticket() -> bytes:
    return encrypt_ticket(public_der())


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def _check(
    make: Callable[[], ClientSide | ServerSide], data: bytes, cuts: list[int], refuse: bool = False
) -> Outcome:
    whole = _drive(make(), [data], refuse=refuse)
    bytewise = _drive(make(), [data[i : i + 1] for i in range(len(data))], refuse=refuse)
    chunked = _drive(make(), _chunked(data, cuts), refuse=refuse)
    assert bytewise == whole
    assert chunked == whole
    return whole


# --- streams ------------------------------------------------------------------------


def _client_link(channel_type: ChannelType) -> bytes:
    return build_link_message(link_message(channel_type, connection_id=7)) + client_ticket_bytes()


_SERVER_LINK = build_link_reply(server_reply()) + build_link_result(LinkError.OK)

_bodies = st.binary(max_size=40)
_client_messages = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 200).filter(lambda t: t != 101), _bodies),
        st.builds(
            lambda init: (101, build_display_init(init)),
            st.builds(
                DisplayInit,
                pixmap_cache_id=st.integers(0, 255),
                pixmap_cache_size=st.integers(-(2**63), 2**63 - 1),
            ),
        ),
    ),
    max_size=8,
)
_server_messages = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 400).filter(lambda t: t != 103), _bodies),
        st.builds(
            lambda sid: (103, build_main_init(MainInit(session_id=sid))), st.integers(0, 2**32 - 1)
        ),
    ),
    max_size=8,
)
_cuts = st.lists(st.integers(0, 10_000), max_size=12)


def _stream(messages: list[tuple[int, bytes]], mini_header: bool = True) -> bytes:
    return b"".join(
        build_message(t, body, mini_header=mini_header, serial=n + 1)
        for n, (t, body) in enumerate(messages)
    )


# --- arbitrary bytes ---------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300), cuts=_cuts, refuse=st.booleans())
def test_client_side_arbitrary_bytes(data: bytes, cuts: list[int], refuse: bool) -> None:
    _check(ClientSide, data, cuts, refuse)


@FUZZ
@given(data=st.binary(max_size=300), cuts=_cuts)
def test_client_side_arbitrary_bytes_after_a_good_header(data: bytes, cuts: list[int]) -> None:
    _check(ClientSide, b"REDQ\x02\0\0\0\x02\0\0\0" + data, cuts)


@FUZZ
@given(
    channel_type=st.sampled_from([ChannelType.DISPLAY, ChannelType.INPUTS]),
    data=st.binary(max_size=300),
    cuts=_cuts,
    limit=st.sampled_from([16, 1 << 20]),
)
def test_client_side_arbitrary_messages(
    channel_type: ChannelType, data: bytes, cuts: list[int], limit: int
) -> None:
    _check(lambda: ClientSide(max_message_size=limit), _client_link(channel_type) + data, cuts)


@FUZZ
@given(data=st.binary(max_size=400), cuts=_cuts)
def test_server_side_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _check(ServerSide, data, cuts)


@FUZZ
@given(data=st.binary(max_size=300), cuts=_cuts, limit=st.sampled_from([16, 1 << 20]))
def test_server_side_arbitrary_messages(data: bytes, cuts: list[int], limit: int) -> None:
    _check(lambda: ServerSide(max_message_size=limit), _SERVER_LINK + data, cuts)


# --- valid streams -----------------------------------------------------------------


@FUZZ
@given(messages=_client_messages, cuts=_cuts)
def test_client_side_valid_streams(messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = _stream(messages)
    outcome = _check(ClientSide, _client_link(ChannelType.DISPLAY) + stream, cuts)
    assert outcome.error is None
    assert outcome.data == stream
    assert outcome.events[-1] == ConnectionClosed(clean=True)
    inits = [e for e in outcome.events if isinstance(e, DisplayInit)]
    assert len(inits) == sum(1 for t, _ in messages if t == 101)


@FUZZ
@given(messages=_server_messages, cuts=_cuts, mini_header=st.booleans())
def test_server_side_valid_streams(
    messages: list[tuple[int, bytes]], cuts: list[int], mini_header: bool
) -> None:
    stream = _stream(messages, mini_header)
    common = (0b1011,) if mini_header else (0b0011,)
    reply = build_link_reply(server_reply(common=common)) + build_link_result(LinkError.OK)
    outcome = _check(ServerSide, reply + stream, cuts)
    assert outcome.error is None
    assert outcome.data == stream
    inits = [e for e in outcome.events if isinstance(e, MainInit)]
    assert [i.session_id for i in inits] == [
        int.from_bytes(body[:4], "little") for t, body in messages if t == 103
    ]
