"""``console-broker doctor``'s SPICE checks (``Spice.doctor``): what only this plugin knows.

* spice-html5, the page's browser client, where the page reads it
  (:data:`broker_spice._page.SPICE_HTML5_FILE` in the assets directory);
* the broker's TLS to QEMU's SPICE ``tlsPort`` (``Spice.console_tls``, from
  ``spice.tls_ca``, ``spice.tls_cert``, ``spice.tls_key``) loads;
* TLS to QEMU's SPICE servers is set on both sides or neither: libvirt's qemu.conf
  (``spice_tls``, ``spice_tls_x509_cert_dir``; qemu.conf(5)) against the broker's TLS to
  consoles (docs/spice.md, TLS to QEMU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api import Finding, PluginError, QemuConf, assets_dir

if TYPE_CHECKING:
    from broker.api import ConsoleTLS, PluginContext, Protocol

#: Where libvirt's QEMU driver takes TLS certificates from when qemu.conf names no
#: directory (``default_tls_x509_cert_dir``'s default, qemu.conf(5)).
DEFAULT_CERT_DIR = "/etc/pki/qemu"


def spice_html5(configured_assets: str) -> Finding:
    """spice-html5 in the assets directory (``http.assets_dir``)."""
    from ._page import SPICE_HTML5, SPICE_HTML5_FILE

    root = assets_dir(configured_assets)
    where = root / SPICE_HTML5
    if (where / SPICE_HTML5_FILE).is_file():
        return Finding("ok", "spice-html5", f"found in {where}")
    return Finding(
        "fail", "spice-html5", f"{where / SPICE_HTML5_FILE} missing: the SPICE page answers 503",
        f"install the browser clients under {root} ('npm ci' in a source tree), or set "
        "http.assets_dir to the node_modules directory holding @spice-project/spice-html5")


def qemu_tls(tls: ConsoleTLS | None, qemu: QemuConf) -> Finding:
    """qemu.conf's TLS for SPICE against the broker's TLS to its consoles (*tls*)."""
    if qemu.path is None:
        return Finding("skip", "qemu.conf", "libvirt.uri is not a QEMU driver of this host")
    if qemu.error:
        return Finding("skip", "qemu.conf", f"{qemu.path}: cannot read it: {qemu.error}")
    certs = qemu.get("spice_tls_x509_cert_dir", qemu.get("default_tls_x509_cert_dir",
                                                         DEFAULT_CERT_DIR))
    if qemu.enabled("spice_tls"):
        if tls is None:
            return Finding(
                "warn", "qemu.conf", f"{qemu.path}: spice_tls = 1 and spice.tls_ca is empty: "
                "the broker uses the plain port, and refuses domains whose SPICE is TLS only "
                "(--spice-tls)", f"set spice.tls_ca to {certs}/ca-cert.pem (docs/spice.md, "
                "TLS to QEMU)")
        return Finding("ok", "qemu.conf", f"{qemu.path}: spice_tls = 1, and the broker has "
                                          "TLS to the SPICE tlsPort (spice.tls_ca)")
    if tls is not None:
        return Finding(
            "warn", "qemu.conf", f"spice.tls_ca is set but {qemu.path} does not set "
            "spice_tls = 1: SPICE graphics get no TLS port", "set spice_tls = 1 and "
            "spice_tls_x509_cert_dir in qemu.conf and restart libvirtd, or empty spice.tls_ca")
    return Finding("ok", "qemu.conf", f"{qemu.path}: spice_tls off, as the broker expects "
                                      "(spice.tls_ca empty)")


def findings(
    protocol: Protocol, context: PluginContext, qemu: QemuConf | None = None
) -> list[Finding]:
    """Every SPICE check of *protocol* (the plugin's own object); *qemu*: the qemu.conf
    read (default: the one ``libvirt.uri`` reads on this host)."""
    config = context.config
    qemu = qemu if qemu is not None else QemuConf.read(config.libvirt.uri)
    found = [spice_html5(config.http.assets_dir)]
    try:
        tls = protocol.console_tls(context)
    except PluginError as exc:
        found.append(Finding("fail", "TLS to QEMU", str(exc), "fix the files or the keys: "
                             "console-broker serve refuses to start with them"))
        return found
    if tls is not None:
        found.append(Finding("ok", "TLS to QEMU", "spice.tls_ca and its files load"))
    found.append(qemu_tls(tls, qemu))
    return found
