"""The keyboard and pointer a graphical console needs, for every graphical plugin.

What a user types or points at on a VNC or SPICE page reaches the guest only through
an input device of the domain. x86 ``pc`` and ``q35`` have a PS/2 keyboard and mouse
built in, and libvirt adds a USB keyboard and mouse to a ppc64 domain with graphics;
the aarch64 and riscv ``virt`` machines and s390x have none, and libvirt adds none
(:meth:`Platform.implicit_inputs`). There :func:`input_slot` adds
``<input type='keyboard' bus='virtio'/>`` and ``<input type='tablet' bus='virtio'/>``
for whichever of the two the domain lacks.

The bus is virtio on every machine: virtio input devices (libvirt's domain XML,
https://libvirt.org/formatdomain.html#input-devices: ``bus`` "virtio", since 1.3.0)
need no USB controller, so one rule serves a domain whose USB is disabled
(``<controller type='usb' model='none'/>``), one without any, and s390x, which has no
USB at all; a tablet (absolute coordinates) follows the pointer of the page exactly,
where a relative mouse drifts from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from broker.xml._model import Compare, Slot
from broker.xml._platform import Platform

#: The slot's name in every protocol's record.
INPUT_SLOT = "input"
#: What the slot selects: the virtio input devices (those it adds among them).
INPUT_SELECT = "input[@bus='virtio']"
#: ``<input type>`` -> what it is to a console.
_KINDS = {"keyboard": "keyboard", "mouse": "pointer", "tablet": "pointer"}
#: What the slot adds for each missing kind, in this order.
_ADDED = (("keyboard", "keyboard"), ("pointer", "tablet"))


def missing_inputs(platform: Platform, devices: etree._Element) -> list[str] | None:
    """Of ``keyboard`` and ``pointer``, those a domain with graphics on *platform* whose
    ``<devices>`` is *devices* has neither as an ``<input>`` nor from the machine; None
    where the platform is unknown or has no virtio input bus (nothing is added there)."""
    implicit = platform.implicit_inputs(graphics=True)
    buses = platform.input_buses
    if implicit is None or buses is None or "virtio" not in buses:
        return None
    present = {
        _KINDS[str(el.get("type"))]
        for el in devices.iterchildren("input")
        if el.get("type") in _KINDS
    }
    return [kind for kind, _type in _ADDED if kind not in present | implicit]


def input_slot(platform: Platform) -> Slot:
    """The shared slot (``Slot.shared``) that gives a graphical console a keyboard and a
    pointer where the domain on *platform* would have none (see the module's notes).

    Every graphical plugin puts it among its slots: the first console enabled adds and
    records the devices, the others find them in place, and ``disable`` takes them away
    only with the last console holding the slot. Where the domain has both, or the
    platform is unknown, it changes nothing."""

    def build(current: Sequence[etree._Element], devices: etree._Element) -> list[etree._Element]:
        missing = missing_inputs(platform, devices)
        if not missing:
            return list(current)
        added = []
        for kind, input_type in _ADDED:
            if kind in missing:
                el = etree.Element("input")
                el.set("type", input_type)
                el.set("bus", "virtio")
                added.append(el)
        return [*current, *added]

    return Slot(
        name=INPUT_SLOT,
        select=INPUT_SELECT,
        build=build,
        compare=Compare.COVERS,
        guest_visible=True,
        shared=True,
    )
