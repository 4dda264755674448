"""One keyboard for a SPICE display (``spice.input = "single"``): the inputs channel of a
full-rights session drops its keyboard and mouse messages while another session holds
the input, forwards them once it holds it, claims it with a press while nobody does, and
acknowledges the mouse motions it dropped so that the client keeps moving the pointer.
The channel proxy with a fake client and QEMU, seats of a real presence registry."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import structlog
from broker_spice._config import TABLE
from broker_spice._session import ChannelProxy
from broker_spice.protocol import (
    INPUTS_DROPPED,
    MSG_INPUTS_MOUSE_MOTION_ACK,
    MSGC_ACK,
    MSGC_PONG,
    ChannelPolicy,
    ChannelType,
    build_message,
)
from broker_spice.protocol._constants import (
    MSGC_INPUTS_KEY_DOWN,
    MSGC_INPUTS_KEY_UP,
    MSGC_INPUTS_MOUSE_MOTION,
    MSGC_INPUTS_MOUSE_POSITION,
    MSGC_INPUTS_MOUSE_PRESS,
    MSGC_INPUTS_MOUSE_RELEASE,
)
from spicekit import FULL_HEADER_COMMON, linked_client, linked_server

from broker.config import ConfigError, config_from_dict
from broker.service import ClientClosed
from broker.service._presence import Presence, Seat
from broker.service._pump import Traffic

DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"
KEY_DOWN = (MSGC_INPUTS_KEY_DOWN, struct.pack("<I", 0x1E))
KEY_UP = (MSGC_INPUTS_KEY_UP, struct.pack("<I", 0x9E))
MOTION = (MSGC_INPUTS_MOUSE_MOTION, struct.pack("<iiI", 1, 1, 0))
POSITION = (MSGC_INPUTS_MOUSE_POSITION, struct.pack("<IIIB", 10, 10, 0, 0))
PRESS = (MSGC_INPUTS_MOUSE_PRESS, struct.pack("<BI", 1, 1))
RELEASE = (MSGC_INPUTS_MOUSE_RELEASE, struct.pack("<BI", 1, 0))
ACK = (MSGC_ACK, b"")
PONG = (MSGC_PONG, struct.pack("<IQ", 1, 2))
MOTION_ACK = build_message(MSG_INPUTS_MOUSE_MOTION_ACK, mini_header=True)


def _wire(messages: list[tuple[int, bytes]], *, mini_header: bool = True) -> bytes:
    return b"".join(
        build_message(t, body, mini_header=mini_header, serial=i + 1)
        for i, (t, body) in enumerate(messages)
    )


class _Client:
    """The client: chunks to receive (a callable instead runs between two), what it was
    sent."""

    def __init__(self, chunks: list[bytes | Callable[[], object]]) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive(self) -> bytes:
        while self.chunks:
            chunk = self.chunks.pop(0)
            if isinstance(chunk, bytes):
                return chunk
            chunk()
        raise ClientClosed

    async def send(self, data: bytes) -> None:
        self.sent += data


class _Stream:
    def __init__(self) -> None:
        self.sent = bytearray()

    async def send(self, data: bytes) -> None:
        self.sent += data


class _Session:
    """The fields of a session the channel proxy reads, its seat a real one."""

    def __init__(self, seat: Seat | None, client: _Client, channel: ChannelType) -> None:
        self.seat = seat
        self.client = client
        self.endpoint = self.console_endpoint = _Endpoint()
        self.group = None
        self.log = structlog.get_logger("test")
        self.traffic = Traffic()
        self.view_only = False
        self.joined = channel is not ChannelType.MAIN
        self.read_size = 65536

    @property
    def may_input(self) -> bool:
        return True if self.seat is None else self.seat.may_input


class _Endpoint:
    def __init__(self) -> None:
        self.stream = _Stream()
        self.kind = "fd"


def _seats(*ids: str, mode: str = "single") -> list[Seat]:
    presence = Presence()
    return [presence.join(domain=DOMAIN, console="spice", id=i, protocol="spice", full=True,
                          address="10.0.0.1", mode=mode) for i in ids]


def _proxy(seat: Seat | None, chunks: list[Any], *, channel: ChannelType = ChannelType.INPUTS,
           mini_header: bool = True) -> tuple[ChannelProxy, _Client, _Stream]:
    client = _Client(chunks)
    session: Any = _Session(seat, client, channel)
    proxy = ChannelProxy(session, ChannelPolicy())
    common = (0b1011,) if mini_header else FULL_HEADER_COMMON
    proxy.client = linked_client(channel, common=common)
    proxy.server = linked_server(channel, common=common)
    proxy._client_boundary = True  # what the client was sent ends between two messages
    return proxy, client, session.console_endpoint.stream


def _run(proxy: ChannelProxy) -> None:
    async def go() -> None:
        with anyio.CancelScope() as scope:
            await proxy._client_to_server(scope)

    anyio.run(go)


def test_a_watching_session_sends_no_keys_or_mouse_and_its_motions_are_acknowledged() -> None:
    holder, watcher = _seats("a", "b")
    stream = [KEY_DOWN, *[MOTION] * 5, ACK, KEY_UP, *[POSITION] * 4, PRESS, RELEASE, PONG]
    proxy, client, qemu = _proxy(watcher, [_wire(stream)])
    _run(proxy)
    assert bytes(qemu.sent) == _wire([ACK, PONG])  # the common messages only
    assert bytes(client.sent) == MOTION_ACK * 2  # 9 motions dropped: two bunches of 4
    assert holder.holds_input  # a press of the watcher claims nothing: a holds it


def test_the_holder_sends_everything_and_nothing_is_acknowledged_by_the_broker() -> None:
    holder, _watcher = _seats("a", "b")
    stream = [KEY_DOWN, *[MOTION] * 8, KEY_UP, PRESS, RELEASE]
    proxy, client, qemu = _proxy(holder, [_wire(stream)])
    _run(proxy)
    assert bytes(qemu.sent) == _wire(stream)
    assert client.sent == b""


def test_taking_over_switches_at_the_next_message() -> None:
    holder, watcher = _seats("a", "b")
    before, after = [KEY_DOWN, KEY_UP], [KEY_DOWN, MOTION, KEY_UP]
    chunks = [_wire(before), watcher.take, _wire(after)]
    proxy, _client, qemu = _proxy(watcher, chunks)
    _run(proxy)
    assert bytes(qemu.sent) == _wire(after)
    assert not holder.may_input


def test_a_press_while_nobody_holds_the_input_claims_it() -> None:
    holder, watcher = _seats("a", "b")
    holder.release()
    stream = [MOTION, KEY_UP, PRESS, MOTION, RELEASE, KEY_DOWN]
    proxy, _client, qemu = _proxy(watcher, [_wire(stream)])
    _run(proxy)
    assert watcher.holds_input and watcher.state().reason == "claimed"
    assert bytes(qemu.sent) == _wire([PRESS, MOTION, RELEASE, KEY_DOWN])


def test_the_acknowledgements_wait_for_a_message_boundary() -> None:
    _holder, watcher = _seats("a", "b")

    async def go() -> None:
        proxy, client, _qemu = _proxy(watcher, [_wire([MOTION] * 4)])
        proxy._client_boundary = False  # the client is in the middle of a server message
        with anyio.CancelScope() as scope:
            await proxy._client_to_server(scope)
        assert client.sent == b""
        proxy._client_boundary = True  # the message is through: the next chance
        await proxy._acknowledge()
        assert bytes(client.sent) == MOTION_ACK
        await proxy._acknowledge()  # owed once only
        assert bytes(client.sent) == MOTION_ACK

    anyio.run(go)


def test_under_the_full_header_nothing_is_acknowledged() -> None:
    _holder, watcher = _seats("a", "b")
    proxy, client, qemu = _proxy(watcher, [_wire([MOTION] * 8 + [ACK], mini_header=False)],
                                 mini_header=False)
    _run(proxy)
    assert client.sent == b""
    assert bytes(qemu.sent) == build_message(MSGC_ACK, mini_header=False, serial=1)


@pytest.mark.parametrize(
    ("mode", "channel"),
    [("shared", ChannelType.INPUTS), ("single", ChannelType.DISPLAY), (None, ChannelType.INPUTS)],
)
def test_only_an_inputs_channel_in_single_mode_is_filtered(
    mode: str | None, channel: ChannelType
) -> None:
    seats = _seats("a", "b", mode=mode or "shared")
    stream = [MOTION, ACK, PRESS]  # (101, KEY_DOWN, would be a display's DISPLAY_INIT)
    proxy, _client, qemu = _proxy(seats[1] if mode else None, [_wire(stream)], channel=channel)
    _run(proxy)
    assert bytes(qemu.sent) == _wire(stream)


def test_every_keyboard_and_mouse_message_is_input() -> None:
    assert {t for t, _ in (KEY_DOWN, KEY_UP, MOTION, POSITION, PRESS, RELEASE)} <= INPUTS_DROPPED
    assert MSGC_ACK not in INPUTS_DROPPED and MSGC_PONG not in INPUTS_DROPPED


def test_the_input_key_is_checked() -> None:
    config = config_from_dict({"spice": {"input": "single"}}, tables=[TABLE])
    assert config.table(TABLE).input == "single"
    with pytest.raises(ConfigError, match=r"spice\.input"):
        config_from_dict({"spice": {"input": "one"}}, tables=[TABLE])
