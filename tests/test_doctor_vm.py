"""``console-broker doctor`` on the real stack: this host's libvirtd, a served broker with a
fresh key pair (``console-broker serve`` makes it), the checkout's browser clients, a tiny
guest whose VNC and serial consoles are enabled and reached; then a private key others may
read, and libvirtd stopped for a moment (``console_broker_testbed.libvirtd_stopped``,
running again however the test ends; marked ``libvirtd_restart``, so it runs last).

The host's other domains are other tests': what doctor says of them is not asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed, libvirtd_stopped
from servedbroker import (
    CLI,
    NODE_MODULES,
    ServedBroker,
    enabled_guest,
    free_port,
    serial_answers,
)

pytestmark = pytest.mark.vm


def doctor(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([*CLI, "doctor", "--config", str(config), "--json", *args],
                          capture_output=True, text=True, timeout=180)
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


def lines(doc: dict[str, Any], check: str) -> list[dict[str, str]]:
    return [c for c in doc["checks"] if c["check"] == check]


def not_about_others(doc: dict[str, Any], domain: str) -> list[dict[str, str]]:
    """The findings that are not about the other tests' domains."""
    return [c for c in doc["checks"]
            if c["check"] != "domains" or c["title"] == f"domain {domain}"]


def write_config(directory: Path) -> Path:
    """A configuration with a fresh key pair (console-broker keygen) and a free port."""
    config = directory / "broker.toml"
    config.write_text(
        f'[broker]\nstate_dir = "state"\n[listen]\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'[http]\nassets_dir = "{NODE_MODULES}"\n'
    )
    subprocess.run([*CLI, "keygen", "--config", str(config)], check=True, capture_output=True,
                   timeout=60)
    return config


def test_a_healthy_host_is_all_green(testbed: Testbed, tmp_path: Path) -> None:
    dom = enabled_guest(testbed, "--consoles", "vnc,serial", "--mode", "fd")
    served = ServedBroker(tmp_path)
    try:
        status, doc = doctor(served.config)
        # the broker still serves the guest's console after doctor reached it
        with served.connect(dom.name(), protocol="serial") as ws:
            serial_answers(ws)
    finally:
        served.stop()
        testbed.remove(dom)
    mine = not_about_others(doc, dom.name())
    assert {c["status"] for c in mine} <= {"ok", "skip"}, [
        c for c in mine if c["status"] not in ("ok", "skip")]
    assert status == doc["exit_status"] == 0
    [libvirt] = lines(doc, "libvirt")
    assert libvirt["title"] == "qemu:///system" and libvirt["detail"].startswith("libvirt ")
    assert [c["title"] for c in lines(doc, "keys")] == ["key pair"]
    [port] = lines(doc, "ports")
    assert port["detail"].startswith("held by the console-broker running here")
    [guest] = [c for c in lines(doc, "domains") if c["title"] == f"domain {dom.name()}"]
    assert guest == {
        "check": "domains", "status": "ok", "title": f"domain {dom.name()}", "fix": "",
        "detail": "serial console stream serial0, vnc graphics #0 (fd)",
    }
    # every loaded protocol's own checks, under its name: the browser clients found
    assets = {c["check"]: c for c in doc["checks"]
              if c["title"] in ("noVNC", "spice-html5", "xterm.js")}
    assert sorted(assets) == ["serial", "spice", "vnc"]
    assert {c["status"] for c in assets.values()} == {"ok"}
    assert {c["check"] for c in doc["checks"] if c["title"] == "qemu.conf"} == {"vnc", "spice"}


def test_a_group_readable_private_key_fails_with_its_fix(testbed: Testbed, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    key = tmp_path / "state" / "signing-key.pem"
    key.chmod(0o640)
    status, doc = doctor(config)
    assert status == doc["exit_status"] == 1
    [keys] = lines(doc, "keys")
    assert keys == {
        "check": "keys", "status": "fail", "title": "private key", "fix": f"chmod 600 {key}",
        "detail": f"{key}: mode 0640: group or others may read the private key",
    }
    assert lines(doc, "libvirt")[0]["status"] == "ok"
    table = subprocess.run([*CLI, "doctor", "--config", str(config)], capture_output=True,
                           text=True, timeout=180)
    assert table.returncode == 1
    text = table.stdout.splitlines()
    at = text.index(next(t for t in text if t.startswith("keys ")))
    assert "fail" in text[at] and text[at + 1].strip() == f"fix: chmod 600 {key}"


@pytest.mark.libvirtd_restart
def test_libvirtd_stopped_fails_with_the_fix(testbed: Testbed, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    try:
        with libvirtd_stopped():
            status, doc = doctor(config, "--timeout", "10")
    finally:
        testbed.reconnect()
    assert status == doc["exit_status"] == 1
    [libvirt] = lines(doc, "libvirt")
    assert libvirt["status"] == "fail"
    assert libvirt["title"] == "qemu:///system"
    assert libvirt["detail"].startswith("cannot connect: ")
    assert libvirt["fix"].startswith("start libvirtd")
    assert [c["status"] for c in lines(doc, "domains")] == ["skip"]
    assert lines(doc, "keys")[0]["status"] == "ok"
    # libvirtd runs again: doctor says so
    status, doc = doctor(config)
    assert lines(doc, "libvirt")[0]["status"] == "ok"
