"""The VNC plugin's domain XML edit: one ``<graphics type='vnc'>``."""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from broker.api import (
    Compare,
    ConsoleEdit,
    DeviceRef,
    EditOptions,
    Slot,
    graphics_for_mode,
    load_fragment,
)

TEMPLATES = "broker_xml_templates"


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """The VNC display, listening as ``options.mode`` asks; other settings are kept."""

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
            )
        ],
        devices=[DeviceRef("graphics", "vnc")],
    )
