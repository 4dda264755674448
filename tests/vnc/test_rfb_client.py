"""RFBClient: the broker's handshake with the VNC server, path by path."""

from __future__ import annotations

import pytest
from broker_vnc.rfb import (
    NEED_DATA,
    RFBClient,
    RFBProtocolError,
    RFBSecurityError,
    RFBUsageError,
    SecuritySucceeded,
    SecurityTypeSelected,
    ServerInit,
    Side,
    StartTLS,
    UpstreamState,
    VersionNegotiated,
)
from rfb_reference_des import reference_vnc_response
from rfb_transcripts import (
    CHALLENGE,
    QEMU_PIXEL_FORMAT,
    V33,
    V37,
    V38,
    bytewise,
    drive_client,
    server_init,
    string,
    u8,
    u32,
)

INIT = ServerInit(720, 400, QEMU_PIXEL_FORMAT, b"QEMU (vm)")
RESPONSE = reference_vnc_response(b"secret", CHALLENGE)


def test_rfb_38_security_none() -> None:
    client = RFBClient()
    events, sent = drive_client(client, [V38, u8(1) + u8(1), u32(0), server_init()])
    assert events == [
        VersionNegotiated((3, 8), (3, 8)),
        SecurityTypeSelected(1, (1,)),
        SecuritySucceeded(1),
        INIT,
    ]
    assert sent == V38 + u8(1) + u8(1)  # version, security type None, ClientInit shared
    assert client.state is UpstreamState.CONNECTED
    assert client.server_init == INIT and client.version == (3, 8)


def test_rfb_37_security_none_has_no_security_result() -> None:
    events, sent = drive_client(RFBClient(), [V37, u8(1) + u8(1), server_init()])
    assert events[:3] == [
        VersionNegotiated((3, 7), (3, 7)),
        SecurityTypeSelected(1, (1,)),
        SecuritySucceeded(1),
    ]
    assert events[3] == INIT
    assert sent == V37 + u8(1) + u8(1)


def test_rfb_33_server_chosen_none() -> None:
    events, sent = drive_client(RFBClient(shared=False), [V33, u32(1), server_init()])
    assert events == [
        VersionNegotiated((3, 3), (3, 3)),
        SecurityTypeSelected(1, (1,)),
        SecuritySucceeded(1),
        INIT,
    ]
    assert sent == V33 + u8(0)  # no security type byte in 3.3; ClientInit not shared


def test_rfb_33_server_chosen_vnc_auth() -> None:
    client = RFBClient(password="secret")
    events, sent = drive_client(client, [V33, u32(2), CHALLENGE, u32(0), server_init()])
    assert events == [
        VersionNegotiated((3, 3), (3, 3)),
        SecurityTypeSelected(2, (2,)),
        SecuritySucceeded(2),
        INIT,
    ]
    assert sent == V33 + RESPONSE + u8(1)


def test_rfb_38_vnc_auth() -> None:
    events, sent = drive_client(
        RFBClient(password=b"secret"), [V38, u8(1) + u8(2), CHALLENGE, u32(0), server_init()]
    )
    assert events[1:3] == [SecurityTypeSelected(2, (2,)), SecuritySucceeded(2)]
    assert sent == V38 + u8(2) + RESPONSE + u8(1)


def test_rfb_37_vnc_auth_failure_has_no_reason() -> None:
    with pytest.raises(RFBSecurityError, match="refused the authentication") as caught:
        drive_client(RFBClient(password=b"wrong"), [V37, u8(1) + u8(2), CHALLENGE, u32(1)])
    assert caught.value.side is Side.SERVER


def test_rfb_38_vnc_auth_failure_with_reason() -> None:
    client = RFBClient(password=b"wrong")
    with pytest.raises(RFBSecurityError) as caught:
        drive_client(
            client, [V38, u8(1) + u8(2), CHALLENGE, u32(1) + string(b"Authentication failed")]
        )
    assert "Authentication failed" in caught.value.reason
    assert caught.value.side is Side.SERVER
    assert client.state is UpstreamState.FAILED
    with pytest.raises(RFBUsageError):
        client.next_event()


def test_rfb_38_failure_reason_arrives_in_pieces() -> None:
    with pytest.raises(RFBSecurityError, match="too many attempts"):
        drive_client(
            RFBClient(password=b"x"),
            bytewise(V38 + u8(1) + u8(2) + CHALLENGE + u32(2) + string(b"too many attempts")),
        )


@pytest.mark.parametrize("version", [V37, V38])
def test_connection_failed_with_reason(version: bytes) -> None:
    with pytest.raises(RFBSecurityError, match="refused the connection: no way"):
        drive_client(RFBClient(), [version, u8(0) + string(b"no way")])


def test_rfb_33_connection_failed_with_reason() -> None:
    with pytest.raises(RFBSecurityError, match="refused the connection: too many"):
        drive_client(RFBClient(), [V33, u32(0) + string(b"too many")])


