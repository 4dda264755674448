"""The VNC plugin's domain XML edit: one ``<graphics type='vnc'>``.

libvirt gives a domain with a display and no video the machine's default video
model itself (virtio-gpu on aarch64 virt and s390x, VGA on ppc64 pseries), so the edit
adds none. A platform (``options.platform``) that offers no VNC display, or has no
video device at all, is refused. A machine without a keyboard or pointer of its own
gets them from the core's shared input slot (``input_slot``), as every graphical
console does.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from broker.api import (
    Compare,
    ConsoleEdit,
    DeviceRef,
    EditError,
    EditOptions,
    Slot,
    graphics_for_mode,
    input_slot,
    load_fragment,
)

TEMPLATES = "broker_xml_templates"


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """The VNC display, listening as ``options.mode`` asks; other settings are kept."""
    platform = options.platform
    if platform.supports_graphics("vnc") is False:
        source = (
            f"libvirt's domain capabilities of {platform.capabilities.emulator or 'its QEMU'}"
            if platform.capabilities is not None
            else "this platform"
        )
        raise EditError(f"vnc: {source} offer no VNC display on {platform.describe()}")
    if platform.has_display is False:
        raise EditError(
            f"vnc: {platform.describe()} has no video device, so no display for VNC to show"
        )

    def graphics(
        current: Sequence[etree._Element], _devices: etree._Element
    ) -> list[etree._Element]:
        el = graphics_for_mode(
            current[0] if current else None,
            load_fragment(TEMPLATES, "vnc/graphics.xml"),
            load_fragment(TEMPLATES, f"vnc/{options.mode}.xml"),
            listen=None if options.mode == "fd" else options.listen_address,
        )
        return [el, *current[1:]]

    return ConsoleEdit(
        mode=options.mode,
        slots=[
            Slot(
                name="graphics",
                select="graphics[@type='vnc']",
                build=graphics,
                compare=Compare.EXACT,
                secret_attributes=("passwd",),
            ),
            input_slot(platform),
        ],
        devices=[DeviceRef("graphics", "vnc")],
    )
