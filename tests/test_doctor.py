"""``console-broker doctor``'s core checks, each with fakes at its boundary: key files of
the wrong modes in a temporary state directory, certificates made with cryptography, a
socket holding a port, a fake libvirt connection and a fake resolver (which plans the
endpoint from the live XML with the broker's own planner), plugins of the test's own for
the protocols' checks (broker/doctor.py; tests/test_doctor_vm.py runs it against the
real stack, tests/{vnc,spice,serial}/test_*_doctor.py the built-in plugins' checks)."""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree

from broker import _doctor_host as host
from broker import _doctor_libvirt as lv
from broker import doctor
from broker.api import Finding, PluginContext, Protocol, QemuConf, hookimpl
from broker.checks import FAIL, OK, SKIP, WARN, parse_qemu_conf, qemu_conf_path
from broker.cli import main
from broker.config import Config, load_config
from broker.keys import generate_keypair
from broker.plugins import PluginManager
from broker.service import Endpoint, Refused
from broker.service._libvirt import Target
from broker.service._plan import plan_endpoint
from broker.service._refusals import CONSOLE_BUSY, HYPERVISOR_UNAVAILABLE, VM_NOT_RUNNING

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"


def make_config(tmp_path: Path, toml: str = "") -> Config:
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nstate_dir = "state"\n{toml}')
    return load_config(path, PluginManager().config_tables)


def statuses(findings: Sequence[Finding]) -> list[str]:
    return [f.status for f in findings]


# --- Finding and QemuConf -----------------------------------------------------------------


def test_a_problem_needs_its_fix() -> None:
    with pytest.raises(ValueError, match="a fail finding needs a fix: keys"):
        Finding("fail", "keys", "mode 0640")
    with pytest.raises(ValueError, match="a warn finding needs a fix"):
        Finding("warn", "clock", "not synchronised", " ")
    with pytest.raises(ValueError, match="must be one of ok, skip, warn, fail"):
        Finding("problem", "keys", "x", "y")
    with pytest.raises(ValueError, match="needs a title"):
        Finding("ok", "")
    assert Finding("ok", "clock", "fine").message == "clock: fine"
    assert Finding("skip", "TLS").message == "TLS"


def test_qemu_conf_settings(tmp_path: Path) -> None:
    text = ('# vnc_tls = 1\nvnc_tls = 1 # on\nvnc_tls_x509_cert_dir = "/etc/pki/vnc" # there\n'
            'cgroup_controllers = [ ]\nspice_tls=0\n')
    assert parse_qemu_conf(text) == {
        "vnc_tls": "1", "vnc_tls_x509_cert_dir": "/etc/pki/vnc", "cgroup_controllers": "[ ]",
        "spice_tls": "0",
    }
    path = tmp_path / "qemu.conf"
    path.write_text(text)
    conf = QemuConf.read("qemu:///system", path)
    assert conf.readable and conf.enabled("vnc_tls") and not conf.enabled("spice_tls")
    assert conf.get("spice_tls_x509_cert_dir", "/etc/pki/qemu") == "/etc/pki/qemu"
    assert QemuConf.read("qemu:///system", tmp_path / "absent.conf") == QemuConf(
        tmp_path / "absent.conf")
    unreadable = tmp_path / "dir.conf"
    unreadable.mkdir()
    assert QemuConf.read("qemu:///system", unreadable).error
    assert not QemuConf.read("qemu:///system", unreadable).readable


def test_qemu_conf_path_of_a_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/op/.config")
    assert qemu_conf_path("qemu:///system") == Path("/etc/libvirt/qemu.conf")
    assert qemu_conf_path("qemu+unix:///system") == Path("/etc/libvirt/qemu.conf")
    assert qemu_conf_path("qemu:///session") == Path("/home/op/.config/libvirt/qemu.conf")
    for uri in ("qemu+ssh://hv1/system", "qemu+tcp://hv1/system", "test:///default",
                "xen:///system"):
        assert qemu_conf_path(uri) is None
        assert QemuConf.read(uri) == QemuConf(None)


