"""``console-broker doctor``'s checks, each with fakes at its boundary: key files of the
wrong modes in a temporary state directory, certificates made with cryptography, a socket
holding a port, a fake libvirt connection, a qemu.conf written by the test
(broker/doctor.py; tests/test_doctor_vm.py runs it against the real stack)."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import doctor
from broker.cli import main
from broker.config import Config, load_config
from broker.doctor import OK, PROBLEM, SKIPPED, WARNING, Finding
from broker.keys import generate_keypair
from broker.plugins import PluginManager

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
PROTOCOLS = {"vnc", "spice", "serial"}
NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"


def make_config(tmp_path: Path, toml: str = "") -> Config:
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nstate_dir = "state"\n{toml}')
    return load_config(path, PluginManager().config_tables)


def statuses(findings: Sequence[Finding]) -> list[str]:
    return [f.status for f in findings]


# --- libvirt ----------------------------------------------------------------------------


class FakeDomain:
    def __init__(self, name: str, xml: str, active: bool = True) -> None:
        self._name, self._xml, self._active = name, xml, active

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return int(self._active)

    def XMLDesc(self, flags: int) -> str:
        return self._xml


class FakeConn:
    def __init__(self, domains: Sequence[FakeDomain] = ()) -> None:
        self.domains = list(domains)
        self.closed = False

    def getLibVersion(self) -> int:
        return 9_000_000

    def getVersion(self) -> int:
        return 7_002_022

    def getType(self) -> str:
        return "QEMU"

    def listAllDomains(self, flags: int) -> list[FakeDomain]:
        return self.domains

    def close(self) -> int:
        self.closed = True
        return 0


class FakeLibvirtError(Exception):
    def get_error_message(self) -> str:
        return str(self)


def test_libvirt_reachable_gives_both_versions() -> None:
    access = doctor.connect_libvirt("qemu:///system", opener=lambda uri: FakeConn())
    [finding] = doctor.check_libvirt(access)
    assert finding.status == OK
    assert finding.message == "qemu:///system: libvirt 9.0.0, QEMU 7.2.22"


def test_libvirt_unreachable_says_to_start_libvirtd() -> None:
    def refuse(uri: str) -> Any:
        raise FakeLibvirtError(
            "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or "
            "directory")

    access = doctor.connect_libvirt("qemu:///system", opener=refuse)
    [finding] = doctor.check_libvirt(access)
    assert finding.status == PROBLEM
    assert "No such file or directory" in finding.message
    assert "start libvirtd" in finding.fix


def test_libvirt_permission_denied_says_who_may() -> None:
    def refuse(uri: str) -> Any:
        raise FakeLibvirtError("authentication failed: Permission denied")

    [finding] = doctor.check_libvirt(doctor.connect_libvirt("qemu:///system", opener=refuse))
    assert finding.status == PROBLEM and "libvirt group" in finding.fix


def test_a_hung_libvirt_is_given_up() -> None:
    release = threading.Event()

    def hang(uri: str) -> Any:
        release.wait(30)
        return FakeConn()

    try:
        access = doctor.connect_libvirt("qemu:///system", opener=hang, timeout=0.2)
    finally:
        release.set()
    [finding] = doctor.check_libvirt(access)
    assert finding.status == PROBLEM
    assert "did not answer" in finding.message and "start libvirtd" in finding.fix


# --- keys -------------------------------------------------------------------------------


def test_a_fresh_key_pair_is_ok(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    [finding] = doctor.check_keys(config)
    assert finding.status == OK
    assert files.fingerprint in finding.message and "1 trusted public key" in finding.message


def test_no_state_dir_yet_is_a_warning(tmp_path: Path) -> None:
    [finding] = doctor.check_keys(make_config(tmp_path))
    assert finding.status == WARNING
    assert "console-broker keygen --config" in finding.fix


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_private_key_others_may_read_is_a_problem(tmp_path: Path, mode: int) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    files.private_key.chmod(mode)
    [finding] = doctor.check_keys(config)
    assert finding.status == PROBLEM
    assert f"mode {mode:04o}" in finding.message
    assert finding.fix == f"chmod 600 {files.private_key}"


def test_an_open_state_dir_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    config.state_dir.chmod(0o755)
    [finding] = doctor.check_keys(config)
    assert finding.status == PROBLEM and finding.fix == f"chmod 700 {config.state_dir}"


def test_a_private_key_of_another_user_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 4242)
    [finding] = doctor.check_keys(config)
    assert finding.status == PROBLEM and "not by uid 4242" in finding.message


def test_an_unreadable_trusted_key_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[tokens]\npublic_keys = ["control-plane.pub.pem"]\n')
    generate_keypair(config.state_dir)
    (tmp_path / "control-plane.pub.pem").write_text("not a key\n")
    [finding] = doctor.check_keys(config)
    assert finding.status == PROBLEM
    assert "control-plane.pub.pem: not a PEM public key" in finding.message
    assert "tokens.public_keys" in finding.fix


def test_a_garbled_private_key_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    files.private_key.write_text("garbage\n")
    findings = doctor.check_keys(config)
    assert statuses(findings)[0] == PROBLEM
    assert "not an unencrypted PEM private key" in findings[0].message


# --- TLS --------------------------------------------------------------------------------


def make_cert(
    directory: Path, name: str, *, not_before: datetime.datetime, not_after: datetime.datetime,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[Path, Path]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def tls_config(tmp_path: Path, cert: Path, key: Path, ca: Path | None = None) -> Config:
    extra = f'ca = "{ca}"\n' if ca else ""
    return make_config(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n{extra}')


def test_no_tls_is_skipped(tmp_path: Path) -> None:
    assert statuses(doctor.check_tls(make_config(tmp_path), now=NOW)) == [SKIPPED]


def test_a_valid_certificate_gives_its_days(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                          not_after=NOW + datetime.timedelta(days=90, hours=1))
    ca, _ = make_cert(tmp_path, "ca", not_before=NOW - datetime.timedelta(days=1),
                      not_after=NOW + datetime.timedelta(days=3650))
    [finding] = doctor.check_tls(tls_config(tmp_path, cert, key, ca), now=NOW)
    assert finding.status == OK
    assert "key matches" in finding.message and "tls.cert until 2026-08-30 (90 days)" in (
        finding.message)


def test_a_certificate_near_its_end_is_a_warning(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=300),
                          not_after=NOW + datetime.timedelta(days=10, hours=1))
    [finding] = doctor.check_tls(tls_config(tmp_path, cert, key), now=NOW)
    assert finding.status == WARNING and "10 days left" in finding.message
    assert "renew" in finding.fix


def test_an_expired_certificate_is_a_problem(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=400),
                          not_after=NOW - datetime.timedelta(days=2))
    [finding] = doctor.check_tls(tls_config(tmp_path, cert, key), now=NOW)
    assert finding.status == PROBLEM and "expired on 2026-05-30" in finding.message


def test_an_expired_client_ca_is_a_problem(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                          not_after=NOW + datetime.timedelta(days=100))
    ca, _ = make_cert(tmp_path, "front-ca", not_before=NOW - datetime.timedelta(days=400),
                      not_after=NOW - datetime.timedelta(days=1))
    config = make_config(
        tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\nclient_ca = "{ca}"\n')
    [finding] = doctor.check_tls(config, now=NOW)
    assert finding.status == PROBLEM and finding.message.startswith("tls.client_ca CN=front-ca")


def test_a_key_of_another_certificate_is_a_problem(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                        not_after=NOW + datetime.timedelta(days=100))
    _, other_key = make_cert(tmp_path, "other", not_before=NOW - datetime.timedelta(days=1),
                             not_after=NOW + datetime.timedelta(days=100))
    [finding] = doctor.check_tls(tls_config(tmp_path, cert, other_key), now=NOW)
    assert finding.status == PROBLEM and "is not the key of tls.cert" in finding.message


def test_an_unreadable_certificate_is_a_problem(tmp_path: Path) -> None:
    _, key = make_cert(tmp_path, "server", not_before=NOW, not_after=NOW)
    (tmp_path / "garbled.pem").write_text("nothing\n")
    [finding] = doctor.check_tls(tls_config(tmp_path, tmp_path / "garbled.pem", key), now=NOW)
    assert finding.status == PROBLEM and "not a PEM certificate" in finding.message


# --- ports ------------------------------------------------------------------------------


def _no_broker(host: str, port: int, tls: bool, timeout: float) -> dict[str, Any] | None:
    return None


def test_a_free_port_is_ok(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = make_config(tmp_path, f'[listen]\nport = {port}\n')
    [finding] = doctor.check_ports(config, health=_no_broker)
    assert finding.status == OK and finding.message.endswith(": free")


def test_a_port_held_by_another_program_is_a_problem(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = make_config(tmp_path, f'[listen]\nport = {port}\n')
        [finding] = doctor.check_ports(config)  # the real /healthz request: no answer
    assert finding.status == PROBLEM and "in use by another program" in finding.message
    assert f"sport = :{port}" in finding.fix


def test_a_port_held_by_this_broker_is_ok(tmp_path: Path) -> None:
    asked: list[tuple[str, int, bool]] = []

    def broker_answers(host: str, port: int, tls: bool, timeout: float) -> dict[str, Any]:
        asked.append((host, port, tls))
        return {"status": "ok", "version": "0.1.0", "node": "here", "libvirt": {}}

    with socket.socket() as holder, socket.socket() as connect_holder:
        for sock in (holder, connect_holder):
            sock.bind(("127.0.0.1", 0))
            sock.listen(1)
        port, connect_port = holder.getsockname()[1], connect_holder.getsockname()[1]
        config = make_config(
            tmp_path, f'[listen]\nhost = "0.0.0.0"\nport = {port}\nconnect_port = {connect_port}\n')
        findings = doctor.check_ports(config, health=broker_answers)
    assert statuses(findings) == [OK, OK]
    assert "held by the console-broker running here (version 0.1.0" in findings[0].message
    assert "CONNECT listener" in findings[1].message
    assert asked == [("127.0.0.1", port, False)]


def test_fetch_health_reads_a_brokers_answer() -> None:
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "unavailable", "version": "1", "libvirt": {}}).encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        doc = doctor.fetch_health("127.0.0.1", server.server_address[1], False, 5)
    finally:
        server.shutdown()
        server.server_close()
    assert doc == {"status": "unavailable", "version": "1", "libvirt": {}}


def test_an_address_not_on_this_host_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[listen]\nhost = "192.0.2.7"\n')
    [finding] = doctor.check_ports(config, health=_no_broker)
    assert finding.status == PROBLEM and "not an address of this host" in finding.message


# --- assets -----------------------------------------------------------------------------


def test_the_checkouts_assets_are_found(tmp_path: Path) -> None:
    config = make_config(tmp_path, f'[http]\nassets_dir = "{NODE_MODULES}"\n')
    [finding] = doctor.check_assets(config, PROTOCOLS)
    assert finding == Finding("assets", OK, f"noVNC, spice-html5, xterm.js found in {NODE_MODULES}")


def test_missing_assets_are_a_problem_each(tmp_path: Path) -> None:
    assets = tmp_path / "node_modules"
    (assets / "@novnc/novnc/core").mkdir(parents=True)
    (assets / "@novnc/novnc/core/rfb.js").write_text("")
    config = make_config(tmp_path, '[http]\nassets_dir = "node_modules"\n')
    findings = doctor.check_assets(config, PROTOCOLS)
    assert statuses(findings) == [PROBLEM, PROBLEM]
    assert findings[0].message.startswith("spice-html5 (spice page)")
    assert findings[1].message.startswith("xterm.js (serial page)")
    assert "http.assets_dir" in findings[0].fix
    # only the loaded plugins' pages are looked for
    assert statuses(doctor.check_assets(config, {"vnc"})) == [OK]


# --- clock ------------------------------------------------------------------------------


def _tools(answers: dict[str, str | None]) -> Any:
    def run(argv: Sequence[str], timeout: float) -> str | None:
        return answers.get(argv[0])

    return run


def test_a_sane_synchronised_clock(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    [finding] = doctor.check_clock(config, run=_tools({"timedatectl": "yes\n"}))
    assert finding.status == OK and finding.message.endswith("synchronised (timedatectl)")


def test_no_tool_says_nothing_of_synchronisation(tmp_path: Path) -> None:
    [finding] = doctor.check_clock(make_config(tmp_path), run=_tools({}))
    assert finding.status == OK and "synchronised" not in finding.message


def test_an_unsynchronised_clock_is_a_warning(tmp_path: Path) -> None:
    chrony = "Reference ID    : 00000000 ()\nLeap status     : Not synchronised\n"
    [finding] = doctor.check_clock(make_config(tmp_path), run=_tools({"chronyc": chrony}))
    assert finding.status == WARNING and finding.message.startswith("chronyc:")


def test_a_clock_before_the_key_and_the_package_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    past = time.time() - 86400 * 365
    findings = doctor.check_clock(config, now=past, run=_tools({}))
    assert statuses(findings) == [PROBLEM, PROBLEM]
    assert "before the signing key was made" in findings[0].message
    assert "before console-broker was built or installed" in findings[1].message
    assert "timedatectl set-ntp true" in findings[0].fix


# --- domains ----------------------------------------------------------------------------

DOMAIN = """<domain type='qemu'><name>vm1</name><uuid>6b3b9b53-9d77-4b5a-8d2e-5d6f0f0d2b11</uuid>
<memory unit='MiB'>64</memory><os><type>hvm</type></os>
<devices><serial type='pty'><target port='0'/></serial></devices></domain>"""


def enabled_xml(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    source = tmp_path / "domain.xml"
    source.write_text(DOMAIN)
    capsys.readouterr()
    assert main(["xml", "enable", *args, str(source)]) == 0
    return capsys.readouterr().out


def live(xml: str, port: str = "5901") -> str:
    return xml.replace("port='-1'", f"port='{port}'").replace(
        "<target port='0'/></serial>", "<target port='0'/><alias name='serial0'/></serial>"
    ).replace("<target type='serial' port='0'/></console>",
              "<target type='serial' port='0'/><alias name='serial0'/></console>")


def test_a_running_domains_consoles_are_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = enabled_xml(tmp_path, capsys, "--consoles", "vnc,serial", "--mode", "tcp")
    access = doctor.LibvirtAccess("qemu:///system", FakeConn([
        FakeDomain("vm1", live(xml)),
        FakeDomain("stopped", xml, active=False),
        FakeDomain("plain", DOMAIN),
    ]))
    findings = doctor.check_domains(make_config(tmp_path), access)
    assert findings == [
        Finding("domains", OK, "vm1: serial console stream serial0, vnc tcp 127.0.0.1:5901"),
        Finding("domains", OK, "stopped: serial, vnc enabled; not running (checked when it runs)"),
    ]


def test_a_console_without_a_port_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = enabled_xml(tmp_path, capsys, "--consoles", "vnc", "--mode", "tcp")
    access = doctor.LibvirtAccess("qemu:///system", FakeConn([FakeDomain("vm1", xml)]))
    [finding] = doctor.check_domains(make_config(tmp_path), access)
    assert finding.status == PROBLEM
    assert finding.message == "vm1: vnc: the live XML gives the vnc graphics no port"
    assert "restart the domain" in finding.fix


def test_a_serial_console_no_longer_a_pty_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "serial"))
    xml = xml.replace("<serial type='pty'>", "<serial type='file'>")
    access = doctor.LibvirtAccess("qemu:///system", FakeConn([FakeDomain("vm1", xml)]))
    [finding] = doctor.check_domains(make_config(tmp_path), access)
    assert finding.status == PROBLEM
    assert finding.message == "vm1: serial: the serial console's device is missing from the domain"
    assert finding.fix.startswith("enable the consoles again (console-broker enable vm1")


def test_domains_are_skipped_without_libvirt(tmp_path: Path) -> None:
    access = doctor.LibvirtAccess("qemu:///system", error="down")
    assert statuses(doctor.check_domains(make_config(tmp_path), access)) == [SKIPPED]


# --- qemu.conf --------------------------------------------------------------------------


def test_qemu_conf_without_tls_on_either_side_is_ok(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# vnc_tls = 1\nuser = "root"\n')
    [finding] = doctor.check_qemu_conf(make_config(tmp_path), PROTOCOLS, path=conf)
    assert finding.status == OK and "vnc_tls off, spice_tls off" in finding.message


def test_vnc_tls_in_qemu_conf_needs_the_brokers_ca(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('vnc_tls = 1\nvnc_tls_x509_cert_dir = "/etc/pki/vnc"\n')
    [finding] = doctor.check_qemu_conf(make_config(tmp_path), PROTOCOLS, path=conf)
    assert finding.status == PROBLEM and "console_auth_failed" in finding.message
    assert finding.fix.startswith("set vnc.tls_ca to /etc/pki/vnc/ca-cert.pem")
    assert statuses(doctor.check_qemu_conf(make_config(tmp_path), {"serial"}, path=conf)) == [OK]


def test_the_brokers_tls_without_qemus_is_a_warning(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    conf = tmp_path / "qemu.conf"
    conf.write_text("spice_tls = 0\n")
    config = make_config(tmp_path, f'[spice]\ntls_ca = "{ca}"\n')
    [finding] = doctor.check_qemu_conf(config, PROTOCOLS, path=conf)
    assert finding.status == WARNING and "does not set spice_tls = 1" in finding.message


def test_an_unreadable_or_remote_qemu_conf_is_skipped(tmp_path: Path) -> None:
    unreadable = tmp_path / "qemu.conf"
    unreadable.mkdir()  # fails to read as a file does that root may read but others not
    [finding] = doctor.check_qemu_conf(make_config(tmp_path), PROTOCOLS, path=unreadable)
    assert finding.status == SKIPPED and "cannot read it" in finding.message
    remote = make_config(tmp_path, '[libvirt]\nuri = "qemu+ssh://hv1/system"\n')
    assert statuses(doctor.check_qemu_conf(remote, PROTOCOLS)) == [SKIPPED]
    assert doctor.qemu_conf_path("qemu:///system") == Path("/etc/libvirt/qemu.conf")


# --- the command ------------------------------------------------------------------------


def test_exit_status_fails_on_problems_and_strict_warnings() -> None:
    warning = [Finding("clock", WARNING, "w", "f")]
    assert doctor.exit_status(warning) == 0
    assert doctor.exit_status(warning, strict=True) == 1
    assert doctor.exit_status([*warning, Finding("keys", PROBLEM, "p", "f")]) == 1
    assert doctor.exit_status([Finding("tls", SKIPPED, "s")], strict=True) == 0


def test_the_table_puts_each_fix_under_its_message() -> None:
    text = doctor.render_table([
        Finding("libvirt", OK, "qemu:///system: libvirt 9.0.0, QEMU 7.2.22"),
        Finding("keys", PROBLEM, "k: mode 0640", "chmod 600 k"),
    ])
    assert text.splitlines() == [
        "CHECK    STATUS   MESSAGE",
        "libvirt  ok       qemu:///system: libvirt 9.0.0, QEMU 7.2.22",
        "keys     problem  k: mode 0640",
        "                  fix: chmod 600 k",
        "",
        "1 problem, 0 warnings",
    ]


def test_doctor_json_with_fakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command end to end with libvirt, the clock tools and qemu.conf faked."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nstate_dir = "state"\n[listen]\nport = {port}\n'
                      f'[http]\nassets_dir = "{NODE_MODULES}"\n')
    generate_keypair(tmp_path / "state")
    (tmp_path / "state" / "signing-key.pem").chmod(0o640)
    (tmp_path / "qemu.conf").write_text("")
    monkeypatch.setattr(doctor, "SYSTEM_QEMU_CONF", tmp_path / "qemu.conf")
    monkeypatch.setattr(doctor, "run_checks", _with_fakes(doctor.run_checks))
    status = main(["doctor", "--config", str(config), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["exit_status"] == 1
    by_check = {c["check"]: c for c in doc["checks"]}
    assert list(by_check) == [
        "libvirt", "keys", "tls", "ports", "assets", "clock", "domains", "qemu.conf"]
    assert by_check["keys"]["status"] == PROBLEM and by_check["keys"]["fix"].startswith("chmod 600")
    assert {c["status"] for c in doc["checks"] if c["check"] != "keys"} <= {OK, SKIPPED}


def _with_fakes(run_checks: Any) -> Any:
    def run(config: Config, protocols: Any, **kwargs: Any) -> Any:
        kwargs.update(opener=lambda uri: FakeConn(), run=lambda argv, timeout: None)
        return run_checks(config, protocols, **kwargs)

    return run


def test_doctor_help_explains_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    text = capsys.readouterr().out
    for check in ("libvirt", "keys", "tls", "ports", "assets", "clock", "domains", "qemu.conf"):
        assert f"\n  {check} " in text
    assert "Exit status: 0" in text
