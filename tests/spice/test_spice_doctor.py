"""The SPICE plugin's checks for ``console-broker doctor`` (broker_spice._doctor, through
``Spice.doctor``): spice-html5 where the page reads it, the broker's TLS to QEMU's SPICE
``tlsPort`` (``Spice.console_tls``), and qemu.conf's ``spice_tls`` against it (a qemu.conf
written by the test)."""

from __future__ import annotations

from pathlib import Path

import broker_spice
from broker_spice import _doctor
from certs import make_certificates

from broker.api import Finding, PluginContext, QemuConf, load_config
from broker.plugins import PluginManager

NODE_MODULES = Path(__file__).resolve().parents[2] / "node_modules"


def context(tmp_path: Path, toml: str = "", assets: Path = NODE_MODULES) -> PluginContext:
    path = tmp_path / "broker.toml"
    path.write_text(f'[http]\nassets_dir = "{assets}"\n{toml}')
    return PluginContext("spice", load_config(path, PluginManager().config_tables))


def qemu_conf(tmp_path: Path, text: str) -> QemuConf:
    path = tmp_path / "qemu.conf"
    path.write_text(text)
    return QemuConf.read("qemu:///system", path)


def check(ctx: PluginContext, conf: QemuConf) -> list[Finding]:
    return _doctor.findings(broker_spice.PROTOCOL, ctx, conf)


def test_the_protocol_reports_its_checks(tmp_path: Path) -> None:
    found = list(broker_spice.PROTOCOL.doctor(
        context(tmp_path, '[libvirt]\nuri = "qemu+ssh://hv1/system"\n')))
    assert found == [
        Finding("ok", "spice-html5", f"found in {NODE_MODULES / '@spice-project/spice-html5'}"),
        Finding("skip", "qemu.conf", "libvirt.uri is not a QEMU driver of this host"),
    ]


def test_spice_html5_missing_fails_and_the_page_agrees(tmp_path: Path) -> None:
    from broker_spice._page import SPICE_HTML5, SPICE_HTML5_FILE, page

    empty = tmp_path / "empty"
    empty.mkdir()
    finding = check(context(tmp_path, assets=empty), qemu_conf(tmp_path, ""))[0]
    assert finding.status == "fail" and finding.title == "spice-html5"
    assert finding.detail == (f"{empty / '@spice-project/spice-html5/src/main.js'} missing: "
                              "the SPICE page answers 503")
    assert "@spice-project/spice-html5" in finding.fix
    served = page("", str(empty))
    assert served is not None and served.status == 503
    (empty / SPICE_HTML5 / SPICE_HTML5_FILE).parent.mkdir(parents=True)
    (empty / SPICE_HTML5 / SPICE_HTML5_FILE).write_text("")
    assert check(context(tmp_path, assets=empty), qemu_conf(tmp_path, ""))[0].status == "ok"
    served = page("", str(empty))
    assert served is not None and served.status == 200


def test_no_tls_on_either_side_is_ok(tmp_path: Path) -> None:
    found = check(context(tmp_path), qemu_conf(tmp_path, "spice_tls = 0\n"))
    assert found[-1] == Finding("ok", "qemu.conf", f"{tmp_path / 'qemu.conf'}: spice_tls off, "
                                                   "as the broker expects (spice.tls_ca empty)")


def test_spice_tls_without_the_brokers_ca_is_a_warning(tmp_path: Path) -> None:
    conf = qemu_conf(tmp_path, 'spice_tls = 1\nspice_tls_x509_cert_dir = "/etc/pki/spice"\n')
    finding = check(context(tmp_path), conf)[-1]
    assert finding.status == "warn" and "refuses domains whose SPICE is TLS only" in (
        finding.detail)
    assert finding.fix.startswith("set spice.tls_ca to /etc/pki/spice/ca-cert.pem")


def test_tls_on_both_sides_is_ok(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    ctx = context(tmp_path, f'[spice]\ntls_ca = "{certs["ca"]}"\n')
    found = check(ctx, qemu_conf(tmp_path, f'spice_tls = 1\nspice_tls_x509_cert_dir = '
                                           f'"{tmp_path}"\n'))
    assert [f.status for f in found] == ["ok", "ok", "ok"]
    assert found[1] == Finding("ok", "TLS to QEMU", "spice.tls_ca and its files load")


def test_the_brokers_tls_without_qemus_is_a_warning(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    ctx = context(tmp_path, f'[spice]\ntls_ca = "{certs["ca"]}"\n')
    finding = check(ctx, qemu_conf(tmp_path, ""))[-1]
    assert finding.status == "warn" and "SPICE graphics get no TLS port" in finding.detail


def test_tls_files_that_do_not_load_fail(tmp_path: Path) -> None:
    garbled = tmp_path / "ca.pem"
    garbled.write_text("not a certificate\n")
    ctx = context(tmp_path, f'[spice]\ntls_ca = "{garbled}"\n')
    found = check(ctx, qemu_conf(tmp_path, "spice_tls = 1\n"))
    assert [f.status for f in found] == ["ok", "fail"]
    assert found[1].title == "TLS to QEMU" and found[1].detail.startswith(
        "spice.tls_ca, spice.tls_cert, spice.tls_key: cannot load the TLS files")
    assert "console-broker serve refuses to start" in found[1].fix
