"""The SPICE layer against the real stack: QEMU 7.2's SPICE server in the tiny guest.

Plain sockets and the sans-I/O layer play the client (and, in the relay test, the
broker). Every test boots its own guest: two of them end with the VM crashed or
nearly so.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from broker_spice.protocol import (
    MSGC_DISPLAY_INIT,
    ChannelPolicy,
    ChannelType,
    ConnectionClosed,
    LinkError,
    MainInit,
    Message,
    build_display_init,
    build_message,
)
from console_broker_testbed import SerialConsole, Testbed, running_guest
from spicerelay import (
    FULL_HEADER_CAPS,
    GUARD_TIMEOUT,
    Relay,
    TestClient,
    spice_port,
)

SPICE_TCP = (
    "<graphics type='spice' autoport='yes'><listen type='address' address='127.0.0.1'/>"
    "</graphics><video><model type='qxl'/></video>"
)
SPICE_NO_LISTEN = (
    "<graphics type='spice'><listen type='none'/></graphics><video><model type='qxl'/></video>"
)
#: spice-server's display messages (SPICE_MSG_DISPLAY_*) start at 101; below are the
#: common ones (SET_ACK 3, PING 4, ...).
FIRST_DISPLAY_MSG = 101
SET_ACK = 3


@pytest.fixture
def guest(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[tuple[Any, SerialConsole]]:
    """A booted tiny guest with SPICE graphics (the devices come from the test's param)."""
    with running_guest(testbed, devices=getattr(request, "param", SPICE_TCP)) as running:
        yield running


def _tcp(dom: Any) -> TestClient:
    return TestClient(socket.create_connection(("127.0.0.1", spice_port(dom)), timeout=10))


def _link_main(client: TestClient, **kwargs: Any) -> int:
    assert client.link(ChannelType.MAIN, 0, **kwargs) is LinkError.OK
    init = client.wait_for(lambda e: isinstance(e, MainInit))
    assert isinstance(init, MainInit) and init.session_id != 0
    assert client.side.session_id == init.session_id
    return init.session_id


def _display_init(client: TestClient, *, mini_header: bool = True, serial: int = 1) -> None:
    client.send(
        build_message(
            MSGC_DISPLAY_INIT, build_display_init(), mini_header=mini_header, serial=serial
        )
    )


def _running(dom: Any) -> bool:
    state, _reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_RUNNING)