def test_rfb_33_unknown_security_type_is_a_protocol_error() -> None:
    with pytest.raises(RFBProtocolError, match="only 0, 1, 2") as caught:
        drive_client(RFBClient(), [V33, u32(19)])
    assert not isinstance(caught.value, RFBSecurityError)


def test_rfb_38_none_refused_by_security_result() -> None:
    with pytest.raises(RFBSecurityError, match="busy"):
        drive_client(RFBClient(), [V38, u8(1) + u8(1), u32(1) + string(b"busy")])


# --- VeNCrypt ------------------------------------------------------------------

VENCRYPT_PATHS = [
    # subtype, anonymous, VNC auth inside TLS
    (257, True, False),
    (258, True, True),
    (260, False, False),
    (261, False, True),
]


@pytest.mark.parametrize(("subtype", "anonymous", "vnc_auth"), VENCRYPT_PATHS)
def test_vencrypt_02_with_each_subtype(subtype: int, anonymous: bool, vnc_auth: bool) -> None:
    client = RFBClient(password=b"secret", tls=True, vencrypt_subtypes=[subtype])
    to_client = [V38, u8(1) + u8(19), u8(0) + u8(2), u8(0), u8(1) + u32(subtype), u8(1)]
    events, sent = drive_client(client, to_client)
    assert events == [
        VersionNegotiated((3, 8), (3, 8)),
        SecurityTypeSelected(19, (19,)),
        StartTLS(subtype, anonymous),
    ]
    assert sent == V38 + u8(19) + u8(0) + u8(2) + u32(subtype)
    # drive_client called tls_established(); the rest flows inside TLS.
    inside = [CHALLENGE, u32(0), server_init()] if vnc_auth else [u32(0), server_init()]
    events, sent = drive_client(client, inside)
    assert events == [SecuritySucceeded(19, subtype), INIT]
    assert sent == (RESPONSE if vnc_auth else b"") + u8(1)


def test_vencrypt_prefers_x509_and_skips_vnc_subtypes_without_password() -> None:
    offered = u8(4) + u32(257) + u32(258) + u32(260) + u32(261)
    head = [V38, u8(1) + u8(19), u8(0) + u8(2), u8(0), offered, u8(1)]
    events, _ = drive_client(RFBClient(password=b"pw", tls=True), head)
    assert events[-1] == StartTLS(261, False)
    events, _ = drive_client(RFBClient(tls=True), head)
    assert events[-1] == StartTLS(260, False)


def test_vencrypt_never_picks_anonymous_tls_by_default() -> None:
    head = [V38, u8(1) + u8(19), u8(0) + u8(2), u8(0), u8(2) + u32(257) + u32(258)]
    with pytest.raises(RFBSecurityError, match=r"subtypes \[257, 258\]"):
        drive_client(RFBClient(password=b"pw", tls=True), head)


def test_vencrypt_version_below_02_is_refused() -> None:
    with pytest.raises(RFBSecurityError, match=r"VeNCrypt 0\.1"):
        drive_client(RFBClient(tls=True), [V38, u8(1) + u8(19), u8(0) + u8(1)])


def test_vencrypt_newer_version_is_answered_with_02() -> None:
    client = RFBClient(tls=True)
    _, sent = drive_client(client, [V38, u8(1) + u8(19), u8(0) + u8(3)])
    assert sent.endswith(u8(0) + u8(2))
    assert client.state is UpstreamState.VENCRYPT_VERSION_ACK


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        ([u8(1)], "refused VeNCrypt version 0.2"),
        ([u8(0), u8(0)], "no VeNCrypt subtype"),
        ([u8(0), u8(1) + u32(260), u8(0)], "refused VeNCrypt subtype 260"),
    ],
)
def test_vencrypt_refusals(tail: list[bytes], match: str) -> None:
    with pytest.raises(RFBSecurityError, match=match):
        drive_client(RFBClient(tls=True), [V38, u8(1) + u8(19), u8(0) + u8(2), *tail])


def test_server_data_before_tls_is_a_protocol_error() -> None:
    head = V38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0) + u8(1) + u32(260) + u8(1)
    with pytest.raises(RFBProtocolError, match="before the TLS handshake"):
        drive_client(RFBClient(tls=True), [head + b"\x16\x03"])


def test_tls_handshake_state_guards() -> None:
    client = RFBClient(tls=True)
    with pytest.raises(RFBUsageError):
        client.tls_established()
    client.receive_data(V38 + u8(1) + u8(19) + u8(0) + u8(2) + u8(0) + u8(1) + u32(260) + u8(1))
    events = [client.next_event() for _ in range(3)]
    assert events[-1] == StartTLS(260, False)
    assert client.next_event() is NEED_DATA
    with pytest.raises(RFBUsageError, match="tls_established"):
        client.receive_data(u32(0))
    client.tls_established()
    client.receive_data(u32(0))
    assert client.next_event() == SecuritySucceeded(19, 260)


# --- the choice of security type ---------------------------------------------------