# --- libvirt ----------------------------------------------------------------------------


class FakeDomain:
    def __init__(self, name: str, xml: str, active: bool = True) -> None:
        self._name, self._xml, self._active = name, xml, active
        self.uuid = etree.fromstring(xml.encode()).findtext("uuid")

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return str(self.uuid)

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
    access = lv.connect_libvirt("qemu:///system", opener=lambda uri: FakeConn())
    [finding] = lv.check_libvirt(access)
    assert finding == Finding(OK, "qemu:///system", "libvirt 9.0.0, QEMU 7.2.22")


def test_libvirt_unreachable_says_to_start_libvirtd() -> None:
    def refuse(uri: str) -> Any:
        raise FakeLibvirtError(
            "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or "
            "directory")

    access = lv.connect_libvirt("qemu:///system", opener=refuse)
    [finding] = lv.check_libvirt(access)
    assert finding.status == FAIL
    assert finding.detail.startswith("cannot connect: Failed to connect socket")
    assert finding.fix.startswith("start libvirtd")


def test_libvirt_permission_denied_says_who_may() -> None:
    def refuse(uri: str) -> Any:
        raise FakeLibvirtError("authentication failed: Permission denied")

    [finding] = lv.check_libvirt(lv.connect_libvirt("qemu:///system", opener=refuse))
    assert finding.status == FAIL and "libvirt group" in finding.fix


def test_a_hung_libvirt_is_given_up() -> None:
    release = threading.Event()

    def hang(uri: str) -> Any:
        release.wait(30)
        return FakeConn()

    try:
        access = lv.connect_libvirt("qemu:///system", opener=hang, timeout=0.2)
    finally:
        release.set()
    [finding] = lv.check_libvirt(access)
    assert finding.status == FAIL
    assert "did not answer" in finding.detail and "start libvirtd" in finding.fix


def test_a_driver_still_probing_its_emulators_is_a_warning() -> None:
    """libvirtd answers, but its QEMU driver takes longer than the timeout to report the
    hypervisor's version (it probes every installed emulator after a start)."""
    release = threading.Event()

    class Probing(FakeConn):
        def getVersion(self) -> int:
            release.wait(30)
            return super().getVersion()

    access = lv.connect_libvirt("qemu:///system", opener=lambda uri: Probing())
    try:
        [finding] = lv.check_libvirt(access, timeout=0.2)
    finally:
        release.set()
    assert finding.status == WARN
    assert finding.detail.startswith("libvirt 9.0.0 answers, but its QEMU driver did not")
    assert "run doctor again in a minute" in finding.fix


def test_libvirts_schema_found_missing_or_broken(tmp_path: Path) -> None:
    from broker.xml import DOMAIN_SCHEMA

    if Path(DOMAIN_SCHEMA).is_file():  # libvirt0 installs it; lxml loads it
        assert lv.check_schema() == [Finding(OK, "libvirt's domain schema",
                                             f"{DOMAIN_SCHEMA} loads")]
    [missing] = lv.check_schema(str(tmp_path / "domain.rng"))
    assert missing.status == WARN
    assert missing.detail.startswith(f"{tmp_path / 'domain.rng'} not found: console-broker "
                                     "xml enable and enable DOMAIN write domain XML without "
                                     "checking it")
    assert "libvirt0" in missing.fix
    broken = tmp_path / "broken.rng"
    broken.write_text("<grammar xmlns='http://relaxng.org/ns/structure/1.0'><start/></grammar>")
    [finding] = lv.check_schema(str(broken))
    assert finding.status == FAIL
    assert finding.detail.startswith(f"cannot load libvirt's domain schema {broken}")
    assert "reinstall" in finding.fix


# --- keys -------------------------------------------------------------------------------


