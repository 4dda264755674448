"""One keyboard for a VNC display (``vnc.input = "single"``): the filter's input switch and
its claim, and in process two sessions on one scripted QEMU whose input the broker
forwards from the holder only, switching as the control channel takes it over."""

from __future__ import annotations

import json
import struct
from typing import Any

import anyio
import pytest
from broker_vnc._config import TABLE, VNCSection
from broker_vnc.rfb import ClientMessageFilter, KeyEvent, PointerEvent
from vnckit import DOMAIN, FRAMEBUFFER_UPDATE, FakeQEMU, echo_console, in_process_broker
from vnckit import rfb_login as login
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker.config import ConfigError, config_from_dict

FBUR = struct.pack(">BBHHHH", 3, 1, 0, 0, 720, 400)
MOVE = struct.pack(">BBHH", 5, 0, 10, 20)  # no button: no press
CLICK = struct.pack(">BBHH", 5, 1, 10, 20)
UNCLICK = struct.pack(">BBHH", 5, 0, 10, 21)


def key(keysym: int, down: bool = True) -> bytes:
    return struct.pack(">BBxxI", 4, int(down), keysym)


def ext_key(keysym: int, down: bool = True) -> bytes:
    return struct.pack(">BBHII", 255, 0, int(down), keysym, 0x1E)


# --- the filter -----------------------------------------------------------------------------


def test_the_input_switch_applies_from_the_next_feed() -> None:
    flt = ClientMessageFilter(view_only=True)
    assert flt.filter_data(key(0x61) + FBUR) == FBUR
    flt.view_only = False
    assert flt.filter_data(key(0x62) + FBUR) == key(0x62) + FBUR
    flt.view_only = True
    assert flt.filter_data(MOVE + key(0x63, False)) == b""


@pytest.mark.parametrize("press", [key(0x61), ext_key(0x61), CLICK])
def test_a_press_claims_the_input_and_goes_through_with_what_follows(press: bytes) -> None:
    asked: list[int] = []

    def claim() -> bool:
        asked.append(1)
        return True

    flt = ClientMessageFilter(view_only=True, claim=claim)
    # motion and a release before the press are dropped, without asking
    data = MOVE + key(0x7A, False) + FBUR + MOVE + press + MOVE + key(0x61, False)
    assert flt.filter_data(data) == FBUR + press + MOVE + key(0x61, False)
    assert asked == [1] and flt.view_only is False
    assert flt.filter_data(key(0x62)) == key(0x62)  # the input is this session's now
    assert asked == [1]


def test_a_refused_claim_drops_the_whole_run() -> None:
    asked: list[int] = []

    def claim() -> bool:
        asked.append(1)
        return False

    flt = ClientMessageFilter(view_only=True, claim=claim)
    assert flt.filter_data(MOVE + key(0x61) + CLICK + FBUR) == FBUR
    assert asked == [1] and flt.view_only  # asked once per run, at its first press
    assert flt.filter_data(MOVE + UNCLICK) == b""
    assert asked == [1]  # no press: nothing asked


def test_without_a_claim_callback_view_only_never_asks() -> None:
    flt = ClientMessageFilter(view_only=True)
    assert flt.filter_data(key(0x61) + CLICK) == b""


def test_the_event_path_claims_alike() -> None:
    flt = ClientMessageFilter(view_only=True, claim=lambda: True)
    flt.receive_data(MOVE + key(0x61) + key(0x62))
    first = flt.next_event()
    assert isinstance(first, PointerEvent) and not first.forward
    second = flt.next_event()
    assert isinstance(second, KeyEvent) and second.forward and second.data == key(0x61)
    third = flt.next_event()
    assert isinstance(third, KeyEvent) and third.forward and not flt.view_only


def test_the_input_key_is_checked() -> None:
    assert config_from_dict({"vnc": {"input": "single"}}, tables=[TABLE]).table(TABLE).input == (
        "single"
    )
    with pytest.raises(ConfigError, match=r"vnc\.input"):
        config_from_dict({"vnc": {"input": "exclusive"}}, tables=[TABLE])


# --- in process -----------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _session(port: int, token: str) -> ClientConnection:
    ws = await connect(f"ws://127.0.0.1:{port}/ws/vnc?token={token}",
                       subprotocols=["binary"])  # type: ignore[list-item]
    await login(ws)
    return ws


async def _control(port: int, token: str) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{port}/ws/vnc/control?token={token}")