def _crashed_within(dom: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return bool(reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
        time.sleep(0.1)
    return False


@pytest.mark.vm
def test_main_display_inputs_and_a_wrong_connection_id(guest: tuple[Any, SerialConsole]) -> None:
    dom, serial = guest
    main = _tcp(dom)
    session_id = _link_main(main)
    assert main.reply is not None
    # measured: QEMU 7.2 advertises auth selection, SPICE auth and the mini header
    assert main.reply.common_caps == (0b1011,)
    assert main.side.mini_header is True

    display = _tcp(dom)
    assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
    _display_init(display)
    safe_before_qemu_answered = display.side.safe_to_close
    assert display.side.display_init_sent and not safe_before_qemu_answered
    first = display.wait_for(lambda e: isinstance(e, Message))
    assert first == Message(type=SET_ACK, size=8)
    assert display.side.safe_to_close
    drawn = display.wait_for(lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG)
    assert isinstance(drawn, Message)

    inputs = _tcp(dom)
    assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.OK

    # measured: the link reply is OK, the link result after the ticket says 8
    stranger = _tcp(dom)
    wrong = session_id ^ 0x5A5A5A5A
    assert stranger.link(ChannelType.INPUTS, wrong) is LinkError.BAD_CONNECTION_ID
    assert stranger.reply is not None and stranger.reply.error is LinkError.OK
    assert stranger.wait_for(lambda e: isinstance(e, ConnectionClosed)) == ConnectionClosed()
    stranger.close()

    # display closes first (after DISPLAY_INIT), main later: the VM lives on
    display.close()
    time.sleep(0.5)
    inputs.close()
    main.close()
    time.sleep(2)
    assert dom.isActive() and _running(dom)
    assert serial.run("echo ok").strip() == "ok"


@pytest.mark.vm
def test_the_guard_keeps_the_vm_alive(guest: tuple[Any, SerialConsole]) -> None:
    """A display channel linked and left without DISPLAY_INIT: the guard completes it."""
    dom, serial = guest
    main = _tcp(dom)
    session_id = _link_main(main)
    display = _tcp(dom)
    assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
    assert not display.side.safe_to_close
    started = time.monotonic()
    display.close_guarded()
    assert display.side.display_init_sent and display.side.display_init_confirmed
    assert time.monotonic() - started < GUARD_TIMEOUT
    main.close()
    time.sleep(2)
    assert _running(dom), dom.state()
    assert serial.run("echo ok").strip() == "ok"


@pytest.mark.vm
def test_without_the_guard_qemu_crashes(guest: tuple[Any, SerialConsole]) -> None:
    """Why the guard exists (TESTBED.md: 5 of 5): close a display channel before its
    DISPLAY_INIT, then the main channel, and QEMU 7.2 takes the VM down."""
    dom, _serial = guest
    main = _tcp(dom)
    session_id = _link_main(main)
    display = _tcp(dom)
    assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
    display.close()
    time.sleep(0.5)
    main.close()
    assert _crashed_within(dom, 10), dom.state()


@pytest.mark.vm
@pytest.mark.parametrize("guest", [SPICE_NO_LISTEN], indirect=True, ids=["listen-none"])
def test_linking_through_open_graphics_fd_with_full_headers(
    guest: tuple[Any, SerialConsole],
) -> None:
    """No SPICE port at all: each channel is a virDomainOpenGraphicsFD socket. The link
    messages leave out MINI_HEADER, so QEMU frames with 18-byte headers."""
    dom, serial = guest

    def open_channel() -> TestClient:
        fd = dom.openGraphicsFD(0, libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
        sock = socket.socket(fileno=fd)
        sock.settimeout(10)
        return TestClient(sock)

    main = open_channel()
    session_id = _link_main(main, caps=FULL_HEADER_CAPS)
    assert main.side.mini_header is False
    display = open_channel()
    assert display.link(ChannelType.DISPLAY, session_id, caps=FULL_HEADER_CAPS) is LinkError.OK
    _display_init(display, mini_header=False, serial=1)
    first = display.wait_for(lambda e: isinstance(e, Message))
    assert isinstance(first, Message) and first.type == SET_ACK and first.serial == 1
    drawn = display.wait_for(lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG)
    assert isinstance(drawn, Message) and drawn.serial is not None and drawn.serial > 1
    display.close_guarded()
    main.close()
    time.sleep(2)
    assert _running(dom)
    assert serial.run("echo ok").strip() == "ok"


@pytest.mark.vm
def test_a_relay_with_the_broker_ticket_policy_binding_and_guard(
    guest: tuple[Any, SerialConsole],
) -> None:
    """The whole layer as the plugin wires it: a view-only relay in front of QEMU.

    The client sends a ticket QEMU would refuse (128 zero bytes: measured, link result 7);
    the relay drops it and sends its own. Inputs are refused by the policy, a wrong
    connection id by the binding; the client vanishes from a display channel before
    DISPLAY_INIT and the relay's guard keeps the VM alive.
    """
    dom, serial = guest
    port = spice_port(dom)
    direct = _tcp(dom)
    assert direct.link(ChannelType.MAIN, ticket=bytes(128)) is LinkError.PERMISSION_DENIED
    direct.close()

    relay = Relay(
        lambda: socket.create_connection(("127.0.0.1", port), timeout=10),
        ChannelPolicy(view_only=True),
    )
    try:
        main = relay.connect()
        assert main.link(ChannelType.MAIN, ticket=bytes(128)) is LinkError.OK
        init = main.wait_for(lambda e: isinstance(e, MainInit))
        assert isinstance(init, MainInit)
        session_id = init.session_id
        assert relay.session_id == session_id

        inputs = relay.connect()
        assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.PERMISSION_DENIED
        inputs.close()
        stranger = relay.connect()
        assert stranger.link(ChannelType.DISPLAY, session_id + 1) is LinkError.BAD_CONNECTION_ID
        stranger.close()

        display = relay.connect()
        assert display.link(ChannelType.DISPLAY, session_id, ticket=bytes(128)) is LinkError.OK
        display.close()  # gone before DISPLAY_INIT
        deadline = time.monotonic() + GUARD_TIMEOUT + 2
        while (ChannelType.DISPLAY, "safe to close: True") not in relay.log:
            assert time.monotonic() < deadline, relay.log
            time.sleep(0.05)
        assert (ChannelType.DISPLAY, "guard sent") in relay.log
        main.close()
        time.sleep(2)
        assert _running(dom), (dom.state(), relay.log)
        assert serial.run("echo ok").strip() == "ok"
    finally:
        relay.close()