@pytest.mark.parametrize(
    ("password", "tls", "chosen"),
    [(b"pw", True, 19), (b"pw", False, 2), (None, False, 1), (None, True, 19)],
)
def test_security_type_preference(password: bytes | None, tls: bool, chosen: int) -> None:
    client = RFBClient(password=password, tls=tls)
    events, sent = drive_client(client, [V38, u8(3) + u8(1) + u8(2) + u8(19)])
    assert events[1] == SecurityTypeSelected(chosen, (1, 2, 19))
    assert sent == V38 + u8(chosen)


@pytest.mark.parametrize(
    ("offered", "client", "match"),
    [
        (u8(1) + u8(2), RFBClient(), "VNC authentication needs a password"),
        (u8(1) + u8(19), RFBClient(password=b"x"), "VeNCrypt needs TLS"),
        (u8(2) + u8(5) + u8(16), RFBClient(password=b"x"), r"\[5, 16\]"),
    ],
)
def test_no_usable_security_type(offered: bytes, client: RFBClient, match: str) -> None:
    with pytest.raises(RFBSecurityError, match=match):
        drive_client(client, [V38, offered])


def test_rfb_33_vnc_auth_without_password() -> None:
    with pytest.raises(RFBSecurityError, match="no password"):
        drive_client(RFBClient(), [V33, u32(2)])


# --- versions, bounds, end of stream -----------------------------------------------


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        (b"RFB 003.889\n", (3, 8)),  # Apple's
        (b"RFB 004.001\n", (3, 8)),  # RealVNC 4 speaks 3.8 to older clients
        (b"RFB 003.005\n", (3, 3)),
        (b"RFB 003.007\n", (3, 7)),
    ],
)
def test_server_versions(banner: bytes, version: tuple[int, int]) -> None:
    events, sent = drive_client(RFBClient(), [banner])
    assert events == [VersionNegotiated((int(banner[4:7]), int(banner[8:11])), version)]
    assert sent == b"RFB 003.%03d\n" % version[1]


@pytest.mark.parametrize(
    "banner",
    [b"RFB 002.002\n", b"RFB 003.002\n", b"RFB 03.008\n\n", b"SSH-2.0-x\r\n\n", b"RFB 003.008\r"],
)
def test_bad_versions(banner: bytes) -> None:
    with pytest.raises(RFBProtocolError) as caught:
        drive_client(RFBClient(), [banner])
    assert caught.value.side is Side.SERVER


def test_long_server_name_fails_as_soon_as_its_length_arrives() -> None:
    client = RFBClient(max_name_length=64)
    head = V38 + u8(1) + u8(1) + u32(0)
    header = server_init(name=b"x" * 65)[:24]
    with pytest.raises(RFBProtocolError, match="name of 65 bytes"):
        drive_client(client, [head, header])


def test_name_at_the_bound_is_fine() -> None:
    events, _ = drive_client(
        RFBClient(max_name_length=64), [V38, u8(1) + u8(1), u32(0), server_init(name=b"n" * 64)]
    )
    assert isinstance(events[-1], ServerInit) and events[-1].name == b"n" * 64


def test_huge_reason_is_a_protocol_error() -> None:
    with pytest.raises(RFBProtocolError, match="reason of 4097 bytes"):
        drive_client(RFBClient(), [V38, u8(0) + u32(4097)])


def test_end_of_stream_mid_handshake() -> None:
    client = RFBClient(password=b"x")
    with pytest.raises(RFBProtocolError, match="while awaiting the VNC authentication") as caught:
        drive_client(client, [V38, u8(1) + u8(2), CHALLENGE[:5], None])
    assert caught.value.side is Side.SERVER


def test_trailing_server_data_is_handed_back() -> None:
    client = RFBClient()
    update = b"\x00\x00\x00\x01"
    drive_client(client, [V38 + u8(1) + u8(1) + u32(0) + server_init() + update])
    assert client.take_trailing_data() == update
    with pytest.raises(RFBUsageError, match="forward the server's data raw"):
        client.receive_data(b"more")


def test_usage_errors() -> None:
    with pytest.raises(RFBUsageError):
        RFBClient(vencrypt_subtypes=[262])
    client = RFBClient()
    with pytest.raises(RFBUsageError):
        client.take_trailing_data()
    client.receive_data(b"")  # no data, not the end
    client.receive_data(None)
    with pytest.raises(RFBUsageError, match="after the end"):
        client.receive_data(b"x")


def test_password_is_utf8_and_only_8_bytes_count() -> None:
    head = [V38, u8(1) + u8(2), CHALLENGE]
    _, long = drive_client(RFBClient(password="secretXYZ-and-more"), head)
    _, short = drive_client(RFBClient(password=b"secretXY"), head)
    assert long == short
    _, text = drive_client(RFBClient(password="pässwörd"), head)
    _, raw = drive_client(RFBClient(password="pässwörd".encode()), head)
    assert text == raw


def test_password_stays_out_of_repr_and_events() -> None:
    client = RFBClient(password=b"hunter22")
    events, _ = drive_client(client, [V38, u8(1) + u8(2), CHALLENGE, u32(0), server_init()])
    assert "hunter22" not in repr(client) + repr(events)
