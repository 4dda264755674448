"""``console-broker doctor``'s VNC checks (``VNC.doctor``): what only this plugin knows.

* noVNC, the page's and the player's browser client, where they read it
  (:data:`broker_vnc._page.NOVNC_FILE` in the assets directory);
* the broker's TLS files to QEMU (``vnc.tls_ca``, ``vnc.tls_cert``, ``vnc.tls_key``)
  load, as the session handler loads them;
* TLS to QEMU's VNC servers is set on both sides or neither: libvirt's qemu.conf
  (``vnc_tls``, ``vnc_tls_x509_verify``, ``vnc_tls_x509_cert_dir``; qemu.conf(5)) against
  ``vnc.tls_ca`` and ``vnc.tls_cert`` (docs/vnc.md, VeNCrypt).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from broker.api import Finding, QemuConf, assets_dir

if TYPE_CHECKING:
    from broker.api import PluginContext

    from ._config import VNCSection

#: Where libvirt's QEMU driver takes TLS certificates from when qemu.conf names no
#: directory (``default_tls_x509_cert_dir``'s default, qemu.conf(5)).
DEFAULT_CERT_DIR = "/etc/pki/qemu"


def novnc(configured_assets: str) -> Finding:
    """noVNC in the assets directory (``http.assets_dir``)."""
    from ._page import NOVNC, NOVNC_FILE

    root = assets_dir(configured_assets)
    where = root / NOVNC
    if (where / NOVNC_FILE).is_file():
        return Finding("ok", "noVNC", f"found in {where}")
    return Finding(
        "fail", "noVNC", f"{where / NOVNC_FILE} missing: the VNC page and player answer 503",
        f"install the browser clients under {root} ('npm ci' in a source tree), or set "
        "http.assets_dir to the node_modules directory holding @novnc/novnc")


def tls_files(section: VNCSection) -> Finding | None:
    """The TLS files to QEMU load (None without ``vnc.tls_ca``)."""
    from ._session import VNCSettings

    if not section.tls_ca:
        return None
    try:
        VNCSettings.from_config(section)
    except (OSError, ssl.SSLError) as exc:
        return Finding("fail", "TLS to QEMU", f"vnc.tls_ca, vnc.tls_cert, vnc.tls_key: cannot "
                       f"load them: {exc}", "fix the files or the keys: console-broker serve "
                       "refuses to start with them")
    return Finding("ok", "TLS to QEMU", f"vnc.tls_ca {section.tls_ca} loads")


def qemu_tls(section: VNCSection, qemu: QemuConf) -> Finding:
    """qemu.conf's TLS for VNC against the broker's."""
    if qemu.path is None:
        return Finding("skip", "qemu.conf", "libvirt.uri is not a QEMU driver of this host")
    if qemu.error:
        return Finding("skip", "qemu.conf", f"{qemu.path}: cannot read it: {qemu.error}")
    certs = qemu.get("vnc_tls_x509_cert_dir", qemu.get("default_tls_x509_cert_dir",
                                                       DEFAULT_CERT_DIR))
    verify = qemu.enabled("vnc_tls_x509_verify") or (
        "vnc_tls_x509_verify" not in qemu.settings and qemu.enabled("default_tls_x509_verify"))
    if qemu.enabled("vnc_tls"):
        if not section.tls_ca:
            return Finding(
                "fail", "qemu.conf", f"{qemu.path}: vnc_tls = 1, so QEMU's VNC servers want "
                "VeNCrypt, and vnc.tls_ca is empty: VNC sessions fail (console_auth_failed)",
                f"set vnc.tls_ca to {certs}/ca-cert.pem (docs/vnc.md, VeNCrypt)")
        if verify and not section.tls_cert:
            return Finding(
                "fail", "qemu.conf", f"{qemu.path}: vnc_tls_x509_verify = 1, so QEMU wants a "
                "client certificate, and vnc.tls_cert is empty: VNC sessions fail",
                "set vnc.tls_cert and vnc.tls_key to a certificate the CA of "
                f"{certs} signed (docs/vnc.md, VeNCrypt)")
        return Finding("ok", "qemu.conf", f"{qemu.path}: vnc_tls = 1, and the broker has "
                                          "TLS to QEMU's VNC servers (vnc.tls_ca)")
    if section.tls_ca:
        return Finding(
            "warn", "qemu.conf", f"vnc.tls_ca is set but {qemu.path} does not set vnc_tls = 1: "
            "QEMU's VNC servers speak without TLS", "set vnc_tls = 1 and vnc_tls_x509_cert_dir "
            "in qemu.conf and restart libvirtd, or empty vnc.tls_ca")
    return Finding("ok", "qemu.conf", f"{qemu.path}: vnc_tls off, as the broker expects "
                                      "(vnc.tls_ca empty)")


def findings(context: PluginContext, qemu: QemuConf | None = None) -> list[Finding]:
    """Every VNC check; *qemu*: the qemu.conf read (default: the one ``libvirt.uri``
    reads on this host)."""
    from ._config import TABLE

    config = context.config
    section = config.table(TABLE)
    qemu = qemu if qemu is not None else QemuConf.read(config.libvirt.uri)
    files = tls_files(section)
    return [novnc(config.http.assets_dir), *([files] if files else []), qemu_tls(section, qemu)]