async def _presence(control: ClientConnection, check: Any) -> dict[str, Any]:
    with anyio.fail_after(5):
        while True:
            doc = json.loads(await control.recv())
            if doc["type"] == "presence" and check(doc):
                return doc  # type: ignore[no-any-return]


async def _reached(qemu: FakeQEMU, data: bytes) -> None:
    """*data* reaches QEMU: sent after a FramebufferUpdateRequest answered, so that what
    the broker drops has had its chance to arrive first."""
    with anyio.fail_after(5):
        while data not in qemu.received:
            await anyio.sleep(0.01)


async def _round_trip(ws: ClientConnection) -> None:
    """A FramebufferUpdateRequest answered: everything sent before it has been filtered."""
    await ws.send(FBUR)
    with anyio.fail_after(5):
        while await ws.recv() != FRAMEBUFFER_UPDATE:
            pass


@pytest.mark.anyio
async def test_one_session_at_a_time_types_and_take_control_switches_it() -> None:
    qemu = FakeQEMU(security=2)
    async with in_process_broker(qemu, vnc=VNCSection(input="single")) as broker:
        alice, bob = (broker.issuer.issue(DOMAIN, "vnc", ttl=60).token for _ in range(2))
        page_a = await _session(broker.port, alice)
        page_b = await _session(broker.port, bob)
        control_a = await _control(broker.port, alice)
        control_b = await _control(broker.port, bob)
        state = await _presence(control_b, lambda d: len(d["viewers"]) == 2)
        assert state["mode"] == "single" and state["input"] is False
        # Alice, the first, types; Bob's keys, clicks and clipboard are dropped
        await page_a.send(key(0x41))
        await page_b.send(key(0x42) + CLICK + UNCLICK + key(0x42, False))
        await page_b.send(struct.pack(">BxxxI", 6, 3) + b"bob")
        await _round_trip(page_b)
        await _reached(qemu, key(0x41))
        assert key(0x42) not in qemu.received and b"bob" not in qemu.received
        # Bob takes control: from then on his keys go through, Alice's do not
        await control_b.send('{"type": "takeover"}')
        await _presence(control_a, lambda d: d["holder"] == state["you"] and not d["input"])
        await page_a.send(key(0x43))
        await _round_trip(page_a)
        await page_b.send(key(0x44))
        await _reached(qemu, key(0x44))
        assert key(0x43) not in qemu.received
        # Bob releases: nobody types until someone presses; Alice's press claims it
        await control_b.send('{"type": "release"}')
        await _presence(control_a, lambda d: d["holder"] is None)
        await page_a.send(MOVE)
        await _round_trip(page_a)
        assert MOVE not in qemu.received  # a motion claims nothing
        await page_a.send(MOVE + key(0x45) + key(0x45, False))
        claimed = await _presence(control_b, lambda d: d["reason"] == "claimed")
        assert claimed["holder"] not in (None, state["you"])
        await _reached(qemu, key(0x45) + key(0x45, False))
        await page_b.send(key(0x46))
        await _round_trip(page_b)
        assert key(0x46) not in qemu.received
        # the holder leaves: nobody holds it, Bob's keys still dropped until he presses
        await page_a.close()
        await _presence(control_b, lambda d: len(d["viewers"]) == 1 and d["holder"] is None)
        await page_b.send(key(0x47))
        await _reached(qemu, key(0x47))  # a press: claimed and forwarded
        for ws in (page_b, control_a, control_b):
            await ws.close()


@pytest.mark.anyio
async def test_shared_input_is_as_before() -> None:
    qemu = FakeQEMU(security=2)
    async with in_process_broker(qemu) as broker:
        alice, bob = (broker.issuer.issue(DOMAIN, "vnc", ttl=60).token for _ in range(2))
        page_a = await _session(broker.port, alice)
        page_b = await _session(broker.port, bob)
        control = await _control(broker.port, bob)
        state = await _presence(control, lambda d: len(d["viewers"]) == 2)
        assert (state["mode"], state["input"], state["holder"]) == ("shared", True, None)
        await page_a.send(key(0x41))
        await page_b.send(key(0x42))
        await _reached(qemu, key(0x41))
        await _reached(qemu, key(0x42))
        for ws in (page_a, page_b, control):
            await ws.close()


@pytest.mark.anyio
async def test_websocket_mode_cannot_keep_one_keyboard() -> None:
    single = VNCSection(input="single")
    async with in_process_broker(echo_console, kind="websocket", vnc=single) as broker:
        ws = await connect(broker.url(), subprotocols=["binary"])  # type: ignore[list-item]
        with anyio.fail_after(5), pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 4009
