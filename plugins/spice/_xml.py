"""The SPICE plugin's domain XML edit.

Slots: the ``<graphics type='spice'>`` display; the agent channel (clipboard,
resize); USB redirection channels; a video card when the domain has no
video at all. QEMU's SPICE server has no WebSocket, so the ``websocket`` mode
provisions (and records) ``tcp``: a broker on another host reaches it there.

What the guest's platform (``options.platform``) has decides the companions: the
video card is QXL (SPICE's own, with its guest driver's 2D acceleration) where the
machine has QXL (x86), else virtio-gpu, else the machine's default model; USB
redirection channels go only on a domain with a USB bus (a USB controller, or a machine
that has one by default); the agent channel only where spicevmc channels exist; a
keyboard and pointer where the machine has none, from the core's shared input slot
(``input_slot``), as every graphical console does. A platform that has no SPICE
display, or no video device at all, is refused.
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
    Platform,
    Slot,
    graphics_for_mode,
    input_slot,
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


def _usb(platform: Platform, devices: etree._Element) -> bool:
    """Whether USB redirection channels can go on this domain."""
    has = platform.has_usb(devices)
    if has is None:  # a platform the core knows nothing about: as before
        return not _usb_disabled(devices)
    return has


def video_model(platform: Platform) -> str | None:
    """The video model for a domain without video: QXL where it exists (and where the
    platform is unknown, as on x86), else virtio-gpu, else the machine's default, else
    any the platform has; None where it has none."""
    qxl = platform.supports_video("qxl")
    if qxl or (qxl is None and platform.family in (None, "x86")):
        return "qxl"
    for model in ("virtio", platform.default_video_model):
        if model is not None and platform.supports_video(model) is not False:
            return model
    others = sorted((platform.video_models or frozenset()) - {"none"})
    return others[0] if others else None


def _refuse(platform: Platform) -> None:
    """Refuse a platform where a SPICE display cannot exist."""
    where = platform.describe()
    if platform.supports_graphics("spice") is False:
        source = (
            f"libvirt's domain capabilities of {platform.capabilities.emulator or 'its QEMU'}"
            if platform.capabilities is not None
            else "this platform"
        )
        raise EditError(f"spice: {source} offer no SPICE display on {where}")
    if platform.has_display is False:
        raise EditError(f"spice: {where} has no video device, so no display for SPICE to show")


def xml_edit(options: EditOptions) -> ConsoleEdit:
    """The SPICE display and its companions, as ``options`` ask."""
    mode = "tcp" if options.mode == "websocket" else options.mode
    tls, wanted_usbredir = options.value(TLS), options.value(USBREDIR)
    assert isinstance(tls, bool) and isinstance(wanted_usbredir, int)
    if tls and mode == "fd":
        raise EditError("spice.tls: TLS needs a listening port: use the tcp or websocket mode")
    platform = options.platform
    _refuse(platform)
    notes = []
    no_usb = platform.redirdev_buses is not None and "usb" not in platform.redirdev_buses
    if no_usb and wanted_usbredir:
        # A note, not a refusal, also when asked for: a host-wide hook policy's usbredir
        # must not stop an s390x domain's migration.
        asked = f" (spice.usbredir={wanted_usbredir} asked for)" if options.given(USBREDIR) else ""
        notes.append(f"spice: {platform.describe()} has no USB, so no USB redirection{asked}")
    agent_exists = platform.channel_types is None or "spicevmc" in platform.channel_types

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
        if current or not agent_exists:
            return list(current)
        return [load_fragment(TEMPLATES, "spice/agent.xml")]

    def usbredir(
        current: Sequence[etree._Element], devices: etree._Element
    ) -> list[etree._Element]:
        if not _usb(platform, devices):
            return list(current)
        missing = max(0, wanted_usbredir - len(current))
        return [*current, *(load_fragment(TEMPLATES, "spice/usbredir.xml") for _ in range(missing))]

    def video(current: Sequence[etree._Element], _devices: etree._Element) -> list[etree._Element]:
        if current:
            return list(current)
        el = load_fragment(TEMPLATES, "spice/video.xml")
        model = el.find("model")
        assert model is not None
        model.set("type", video_model(platform) or "qxl")
        return [el]

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
            input_slot(platform),
        ],
        devices=[DeviceRef("graphics", "spice")],
        settings={"tls": "yes" if tls else "no"},
        notes=notes,
    )