def test_a_fresh_key_pair_is_ok(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    [finding] = host.check_keys(config)
    assert finding.status == OK
    assert files.fingerprint in finding.detail and "1 trusted public key" in finding.detail


def test_no_state_dir_yet_is_a_warning(tmp_path: Path) -> None:
    [finding] = host.check_keys(make_config(tmp_path))
    assert finding.status == WARN
    assert "console-broker keygen --config" in finding.fix


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_private_key_others_may_read_fails(tmp_path: Path, mode: int) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    files.private_key.chmod(mode)
    [finding] = host.check_keys(config)
    assert finding.status == FAIL
    assert f"mode {mode:04o}" in finding.detail
    assert finding.fix == f"chmod 600 {files.private_key}"


def test_an_open_state_dir_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    config.state_dir.chmod(0o755)
    [finding] = host.check_keys(config)
    assert finding.status == FAIL and finding.fix == f"chmod 700 {config.state_dir}"


def test_a_private_key_of_another_user_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    monkeypatch.setattr(host.os, "geteuid", lambda: 4242)
    [finding] = host.check_keys(config)
    assert finding.status == FAIL and "not by uid 4242" in finding.detail


def test_an_unreadable_trusted_key_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[tokens]\npublic_keys = ["control-plane.pub.pem"]\n')
    generate_keypair(config.state_dir)
    (tmp_path / "control-plane.pub.pem").write_text("not a key\n")
    [finding] = host.check_keys(config)
    assert finding.status == FAIL
    assert "control-plane.pub.pem: not a PEM public key" in finding.detail
    assert "tokens.public_keys" in finding.fix


def test_a_garbled_private_key_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    files = generate_keypair(config.state_dir)
    files.private_key.write_text("garbage\n")
    findings = host.check_keys(config)
    assert statuses(findings)[0] == FAIL
    assert "not an unencrypted PEM private key" in findings[0].detail


# --- TLS --------------------------------------------------------------------------------


def make_cert(
    directory: Path, name: str, *, not_before: datetime.datetime, not_after: datetime.datetime,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
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
    assert statuses(host.check_tls(make_config(tmp_path), now=NOW)) == [SKIP]


def test_a_valid_certificate_gives_its_days(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                          not_after=NOW + datetime.timedelta(days=90, hours=1))
    ca, _ = make_cert(tmp_path, "ca", not_before=NOW - datetime.timedelta(days=1),
                      not_after=NOW + datetime.timedelta(days=3650))
    [finding] = host.check_tls(tls_config(tmp_path, cert, key, ca), now=NOW)
    assert finding.status == OK
    assert finding.detail.startswith("key matches; tls.cert until 2026-08-30 (90 days left)")


def test_a_certificate_near_its_end_is_a_warning(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=300),
                          not_after=NOW + datetime.timedelta(days=10, hours=1))
    [finding] = host.check_tls(tls_config(tmp_path, cert, key), now=NOW)
    assert finding.status == WARN and "10 days left" in finding.detail
    assert finding.fix.startswith(f"renew {cert} (tls.cert)")


def test_an_expired_certificate_fails(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=400),
                          not_after=NOW - datetime.timedelta(days=2))
    [finding] = host.check_tls(tls_config(tmp_path, cert, key), now=NOW)
    assert finding.status == FAIL and finding.detail == "expired on 2026-05-30"


