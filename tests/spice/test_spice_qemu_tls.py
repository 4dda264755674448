"""SPICE over TLS on the real stack: QEMU's SPICE server listening for TLS only.

The guest is provisioned with ``console-broker xml enable --consoles spice --mode tcp
--spice-tls`` (every channel secure) and started in the short window of TLS in qemu.conf
that tests/qemutls.py opens (``spice_tls = 1``, the session's ``qemu_tls`` fixture): its
live graphics has a ``tlsPort`` and no plain port. The broker verifies QEMU's certificate
against ``spice.tls_ca``. For native clients the broker has TLS of its own (``[tls]``,
certificates from another CA): remote-viewer and the test client do TLS inside their
CONNECT tunnels with only what the ``.vv`` file says (``tls-port``, ``ca``,
``host-subject``), so both legs are encrypted.
"""

from __future__ import annotations

import configparser
import ssl
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import pytest
from certs import make_certificates
from qemutls import TLSGuests
from spicebroker import (
    Broker,
    RemoteViewer,
    close_code,
    connect_client,
    link_session,
    ws_client,
)
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.vm, pytest.mark.qemu_tls]


@pytest.fixture(scope="module")
def guest(qemu_tls: TLSGuests) -> Any:
    graphics = ElementTree.fromstring(qemu_tls.spice.XMLDesc(0)).find(
        "devices/graphics[@type='spice']"
    )
    assert graphics is not None
    assert int(graphics.get("tlsPort", "-1")) > 0, ElementTree.tostring(graphics)
    assert graphics.get("defaultMode") == "secure"
    return qemu_tls.spice


def _broker(directory: Path, spice: str = "", **kwargs: Any) -> Broker:
    directory.mkdir(parents=True, exist_ok=True)
    return Broker(directory, extra=f"[spice]\n{spice}", **kwargs)


def test_channels_link_over_tls_to_qemu(
    guest: Any, qemu_tls: TLSGuests, tmp_path: Path
) -> None:
    broker = _broker(tmp_path, f'tls_ca = "{qemu_tls.certificates["ca"]}"\n')
    try:
        url = broker.token(guest.name())["websocket"]
        link_session(lambda: ws_client(url)).close()
    finally:
        broker.stop()
    opened = broker.events("session.opened")
    assert len(opened) == 3 and {e["endpoint_kind"] for e in opened} == {"tls"}, opened
    linked = {e["channel"] for e in broker.events("spice.channel_linked")}
    assert linked == {"main", "display", "inputs"}
    assert guest.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    broker.assert_no_token_logged()


def test_without_the_ca_the_broker_says_what_to_set(guest: Any, tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    try:
        url = broker.token(guest.name())["websocket"]
        with pytest.raises(InvalidStatus) as refused:
            ws_client(url)
        assert refused.value.response.status_code == 502  # console_unreachable
    finally:
        broker.stop()
    [event] = broker.events("request.refused")
    assert "listens for TLS only" in event["detail"] and "spice.tls_ca" in event["detail"]


def test_a_certificate_from_another_ca_is_refused(guest: Any, tmp_path: Path) -> None:
    other = make_certificates(tmp_path / "other")
    broker = _broker(tmp_path / "broker", f'tls_ca = "{other["ca"]}"\n')
    try:
        main = ws_client(broker.token(guest.name())["websocket"])
        assert close_code(main, timeout=10) == 4106  # console_auth_failed
    finally:
        broker.stop()
    ended = broker.events("request.refused")
    assert any("certificate verify failed" in e.get("detail", "") for e in ended), ended
    assert guest.state()[0] == libvirt.VIR_DOMAIN_RUNNING


@pytest.fixture(scope="module")
def tls_broker(
    qemu_tls: TLSGuests, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """A broker with TLS of its own (another CA than QEMU's) and a CONNECT listener."""
    directory = tmp_path_factory.mktemp("spice-tls-broker")
    own = make_certificates(directory / "own", names=("broker.example",))
    broker = _broker(directory, f'tls_ca = "{qemu_tls.certificates["ca"]}"\n', tls=own)
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


def test_native_channels_link_with_tls_on_both_legs(tls_broker: Broker, guest: Any) -> None:
    doc = tls_broker.token(guest.name())
    section = configparser.ConfigParser(interpolation=None)
    section.read_string(doc["vv"])
    vv = section["virt-viewer"]
    assert vv["tls-port"] == "443" and "port" not in vv and vv["host-subject"] == "CN=server"
    assert doc["file"].startswith("https://")
    channels = link_session(lambda: connect_client(doc["vv"]))
    # a client that trusts another CA does not get through (while the session lives, the
    # tunnel is admitted and its TLS handshake fails)
    stranger = make_certificates(Path(tls_broker.directory) / "stranger")["ca"]
    other = doc["vv"].replace(
        vv["ca"], stranger.read_text().strip().replace("\n", "\\n") + "\\n"
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        connect_client(other)
    channels.close()


@pytest.mark.usefixtures("remote_viewer")
def test_remote_viewer_over_tls_shows_the_guests_screen(
    tls_broker: Broker, guest: Any, tmp_path: Path
) -> None:
    failed_before = len(tls_broker.events("connect.tls_failed"))
    vv = tmp_path / "console.vv"
    tls_broker.token(guest.name(), "--vv", str(vv))
    with RemoteViewer(vv, tmp_path) as viewer:
        viewer.wait_for_the_guests_screen()
    uuid = guest.UUIDString()
    opened = [e for e in tls_broker.events("session.opened") if e.get("domain") == uuid]
    assert opened and {e["endpoint_kind"] for e in opened} == {"tls"}
    linked = {e["channel"] for e in tls_broker.events("spice.channel_linked")
              if e.get("domain") == uuid}
    assert {"main", "display", "inputs", "cursor"} <= linked, linked
    assert len(tls_broker.events("connect.tls_failed")) == failed_before
    assert guest.state()[0] == libvirt.VIR_DOMAIN_RUNNING
