"""VeNCrypt toward QEMU on the real stack: QEMU's VNC server with TLS and a password.

QEMU's VNC TLS is switched on only by the global qemu.conf (``vnc_tls``), read when
libvirtd starts, and then applies to every domain started afterwards. So this test
keeps the window short and puts everything back: with a CA, a server certificate
for 127.0.0.1 and a client certificate made here (in a temporary directory), it
writes qemu.conf with ``vnc_tls = 1`` and ``vnc_tls_x509_verify = 1``, restarts
libvirtd, starts its guest, then restores qemu.conf and restarts libvirtd again, in
a ``finally``. The guest keeps its TLS-only VNC server; the broker is tested against
it afterwards. The ``qemu_tls`` marker makes it run last in a test session
(tests/conftest.py); other test sessions on the machine lose their libvirt
connection twice for a moment.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_vnc.rfb import RFBSecurityError, SecurityTypeSelected
from vnckit import make_certificates
from vncstack import CLI, GRAPHICS, RFBSocket, Served, distinct_pixels
from websockets.exceptions import ConnectionClosed

from broker.testbed import Testbed, restart_libvirtd

pytestmark = [pytest.mark.vm, pytest.mark.qemu_tls]
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("qemu-tls")
    directory.chmod(0o755)
    return make_certificates(directory, names=("127.0.0.1",), client=True)


@pytest.fixture(scope="module")
def tls_guest(testbed: Testbed, certificates: dict[str, Path]) -> Iterator[Any]:
    """A guest (tcp mode, VNC password ``secret``) started while qemu.conf had TLS on."""
    xml = testbed.guest_xml(testbed.unique_name("vnc-tls"), devices=GRAPHICS)
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "vnc", "--mode", "tcp"],
        input=xml, check=True, capture_output=True, text=True,
    ).stdout
    original = QEMU_CONF.read_bytes()
    directory = certificates["ca"].parent
    try:
        QEMU_CONF.write_bytes(
            original
            + b"\n# console-broker VNC TLS test (removed again at once)\n"
            + f'vnc_tls = 1\nvnc_tls_x509_cert_dir = "{directory}"\n'.encode()
            + b"vnc_tls_x509_verify = 1\n"
        )
        restart_libvirtd()
        testbed.reconnect()
        dom = testbed.define(enabled)
        dom.create()
    finally:
        QEMU_CONF.write_bytes(original)
        restart_libvirtd()
        testbed.reconnect()
    dom = testbed.conn.lookupByUUIDString(dom.UUIDString())
    try:
        yield dom
    finally:
        testbed.remove(dom)


def _served(directory: Path, **vnc: str) -> Served:
    """A broker with these ``[vnc]`` keys."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(f'{key} = "{value}"\n' for key, value in vnc.items())
    return Served(directory, extra_config=f"[vnc]\n{lines}")


def test_vencrypt_with_x509_and_a_client_certificate(
    tls_guest: Any, certificates: dict[str, Path], tmp_path: Path
) -> None:
    served = _served(
        tmp_path, tls_ca=str(certificates["ca"]),
        tls_cert=str(certificates["client"]), tls_key=str(certificates["client-key"]),
    )
    try:
        with served.connect(tls_guest.name()) as ws:
            rfb = RFBSocket(ws)
            init = rfb.handshake()
            assert rfb.events[1] == SecurityTypeSelected(1, (1,))  # None toward the browser
            assert (init.width, init.height) in {(720, 400), (640, 480)}
            assert distinct_pixels(rfb.screen(init)) > 1
    finally:
        served.stop()
    connected = served.log_events("vnc.connected")
    assert connected, served.log_text()[-3000:]
    # QEMU offered VeNCrypt only (vnc_tls), X509Vnc with the password: TLS, then VNC auth.
    assert connected[0]["security_type"] == 19 and connected[0]["vencrypt_subtype"] == 261
    assert connected[0]["tls"] is True
    served.assert_no_secret_logged("secret")


def test_without_the_ca_the_broker_says_why(
    tls_guest: Any, certificates: dict[str, Path], tmp_path: Path
) -> None:
    served = _served(tmp_path)
    try:
        with served.connect(tls_guest.name()) as ws:
            with pytest.raises(RFBSecurityError, match="VeNCrypt needs TLS configured"):
                RFBSocket(ws).handshake()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 4106
    finally:
        served.stop()


def test_a_certificate_from_another_ca_is_refused(
    tls_guest: Any, certificates: dict[str, Path], tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other", client=True)
    served = _served(
        tmp_path / "broker", tls_ca=str(other["ca"]),
        tls_cert=str(other["client"]), tls_key=str(other["client-key"]),
    )
    try:
        with (
            served.connect(tls_guest.name()) as ws,
            pytest.raises(RFBSecurityError, match="certificate verify failed"),
        ):
            RFBSocket(ws).handshake()
    finally:
        served.stop()
