"""Fuzzing the RFB parsers with hypothesis.

* Arbitrary bytes, fed whole and byte by byte (and after a valid prefix, to get
  past the first checks), raise nothing but RFBProtocolError.
* A valid stream cut into random pieces yields exactly the events (and sends
  exactly the bytes) it yields when fed whole; the filter's fast path forwards
  exactly what its event path says to forward.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable

from broker_vnc.rfb import (
    ClientMessage,
    ClientMessageFilter,
    DownstreamState,
    Event,
    PixelFormat,
    RFBClient,
    RFBProtocolError,
    RFBServer,
    ServerInit,
    UpstreamState,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rfb_transcripts import (
    V33,
    V37,
    V38,
    bytewise,
    drive_client,
    drive_server,
    filter_events,
    server_init,
    split,
    u8,
    u32,
)

#: More examples for a deeper run: RFB_FUZZ_EXAMPLES=20000 pytest tests/vnc/test_rfb_fuzz.py
EXAMPLES = int(os.environ.get("RFB_FUZZ_EXAMPLES", "300"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
INIT = ServerInit(640, 480, PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0), b"vm")
CUTS = st.lists(st.integers(0, 4096), max_size=40)

u8s = st.integers(0, 0xFF)
u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFFFFFF)
s32s = st.integers(-(2**31), 2**31 - 1)


def client_factories() -> st.SearchStrategy[Callable[[], RFBClient]]:
    return st.sampled_from(
        [
            lambda: RFBClient(),
            lambda: RFBClient(password=b"pw", shared=False),
            lambda: RFBClient(password=b"pw", tls=True, vencrypt_subtypes=[257, 258, 260, 261]),
            lambda: RFBClient(tls=True, max_name_length=16, max_reason_length=8),
        ]
    )


# A valid prefix, then garbage: gets the fuzzer past the version check.
SERVER_PREFIXES = st.sampled_from(
    [
        b"",
        V33,
        V37,
        V38,
        V38 + u8(1) + u8(2),
        V38 + u8(1) + u8(19) + u8(0) + u8(2),
        V38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0),
        V38 + u8(1) + u8(1) + u32(0),
        V37 + u8(1) + u8(1),
    ]
)
CLIENT_PREFIXES = st.sampled_from([b"", V33, V37, V38, V38 + u8(1), V37 + u8(1)])


def run_client(client: RFBClient, pieces: list[bytes]) -> None:
    try:
        for piece in [*pieces, None]:
            if client.state is UpstreamState.CONNECTED:
                client.take_trailing_data()
                return
            drive_client(client, [piece])
    except RFBProtocolError:
        pass


def run_server(server: RFBServer, pieces: list[bytes]) -> None:
    with contextlib.suppress(RFBProtocolError):
        drive_server(server, [*pieces, None], INIT)


@FUZZ
@given(client_factories(), SERVER_PREFIXES, st.binary(max_size=200))
def test_client_raises_only_protocol_errors(
    make: Callable[[], RFBClient], prefix: bytes, data: bytes
) -> None:
    run_client(make(), [prefix + data])
    run_client(make(), bytewise(prefix + data))


@FUZZ
@given(CLIENT_PREFIXES, st.binary(max_size=100), st.booleans())
def test_server_raises_only_protocol_errors(prefix: bytes, data: bytes, reject: bool) -> None:
    for pieces in ([prefix + data], bytewise(prefix + data)):
        server = RFBServer()
        if reject:
            server.reject("no")
        run_server(server, pieces)


@FUZZ
@given(st.binary(max_size=300), st.booleans())
def test_filter_raises_only_protocol_errors(data: bytes, view_only: bool) -> None:
    outputs = []
    for pieces in ([data], bytewise(data)):
        fast = ClientMessageFilter(view_only=view_only, max_cut_text=100)
        out = bytearray()
        try:
            for piece in [*pieces, None]:
                out += fast.filter_data(piece)
        except RFBProtocolError:
            out += b"<error>"
        outputs.append(bytes(out))
        with contextlib.suppress(RFBProtocolError):
            filter_events(
                ClientMessageFilter(view_only=view_only, max_cut_text=100),
                [*pieces, None],
            )
    whole, bytewise_out = outputs
    # Fed whole, an error loses the forwardable messages before it; fed byte by
    # byte they went out first. Without an error both forward the same bytes.
    if not whole.endswith(b"<error>"):
        assert whole == bytewise_out


# --- valid handshakes, random chunkings ------------------------------------------------


@st.composite
def server_transcripts(draw: st.DrawFn) -> tuple[Callable[[], RFBClient], list[bytes]]:
    """(client factory, segments): what a valid server sends; a VeNCrypt
    transcript has two segments, before and after the TLS handshake."""
    name = draw(st.binary(max_size=40))
    init = server_init(draw(u16s), draw(u16s), name)
    trailing = draw(st.binary(max_size=20))
    path = draw(st.sampled_from(["none", "vnc", "vencrypt-none", "vencrypt-vnc"]))
    version = draw(st.sampled_from([V33, V37, V38]))
    challenge = draw(st.binary(min_size=16, max_size=16))
    if path.startswith("vencrypt"):
        subtype = 260 if path == "vencrypt-none" else 261
        pre = V38 + u8(2) + u8(2) + u8(19) + u8(0) + u8(2) + u8(0) + u8(1) + u32(subtype) + u8(1)
        post = (challenge if subtype == 261 else b"") + u32(0) + init + trailing
        return (lambda: RFBClient(password=b"pw", tls=True)), [pre, post]
    if version == V33:
        security = u32(1) if path == "none" else u32(2) + challenge + u32(0)
    elif path == "none":
        security = u8(1) + u8(1) + (u32(0) if version == V38 else b"")
    else:
        security = u8(2) + u8(1) + u8(2) + challenge + u32(0)
    password = b"pw" if path == "vnc" else None
    return (lambda: RFBClient(password=password)), [version + security + init + trailing]


def client_run(
    make: Callable[[], RFBClient], pieces: list[bytes]
) -> tuple[list[Event], bytes, bytes]:
    """Events, bytes sent, and the server's bytes after ServerInit."""
    client = make()
    events: list[Event] = []
    sent = b""
    for i, piece in enumerate(pieces):
        if client.state is UpstreamState.CONNECTED:
            return events, sent, client.take_trailing_data() + b"".join(pieces[i:])
        more, out = drive_client(client, [piece])
        events += more
        sent += out
    assert client.state is UpstreamState.CONNECTED
    return events, sent, client.take_trailing_data()


