"""The VNC session handler in process: a real broker and WebSocket client, a scripted QEMU.

The browser always sees RFB 3.8 with security None; toward QEMU the broker logs
in with None, VNC Authentication or VeNCrypt (real TLS), in RFB 3.3, 3.7 and
3.8; view-only input is dropped by the broker; what cannot be parsed ends the
session with its close code; QEMU's WebSocket port is passed through.
"""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import anyio
import pytest
import structlog
from broker_vnc._config import VNCSection
from broker_vnc.rfb import (
    RFBSecurityError,
    SecuritySucceeded,
    SecurityTypeSelected,
    VersionNegotiated,
)
from certs import make_certificates
from rfb_transcripts import V33, V37, V38, server_init
from vnckit import (
    FRAMEBUFFER_UPDATE,
    FakeQEMU,
    echo_console,
    vnc_client,
)
from vnckit import rfb_login as login
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.anyio

FBUR = struct.pack(">BBHHHH", 3, 0, 0, 0, 720, 400)
KEY_A = struct.pack(">BBxxI", 4, 1, 0x61)
POINTER = struct.pack(">BBHH", 5, 1, 10, 20)
GII = b"\xfd\x00\x00\x00"  # gii (253): a type the filter does not know


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def closed(ws: object) -> tuple[int | None, str | None]:
    # A console that closes while its VM runs ends its session within 4 s (the broker
    # waits that long for libvirt to report a stop): room for a loaded machine beyond.
    with anyio.fail_after(10), pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()  # type: ignore[attr-defined]
    return ws.close_code, ws.close_reason  # type: ignore[attr-defined]


async def until(qemu: FakeQEMU, data: bytes) -> None:
    with anyio.fail_after(5):
        while data not in qemu.received:
            await anyio.sleep(0.01)


@pytest.mark.parametrize(
    ("version", "security"),
    [(V38, 2), (V37, 2), (V33, 2), (V38, 1), (V37, 1), (V33, 1)],
    ids=["3.8-vnc", "3.7-vnc", "3.3-vnc", "3.8-none", "3.7-none", "3.3-none"],
)
async def test_the_browser_sees_none_whatever_qemu_asks(version: bytes, security: int) -> None:
    qemu = FakeQEMU(version=version, security=security)
    async with vnc_client(qemu) as ws:
        events, init, _ = await login(ws, shared=False)
        assert events[:3] == [
            VersionNegotiated((3, 8), (3, 8)),
            SecurityTypeSelected(1, (1,)),
            SecuritySucceeded(1),
        ]
        assert (init.width, init.height, init.name) == (720, 400, b"QEMU (fake)")
        await ws.send(FBUR)
        assert await ws.recv() == FRAMEBUFFER_UPDATE
        await ws.send(KEY_A + POINTER)
        await until(qemu, KEY_A + POINTER)
    assert qemu.shared == [True]  # the broker's policy, not the browser's shared=False


async def test_view_only_input_is_dropped_by_the_broker() -> None:
    qemu = FakeQEMU(security=2)
    async with vnc_client(qemu, view_only=True) as ws:
        await login(ws)
        await ws.send(KEY_A)
        await ws.send(POINTER + FBUR)  # input and a request in one message
        assert await ws.recv() == FRAMEBUFFER_UPDATE
        await ws.send(FBUR)
        assert await ws.recv() == FRAMEBUFFER_UPDATE
    assert bytes(qemu.received) == FBUR + FBUR


async def test_an_unparseable_message_ends_the_session_with_its_code() -> None:
    qemu = FakeQEMU()
    with structlog.testing.capture_logs() as logs:
        async with vnc_client(qemu) as ws:
            await login(ws)
            await ws.send(FBUR)
            assert await ws.recv() == FRAMEBUFFER_UPDATE
            await ws.send(KEY_A + GII)  # refused whole: the key does not go either
            assert await closed(ws) == (4104, "the client sent a message the broker cannot check")
    assert bytes(qemu.received) == FBUR
    ended = [e for e in logs if e["event"] == "session.ended_by_plugin"]
    assert ended and "253" in ended[0]["detail"]


async def test_qemu_refusing_the_password_tells_the_browser_why() -> None:
    qemu = FakeQEMU(security=2, password=b"other")
    async with vnc_client(qemu) as ws:
        with pytest.raises(RFBSecurityError, match="Authentication failed"):
            await login(ws)
        assert await closed(ws) == (4106, "the broker could not log in to the console")


async def test_no_password_for_a_vm_that_wants_one() -> None:
    async with vnc_client(FakeQEMU(security=2), password=None) as ws:
        with pytest.raises(RFBSecurityError, match="needs a password"):
            await login(ws)
        assert (await closed(ws))[0] == 4106


