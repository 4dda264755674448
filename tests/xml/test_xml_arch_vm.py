"""Issue 18 on the real stack: the x86_64, aarch64, s390x and ppc64le domains of
``arch/`` (as virt-install writes them), enabled with every console in every mode (the
filter in fd, tcp and websocket, the libvirt hook, the live command), are defined by
this machine's libvirtd, and what libvirt stores validates against its schema.

An architecture whose QEMU is not installed is skipped on a developer machine; under
``CI`` it fails when scripts/setup-host installs its package. The domains are defined,
never started (the samples boot nothing).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from lxml import etree
from xmlhelpers import CliRunner

from broker.xml import (
    NAMESPACE,
    Platform,
    connection_capabilities,
    domain_schema,
    libvirt_capabilities,
    parse_document,
    read_consoles,
    schema_errors,
)

libvirt = pytest.importorskip("libvirt")

ARCH = Path(__file__).parent / "arch"
SAMPLES = sorted(ARCH.glob("*.xml"))
SETUP_HOST = Path(__file__).parents[2] / "scripts" / "setup-host"
ALL = "vnc,spice,serial"
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE

#: arch -> (emulator, the Debian package that ships it)
EMULATORS = {
    "x86_64": ("qemu-system-x86_64", "qemu-system-x86"),
    "aarch64": ("qemu-system-aarch64", "qemu-system-arm"),
    "s390x": ("qemu-system-s390x", "qemu-system-misc"),
    "ppc64le": ("qemu-system-ppc64le", "qemu-system-ppc"),
}


def arch_of(data: bytes) -> str:
    os_type = parse_document(data).root.find("os/type")
    assert os_type is not None
    return str(os_type.get("arch"))


def require_emulator(arch: str) -> None:
    """Skip without *arch*'s QEMU; under CI, fail if setup-host installs it."""
    emulator, package = EMULATORS[arch]
    if shutil.which(emulator):
        return
    installed_by_setup = SETUP_HOST.exists() and re.search(
        rf"\b{re.escape(package)}\b", SETUP_HOST.read_text()
    )
    if os.environ.get("CI") and installed_by_setup:
        pytest.fail(f"{emulator} ({package}) is required when CI is set", pytrace=False)
    pytest.skip(f"{emulator} is not installed (Debian package {package})")


def named(data: bytes, name: str) -> bytes:
    """*data* as domain *name*, without its UUID (libvirt gives it a new one)."""
    data = re.sub(rb"<name>[^<]*</name>", f"<name>{name}</name>".encode(), data, count=1)
    return re.sub(rb"\s*<uuid>[^<]*</uuid>", b"", data, count=1)


def assert_valid(xml: str | bytes) -> None:
    data = xml.encode() if isinstance(xml, str) else xml
    schema = domain_schema()
    assert schema is not None, "libvirt's domain schema is part of the test bed"
    assert schema_errors(parse_document(data).tree, schema) == []


def define(testbed: Testbed, xml: bytes) -> Any:
    dom = testbed.define(xml.decode())
    assert_valid(dom.XMLDesc(INACTIVE))
    return dom