def test_an_expired_client_ca_fails(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                          not_after=NOW + datetime.timedelta(days=100))
    ca, _ = make_cert(tmp_path, "front-ca", not_before=NOW - datetime.timedelta(days=400),
                      not_after=NOW - datetime.timedelta(days=1))
    config = make_config(
        tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\nclient_ca = "{ca}"\n')
    [finding] = host.check_tls(config, now=NOW)
    assert finding.status == FAIL and finding.title == "tls.client_ca CN=front-ca"


def test_a_key_of_another_certificate_fails(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "server", not_before=NOW - datetime.timedelta(days=1),
                        not_after=NOW + datetime.timedelta(days=100))
    _, other_key = make_cert(tmp_path, "other", not_before=NOW - datetime.timedelta(days=1),
                             not_after=NOW + datetime.timedelta(days=100))
    [finding] = host.check_tls(tls_config(tmp_path, cert, other_key), now=NOW)
    assert finding.status == FAIL and finding.detail.startswith("not the key of tls.cert")


def test_an_unreadable_certificate_fails(tmp_path: Path) -> None:
    _, key = make_cert(tmp_path, "server", not_before=NOW, not_after=NOW)
    (tmp_path / "garbled.pem").write_text("nothing\n")
    [finding] = host.check_tls(tls_config(tmp_path, tmp_path / "garbled.pem", key), now=NOW)
    assert finding.status == FAIL and "not a PEM certificate" in finding.detail


# --- ports ------------------------------------------------------------------------------


def _no_broker(host: str, port: int, tls: bool, timeout: float) -> dict[str, Any] | None:
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_free_port_is_ok(tmp_path: Path) -> None:
    port = _free_port()
    config = make_config(tmp_path, f'[listen]\nport = {port}\n')
    [finding] = host.check_ports(config, health=_no_broker)
    assert finding == Finding(OK, f"listen.port 127.0.0.1:{port}", "free")


def test_a_port_held_by_another_program_fails(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        config = make_config(tmp_path, f'[listen]\nport = {port}\n')
        [finding] = host.check_ports(config, timeout=2)  # the real /healthz request
    assert finding.status == FAIL and finding.detail == "in use by another program"
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
        findings = host.check_ports(config, health=broker_answers)
    assert statuses(findings) == [OK, OK]
    assert findings[0].detail.startswith("held by the console-broker running here (version 0.1.0")
    assert "CONNECT listener" in findings[1].detail
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
        doc = host.fetch_health("127.0.0.1", server.server_address[1], False, 5)
    finally:
        server.shutdown()
        server.server_close()
    assert doc == {"status": "unavailable", "version": "1", "libvirt": {}}


def test_an_address_not_on_this_host_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[listen]\nhost = "192.0.2.7"\n')
    [finding] = host.check_ports(config, health=_no_broker)
    assert finding.status == FAIL and "not an address of this host" in finding.detail


# --- clock ------------------------------------------------------------------------------


def _tools(answers: dict[str, str | None]) -> Any:
    def run(argv: Sequence[str], timeout: float) -> str | None:
        return answers.get(argv[0])

    return run


def test_a_sane_synchronised_clock(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    [finding] = host.check_clock(config, run=_tools({"timedatectl": "yes\n"}))
    assert finding.status == OK and finding.detail.endswith("synchronised (timedatectl)")


def test_no_tool_says_nothing_of_synchronisation(tmp_path: Path) -> None:
    [finding] = host.check_clock(make_config(tmp_path), run=_tools({}))
    assert finding.status == OK and "synchronised" not in finding.detail


def test_an_unsynchronised_clock_is_a_warning(tmp_path: Path) -> None:
    chrony = "Reference ID    : 00000000 ()\nLeap status     : Not synchronised\n"
    [finding] = host.check_clock(make_config(tmp_path), run=_tools({"chronyc": chrony}))
    assert finding.status == WARN and finding.detail.startswith("chronyc: not synchronised")


def test_a_clock_before_the_key_and_the_package_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    generate_keypair(config.state_dir)
    past = time.time() - 86400 * 365
    findings = host.check_clock(config, now=past, run=_tools({}))
    assert statuses(findings) == [FAIL, FAIL]
    assert "before the signing key was made" in findings[0].detail
    assert "before console-broker was built or installed" in findings[1].detail
    assert "timedatectl set-ntp true" in findings[0].fix


# --- domains: reached through the resolver, by every loaded protocol ----------------------

DOMAIN = """<domain type='qemu'><name>vm1</name><uuid>6b3b9b53-9d77-4b5a-8d2e-5d6f0f0d2b11</uuid>
<memory unit='MiB'>64</memory><os><type>hvm</type></os>
<devices><serial type='pty'><target port='0'/></serial></devices></domain>"""


def enabled_xml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, name: str = "vm1",
    uuid: str = "6b3b9b53-9d77-4b5a-8d2e-5d6f0f0d2b11",
) -> str:
    source = tmp_path / f"{name}.xml"
    source.write_text(DOMAIN.replace("vm1", name).replace(
        "6b3b9b53-9d77-4b5a-8d2e-5d6f0f0d2b11", uuid))
    capsys.readouterr()
    assert main(["xml", "enable", *args, str(source)]) == 0
    return capsys.readouterr().out


def live(xml: str, port: str = "5901") -> str:
    return xml.replace("port='-1'", f"port='{port}'").replace(
        "<target port='0'/></serial>", "<target port='0'/><alias name='serial0'/></serial>"
    ).replace("<target type='serial' port='0'/></console>",
              "<target type='serial' port='0'/><alias name='serial0'/></console>")


class PlanningResolver:
    """A resolver over fake domains that plans each endpoint with the broker's own planner
    from the domain's XML; opening gives one end of a socket pair (or the refusal the test
    put in :attr:`refuse`), and every endpoint must be closed again."""

    def __init__(self, conn: FakeConn) -> None:
        self.by_uuid = {d.uuid: d for d in conn.domains}
        self.refuse: dict[str, Refused] = {}
        self.tls_seen: dict[str, object] = {}
        self.open_streams: list[anyio.abc.SocketStream] = []
        self.started = self.stopped = False

    async def run(self, events: Any, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.started = True
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            self.stopped = True

    async def target(self, claims: Any, console: str | None, tls: Any = None) -> Target:
        dom = self.by_uuid[claims.domain_uuid]
        if console is None:
            return Target(dom.uuid, dom.name(), None, handle=dom)
        self.tls_seen[console] = tls
        root = etree.fromstring(dom.XMLDesc(0).encode())
        return Target(dom.uuid, dom.name(), plan_endpoint(root, console, tls=tls is not None),
                      handle=dom, tls=tls)

    async def open(self, target: Target) -> Endpoint:
        plan = target.console_plan
        if plan.console in self.refuse:
            raise self.refuse[plan.console]
        ours, theirs = socket.socketpair()
        theirs.close()
        stream = await anyio.abc.SocketStream.from_socket(ours)
        self.open_streams.append(stream)
        return Endpoint(stream, plan.kind, plan.describe())


def plugin_manager(*protocols: Protocol, name: str = "fake") -> PluginManager:
    """The built-in plugins' configuration tables are not needed: a plugin of the test's
    own serves *protocols* (named after the built-in consoles: the records the XML holds)."""
    module = SimpleNamespace(console_broker_protocols=hookimpl(lambda: list(protocols)))
    return PluginManager(load_entrypoints=False, plugins=[(name, module)])


def reachers(*protocols: Protocol, tls: Any = None) -> list[lv.Reacher]:
    return [lv.Reacher(p, "fake", tls if p.name == "spice" else None) for p in protocols]


VNC, SERIAL = Protocol(name="vnc", title="VNC"), Protocol(name="serial", title="Serial")


def test_a_running_domains_consoles_are_reached_and_closed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = enabled_xml(tmp_path, capsys, "--consoles", "vnc,serial", "--mode", "tcp")
    stopped_xml = enabled_xml(tmp_path, capsys, "--consoles", "vnc,serial", "--mode", "tcp",
                              name="stopped", uuid="6b3b9b53-9d77-4b5a-8d2e-5d6f0f0d2b12")
    conn = FakeConn([
        FakeDomain("vm1", live(xml)),
        FakeDomain("stopped", stopped_xml, active=False),
        FakeDomain("plain", DOMAIN.replace("2b11", "2b13")),
    ])
    resolver = PlanningResolver(conn)
    findings = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                reachers(VNC, SERIAL), resolver=lambda uri: resolver)
    assert findings == [
        Finding(OK, "domain vm1", "vnc tcp 127.0.0.1:5901, serial console stream serial0"),
        Finding(OK, "domain stopped", "serial, vnc enabled; not running (its consoles are "
                                      "reached when it runs)"),
    ]
    assert resolver.started and resolver.stopped
    assert len(resolver.open_streams) == 2
    for stream in resolver.open_streams:  # each closed at once
        with pytest.raises(anyio.ClosedResourceError):
            anyio.run(stream.send, b"x")


def test_only_the_loaded_protocols_consoles_are_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "vnc,serial", "--mode", "tcp"))
    conn = FakeConn([FakeDomain("vm1", xml)])
    resolver = PlanningResolver(conn)
    access = lv.LibvirtAccess("qemu:///system", conn)
    [finding] = lv.check_domains(make_config(tmp_path), access, reachers(SERIAL),
                                 resolver=lambda uri: resolver)
    assert finding == Finding(OK, "domain vm1", "serial console stream serial0")
    [finding] = lv.check_domains(make_config(tmp_path), access, [],
                                 resolver=lambda uri: resolver)
    assert finding == Finding(SKIP, "domain vm1", "serial, vnc enabled; no loaded plugin "
                                                  "serves them")