async def test_qemu_refusing_the_connection() -> None:
    async with vnc_client(FakeQEMU(refuse=b"Too many clients")) as ws:
        with pytest.raises(RFBSecurityError, match="Too many clients"):
            await login(ws)
        assert (await closed(ws))[0] == 4106


async def test_qemu_hanging_up_in_the_handshake_closes_normally() -> None:
    async with vnc_client(FakeQEMU(hang_up=True)) as ws:
        assert await ws.recv() == V38  # the broker's own version, sent at once
        assert await closed(ws) == (1000, "console closed")


async def test_qemu_breaking_the_protocol() -> None:
    async with vnc_client(FakeQEMU(version=b"XYZ 003.008\n")) as ws:
        await ws.recv()
        await ws.send(V38)
        assert await closed(ws) == (4105, "console protocol error")


async def test_the_shared_flag_is_configurable() -> None:
    qemu = FakeQEMU()
    async with vnc_client(qemu, vnc=VNCSection(shared=False)) as ws:
        await login(ws, shared=True)
    assert qemu.shared == [False]


# --- VeNCrypt ----------------------------------------------------------------------------


def _server_context(paths: dict[str, Path], *, verify_client: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths["server"], paths["server-key"])
    if verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(paths["ca"])
    return context


@pytest.mark.parametrize(
    ("kind", "server_name", "subtype"),
    [("tcp", "", 261), ("tcp", "", 260), ("fd", "", 260), ("fd", "127.0.0.1", 261)],
)
async def test_vencrypt_with_tls_verified_against_the_ca(
    tmp_path: Path, kind: str, server_name: str, subtype: int
) -> None:
    paths = make_certificates(tmp_path, client=True)
    qemu = FakeQEMU(
        security=19, subtype=subtype, tls=_server_context(paths, verify_client=True)
    )
    vnc = VNCSection(
        tls_ca=str(paths["ca"]), tls_cert=str(paths["client"]),
        tls_key=str(paths["client-key"]), tls_server_name=server_name,
    )
    with structlog.testing.capture_logs() as logs:
        async with vnc_client(qemu, kind=kind, vnc=vnc) as ws:
            events, _init, _ = await login(ws)
            assert SecurityTypeSelected(1, (1,)) in events
            await ws.send(FBUR)
            assert await ws.recv() == FRAMEBUFFER_UPDATE
    connected = next(e for e in logs if e["event"] == "vnc.connected")
    assert connected["security_type"] == 19 and connected["vencrypt_subtype"] == subtype
    assert connected["tls"] is True
    assert qemu.shared == [True] and qemu.received == FBUR


async def test_vencrypt_refuses_a_certificate_of_another_ca(tmp_path: Path) -> None:
    ours = make_certificates(tmp_path / "ours")
    theirs = make_certificates(tmp_path / "theirs")
    qemu = FakeQEMU(security=19, tls=_server_context(theirs))
    async with vnc_client(qemu, kind="tcp", vnc=VNCSection(tls_ca=str(ours["ca"]))) as ws:
        with pytest.raises(RFBSecurityError, match="certificate verify failed"):
            await login(ws)
        assert (await closed(ws))[0] == 4106


async def test_vencrypt_checks_the_name_in_tcp_mode(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, names=("qemu.example",))
    qemu = FakeQEMU(security=19, tls=_server_context(paths))
    vnc = VNCSection(tls_ca=str(paths["ca"]))
    async with vnc_client(qemu, kind="tcp", vnc=vnc) as ws:  # 127.0.0.1 is not in the certificate
        with pytest.raises(RFBSecurityError, match="certificate verify failed"):
            await login(ws)


async def test_vencrypt_is_refused_without_a_ca() -> None:
    async with vnc_client(FakeQEMU(security=19)) as ws:
        with pytest.raises(RFBSecurityError, match="VeNCrypt needs TLS configured"):
            await login(ws)


# --- websocket mode ----------------------------------------------------------------------


async def test_websocket_mode_passes_bytes_through() -> None:
    async with vnc_client(echo_console, kind="websocket") as ws:
        assert await ws.recv() == V38  # QEMU's own banner, not the broker's
        await ws.send(GII)  # nothing is parsed
        assert await ws.recv() == GII


async def test_websocket_mode_refuses_view_only_tokens() -> None:
    async with vnc_client(echo_console, kind="websocket", view_only=True) as ws:
        assert await closed(ws) == (
            4009, "view-only sessions are not available for this protocol"
        )


async def test_the_server_init_is_qemus() -> None:
    qemu = FakeQEMU(init=server_init(1024, 768, b"x"))
    async with vnc_client(qemu) as ws:
        _, init, _ = await login(ws)
    assert (init.width, init.height, init.name) == (1024, 768, b"x")
