"""``console-broker serve`` under the shipped unit's restrictions, applied without systemd
(tests/systemd_sandbox.py says which it reproduces and which not): inside, the file
system is read-only but for the state directory, home directories are hidden, /tmp is
private, no privilege can be gained and no capability but binding a low port is left;
the broker still serves, and on the real stack it reaches libvirt and a serial console
echoes through it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_broker_testbed import Testbed
from servedbroker import NODE_MODULES, ServedBroker, enabled_guest, serial_answers
from systemd_sandbox import Sandbox

from broker.service_unit import installed_script

#: CAP_NET_BIND_SERVICE alone (capability 10), as /proc/PID/status shows a set.
NET_BIND_SERVICE = f"{1 << 10:016x}"


def sandbox_or_skip(directory: Path) -> Sandbox:
    script = Path(installed_script()[0])
    sandbox = Sandbox(directory, [directory / "state"],
                      needed=[script.parent, script.resolve().parent, NODE_MODULES])
    probe = subprocess.run(sandbox.command(["true"]), capture_output=True, text=True)
    if probe.returncode != 0:
        why = f"cannot make the sandbox here (root with CAP_SYS_ADMIN needed): {probe.stderr}"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return sandbox


def inside(sandbox: Sandbox, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sandbox.command(["sh", "-c", script]), capture_output=True,
                          text=True, timeout=60)


def test_the_restrictions_hold_inside(tmp_path: Path) -> None:
    sandbox = sandbox_or_skip(tmp_path)
    (tmp_path / "broker.toml").write_text("")
    status = inside(sandbox, "grep -E '^(CapBnd|CapEff|CapAmb|NoNewPrivs):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status.stdout.splitlines())
    assert fields == {"CapBnd": NET_BIND_SERVICE, "CapEff": NET_BIND_SERVICE,
                      "CapAmb": "0" * 16, "NoNewPrivs": "1"}
    # Writing: the state directory and the private /tmp only.
    for path in ("/etc/console-broker-probe", "/var/lib/console-broker-probe",
                 "/usr/local/console-broker-probe", str(tmp_path / "probe"),
                 "/run/console-broker-probe"):
        denied = inside(sandbox, f"echo x > {path}")
        assert denied.returncode != 0, path
        assert "Read-only file system" in denied.stderr, (path, denied.stderr)
        assert not Path(path).exists()
    allowed = inside(sandbox, f"echo x > {tmp_path / 'state' / 'probe'} && echo x > /tmp/free")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "state" / "probe").read_text() == "x\n"
    assert not Path("/tmp/free").exists()  # the private /tmp went away with the process
    # The test's files are there, read-only; nothing else of the real /tmp; no home.
    listing = inside(sandbox, f"ls /tmp; echo ---; ls {tmp_path}; echo ---; umask")
    in_tmp, here, umask = listing.stdout.split("---\n")
    shown = {path.relative_to("/tmp").parts[0] for path in [tmp_path, *sandbox.in_tmp]}
    assert set(in_tmp.split()) == shown
    assert "broker.toml" in here.split()
    assert umask.strip() == sandbox.options["UMask"]
    for home in ("/root", "/home"):
        hidden = inside(sandbox, f"ls -A {home}")
        assert hidden.returncode != 0 and "Permission denied" in hidden.stderr, home
    # The kernel's tunables cannot be changed.
    tunable = inside(sandbox, "echo 1 > /proc/sys/kernel/domainname")
    assert "Read-only file system" in tunable.stderr


def sandboxed_broker(directory: Path, **kwargs: object) -> ServedBroker:
    """``console-broker serve`` (the installed script, as the unit's ExecStart) in the
    sandbox; its tokens are issued in the sandbox too."""
    sandbox = sandbox_or_skip(directory)
    return ServedBroker(directory, command=sandbox.command(installed_script()), **kwargs)


def test_the_broker_serves_in_the_sandbox(tmp_path: Path) -> None:
    served = sandboxed_broker(
        tmp_path, protocol="serial", extra_config='[libvirt]\nuri = "test:///default"\n'
    )
    try:
        status, _ = served.get("/healthz")
        assert status == 200
        token = served.token("test")
        assert token["token"]
        # The key pair and the used tokens' store were made in the state directory.
        assert (tmp_path / "state" / "signing-key.pem").is_file()
        assert (tmp_path / "state" / "replay.sqlite3").is_file()
    finally:
        served.stop()
    assert served.process.returncode == 0
    assert served.events("broker.stopped")


@pytest.fixture
def guest(testbed: Testbed) -> Iterator[object]:
    dom = enabled_guest(testbed, "--consoles", "serial")
    try:
        yield dom
    finally:
        testbed.remove(dom)


@pytest.mark.vm
def test_a_serial_console_through_the_sandboxed_broker(tmp_path: Path, guest: object) -> None:
    """On the real stack: the sandboxed broker reaches libvirt's socket (qemu:///system)
    and the guest's serial console answers through it."""
    served = sandboxed_broker(tmp_path, protocol="serial")
    try:
        # A raw session (subprotocol binary): typed keys go to the guest's shell, its
        # output comes back (echo hello-$((6*7)) answers hello-42).
        with served.connect(guest.name()) as ws:  # type: ignore[attr-defined]
            serial_answers(ws)
        assert served.events("libvirt.connected")
        assert not served.events("libvirt.unreachable")
    finally:
        served.stop()
    served.assert_no_token_logged(require_tokens=True)
