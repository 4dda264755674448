"""RFBServer: the broker's handshake with the VNC client (noVNC)."""

from __future__ import annotations

import pytest
from broker_vnc.rfb import (
    NEED_DATA,
    ClientInit,
    DownstreamState,
    HandshakeRejected,
    RFBClient,
    RFBProtocolError,
    RFBServer,
    RFBUsageError,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    Side,
    VersionNegotiated,
)
from rfb_transcripts import (
    QEMU_PIXEL_FORMAT,
    V33,
    V37,
    V38,
    drive_client,
    drive_server,
    server_init,
    string,
    u8,
    u32,
)

INIT = ServerInit(720, 400, QEMU_PIXEL_FORMAT, b"QEMU (vm)")


def test_offers_38_and_security_none_only() -> None:
    server = RFBServer()
    assert server.data_to_send() == V38
    events, sent = drive_server(server, [V38, u8(1), u8(1)], INIT)
    assert events == [
        VersionNegotiated((3, 8), (3, 8)),
        SecurityTypeSelected(1, (1,)),
        ClientInit(shared=True),
    ]
    assert sent == u8(1) + u8(1) + u32(0) + server_init()
    assert server.state is DownstreamState.CONNECTED


def test_forwards_the_servers_init_unchanged() -> None:
    upstream = RFBClient()
    wire = server_init(1024, 768, b"QEMU (a \xc3\xa9 vm)")
    (*_, init), _ = drive_client(upstream, [V38, u8(1) + u8(1), u32(0), wire])
    assert isinstance(init, ServerInit)
    _, sent = drive_server(RFBServer(), [V38 + u8(1) + u8(0)], init)
    assert sent.endswith(wire)
    assert init.name_text == "QEMU (a é vm)"


def test_client_shared_flag_is_reported() -> None:
    events, _ = drive_server(RFBServer(), [V38, u8(1), u8(0)], INIT)
    assert events[-1] == ClientInit(shared=False)


def test_rfb_37_client_gets_no_security_result() -> None:
    events, sent = drive_server(RFBServer(), [V37, u8(1), u8(1)], INIT)
    assert events[0] == VersionNegotiated((3, 7), (3, 7))
    assert sent == V38 + u8(1) + u8(1) + server_init()


@pytest.mark.parametrize("banner", [V33, b"RFB 003.005\n", b"RFB 003.004\n"])
def test_rfb_33_client_is_told_security_none(banner: bytes) -> None:
    events, sent = drive_server(RFBServer(), [banner, u8(1)], INIT)
    assert events == [
        VersionNegotiated((3, int(banner[8:11])), (3, 3)),
        SecurityTypeSelected(1, (1,)),
        ClientInit(shared=True),
    ]
    assert sent == V38 + u32(1) + server_init()


@pytest.mark.parametrize(
    "banner",
    [b"RFB 003.006\n", b"RFB 003.009\n", b"RFB 003.889\n", b"RFB 004.000\n", b"GET / HTTP/1"],
)
def test_unsupported_client_versions(banner: bytes) -> None:
    with pytest.raises(RFBProtocolError) as caught:
        drive_server(RFBServer(), [banner])
    assert caught.value.side is Side.CLIENT


@pytest.mark.parametrize("choice", [0, 2, 19])
def test_client_must_choose_none(choice: int) -> None:
    server = RFBServer()
    with pytest.raises(RFBProtocolError, match=f"security type {choice}"):
        drive_server(server, [V38, u8(choice)])
    assert server.state is DownstreamState.FAILED


def test_pipelined_client_messages_are_kept_for_the_filter() -> None:
    server = RFBServer()
    pipelined = b"\x02\x00\x00\x01\x00\x00\x00\x00" + b"\x03\x00" + bytes(8)
    events, _ = drive_server(server, [V38 + u8(1) + u8(1) + pipelined], INIT)
    assert events[-1] == ClientInit(True)
    assert server.take_trailing_data() == pipelined
    with pytest.raises(RFBUsageError, match="filter"):
        server.receive_data(b"\x03")


def test_our_client_and_our_server_agree() -> None:
    client, server = RFBClient(), RFBServer()
    client_events = []
    while client.server_init is None:
        client.receive_data(server.data_to_send())
        while (event := client.next_event()) is not NEED_DATA:
            client_events.append(event)
        server.receive_data(client.data_to_send())
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, ClientInit):
                server.send_server_init(INIT)
    assert client_events[-2:] == [SecuritySucceeded(1), INIT]


# --- rejecting a client ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("banner", "failure"),
    [
        (V38, u8(0) + string(b"the VM refused: Authentication failed")),
        (V37, u8(0) + string(b"the VM refused: Authentication failed")),
        (V33, u32(0) + string(b"the VM refused: Authentication failed")),
    ],
)
def test_reject_before_the_clients_version(banner: bytes, failure: bytes) -> None:
    server = RFBServer()
    assert server.can_reject
    server.reject("the VM refused: Authentication failed")
    events, sent = drive_server(server, [banner])
    assert events[1] == HandshakeRejected("the VM refused: Authentication failed")
    assert sent == V38 + failure
    assert server.state is DownstreamState.REJECTED
    assert server.next_event() is NEED_DATA
    server.receive_data(b"ignored")


def test_reject_while_the_client_chooses_rfb_38() -> None:
    server = RFBServer()
    drive_server(server, [V38])
    server.reject("the VM is gone")
    assert server.data_to_send() == u32(1) + string(b"the VM is gone")
    assert server.next_event() == HandshakeRejected("the VM is gone")
    assert not server.can_reject


def test_reject_while_the_client_chooses_rfb_37_just_closes() -> None:
    server = RFBServer()
    drive_server(server, [V37])
    server.reject("the VM is gone")
    assert server.data_to_send() == b""
    assert server.next_event() == HandshakeRejected("the VM is gone")


def test_reject_after_security_is_a_usage_error() -> None:
    server = RFBServer()
    drive_server(server, [V38, u8(1)])
    assert not server.can_reject
    with pytest.raises(RFBUsageError, match="too late"):
        server.reject("x")


def test_send_server_init_only_after_client_init() -> None:
    server = RFBServer()
    with pytest.raises(RFBUsageError):
        server.send_server_init(INIT)
    with pytest.raises(RFBUsageError):
        server.take_trailing_data()


def test_client_closing_mid_handshake() -> None:
    server = RFBServer()
    with pytest.raises(RFBProtocolError, match="while awaiting the client's ClientInit") as caught:
        drive_server(server, [V38, u8(1), None])
    assert caught.value.side is Side.CLIENT
    with pytest.raises(RFBUsageError):
        server.next_event()
    with pytest.raises(RFBUsageError):
        server.receive_data(b"x")
