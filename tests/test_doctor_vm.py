"""``console-broker doctor`` on the real stack: this host's libvirtd, a fresh state
directory made by ``console-broker keygen``, the checkout's browser clients, a guest whose
consoles are enabled; then a private key others may read, and libvirtd stopped for a
moment (restarted in a ``finally``, as tests/service/test_libvirtd_restart_vm.py does).

Domains and qemu.conf are the host's, shared with other tests: their findings about
domains that are not this test's are not asserted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed, ensure_daemons
from servedbroker import CLI, NODE_MODULES, enabled_guest, free_port

pytestmark = pytest.mark.vm
LIBVIRTD_PID = Path("/run/libvirtd.pid")


def write_config(directory: Path) -> Path:
    config = directory / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "state"\n[listen]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[http]\nassets_dir = "{NODE_MODULES}"\n'
    )
    subprocess.run([*CLI, "keygen", "--config", str(config)], check=True, capture_output=True,
                   timeout=60)
    return config


def doctor(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([*CLI, "doctor", "--config", str(config), "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


def checks(doc: dict[str, Any], name: str) -> list[dict[str, str]]:
    return [c for c in doc["checks"] if c["check"] == name]


def not_about_others(doc: dict[str, Any], domain: str = "") -> list[dict[str, str]]:
    """The findings that are not about the host's other tests' domains or qemu.conf."""
    return [
        c for c in doc["checks"]
        if c["check"] != "qemu.conf"
        and (c["check"] != "domains" or c["message"].startswith(f"{domain}:"))
    ]


def test_a_healthy_host_passes(testbed: Testbed, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    dom = enabled_guest(testbed, "--consoles", "vnc,serial", "--mode", "fd")
    try:
        status, doc = doctor(config)
    finally:
        testbed.remove(dom)
    [libvirt] = checks(doc, "libvirt")
    assert libvirt["status"] == "ok" and libvirt["message"].startswith("qemu:///system: libvirt ")
    [keys] = checks(doc, "keys")
    assert keys["status"] == "ok", keys
    assert [c["status"] for c in checks(doc, "assets")] == ["ok"]
    assert [c["status"] for c in checks(doc, "ports")] == ["ok"]
    [mine] = [c for c in checks(doc, "domains") if c["message"].startswith(f"{dom.name()}:")]
    assert mine == {
        "check": "domains", "status": "ok", "fix": "",
        "message": f"{dom.name()}: serial console stream serial0, vnc graphics #0 (fd)",
    }
    assert [c for c in not_about_others(doc, dom.name()) if c["status"] == "problem"] == []
    problems = [c for c in doc["checks"] if c["status"] == "problem"]
    assert status == doc["exit_status"] == (1 if problems else 0)


def test_a_group_readable_private_key_fails(testbed: Testbed, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    key = tmp_path / "state" / "signing-key.pem"
    key.chmod(0o640)
    status, doc = doctor(config)
    assert status == 1
    [keys] = checks(doc, "keys")
    assert keys == {
        "check": "keys", "status": "problem", "fix": f"chmod 600 {key}",
        "message": f"{key}: mode 0640: group or others may read the private key",
    }
    assert checks(doc, "libvirt")[0]["status"] == "ok"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def libvirtd_stopped(testbed: Testbed, timeout: float = 30.0) -> Iterator[None]:
    """libvirtd stopped (SIGTERM to its pid file's process, as
    console_broker_testbed.restart_libvirtd does), and started again however the block
    ends; the test bed's connection is opened anew."""
    pid = int(LIBVIRTD_PID.read_text().strip())
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid):
            assert time.monotonic() < deadline, f"libvirtd (pid {pid}) did not stop"
            time.sleep(0.05)
        yield
    finally:
        ensure_daemons(timeout)
        testbed.reconnect()


@pytest.mark.libvirtd_restart
def test_libvirtd_stopped_is_reported_with_the_fix(testbed: Testbed, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with libvirtd_stopped(testbed):
        status, doc = doctor(config, "--timeout", "10")
    assert status == 1
    [libvirt] = checks(doc, "libvirt")
    assert libvirt["status"] == "problem"
    assert libvirt["message"].startswith("cannot connect to qemu:///system: ")
    assert libvirt["fix"].startswith("start libvirtd")
    assert [c["status"] for c in checks(doc, "domains")] == ["skipped"]
    assert checks(doc, "keys")[0]["status"] == "ok"
