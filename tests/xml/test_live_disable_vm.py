"""Live: enable then disable on a defined domain gives back ``virsh dumpxml --inactive``
identical to the one before enable, on the real stack's libvirt.

libvirt completes the definitions it stores: a virtio-serial controller for the
SPICE agent channel, a video card for a display, PCIe root ports and bridges on
q35, USB input devices on ppc64 ``pseries``. ``console-broker enable DOMAIN``
records those in the domain's metadata and ``disable`` removes them again when
nothing else uses them. Shown for every console alone and all three together on
the test bed's tiny guests (x86_64 on i440fx and q35, aarch64 on virt) and on the
virt-install domains of every architecture in ``tests/xml/arch`` whose emulator
is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import libvirt
import pytest
from console_broker_testbed import Testbed, TestbedError
from lxml import etree

from broker.xml import NAMESPACE
from broker.xml._additions import identity
from broker.xml._metadata import ADDED_NAMESPACE

pytestmark = pytest.mark.vm

CLI = [sys.executable, "-m", "broker.cli"]
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
ARCH_SAMPLES = Path(__file__).parent / "arch"
CONSOLE_SETS = ("vnc,spice,serial", "vnc", "spice", "serial")
#: The guest agent's channel, which an operator adds after enable: libvirt puts it on
#: the virtio-serial controller it added for SPICE's agent channel.
GUEST_AGENT = (
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\n"
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def enable(testbed: Testbed, name: str, consoles: str) -> str:
    done = cli("enable", name, "--consoles", consoles, "--connect", testbed.uri)
    assert done.returncode == 0, done.stderr
    return done.stdout


def disable(testbed: Testbed, name: str, *consoles: str) -> str:
    extra = ["--consoles", ",".join(consoles)] if consoles else []
    done = cli("disable", name, *extra, "--connect", testbed.uri)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def tiny_guest(testbed: Testbed, machine: str) -> str:
    """The tiny guest on *machine*: ``pc`` or ``q35`` (x86_64), or ``virt`` (aarch64:
    skipped on a developer machine without its emulator and files, failed when ``CI``
    is set)."""
    name = testbed.unique_name(f"restore-{machine}")
    if machine == "virt":
        try:
            return testbed.guest_xml(name, arch="aarch64")
        except TestbedError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"the aarch64 guest is required when CI is set: {exc}", pytrace=False)
            pytest.skip(str(exc))
    return testbed.guest_xml(name).replace("machine='pc'", f"machine='{machine}'")


def sample(testbed: Testbed, path: Path) -> str:
    """*path* (virt-install's output) under a test bed name and a new UUID; skipped on a
    developer machine without its emulator, failed when ``CI`` is set."""
    text = path.read_text()
    emulator = etree.fromstring(text.encode()).findtext("devices/emulator")
    machine_arch = re.search(r"arch=['\"]([^'\"]+)", text)
    arch = machine_arch.group(1) if machine_arch else "?"
    binary = emulator or f"qemu-system-{arch}"
    if shutil.which(binary) is None and not Path(binary).exists():
        why = f"{binary} is not installed (scripts/setup-host installs the emulators)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; required when CI is set", pytrace=False)
        pytest.skip(why)
    name = testbed.unique_name(f"restore-{path.stem}")
    text = re.sub(r"<name>.*?</name>", f"<name>{name}</name>", text, count=1)
    return re.sub(r"<uuid>.*?</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", text, count=1)


def name_of(xml: str) -> str:
    found = etree.fromstring(xml.encode()).findtext("name")
    assert found
    return found


def device_identities(xml: str) -> Counter[Any]:
    devices = etree.fromstring(xml.encode()).find("devices")
    assert devices is not None
    return Counter(identity(el) for el in devices if isinstance(el.tag, str))


def assert_enable_then_disable_restores(testbed: Testbed, xml: str, consoles: str) -> None:
    dom = testbed.define(xml)
    name = name_of(xml)
    try:
        before = dom.XMLDesc(INACTIVE)
        enable(testbed, name, consoles)
        enabled = dom.XMLDesc(INACTIVE)
        assert enabled != before
        disable(testbed, name)
        assert dom.XMLDesc(INACTIVE) == before
    finally:
        testbed.remove(dom)


@pytest.mark.parametrize("consoles", CONSOLE_SETS)
@pytest.mark.parametrize("machine", ["pc", "q35", "virt"])
def test_the_tiny_guest_is_given_back_exactly(
    testbed: Testbed, machine: str, consoles: str
) -> None:
    assert_enable_then_disable_restores(testbed, tiny_guest(testbed, machine), consoles)


def arch_samples() -> list[Path]:
    return sorted(ARCH_SAMPLES.glob("*.xml"))


@pytest.mark.parametrize("consoles", CONSOLE_SETS)
@pytest.mark.parametrize("path", arch_samples(), ids=lambda path: path.stem)
def test_each_architectures_domain_is_given_back_exactly(
    testbed: Testbed, path: Path, consoles: str
) -> None:
    xml = sample(testbed, path)
    assert_enable_then_disable_restores(testbed, xml, consoles)


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_enable_reports_and_records_what_libvirt_added(testbed: Testbed, machine: str) -> None:
    dom = testbed.define(tiny_guest(testbed, machine))
    name = dom.name()
    before = dom.XMLDesc(INACTIVE)
    out = enable(testbed, name, "spice")
    assert "recorded what libvirt added for the consoles" in out
    assert "<controller type='virtio-serial' index='0'>" in out
    enabled = dom.XMLDesc(INACTIVE)
    record = etree.fromstring(enabled.encode()).find(f"metadata/{{{ADDED_NAMESPACE}}}libvirt-added")
    assert record is not None
    assert [el.get("type") for el in record].count("virtio-serial") == 1
    # the copy in the record is the controller libvirt added, as it is in <devices>
    added = device_identities(enabled) - device_identities(before)
    assert identity(record[0]) in added
    disable(testbed, name)
    assert dom.XMLDesc(INACTIVE) == before


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_more_consoles_later_and_a_partial_disable_keep_the_record_right(
    testbed: Testbed, machine: str
) -> None:
    dom = testbed.define(tiny_guest(testbed, machine))
    name = dom.name()
    before = dom.XMLDesc(INACTIVE)
    enable(testbed, name, "vnc")
    enable(testbed, name, "spice")
    enable(testbed, name, "vnc,spice,serial")  # serial besides
    again = dom.XMLDesc(INACTIVE)
    assert "nothing to change" in enable(testbed, name, "vnc,spice,serial")
    assert dom.XMLDesc(INACTIVE) == again  # enabling twice changes nothing, the record too
    record = etree.fromstring(again.encode()).find(f"metadata/{{{ADDED_NAMESPACE}}}libvirt-added")
    assert record is not None
    kinds = [identity(el) for el in record]
    assert len(kinds) == len(set(kinds))  # a union: each device once
    disable(testbed, name, "spice")
    disable(testbed, name, "serial")
    disable(testbed, name)
    assert dom.XMLDesc(INACTIVE) == before


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_a_controller_the_operators_channel_uses_stays(
    testbed: Testbed, machine: str, tmp_path: Path
) -> None:
    """enable, then the operator adds the guest agent's channel (virsh define), then
    disable: the virtio-serial controller and the channel stay, everything console-broker
    added is gone."""
    dom = testbed.define(tiny_guest(testbed, machine))
    name = dom.name()
    before = dom.XMLDesc(INACTIVE)
    enable(testbed, name, "vnc,spice,serial")

    edited = tmp_path / "with-agent.xml"
    edited.write_text(dom.XMLDesc(INACTIVE).replace("</devices>", GUEST_AGENT + "</devices>"))
    done = subprocess.run(
        ["virsh", "-c", testbed.uri, "define", str(edited)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with_agent = dom.XMLDesc(INACTIVE)

    out = disable(testbed, name)
    assert "kept <controller type='virtio-serial' index='0'>" in out
    after = dom.XMLDesc(INACTIVE)
    root = etree.fromstring(after.encode())
    agent = root.find("devices/channel[@type='unix']")
    assert agent is not None
    assert agent.find("address").get("type") == "virtio-serial"
    # what stays beside the domain's own devices: the channel and what it needs
    stayed = device_identities(after) - device_identities(before)
    kept = {identity(agent)}
    controller = root.find("devices/controller[@type='virtio-serial']")
    assert controller is not None
    kept.add(identity(controller))
    if machine == "q35":  # the root port the controller sits on
        bus = int(controller.find("address").get("bus", "0"), 16)
        port = root.find(f"devices/controller[@type='pci'][@index='{bus}']")
        assert port is not None and port.get("model") == "pcie-root-port"
        kept.add(identity(port))
    assert set(stayed) == kept and all(count == 1 for count in stayed.values())
    assert not device_identities(before) - device_identities(after)
    # everything console-broker added is gone, its metadata too
    assert root.find("devices/graphics") is None
    assert root.find("devices/redirdev") is None
    assert root.find("devices/channel[@type='spicevmc']") is None
    assert NAMESPACE not in after and ADDED_NAMESPACE not in after
    assert with_agent != after