def video_models(xml: str) -> list[str | None]:
    root = etree.fromstring(xml.encode())
    return [v.find("model").get("type") for v in root.iterfind("devices/video")]  # type: ignore[union-attr]


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["fd", "tcp", "websocket"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_filters_output_is_defined_and_valid(
    testbed: Testbed, cli: CliRunner, sample: Path, mode: str
) -> None:
    data = named(sample.read_bytes(), testbed.unique_name(f"arch-{mode}"))
    require_emulator(arch_of(data))
    done = cli("xml", "enable", "--consoles", ALL, "--mode", mode, "-", stdin=data)
    assert done.status == 0, done.stderr
    dom = define(testbed, done.stdout)
    stored = dom.XMLDesc(INACTIVE)
    assert set(read_consoles(parse_document(stored.encode()))) == {"vnc", "spice", "serial"}
    if arch_of(data) != "x86_64":
        assert "qxl" not in video_models(stored)
    # libvirt's own rewrite is recognised as done
    again = cli("xml", "enable", "--consoles", ALL, "--mode", mode, "--check", "-",
                stdin=stored.encode())
    assert again.status == 0, again.stderr
    # disable on the filter's own output gives back the input (libvirt's additions on
    # define are the live command's to record: see test_the_live_command_...)
    undone = cli("xml", "disable", "-", stdin=done.stdout)
    assert undone.status == 0, undone.stderr
    assert undone.stdout == data


@pytest.mark.vm
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_hooks_output_is_defined_and_valid(
    testbed: Testbed, cli: CliRunner, sample: Path, tmp_path: Path
) -> None:
    data = named(sample.read_bytes(), testbed.unique_name("arch-hook"))
    require_emulator(arch_of(data))
    policy = tmp_path / "hook.toml"
    policy.write_text('consoles = ["vnc", "spice", "serial"]\nmode = "tcp"\n')
    done = cli("libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-",
               stdin=data)
    assert done.status == 0, done.stderr
    define(testbed, done.stdout or data)


@pytest.mark.vm
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_live_command_enables_and_disables(
    testbed: Testbed, cli: CliRunner, sample: Path
) -> None:
    name = testbed.unique_name("arch-live")
    data = named(sample.read_bytes(), name)
    arch = arch_of(data)
    require_emulator(arch)
    dom = define(testbed, data)
    done = cli("enable", name, "--consoles", ALL, "--mode", "tcp", "--connect", testbed.uri)
    assert done.status == 0, done.stderr
    stored = dom.XMLDesc(INACTIVE)
    assert_valid(stored)
    records = read_consoles(parse_document(stored.encode()))
    assert set(records) == {"vnc", "spice", "serial"}
    assert all(record.device is not None for record in records.values())
    if arch != "x86_64":
        assert "qxl" not in video_models(stored)
    if arch == "s390x":
        assert etree.fromstring(stored.encode()).find("devices/redirdev") is None
    done = cli("disable", name, "--connect", testbed.uri)
    assert done.status == 0, done.stderr
    after = dom.XMLDesc(INACTIVE)
    assert_valid(after)
    assert NAMESPACE not in after


@pytest.mark.vm
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_libvirts_capabilities_for_the_domain(testbed: Testbed, sample: Path) -> None:
    data = sample.read_bytes()
    arch = arch_of(data)
    require_emulator(arch)
    platform = Platform.of_domain(parse_document(data).root)
    caps = libvirt_capabilities(testbed.conn)(platform)
    assert caps is not None
    assert caps.arch == arch
    assert caps.video_models is not None and "virtio" in caps.video_models
    assert ("qxl" in caps.video_models) == (arch == "x86_64")
    assert caps.redirdev_buses == (frozenset() if arch == "s390x" else frozenset({"usb"}))
    assert caps.graphics_types is not None and "vnc" in caps.graphics_types
    # the table the filter uses without a connection says the same
    offline = Platform(arch=arch, machine=platform.machine)
    assert offline.video_models == caps.video_models
    assert offline.redirdev_buses == caps.redirdev_buses


@pytest.mark.vm
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_live_command_gets_the_capabilities(testbed: Testbed, sample: Path) -> None:
    """What ``console-broker enable DOMAIN`` asks: its own connection to the URI."""
    data = sample.read_bytes()
    require_emulator(arch_of(data))
    platform = Platform.of_domain(parse_document(data).root)
    caps = connection_capabilities(testbed.uri)(platform)
    assert caps is not None
    assert caps == libvirt_capabilities(testbed.conn)(platform)


@pytest.mark.vm
def test_an_emulator_libvirt_does_not_know_gives_no_capabilities(testbed: Testbed) -> None:
    platform = Platform(arch="aarch64", machine="virt", emulator="/nonexistent/qemu")
    assert libvirt_capabilities(testbed.conn)(platform) is None
    assert connection_capabilities(testbed.uri)(platform) is None


@pytest.mark.vm
@pytest.mark.parametrize(
    ("arch", "machine", "added"),
    [
        ("aarch64", "virt", "console"),  # its one UART taken: a virtio console
        ("s390x", "s390-ccw-virtio", "serial"),  # port 1, the line-mode SCLP console
        ("ppc64le", "pseries", "serial"),  # another spapr-vty
    ],
)
def test_a_pty_beside_a_taken_serial_port_is_defined(
    testbed: Testbed, cli: CliRunner, arch: str, machine: str, added: str
) -> None:
    require_emulator(arch)
    emulator = EMULATORS[arch][0]
    data = (
        f"<domain type='qemu'><name>{testbed.unique_name('arch-serial')}</name>"
        f"<memory>131072</memory><os><type arch='{arch}' machine='{machine}'>hvm</type></os>"
        f"<devices><emulator>/usr/bin/{emulator}</emulator>"
        "<serial type='file'><source path='/var/log/cb-serial.log'/><target port='0'/></serial>"
        "</devices></domain>"
    ).encode()
    done = cli("xml", "enable", "--consoles", "serial", "-", stdin=data)
    assert done.status == 0, done.stderr
    dom = define(testbed, done.stdout)
    stored = parse_document(dom.XMLDesc(INACTIVE).encode())
    record = read_consoles(stored)["serial"]
    assert record.device is not None and record.device.tag == added
    assert record.index is not None
    found = stored.root.findall(f"devices/{added}")[record.index]
    assert found.get("type") == "pty"
