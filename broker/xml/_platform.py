"""The guest's architecture and machine type: what devices can exist there.

A plugin's ``xml_edit`` gets the domain's :class:`Platform` in
``EditOptions.platform``: the ``arch`` and ``machine`` of ``<os><type>``, the domain
``type``, its ``<emulator>``, and, when the command has a live libvirt connection,
libvirt's domain capabilities for that emulator, architecture and machine
(:class:`DomainCapabilities`, from ``virConnectGetDomainCapabilities``). Its methods
answer architecture questions that are no protocol's: which video models, graphics
types, redirection and input buses exist, whether the machine has USB, which keyboard
and pointer libvirt gives a domain there on its own, which serial target type libvirt
gives a serial port there and how many such ports the machine has. Which devices a
protocol needs stays the plugin's knowledge.

Every answer is ``None`` where neither the capabilities nor the table below know: a
domain without ``arch`` (libvirt then takes the host's), or an architecture or machine
type outside the table. Plugins then do what they always did.

The table holds the facts of libvirt's domain XML documentation
(https://libvirt.org/formatdomain.html: "Video devices", "Consoles, serial, parallel &
channel devices", "Redirected devices", "Controllers", "Input devices") and of libvirt's
QEMU driver as it fills in defaults (``qemuDomainDefAddDefaultDevices``,
``qemuDomainDefAddImplicitInputDevice``, ``qemuDomainChrDefPostParse``),
checked against libvirt 9.0 with QEMU 7.2 (``virsh domcapabilities`` and ``virsh
define`` of each sample domain in ``tests/xml/arch``; docs/xml.md has the table).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from lxml import etree

from broker.xml._errors import InputError
from broker.xml._source import parse_fragment

#: The architectures of libvirt's ``arch`` names, by family.
_FAMILIES: dict[str, str] = {
    "i686": "x86",
    "x86_64": "x86",
    "aarch64": "arm",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv7b": "arm",
    "s390": "s390",
    "s390x": "s390",
    "ppc64": "ppc64",
    "ppc64le": "ppc64",
    "riscv32": "riscv",
    "riscv64": "riscv",
}


def _machine_kind(family: str | None, machine: str | None) -> str | None:
    """The machine class the table knows (libvirt's own tests: ``qemuDomainIsQ35`` and
    the like match the machine type and its versioned names), or None."""
    if family is None:
        return None
    name = machine or ""
    if family == "x86":
        if machine is None or name == "pc" or name.startswith(("pc-i440fx-", "pc-0.", "pc-1.")):
            return "i440fx"  # libvirt's default x86 machine is pc (i440fx) or q35: both alike
        if name == "q35" or name.startswith("pc-q35-"):
            return "q35"
        return None
    if family == "arm":
        return "virt" if name == "virt" or name.startswith("virt-") else None
    if family == "s390":
        return "s390-ccw" if machine is None or name.startswith("s390-ccw-virtio") else None
    if family == "ppc64":
        return "pseries" if machine is None or name.startswith("pseries") else None
    if family == "riscv":
        return "virt" if name == "virt" or name.startswith("virt-") else None
    return None


@attrs.frozen
class _Facts:
    video: frozenset[str]
    #: libvirt's model for a ``<video>`` without one.
    default_video: str
    graphics: frozenset[str]
    redirdev: frozenset[str]
    #: Whether libvirt adds a USB controller to a domain that names none.
    usb_default: bool
    #: The serial target type libvirt gives a ``<serial>`` without one.
    serial_target: str
    #: How many serial ports of that type the machine has (None: no fixed limit).
    serial_ports: int | None
    #: ``<console><target type>`` values that exist there.
    console_targets: frozenset[str]
    #: The ``<input bus>`` values that exist there.
    input_buses: frozenset[str]
    #: The input devices libvirt gives every domain of the machine (``ps2``: a PS/2
    #: keyboard and mouse unless ``<features><ps2 state='off'/>``), one with graphics
    #: (``usb-with-graphics``: a USB keyboard and mouse), or none (``""``).
    implicit_input: str


_GRAPHICS = frozenset({"vnc", "spice", "sdl", "egl-headless", "dbus"})
_PC_VIDEO = frozenset({"vga", "cirrus", "vmvga", "qxl", "virtio", "bochs", "ramfb", "none"})

#: (family, machine class) -> facts; libvirt 9.0 and QEMU 7.2's domain capabilities
#: and libvirt's defaults (see the module's notes and docs/xml.md).
_TABLE: dict[tuple[str, str], _Facts] = {
    ("x86", "i440fx"): _Facts(
        video=_PC_VIDEO,
        default_video="cirrus",
        graphics=_GRAPHICS,
        redirdev=frozenset({"usb"}),
        usb_default=True,
        serial_target="isa-serial",
        serial_ports=4,
        console_targets=frozenset({"serial", "virtio"}),
        input_buses=frozenset({"ps2", "usb", "virtio"}),
        implicit_input="ps2",
    ),
    ("x86", "q35"): _Facts(
        video=_PC_VIDEO,
        default_video="cirrus",
        graphics=_GRAPHICS,
        redirdev=frozenset({"usb"}),
        usb_default=True,
        serial_target="isa-serial",
        serial_ports=4,
        console_targets=frozenset({"serial", "virtio"}),
        input_buses=frozenset({"ps2", "usb", "virtio"}),
        implicit_input="ps2",
    ),
    ("arm", "virt"): _Facts(
        video=frozenset({"virtio", "ramfb", "vga", "bochs", "cirrus", "vmvga", "none"}),
        default_video="virtio",
        graphics=_GRAPHICS,
        redirdev=frozenset({"usb"}),
        usb_default=False,
        serial_target="system-serial",
        serial_ports=1,  # the virt board has one PL011 UART
        console_targets=frozenset({"serial", "virtio"}),
        input_buses=frozenset({"usb", "virtio"}),
        implicit_input="",
    ),
    ("s390", "s390-ccw"): _Facts(
        video=frozenset({"virtio", "none"}),
        default_video="virtio",
        graphics=_GRAPHICS,
        redirdev=frozenset(),
        usb_default=False,
        serial_target="sclp-serial",
        serial_ports=2,  # sclpconsole (port 0) and sclplmconsole (port 1)
        console_targets=frozenset({"serial", "virtio", "sclp", "sclplm"}),
        input_buses=frozenset({"virtio"}),
        implicit_input="",
    ),
    ("ppc64", "pseries"): _Facts(
        video=frozenset({"vga", "virtio", "bochs", "cirrus", "vmvga", "none"}),
        default_video="vga",
        graphics=_GRAPHICS,
        redirdev=frozenset({"usb"}),
        usb_default=True,
        serial_target="spapr-vio-serial",
        serial_ports=None,
        console_targets=frozenset({"serial", "virtio"}),
        input_buses=frozenset({"usb", "virtio"}),
        implicit_input="usb-with-graphics",
    ),
    ("riscv", "virt"): _Facts(
        video=frozenset({"virtio", "ramfb", "vga", "bochs", "cirrus", "vmvga", "none"}),
        default_video="virtio",
        graphics=_GRAPHICS,
        redirdev=frozenset({"usb"}),
        usb_default=False,
        serial_target="system-serial",
        serial_ports=1,
        console_targets=frozenset({"serial", "virtio"}),
        input_buses=frozenset({"usb", "virtio"}),
        implicit_input="",
    ),
}


def _values(devices: etree._Element | None, tag: str, enum: str) -> frozenset[str] | None:
    """The values of ``<devices>/<tag>/<enum name=enum>``: empty when libvirt reports the
    device unsupported, None when it does not report it at all."""
    if devices is None:
        return None
    device = devices.find(tag)
    if device is None:
        return None
    if device.get("supported") == "no":
        return frozenset()
    found = device.find(f"enum[@name='{enum}']")
    if found is None:
        return None
    return frozenset((value.text or "").strip() for value in found.iterfind("value"))


@attrs.frozen
class DomainCapabilities:
    """What libvirt's domain capabilities (``virsh domcapabilities``, the XML of
    ``virConnectGetDomainCapabilities``) say this host's QEMU offers for one emulator,
    architecture, machine type and virtualization type. Each set is None when this
    libvirt does not report it, empty when it reports the device unsupported."""

    arch: str | None = None
    #: The canonical machine type (``virt-7.2`` for ``virt``).
    machine: str | None = None
    emulator: str | None = None
    #: ``<video><enum name='modelType'>``.
    video_models: frozenset[str] | None = None
    #: ``<graphics><enum name='type'>``.
    graphics_types: frozenset[str] | None = None
    #: ``<redirdev><enum name='bus'>``.
    redirdev_buses: frozenset[str] | None = None
    #: ``<channel><enum name='type'>``.
    channel_types: frozenset[str] | None = None

    @classmethod
    def from_xml(cls, data: bytes | str) -> DomainCapabilities:
        """Read the XML of ``virsh domcapabilities``; :class:`InputError` if it is none."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        try:
            root = parse_fragment(raw)
        except InputError as exc:
            raise InputError(f"not libvirt domain capabilities: {exc}") from None
        if root.tag != "domainCapabilities":
            raise InputError(
                f"not libvirt domain capabilities: the root element is <{root.tag}>, "
                "expected <domainCapabilities>"
            )
        devices = root.find("devices")
        return cls(
            arch=root.findtext("arch"),
            machine=root.findtext("machine"),
            emulator=root.findtext("path"),
            video_models=_values(devices, "video", "modelType"),
            graphics_types=_values(devices, "graphics", "type"),
            redirdev_buses=_values(devices, "redirdev", "bus"),
            channel_types=_values(devices, "channel", "type"),
        )


