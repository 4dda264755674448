"""The SPICE plugin's domain XML edit.

Slots: the ``<graphics type='spice'>`` display; the agent channel (clipboard,
resize); USB redirection channels; a QXL video card when the domain has no
video at all. QEMU's SPICE server has no WebSocket, so the ``websocket`` mode
provisions (and records) ``tcp``: a broker on another host reaches it there.
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
    load_fragment,
)

from ._options import TLS, USBREDIR

TEMPLATES = "broker_xml_templates"


def _usb_disabled(devices: etree._Element) -> bool:
    return any(
        controller.get("model") == "none"
        for controller in devices.iterchildren("controller")
        if controller.get("type") == "usb"
    )


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """The SPICE display and its companions, as ``options`` ask."""
    mode = "tcp" if options.mode == "websocket" else options.mode
    tls, wanted_usbredir = options.value(TLS), options.value(USBREDIR)
    assert isinstance(tls, bool) and isinstance(wanted_usbredir, int)
    if tls and mode == "fd":
        raise EditError("spice.tls: TLS needs a listening port: use the tcp or websocket mode")

    def graphics(
        current: Sequence[etree._Element], _devices: etree._Element
    ) -> list[etree._Element]:
        el = graphics_for_mode(
            current[0] if current else None,
            load_fragment(TEMPLATES, "spice/graphics.xml"),
            load_fragment(TEMPLATES, f"spice/{mode}.xml"),
            listen=None if mode == "fd" else options.listen_address,
        )
        if tls:
            for key, value in load_fragment(TEMPLATES, "spice/tls.xml").attrib.items():
                if key != "type":
                    el.set(key, value)
        elif el.get("defaultMode") == "secure":
            del el.attrib["defaultMode"]
        return [el, *current[1:]]

    def agent(current: Sequence[etree._Element], _devices: etree._Element) -> list[etree._Element]:
        return list(current) if current else [load_fragment(TEMPLATES, "spice/agent.xml")]

    def usbredir(
        current: Sequence[etree._Element], devices: etree._Element
    ) -> list[etree._Element]:
        if _usb_disabled(devices):
            return list(current)
        missing = max(0, wanted_usbredir - len(current))
        return [*current, *(load_fragment(TEMPLATES, "spice/usbredir.xml") for _ in range(missing))]

    def video(current: Sequence[etree._Element], _devices: etree._Element) -> list[etree._Element]:
        return list(current) if current else [load_fragment(TEMPLATES, "spice/video.xml")]

    notes = []
    if options.mode == "websocket":
        notes.append(
            "spice: QEMU's SPICE server has no WebSocket; provisioned (and recorded) as tcp"
        )
    return ConsoleEdit(
        mode=mode,
        slots=[
            Slot(
                name="graphics",
                select="graphics[@type='spice']",
                build=graphics,
                compare=Compare.EXACT,
                secret_attributes=("passwd",),
            ),
            Slot(
                name="agent",
                select="channel[@type='spicevmc']",
                build=agent,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
            Slot(
                name="usbredir",
                select="redirdev[@bus='usb'][@type='spicevmc']",
                build=usbredir,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
            Slot(
                name="video",
                select="video",
                build=video,
                compare=Compare.COVERS,
                guest_visible=True,
            ),
        ],
        devices=[DeviceRef("graphics", "spice")],
        settings={"tls": "yes" if tls else "no"},
        notes=notes,
    )
