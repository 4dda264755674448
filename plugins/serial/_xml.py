"""The serial plugin's domain XML edit: a pty serial port the broker can open.

The broker reads and writes the serial console through libvirt
(virDomainOpenConsole), which needs a ``pty`` character device. Existing
serial ports are always kept. When none is a pty (and no virtio console is
one), a pty serial port is added on the next free port. When serial port 0
is a pty, the first console mirrors it, as libvirt itself would arrange.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from lxml import etree

from broker.api import Compare, ConsoleEdit, DeviceRef, EditOptions, Slot, load_fragment

TEMPLATES = "broker_xml_templates"


def _is_mirror(console: etree._Element) -> bool:
    """Whether *console* is one whose target is a serial port (libvirt mirrors that port)."""
    target = console.find("target")
    return target is None or target.get("type") in (None, "serial")


def _port(serial: etree._Element) -> int:
    target = serial.find("target")
    port = target.get("port") if target is not None else None
    return int(port) if port is not None and port.isdigit() else 0


def _reachable(serials: Sequence[etree._Element], devices: etree._Element) -> bool:
    """Whether a pty console exists already (a serial port, or a virtio/other console)."""
    if any(serial.get("type") == "pty" for serial in serials):
        return True
    mirrors = {el for el in devices.iterchildren("console") if _is_mirror(el)}
    for console in devices.iterchildren("console"):
        if console.get("type") != "pty":
            continue
        # A serial-target console without any serial port defines serial port 0.
        if console not in mirrors or not serials:
            return True
    return False


def _serials(current: Sequence[etree._Element], devices: etree._Element) -> list[etree._Element]:
    if _reachable(current, devices):
        return list(current)
    serial = load_fragment(TEMPLATES, "serial/serial.xml")
    target = serial.find("target")
    assert target is not None
    target.set("port", str(max((_port(s) for s in current), default=-1) + 1))
    return [*current, serial]


def _consoles(current: Sequence[etree._Element], devices: etree._Element) -> list[etree._Element]:
    """libvirt's own rule: the first console mirrors a pty serial port 0.

    libvirt adds that console itself when it is missing; adding it here keeps
    the edit's output what libvirt stores, and lets ``disable`` take it away.
    """
    serial0 = next((s for s in devices.iterchildren("serial") if _port(s) == 0), None)
    if serial0 is None or serial0.get("type") != "pty" or any(_is_mirror(c) for c in current):
        return list(current)
    # The mirror must come first: the others move behind it (as copies).
    return [load_fragment(TEMPLATES, "serial/console.xml"), *(copy.deepcopy(c) for c in current)]


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """A pty serial port and, where libvirt would add one, its console."""
    del options  # serial consoles have no modes: the broker always uses a libvirt stream
    return ConsoleEdit(
        mode="stream",
        slots=[
            Slot(
                name="serial",
                select="serial",
                build=_serials,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
            Slot(
                name="console",
                select="console",
                build=_consoles,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
        ],
        devices=[DeviceRef("serial", "pty"), DeviceRef("console", "pty")],
    )