@FUZZ
@given(server_transcripts(), CUTS)
def test_client_handshake_is_independent_of_chunking(
    transcript: tuple[Callable[[], RFBClient], list[bytes]], cuts: list[int]
) -> None:
    make, segments = transcript
    whole = client_run(make, segments)
    chunked = client_run(make, [piece for segment in segments for piece in split(segment, cuts)])
    assert chunked == whole
    assert client_run(make, [b for segment in segments for b in bytewise(segment)]) == whole


@st.composite
def client_transcripts(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([V33, b"RFB 003.005\n", V37, V38]))
    choice = b"" if version[8:11] in (b"003", b"005") else u8(1)
    return version + choice + u8(draw(st.booleans())) + draw(st.binary(max_size=20))


def server_run(pieces: list[bytes]) -> tuple[list[Event], bytes, bytes]:
    """Events, bytes sent, and the client's bytes after ClientInit."""
    server = RFBServer()
    events: list[Event] = []
    sent = b""
    for i, piece in enumerate(pieces):
        if server.state is DownstreamState.CONNECTED:
            return events, sent, server.take_trailing_data() + b"".join(pieces[i:])
        more, out = drive_server(server, [piece], INIT)
        events += more
        sent += out
    assert server.state is DownstreamState.CONNECTED
    return events, sent, server.take_trailing_data()


