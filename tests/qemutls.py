"""Guests whose VNC and SPICE servers use TLS: QEMU's TLS is switched on only by the
global qemu.conf (``vnc_tls``, ``spice_tls``), read when libvirtd starts, and then applies
to every domain started afterwards.

:func:`start_tls_guests` keeps that window short and puts everything back: with a CA, a
server certificate for 127.0.0.1 and a client certificate made here, it appends to
qemu.conf ``vnc_tls = 1``, ``vnc_tls_x509_verify = 1`` and ``spice_tls = 1`` (one
certificate directory for both), restarts libvirtd, starts the guests, then restores
qemu.conf and restarts libvirtd again, in a ``finally``. The guests keep their TLS-only
servers. Tests using it carry the ``qemu_tls`` marker, which makes them run last in a
test session (tests/conftest.py); other test sessions on the machine lose their libvirt
connection twice for a moment.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import attrs
from console_broker_testbed import Testbed, restart_libvirtd
from servedbroker import CLI

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
#: The VNC guest's devices: a password (QEMU then offers VeNCrypt X509Vnc).
VNC_DEVICES = "<graphics type='vnc' passwd='secret'/>\n    <video><model type='vga'/></video>\n"


@attrs.frozen
class TLSGuests:
    """The guests started while qemu.conf had TLS on, and the certificates QEMU uses."""

    certificates: dict[str, Path]
    #: VNC in tcp mode with the password ``secret``: VeNCrypt with X509, client certificate
    #: required.
    vnc: Any
    #: SPICE in tcp mode provisioned with ``--spice-tls``: every channel secure, on the
    #: ``tlsPort`` only.
    spice: Any


def _enabled(testbed: Testbed, label: str, devices: str, *enable: str) -> str:
    xml = testbed.guest_xml(testbed.unique_name(label), devices=devices)
    return subprocess.run(
        [*CLI, "xml", "enable", *enable], input=xml, check=True, capture_output=True,
        text=True,
    ).stdout


def start_tls_guests(testbed: Testbed, certificates: dict[str, Path]) -> TLSGuests:
    """Start the guests in one short window of TLS in qemu.conf (see the module)."""
    vnc_xml = _enabled(testbed, "vnc-tls", VNC_DEVICES, "--consoles", "vnc", "--mode", "tcp")
    spice_xml = _enabled(
        testbed, "spice-tls", "", "--consoles", "spice", "--mode", "tcp", "--spice-tls"
    )
    original = QEMU_CONF.read_bytes()
    directory = certificates["ca"].parent
    started = []
    try:
        QEMU_CONF.write_bytes(
            original
            + b"\n# console-broker TLS tests (removed again at once)\n"
            + f'vnc_tls = 1\nvnc_tls_x509_cert_dir = "{directory}"\n'.encode()
            + b"vnc_tls_x509_verify = 1\n"
            + f'spice_tls = 1\nspice_tls_x509_cert_dir = "{directory}"\n'.encode()
        )
        restart_libvirtd()
        testbed.reconnect()
        for xml in (vnc_xml, spice_xml):
            dom = testbed.define(xml)
            dom.create()
            started.append(dom.UUIDString())
    finally:
        QEMU_CONF.write_bytes(original)
        restart_libvirtd()
        testbed.reconnect()
    vnc, spice = (testbed.conn.lookupByUUIDString(uuid) for uuid in started)
    return TLSGuests(certificates, vnc, spice)