def test_a_console_without_a_port_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = enabled_xml(tmp_path, capsys, "--consoles", "vnc", "--mode", "tcp")
    conn = FakeConn([FakeDomain("vm1", xml)])
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(VNC), resolver=lambda uri: PlanningResolver(conn))
    assert finding.status == FAIL
    assert finding.detail == "vnc: console_unreachable: the live XML gives the vnc graphics no port"
    assert finding.fix.startswith("restart the domain so that libvirt applies its console XML")


def test_a_serial_console_no_longer_a_pty_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "serial"))
    xml = xml.replace("<serial type='pty'>", "<serial type='file'>")
    conn = FakeConn([FakeDomain("vm1", xml)])
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(SERIAL), resolver=lambda uri: PlanningResolver(conn))
    assert finding.status == FAIL
    assert finding.detail == ("serial: console_not_enabled: the serial console's device is "
                              "missing from the domain")
    assert finding.fix.startswith("enable the console again (console-broker enable vm1 "
                                  "--consoles serial)")


@pytest.mark.parametrize(("refusal", "status", "fix"), [
    (CONSOLE_BUSY, WARN, "another client holds the console"),
    (VM_NOT_RUNNING, OK, ""),
    (HYPERVISOR_UNAVAILABLE, FAIL, "check libvirt.uri"),
])
def test_what_opening_a_console_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], refusal: Any, status: str, fix: str
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "vnc,serial", "--mode", "tcp"))
    conn = FakeConn([FakeDomain("vm1", xml)])
    resolver = PlanningResolver(conn)
    resolver.refuse["serial"] = Refused(refusal, "what libvirt said")
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(VNC, SERIAL), resolver=lambda uri: resolver)
    assert finding.status == status
    assert finding.detail.startswith("vnc tcp 127.0.0.1:5901, serial: ")
    assert finding.fix.startswith(fix)