@FUZZ
@given(client_transcripts(), CUTS)
def test_server_handshake_is_independent_of_chunking(transcript: bytes, cuts: list[int]) -> None:
    whole = server_run([transcript])
    assert server_run(split(transcript, cuts)) == whole
    assert server_run(bytewise(transcript)) == whole


# --- valid client message streams ----------------------------------------------------------


def _pack(fmt: str) -> Callable[..., bytes]:
    return lambda *values: struct.pack(fmt, *values)


ENCODINGS = st.one_of(s32s, st.sampled_from([-316, -305, -258, -259, -308, -312, -313, 7, 16]))
MESSAGES = st.one_of(
    st.builds(
        lambda pad, pf: b"\x00" + pad + pf,
        st.binary(min_size=3, max_size=3),
        st.binary(min_size=16, max_size=16),
    ),
    st.builds(
        lambda pad, encs: b"\x02" + pad + struct.pack(f">H{len(encs)}i", len(encs), *encs),
        st.binary(min_size=1, max_size=1),
        st.lists(ENCODINGS, max_size=12),
    ),
    st.builds(_pack(">BBHHHH"), st.just(3), u8s, u16s, u16s, u16s, u16s),
    st.builds(_pack(">BBHI"), st.just(4), u8s, u16s, u32s),
    st.builds(_pack(">BBHH"), st.just(5), u8s, u16s, u16s),
    st.builds(lambda text: struct.pack(">BxxxI", 6, len(text)) + text, st.binary(max_size=40)),
    st.builds(
        lambda flags, payload: struct.pack(">BxxxiI", 6, -(4 + len(payload)), flags) + payload,
        st.one_of(u32s, st.sampled_from([1 << 24, 1 << 25, 1 << 26, 1 << 27, 1 << 28])),
        st.binary(max_size=30),
    ),
    st.builds(_pack(">BBHHHH"), st.just(150), u8s, u16s, u16s, u16s, u16s),
    st.builds(
        lambda pad, flags, payload: (
            b"\xf8" + pad + struct.pack(">IB", flags, len(payload)) + payload
        ),
        st.binary(min_size=3, max_size=3),
        u32s,
        st.binary(max_size=64),
    ),
    st.builds(_pack(">BBBB"), st.just(250), u8s, u8s, u8s),
    st.builds(
        lambda pad, w, h, screens: (
            b"\xfb" + pad + struct.pack(">HHB", w, h, len(screens)) + pad + b"".join(screens)
        ),
        st.binary(min_size=1, max_size=1),
        u16s,
        u16s,
        st.lists(st.binary(min_size=16, max_size=16), max_size=16),
    ),
    st.builds(_pack(">BBHII"), st.just(255), st.just(0), u16s, u32s, u32s),
    st.builds(_pack(">BBH"), st.just(255), st.just(1), st.sampled_from([0, 1])),
    st.builds(_pack(">BBHBBI"), st.just(255), st.just(1), st.just(2), u8s, u8s, u32s),
)


@FUZZ
@given(st.lists(MESSAGES, max_size=30), CUTS, st.booleans())
def test_filter_is_independent_of_chunking(
    messages: list[bytes], cuts: list[int], view_only: bool
) -> None:
    stream = b"".join(messages)
    whole = filter_events(ClientMessageFilter(view_only=view_only), [stream, None])
    chunked = filter_events(ClientMessageFilter(view_only=view_only), [*split(stream, cuts), None])
    assert chunked == whole
    parsed = [event for event in whole if isinstance(event, ClientMessage)]
    assert len(parsed) == len(messages)
    for raw, event in zip(messages, parsed, strict=True):
        assert event.data == raw or (raw[0] == 2 and event.data != raw and event.stripped)
        assert event.forward is not (view_only and event.is_input)
    forwarded = b"".join(event.data for event in parsed if event.forward)

    fast = ClientMessageFilter(view_only=view_only)
    assert fast.filter_data(stream) == forwarded
    fast = ClientMessageFilter(view_only=view_only)
    assert b"".join(fast.filter_data(piece) for piece in split(stream, cuts)) == forwarded
    assert fast.buffered == 0
