"""The test bed itself: the guest's initramfs, and the real stack booting it."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import console_broker_testbed as tb
import pytest
from console_broker_testbed import PROMPT, READY_LINE, Testbed, running_guest


def _cpio_members(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Parse a newc cpio archive: name -> (mode, data, (rdev major, minor))."""
    members = {}
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + size]
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data, (fields[9], fields[10]))


def test_initramfs_holds_busybox_init_and_a_console_node() -> None:
    members = _cpio_members(gzip.decompress(tb.initramfs_bytes(b"BUSYBOX")))
    assert members["bin/busybox"] == (0o100755, b"BUSYBOX", (0, 0))
    mode, init, _ = members["init"]
    assert mode == 0o100755 and init.startswith(b"#!/bin/busybox sh\n")
    assert READY_LINE.encode() in init
    assert members["dev/console"][0] == 0o020600 and members["dev/console"][2] == (5, 1)
    assert PROMPT.encode() in members["etc/profile"][1]


def test_initramfs_is_reproducible() -> None:
    assert tb.initramfs_bytes(b"x") == tb.initramfs_bytes(b"x")


def test_guest_xml_escapes_its_name() -> None:
    xml = tb.guest_xml("a<b", kernel=Path("/k"), initrd=Path("/i"))
    assert "<name>a&lt;b</name>" in xml


def test_the_x86_init_is_the_generic_one_on_ttys0() -> None:
    assert tb.init_script() == tb.init_script("ttyS0", ())
    assert "insmod" not in tb.init_script()
    assert "/dev/ttyS0" in tb.init_script() and "ttyAMA0" not in tb.init_script()


def test_the_aarch64_initramfs_loads_its_modules_in_order(tmp_path: Path) -> None:
    files = tmp_path / tb.ARM64_SUBDIR
    (files / "modules").mkdir(parents=True)
    (files / "vmlinuz").write_bytes(b"IMAGE")
    (files / "busybox").write_bytes(b"ARM64-BUSYBOX")
    order = ["virtio_pci.ko", "drm.ko", "virtio-gpu.ko"]
    for name in order:
        (files / "modules" / name).write_bytes(name.encode() + b"-code")
    (files / "modules.load").write_text("\n".join(order) + "\n")

    kernel, initrd = tb.aarch64_files(tmp_path)
    assert kernel == files / "vmlinuz"
    members = _cpio_members(gzip.decompress(initrd.read_bytes()))
    assert members["bin/busybox"][1] == b"ARM64-BUSYBOX"
    for name in order:
        assert members[f"lib/modules/{name}"] == (0o100644, name.encode() + b"-code", (0, 0))
    init = members["init"][1].decode()
    loads = re.findall(r"^insmod /lib/modules/(\S+)$", init, re.MULTILINE)
    assert loads == order
    # loaded before the ready line, which goes to the PL011 and the screen's console
    assert init.index("insmod") < init.index(READY_LINE)
    assert f'echo "{READY_LINE}" >/dev/ttyAMA0' in init and "/dev/ttyS0" not in init
    assert "<>/dev/ttyAMA0" in init and "<>/dev/tty1" in init
    # built once per content
    assert tb.aarch64_files(tmp_path) == (kernel, initrd)
    (files / "modules" / "drm.ko").write_bytes(b"another drm")
    assert tb.aarch64_files(tmp_path)[1] != initrd


def test_missing_aarch64_files_say_to_run_setup_host(tmp_path: Path) -> None:
    with pytest.raises(tb.TestbedError, match="scripts/setup-host") as missing:
        tb.aarch64_files(tmp_path)
    assert str(tmp_path / tb.ARM64_SUBDIR / "vmlinuz") in str(missing.value)
    files = tmp_path / tb.ARM64_SUBDIR
    files.mkdir()
    for name in ("vmlinuz", "busybox"):
        (files / name).write_bytes(b"x")
    (files / "modules.load").write_text("gone.ko\n")
    with pytest.raises(tb.TestbedError, match=r"gone\.ko is missing: run scripts/setup-host"):
        tb.aarch64_files(tmp_path)


def test_the_aarch64_domain_is_the_virt_machine_with_virtio_gpu() -> None:
    from lxml import etree

    xml = tb.guest_xml("g", kernel=Path("/k"), initrd=Path("/i"), arch="aarch64")
    tree = etree.fromstring(xml.encode())
    assert tree.get("type") == "qemu"
    assert (tree.find("os/type").get("arch"), tree.find("os/type").get("machine")) == (
        "aarch64", "virt")
    assert tree.find("os/loader") is None and tree.find("os").get("firmware") is None
    assert tree.findtext("os/cmdline").split()[:2] == ["console=tty0", "console=ttyAMA0"]
    assert tree.findtext("cpu/model") == "cortex-a57"
    assert [m.get("type") for m in tree.iterfind("devices/video/model")] == ["virtio"]
    assert [c.get("model") for c in tree.iterfind("devices/controller[@type='usb']")] == [
        "qemu-xhci"]
    assert tree.find("devices/serial") is not None
    # the x86 guest is what it was: the pc machine, ttyS0, no display of its own
    x86 = etree.fromstring(tb.guest_xml("g", kernel=Path("/k"), initrd=Path("/i")).encode())
    assert x86.find("os/type").get("arch") == "x86_64"
    assert x86.find("devices/video") is None and x86.find("cpu") is None
    assert x86.findtext("memory") == "128"
    with pytest.raises(ValueError, match="s390x"):
        tb.guest_xml("g", kernel=Path("/k"), initrd=Path("/i"), arch="s390x")


@pytest.mark.vm
def test_tiny_guest_boots_and_answers_on_its_serial_console(testbed: Testbed) -> None:
    with running_guest(testbed) as (dom, serial):
        assert dom.isActive()
        # boot() already waited for the ready line; the shell prompt follows.
        assert READY_LINE.encode() in serial.output
        serial.expect(re.escape(PROMPT))
        assert serial.run("echo hello-$((6*7))").strip() == "hello-42"
        assert serial.run("cat /proc/cmdline").split()[:2] == ["console=tty0", "console=ttyS0"]
    names = [d.name() for d in testbed.conn.listAllDomains()]
    assert dom.name() not in names  # removed afterwards


@pytest.mark.vm
def test_daemons_starts_libvirtd_with_its_capabilities_probed(testbed: Testbed) -> None:
    """``python -m console_broker_testbed daemons`` (scripts/test runs it beside the unit
    tests, in a process of its own as here: libvirt's event loop of this one is the
    tests'): libvirtd answers, and its capabilities name the host's emulator."""
    done = subprocess.run([sys.executable, "-m", "console_broker_testbed", "daemons"],
                          capture_output=True, text=True, timeout=240)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert "/usr/bin/qemu-system-x86_64" in testbed.conn.getCapabilities()