def test_a_console_that_hangs_is_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "serial"))
    conn = FakeConn([FakeDomain("vm1", xml)])

    class Hanging(PlanningResolver):
        async def open(self, target: Target) -> Endpoint:
            await anyio.sleep_forever()
            raise AssertionError

    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(SERIAL), resolver=lambda uri: Hanging(conn),
                                 timeout=0.2)
    assert finding.status == FAIL and finding.detail == "serial: no answer within 0.2 s"


def test_the_protocols_console_tls_is_what_the_resolver_gets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "spice", "--mode", "tcp"))
    xml = xml.replace("<graphics type='spice'", "<graphics type='spice' tlsPort='5902'")
    conn = FakeConn([FakeDomain("vm1", xml)])
    resolver = PlanningResolver(conn)
    marker = object()
    spice = Protocol(name="spice", title="SPICE")
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(spice, tls=marker), resolver=lambda uri: resolver)
    assert resolver.tls_seen == {"spice": marker}
    assert finding == Finding(OK, "domain vm1", "spice tls 127.0.0.1:5902")
    broken = [lv.Reacher(spice, "fake", tls_error="cannot load ca.pem")]
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 broken, resolver=lambda uri: resolver)
    assert finding.status == FAIL and "cannot load ca.pem" in finding.detail
    assert "see the spice checks below" in finding.fix


