"""The serial plugin's domain XML edit: a pty serial port the broker can open.

The broker reads and writes the serial console through libvirt
(virDomainOpenConsole), which needs a ``pty`` character device. Existing
serial ports are always kept. When none is a pty (and no virtio console is
one), a pty serial port is added on the next free port. When serial port 0
is a pty, the first console mirrors it, as libvirt itself would arrange.

The guest's platform (``options.platform``) decides the serial port: on a machine the
core knows other than x86, the new port names the target type libvirt gives it there
(``system-serial``, a PL011, on aarch64 virt; ``sclp-serial`` on s390x, port 1 being
the ``sclplmconsole``; ``spapr-vio-serial`` on ppc64 pseries). Where the machine has
no free serial port left (aarch64 virt has one UART), a virtio console on a pty is
added instead (every machine libvirt runs has virtio consoles).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from lxml import etree

from broker.api import (
    Compare,
    ConsoleEdit,
    DeviceRef,
    EditOptions,
    Platform,
    Slot,
    load_fragment,
)

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


def _next_port(serials: Sequence[etree._Element]) -> int:
    return max((_port(s) for s in serials), default=-1) + 1


def _port_free(platform: Platform, serials: Sequence[etree._Element]) -> bool:
    """Whether the machine has a serial port left for a new one."""
    limit = platform.serial_ports
    return limit is None or _next_port(serials) < limit


def _new_serial(platform: Platform, port: int) -> etree._Element:
    serial = load_fragment(TEMPLATES, "serial/serial.xml")
    target = serial.find("target")
    assert target is not None
    target.set("port", str(port))
    target_type = platform.serial_target_type
    if target_type is not None and platform.family != "x86":
        # libvirt's own default there, written out (x86 keeps the template: isa-serial).
        target.attrib.clear()
        target.set("type", target_type)
        target.set("port", str(port))
        if target_type == "sclp-serial" and port == 1:
            etree.SubElement(target, "model").set("name", "sclplmconsole")
    return serial


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """A pty serial port and, where libvirt would add one, its console."""
    # serial consoles have no modes: the broker always uses a libvirt stream
    platform = options.platform

    def serials(
        current: Sequence[etree._Element], devices: etree._Element
    ) -> list[etree._Element]:
        if _reachable(current, devices) or not _port_free(platform, current):
            return list(current)
        return [*current, _new_serial(platform, _next_port(current))]

    def consoles(
        current: Sequence[etree._Element], devices: etree._Element
    ) -> list[etree._Element]:
        """libvirt's own rule: the first console mirrors a pty serial port 0.

        libvirt adds that console itself when it is missing; adding it here keeps
        the edit's output what libvirt stores, and lets ``disable`` take it away.
        Where no serial port could be added, a virtio console on a pty is.
        """
        present = list(devices.iterchildren("serial"))
        if not _reachable(present, devices):
            return [*current, load_fragment(TEMPLATES, "serial/virtio-console.xml")]
        serial0 = next((s for s in present if _port(s) == 0), None)
        if serial0 is None or serial0.get("type") != "pty" or any(_is_mirror(c) for c in current):
            return list(current)
        # The mirror must come first: the others move behind it (as copies).
        mirror = load_fragment(TEMPLATES, "serial/console.xml")
        return [mirror, *(copy.deepcopy(c) for c in current)]

    return ConsoleEdit(
        mode="stream",
        slots=[
            Slot(
                name="serial",
                select="serial",
                build=serials,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
            Slot(
                name="console",
                select="console",
                build=consoles,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
        ],
        devices=[DeviceRef("serial", "pty"), DeviceRef("console", "pty")],
    )
