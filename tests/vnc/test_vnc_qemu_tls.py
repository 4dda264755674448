"""VeNCrypt toward QEMU on the real stack: QEMU's VNC server with TLS and a password.

The guest is started in the short window of TLS in qemu.conf that tests/qemutls.py
opens (``vnc_tls = 1``, ``vnc_tls_x509_verify = 1``, the session's ``qemu_tls``
fixture); it keeps its TLS-only VNC server, and the broker is tested against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from broker_vnc.rfb import RFBSecurityError, SecurityTypeSelected
from certs import make_certificates
from qemutls import TLSGuests
from vncstack import RFBSocket, Served, distinct_pixels
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.vm, pytest.mark.qemu_tls]


@pytest.fixture(scope="module")
def certificates(qemu_tls: TLSGuests) -> dict[str, Path]:
    return qemu_tls.certificates


@pytest.fixture(scope="module")
def tls_guest(qemu_tls: TLSGuests) -> Any:
    """A guest (tcp mode, VNC password ``secret``) started while qemu.conf had TLS on."""
    return qemu_tls.vnc


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