def test_a_protocol_of_its_own_endpoint_is_asked_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "serial"))
    conn = FakeConn([FakeDomain("vm1", xml)])
    asked: list[str] = []

    class Own(Protocol):
        async def open_endpoint(self, request: Any) -> Endpoint:
            asked.append(request.domain_name)
            raise RuntimeError("the monitor socket is gone")

    own = Own(name="raw-serial", title="raw", console="serial", endpoint="plugin")
    none = Protocol(name="watch", title="watch", console="serial", endpoint="none")
    [finding] = lv.check_domains(make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn),
                                 reachers(own, none), resolver=lambda uri: PlanningResolver(conn))
    assert asked == ["vm1"]
    assert finding.status == FAIL
    assert finding.detail == (
        "raw-serial: the plugin fake's open_endpoint raised RuntimeError: the monitor socket "
        "is gone, watch: running (the plugin reaches the VM itself)")
    assert finding.fix == "report it to the plugin fake's authors"


def test_domains_are_skipped_without_libvirt(tmp_path: Path) -> None:
    access = lv.LibvirtAccess("qemu:///system", error="down")
    assert statuses(lv.check_domains(make_config(tmp_path), access, [])) == [SKIP]


# --- the protocols' own checks ------------------------------------------------------------


class Checked(Protocol):
    def doctor(self, context: PluginContext) -> Iterable[Finding]:
        yield Finding("ok", "its client", f"found, assets {context.config.http.assets_dir}")
        yield Finding("warn", "qemu.conf", "odd", "set it right")


class Raising(Protocol):
    def doctor(self, context: PluginContext) -> Iterable[Finding]:
        raise OSError("boom")


class Wrong(Protocol):
    def doctor(self, context: PluginContext) -> Iterable[Finding]:
        return ["all fine"]  # type: ignore[list-item]


def test_each_protocols_findings_come_under_its_name(tmp_path: Path) -> None:
    config = make_config(tmp_path, '[http]\nassets_dir = "/srv/assets"\n')
    plugins = plugin_manager(Checked(name="zeta", title="Z"), Protocol(name="alpha", title="A"))
    lines = doctor.protocol_findings(plugins, plugins.contexts(config))
    assert lines == [
        doctor.Line("zeta", Finding("ok", "its client", "found, assets /srv/assets")),
        doctor.Line("zeta", Finding("warn", "qemu.conf", "odd", "set it right")),
    ]


@pytest.mark.parametrize(("protocol", "error"), [
    (Raising(name="boom", title="B"), "OSError: boom"),
    (Wrong(name="wrong", title="W"), "TypeError: doctor() gave 'all fine', not a Finding"),
])
def test_a_plugin_whose_check_breaks_is_a_failure_naming_it(
    tmp_path: Path, protocol: Protocol, error: str
) -> None:
    plugins = plugin_manager(protocol, Checked(name="zeta", title="Z"), name="brittle")
    lines = doctor.protocol_findings(plugins, plugins.contexts(make_config(tmp_path)))
    assert [line.check for line in lines] == [protocol.name, "zeta", "zeta"]
    broken = lines[0].finding
    assert broken.status == FAIL
    assert broken.detail == f"plugin 'brittle': {error}"
    assert "CONSOLE_BROKER_DISABLE_PLUGINS=brittle" in broken.fix


# --- the command ------------------------------------------------------------------------


def test_exit_status_fails_on_failures_and_strict_warnings() -> None:
    warning = [doctor.Line("clock", Finding(WARN, "clock", "w", "f"))]
    assert doctor.exit_status(warning) == 0
    assert doctor.exit_status(warning, strict=True) == 1
    assert doctor.exit_status([*warning, doctor.Line("keys", Finding(FAIL, "k", "p", "f"))]) == 1
    assert doctor.exit_status([doctor.Line("tls", Finding(SKIP, "TLS"))], strict=True) == 0


