"""The test bed itself: the guest's initramfs, and the real stack booting it."""

from __future__ import annotations

import gzip
import re
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