def _set(value: Iterable[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


@attrs.frozen
class Platform:
    """The guest platform of the domain being edited (see the module's notes)."""

    #: ``<os><type arch>``; None when the domain names none (libvirt takes the host's).
    arch: str | None = None
    #: ``<os><type machine>`` as written (``q35``, ``pc-q35-7.2``, ``virt``...).
    machine: str | None = None
    #: The domain's ``type`` (``kvm``, ``qemu``...).
    virt_type: str | None = None
    #: ``<devices><emulator>``.
    emulator: str | None = None
    #: libvirt's domain capabilities for this domain, when a live connection gave them.
    capabilities: DomainCapabilities | None = None
    #: ``<features><ps2 state>`` (``off`` takes the PS/2 keyboard and mouse away).
    ps2: str | None = None

    @classmethod
    def of_domain(cls, root: etree._Element) -> Platform:
        """The platform a ``<domain>`` element names."""
        os_type = root.find("os/type")
        ps2 = root.find("features/ps2")
        return cls(
            arch=os_type.get("arch") if os_type is not None else None,
            machine=os_type.get("machine") if os_type is not None else None,
            virt_type=root.get("type"),
            emulator=(root.findtext("devices/emulator") or "").strip() or None,
            ps2=ps2.get("state") if ps2 is not None else None,
        )

    # -- what it is ------------------------------------------------------------

    @property
    def family(self) -> str | None:
        """``x86``, ``arm``, ``s390``, ``ppc64`` or ``riscv``; None for another or no arch."""
        return _FAMILIES.get(self.arch) if self.arch is not None else None

    @property
    def known(self) -> bool:
        """Whether the table knows this architecture and machine type."""
        return self._facts is not None

    @property
    def _facts(self) -> _Facts | None:
        family = self.family
        kind = _machine_kind(family, self.machine)
        if family is None or kind is None:
            return None
        return _TABLE.get((family, kind))

    def describe(self) -> str:
        """``aarch64 (virt)``, for messages."""
        arch = self.arch or "the host's architecture"
        return f"{arch} ({self.machine})" if self.machine else arch

    # -- devices -----------------------------------------------------------------

    @property
    def video_models(self) -> frozenset[str] | None:
        """The ``<video><model type>`` values that exist here (``none`` included)."""
        caps = self.capabilities.video_models if self.capabilities else None
        if caps is not None:
            return caps
        facts = self._facts
        return facts.video if facts else None

    def supports_video(self, model: str) -> bool | None:
        """Whether video *model* exists here (None: unknown)."""
        models = self.video_models
        return None if models is None else model in models

    @property
    def default_video_model(self) -> str | None:
        """The model libvirt gives a ``<video>`` that names none, on this machine."""
        facts = self._facts
        return facts.default_video if facts else None

    @property
    def has_display(self) -> bool | None:
        """Whether any video device exists here (a display needs one)."""
        models = self.video_models
        return None if models is None else bool(models - {"none"})

    @property
    def graphics_types(self) -> frozenset[str] | None:
        """The ``<graphics type>`` values this host's QEMU offers here."""
        caps = self.capabilities.graphics_types if self.capabilities else None
        if caps is not None:
            return caps
        facts = self._facts
        return facts.graphics if facts else None

    def supports_graphics(self, kind: str) -> bool | None:
        """Whether graphics type *kind* exists here (None: unknown)."""
        kinds = self.graphics_types
        return None if kinds is None else kind in kinds

    @property
    def redirdev_buses(self) -> frozenset[str] | None:
        """The ``<redirdev bus>`` values that exist here (empty: no redirection at all)."""
        caps = self.capabilities.redirdev_buses if self.capabilities else None
        if caps is not None:
            return caps
        facts = self._facts
        return facts.redirdev if facts else None

    @property
    def channel_types(self) -> frozenset[str] | None:
        """The ``<channel type>`` values this host's QEMU offers here (capabilities only)."""
        return self.capabilities.channel_types if self.capabilities else None

    @property
    def usb_by_default(self) -> bool | None:
        """Whether libvirt adds a USB controller to a domain of this machine that names
        none (x86 pc and q35, ppc64 pseries: yes; aarch64 and riscv virt, s390x: no)."""
        if self.redirdev_buses is not None and "usb" not in self.redirdev_buses:
            return False
        facts = self._facts
        return facts.usb_default if facts else None

    def usb_controllers(self, devices: etree._Element) -> list[etree._Element]:
        """The domain's USB controllers that exist (``model='none'`` ones do not)."""
        return [
            controller
            for controller in devices.iterchildren("controller")
            if controller.get("type") == "usb" and controller.get("model") != "none"
        ]

    def has_usb(self, devices: etree._Element) -> bool | None:
        """Whether the domain whose ``<devices>`` is *devices* has a USB bus: a USB
        controller that is not ``model='none'``; with none named, the machine's default
        (a ``model='none'`` controller alone disables USB, as libvirt reads it)."""
        if self.redirdev_buses is not None and "usb" not in self.redirdev_buses:
            return False
        if self.usb_controllers(devices):
            return True
        if any(c.get("type") == "usb" for c in devices.iterchildren("controller")):
            return False
        return self.usb_by_default

    @property
    def input_buses(self) -> frozenset[str] | None:
        """The ``<input bus>`` values that exist here (``ps2`` on x86 only, ``usb``
        with a USB controller, ``virtio`` everywhere the table knows)."""
        facts = self._facts
        return facts.input_buses if facts else None

    def implicit_inputs(self, *, graphics: bool) -> frozenset[str] | None:
        """What libvirt gives a domain of this machine on its own, of ``keyboard`` and
        ``pointer``: x86 ``pc`` and ``q35`` have a PS/2 keyboard and mouse (unless
        ``<features><ps2 state='off'/>``); on ppc64 libvirt adds a USB keyboard and
        mouse to a domain with *graphics*; aarch64 and riscv ``virt`` and s390x get
        none. None where the table does not know the machine."""
        facts = self._facts
        if facts is None:
            return None
        both = frozenset({"keyboard", "pointer"})
        if facts.implicit_input == "ps2":
            return frozenset() if self.ps2 == "off" else both
        if facts.implicit_input == "usb-with-graphics":
            return both if graphics else frozenset()
        return frozenset()

    @property
    def serial_target_type(self) -> str | None:
        """The ``<serial><target type>`` libvirt gives a serial port here
        (``isa-serial``, ``system-serial``, ``sclp-serial``, ``spapr-vio-serial``)."""
        facts = self._facts
        return facts.serial_target if facts else None

    @property
    def serial_ports(self) -> int | None:
        """How many serial ports of that type the machine has (None: unknown or no
        fixed limit)."""
        facts = self._facts
        return facts.serial_ports if facts else None

    @property
    def console_target_types(self) -> frozenset[str] | None:
        """The ``<console><target type>`` values that exist here."""
        facts = self._facts
        return facts.console_targets if facts else None


#: ``capabilities(platform) -> DomainCapabilities | None``: what libvirt reports for the
#: platform of the domain being edited (None when it cannot say).
CapabilitiesSource = Callable[[Platform], DomainCapabilities | None]

_VIRT_TYPES = re.compile(r"[a-z0-9]+\Z")


def libvirt_capabilities(conn: Any) -> CapabilitiesSource:
    """A :data:`CapabilitiesSource` asking the libvirt connection *conn*
    (``virConnectGetDomainCapabilities(emulator, arch, machine, virttype)``); a libvirt
    that cannot answer (an emulator it does not know) gives None: the edit goes on with
    the table's facts."""

    import libvirt  # the libvirt-backed commands only: the filter runs without it

    def capabilities(platform: Platform) -> DomainCapabilities | None:
        virt_type = platform.virt_type
        if virt_type is not None and not _VIRT_TYPES.match(virt_type):
            virt_type = None
        try:
            xml = conn.getDomainCapabilities(
                platform.emulator, platform.arch, platform.machine, virt_type, 0
            )
        except libvirt.libvirtError:
            return None
        try:
            return DomainCapabilities.from_xml(xml)
        except InputError:
            return None

    return capabilities


def _quiet(_context: object, _error: object) -> None:
    """libvirt's default error handler prints every error on stderr; a missing answer
    here is no error of the command's."""


def connection_capabilities(uri: str) -> CapabilitiesSource:
    """A :data:`CapabilitiesSource` that opens its own connection to *uri* when asked
    (read-write: libvirt refuses domain capabilities to a read-only one) and closes it;
    a libvirt that cannot be reached or cannot answer gives None."""

    def capabilities(platform: Platform) -> DomainCapabilities | None:
        try:
            import libvirt  # the libvirt-backed commands only: the filter runs without it
        except ImportError:
            return None
        libvirt.registerErrorHandler(_quiet, None)
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            return None
        try:
            return libvirt_capabilities(conn)(platform)
        finally:
            conn.close()

    return capabilities