def test_the_table_puts_each_fix_under_its_finding() -> None:
    text = doctor.render_table([
        doctor.Line("libvirt", Finding(OK, "qemu:///system", "libvirt 9.0.0, QEMU 7.2.22")),
        doctor.Line("keys", Finding(FAIL, "private key", "k: mode 0640", "chmod 600 k")),
        doctor.Line("vnc", Finding(SKIP, "qemu.conf", "remote")),
    ])
    assert text.splitlines() == [
        "CHECK    STATUS  FINDING",
        "libvirt  ok      qemu:///system: libvirt 9.0.0, QEMU 7.2.22",
        "keys     fail    private key: k: mode 0640",
        "                 fix: chmod 600 k",
        "vnc      skip    qemu.conf: remote",
        "",
        "1 failure, 0 warnings",
    ]


def test_doctor_json_with_fakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command end to end with the built-in plugins, libvirt, the resolver and the
    clock tools faked, a group-readable key: it fails with the key's fix, the rest ok."""
    port = _free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nstate_dir = "state"\n[listen]\nport = {port}\n'
                      f'[http]\nassets_dir = "{NODE_MODULES}"\n'
                      '[libvirt]\nuri = "qemu+ssh://hv1/system"\n')
    generate_keypair(tmp_path / "state")
    (tmp_path / "state" / "signing-key.pem").chmod(0o640)
    schema = tmp_path / "domain.rng"  # the smallest schema lxml loads
    schema.write_text("<grammar xmlns='http://relaxng.org/ns/structure/1.0'><start>"
                      "<element name='domain'><empty/></element></start></grammar>")
    real = doctor.run_checks

    def with_fakes(config: Config, plugins: PluginManager, **kwargs: Any) -> Any:
        conn = FakeConn()
        kwargs.update(opener=lambda uri: conn, run=lambda argv, timeout: None,
                      resolver=lambda uri: PlanningResolver(conn), schema=str(schema))
        return real(config, plugins, **kwargs)

    monkeypatch.setattr(doctor, "run_checks", with_fakes)
    status = main(["doctor", "--config", str(config), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["exit_status"] == 1 and doc["strict"] is False
    checks = [c["check"] for c in doc["checks"]]
    assert checks == [*doctor.CORE_CHECKS, "serial", "spice", "spice", "vnc", "vnc"]
    [keys] = [c for c in doc["checks"] if c["check"] == "keys"]
    assert keys["status"] == FAIL and keys["fix"].startswith("chmod 600")
    assert set(keys) == {"check", "status", "title", "detail", "fix"}
    assert {c["status"] for c in doc["checks"] if c["check"] != "keys"} <= {OK, SKIP}


def test_a_configuration_that_cannot_be_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("[listen]\nport = -1\n")
    assert main(["doctor", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("console-broker: error: ") and "listen.port" in err


def test_doctor_help_explains_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    text = capsys.readouterr().out
    for check in doctor.CORE_CHECKS:
        assert f"\n  {check} " in text
    assert "every loaded protocol's own checks" in text
    assert "Exit\nstatus: 0 when no check failed" in text
    for flag in ("--json", "--strict", "--timeout", "--config"):
        assert flag in text


def test_reaching_consoles_that_never_ends_is_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A libvirt call stuck in a worker thread cannot be cancelled: the consoles check as a
    whole is bounded too."""
    xml = live(enabled_xml(tmp_path, capsys, "--consoles", "serial"))
    conn = FakeConn([FakeDomain("vm1", xml)])
    release = threading.Event()

    class Stuck(PlanningResolver):
        async def open(self, target: Target) -> Endpoint:
            await anyio.to_thread.run_sync(release.wait, 30)
            raise AssertionError

    try:
        [finding] = lv.check_domains(
            make_config(tmp_path), lv.LibvirtAccess("qemu:///system", conn), reachers(SERIAL),
            resolver=lambda uri: Stuck(conn), timeout=0.2)
    finally:
        release.set()
    assert finding.status == FAIL
    assert finding.detail == "reaching the consoles took more than 0.6 s"
    assert finding.fix.startswith("start libvirtd")
