"""The VNC plugin's checks for ``console-broker doctor`` (broker_vnc._doctor, through
``VNC.doctor``): noVNC where the page reads it, the TLS files to QEMU, and qemu.conf's
``vnc_tls`` against ``vnc.tls_ca`` (a qemu.conf written by the test)."""

from __future__ import annotations

from pathlib import Path

import broker_vnc
import pytest
from broker_vnc import _doctor
from certs import make_certificates

from broker.api import Finding, PluginContext, QemuConf, load_config
from broker.plugins import PluginManager

NODE_MODULES = Path(__file__).resolve().parents[2] / "node_modules"


def context(tmp_path: Path, toml: str = "") -> PluginContext:
    path = tmp_path / "broker.toml"
    path.write_text(f'[http]\nassets_dir = "{NODE_MODULES}"\n{toml}')
    return PluginContext("vnc", load_config(path, PluginManager().config_tables))


def qemu_conf(tmp_path: Path, text: str) -> QemuConf:
    path = tmp_path / "qemu.conf"
    path.write_text(text)
    return QemuConf.read("qemu:///system", path)


def test_the_protocol_reports_its_checks(tmp_path: Path) -> None:
    """Through the protocol object, as the core calls it: with a remote libvirt,
    qemu.conf is not this host's to check."""
    found = list(broker_vnc.PROTOCOL.doctor(
        context(tmp_path, '[libvirt]\nuri = "qemu+ssh://hv1/system"\n')))
    assert found == [
        Finding("ok", "noVNC", f"found in {NODE_MODULES / '@novnc/novnc'}"),
        Finding("skip", "qemu.conf", "libvirt.uri is not a QEMU driver of this host"),
    ]


def test_novnc_missing_fails_with_where_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    path = tmp_path / "broker.toml"
    path.write_text('[http]\nassets_dir = "empty"\n')
    ctx = PluginContext("vnc", load_config(path, PluginManager().config_tables))
    finding = _doctor.findings(ctx, qemu_conf(tmp_path, ""))[0]
    assert finding.status == "fail" and finding.title == "noVNC"
    assert finding.detail == (f"{empty / '@novnc/novnc/core/rfb.js'} missing: the VNC page "
                              "and player answer 503")
    assert finding.fix.startswith(f"install the browser clients under {empty}")
    assert "@novnc/novnc" in finding.fix


def test_the_page_and_the_check_look_for_the_same_file(tmp_path: Path) -> None:
    """The check is no second list: a tree holding only NOVNC_FILE passes it, and the
    page serves its console then (200), not the 503 page."""
    from broker_vnc._page import NOVNC, NOVNC_FILE, page

    (tmp_path / NOVNC / NOVNC_FILE).parent.mkdir(parents=True)
    (tmp_path / NOVNC / NOVNC_FILE).write_text("")
    assert _doctor.novnc(str(tmp_path)).status == "ok"
    served = page("", str(tmp_path))
    assert served is not None and served.status == 200


def test_qemu_conf_without_tls_on_either_side_is_ok(tmp_path: Path) -> None:
    found = _doctor.findings(context(tmp_path), qemu_conf(tmp_path, '# vnc_tls = 1\n'))
    assert found[-1] == Finding("ok", "qemu.conf", f"{tmp_path / 'qemu.conf'}: vnc_tls off, as "
                                                   "the broker expects (vnc.tls_ca empty)")


def test_vnc_tls_in_qemu_conf_needs_the_brokers_ca(tmp_path: Path) -> None:
    conf = qemu_conf(tmp_path, 'vnc_tls = 1\nvnc_tls_x509_cert_dir = "/etc/pki/vnc"\n')
    finding = _doctor.findings(context(tmp_path), conf)[-1]
    assert finding.status == "fail" and "console_auth_failed" in finding.detail
    assert finding.fix == "set vnc.tls_ca to /etc/pki/vnc/ca-cert.pem (docs/vnc.md, VeNCrypt)"
    # without a directory of its own, libvirt's default one
    finding = _doctor.findings(context(tmp_path), qemu_conf(tmp_path, "vnc_tls = 1\n"))[-1]
    assert finding.fix.startswith("set vnc.tls_ca to /etc/pki/qemu/ca-cert.pem")


def test_qemu_verifying_clients_needs_the_brokers_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path, client=True)
    ctx = context(tmp_path, f'[vnc]\ntls_ca = "{certs["ca"]}"\n')
    conf = qemu_conf(tmp_path, f'vnc_tls = 1\nvnc_tls_x509_cert_dir = "{tmp_path}"\n'
                               "vnc_tls_x509_verify = 1\n")
    found = _doctor.findings(ctx, conf)
    assert found[1] == Finding("ok", "TLS to QEMU", f"vnc.tls_ca {certs['ca']} loads")
    assert found[2].status == "fail" and "vnc.tls_cert is empty" in found[2].detail
    with_cert = context(tmp_path, f'[vnc]\ntls_ca = "{certs["ca"]}"\n'
                                  f'tls_cert = "{certs["client"]}"\n'
                                  f'tls_key = "{certs["client-key"]}"\n')
    assert [f.status for f in _doctor.findings(with_cert, conf)] == ["ok", "ok", "ok"]


def test_the_brokers_tls_without_qemus_is_a_warning(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    ctx = context(tmp_path, f'[vnc]\ntls_ca = "{certs["ca"]}"\n')
    finding = _doctor.findings(ctx, qemu_conf(tmp_path, "vnc_tls = 0\n"))[-1]
    assert finding.status == "warn" and "does not set vnc_tls = 1" in finding.detail
    assert "restart libvirtd" in finding.fix


def test_tls_files_that_do_not_load_fail(tmp_path: Path) -> None:
    garbled = tmp_path / "ca.pem"
    garbled.write_text("not a certificate\n")
    ctx = context(tmp_path, f'[vnc]\ntls_ca = "{garbled}"\n')
    found = _doctor.findings(ctx, qemu_conf(tmp_path, "vnc_tls = 1\n"))
    assert found[1].status == "fail" and found[1].title == "TLS to QEMU"
    assert found[1].detail.startswith("vnc.tls_ca, vnc.tls_cert, vnc.tls_key: cannot load them")


@pytest.mark.parametrize("conf", [QemuConf(None), QemuConf(Path("/x/qemu.conf"),
                                                           error="Permission denied")])
def test_a_qemu_conf_not_to_be_read_is_skipped(tmp_path: Path, conf: QemuConf) -> None:
    finding = _doctor.findings(context(tmp_path), conf)[-1]
    assert finding.status == "skip" and finding.title == "qemu.conf"
