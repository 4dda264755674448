"""The value types of domain XML provisioning.

A protocol's (or XML edit's) ``xml_edit`` returns a
:class:`ConsoleEdit`: the mode it provisions and a list of :class:`Slot`.
A slot owns some children of ``<devices>`` (those its XPath selects) and
says what they should become; the core (:mod:`broker.xml._editor`) does the
moving, ordering, recording and validating, so it knows nothing about any
protocol.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from lxml import etree

from broker.hookspecs import XMLOption
from broker.xml._constants import DEFAULT_LISTEN, DEFAULT_MODE, MODES
from broker.xml._platform import Platform

_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _slots(value: Iterable[Slot]) -> tuple[Slot, ...]:
    return tuple(value)


def _devices(value: Iterable[DeviceRef]) -> tuple[DeviceRef, ...]:
    return tuple(value)


def _check_name(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(
            f"{attribute.name} {value!r} must be lower-case ASCII letters, digits and '-'"
        )


def _check_mode(_instance: object, _attribute: object, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"unknown mode {value!r} (modes: {', '.join(MODES)})")


def _check_listen(instance: EditOptions, _attribute: object, value: str | None) -> None:
    if value is None:
        return
    if instance.mode == "fd":
        raise ValueError("a listen address only applies to the tcp and websocket modes")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"listen address {value!r} is not an IPv4 or IPv6 address") from None


def _check_params(_instance: object, _attribute: object, value: Mapping[str, str]) -> None:
    for key in value:
        if not _PARAM.match(key):
            raise ValueError(f"parameter name {key!r} must be letters, digits, '_', '.' or '-'")


@attrs.frozen
class EditOptions:
    """What the operator asked for; every plugin gets the same options.

    A plugin uses what applies to it and ignores the rest (serial has no
    mode; VNC has no per-domain TLS).
    """

    #: One of :data:`MODES`.
    mode: str = attrs.field(default=DEFAULT_MODE, validator=_check_mode)
    #: The address ``tcp``/``websocket`` listen on; None means :data:`DEFAULT_LISTEN`.
    listen: str | None = attrs.field(default=None, validator=_check_listen)
    #: ``NAME=VALUE`` settings (``--option``, alias ``--param``, and the flags plugins'
    #: options declare): a plugin reads its own declared ones with :meth:`value`.
    params: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_mapping, validator=_check_params, hash=False
    )
    #: The guest's architecture and machine type (and libvirt's domain capabilities when
    #: a live connection gave them): the editor fills it in from the domain's ``<os>``
    #: before it asks the plugins, so a plugin chooses devices that exist there.
    platform: Platform = attrs.field(factory=Platform)

    @property
    def listen_address(self) -> str:
        """The listen address to write: the one asked for, else :data:`DEFAULT_LISTEN`."""
        return self.listen or DEFAULT_LISTEN

    def value(self, option: XMLOption) -> bool | int | str:
        """*option*'s value: the one given (``params``), else its default; ValueError,
        naming the option, for a value it does not take."""
        raw = self.params.get(option.name)
        return option.default if raw is None else option.parse(raw)

    def given(self, option: XMLOption) -> bool:
        """Whether *option* was asked for explicitly (rather than left at its default)."""
        return option.name in self.params


class Compare(enum.Enum):
    """How the core decides that the elements in place already are what a slot wants."""

    #: Same tags, attributes (in any order), text and child elements.
    EXACT = "exact"
    #: Every attribute and child the slot wants is there; extra ones are fine.
    #: Use it for devices libvirt completes with defaults (addresses, models),
    #: so that an edit of libvirt's own output is recognised as already done.
    COVERS = "covers"


#: ``build(current, devices) -> desired``: see :class:`Slot`.
BuildFunction = Callable[[Sequence[etree._Element], etree._Element], Sequence[etree._Element]]


def _compile_xpath(_instance: object, _attribute: object, value: str) -> None:
    try:
        etree.XPath(value)
    except etree.XPathSyntaxError as exc:
        raise ValueError(f"select {value!r} is not a valid XPath: {exc}") from None


@attrs.frozen
class Slot:
    """A part of ``<devices>`` one protocol owns, and what it should become.

    ``select`` is an XPath evaluated on ``<devices>``; it must select direct
    children only, and must not depend on the options (``disable`` evaluates
    it again to find what ``enable`` placed). Slots of different protocols
    must select disjoint elements, except ``shared`` slots of the same name and
    select.

    ``build(current, devices)`` gets the selected elements (in document
    order) and the ``<devices>`` element for context, and returns the
    elements the slot should hold. It must not modify either. To keep an
    element, return the same object; to change one, return a changed
    :func:`copy.deepcopy`; new elements are new objects (see
    :func:`broker.xml.load_fragment`). New elements take the places of the
    dropped ones, in order; the rest are inserted in libvirt's device order,
    indented like their neighbours.

    The core calls ``build`` on what is in place to decide whether anything
    needs doing (when it returns what is already there, per ``compare``,
    the slot is left alone), and if so, again on the elements as they were
    before console-broker touched the slot. So ``build`` must be idempotent:
    building on its own result must change nothing.
    """

    #: Unique within the protocol; recorded in the metadata.
    name: str = attrs.field(validator=_check_name)
    #: XPath on ``<devices>`` selecting the children this slot owns.
    select: str = attrs.field(validator=_compile_xpath)
    build: BuildFunction
    compare: Compare = Compare.EXACT
    #: Whether the slot changes hardware the guest sees (a video card, a
    #: serial port, a virtio channel). The libvirt hook never applies such
    #: slots, because incoming migrations and restores need the same hardware.
    guest_visible: bool = False
    #: Attributes that hold secrets (a VNC ``passwd``): the copy of the
    #: original kept in the metadata has them blanked, and ``disable`` takes
    #: their values from the element in place.
    secret_attributes: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: Whether several protocols hold this slot alike (the same ``name`` and ``select``,
    #: e.g. the keyboard and pointer every graphical console needs, from
    #: :func:`broker.xml.input_slot`): the first protocol whose edit adds elements records
    #: them, the others find them in place; ``disable`` hands the record to another
    #: enabled protocol holding the slot instead of taking the elements away.
    shared: bool = False


@attrs.frozen
class DeviceRef:
    """Names the device a console is reached through: the first ``<tag>`` child
    of ``<devices>`` whose ``type`` attribute is ``type`` (any type if None)."""

    tag: str
    type: str | None = None

    def find(self, devices: etree._Element) -> tuple[int, etree._Element] | None:
        """(index among the ``<tag>`` children, element) of the first match, or None."""
        for index, child in enumerate(devices.iterchildren(self.tag)):
            if self.type is None or child.get("type") == self.type:
                return index, child
        return None

    def __str__(self) -> str:
        return self.tag if self.type is None else f"{self.tag}[type={self.type}]"


def _unique_slot_names(_instance: object, _attribute: object, value: tuple[Slot, ...]) -> None:
    names = [slot.name for slot in value]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"slot names must be unique, repeated: {', '.join(duplicates)}")


@attrs.frozen
class ConsoleEdit:
    """A plugin's answer for one protocol: what to change and what to record."""

    #: The mode actually provisioned (recorded; SPICE asked for ``websocket``
    #: provisions and records ``tcp``). Serial records ``stream``.
    mode: str = attrs.field(validator=_check_name)
    slots: tuple[Slot, ...] = attrs.field(converter=_slots, validator=_unique_slot_names)
    #: Candidates for the device the broker opens, the first present one is recorded.
    devices: tuple[DeviceRef, ...] = attrs.field(default=(), converter=_devices)
    #: Facts the broker needs later (e.g. ``{"tls": "yes"}``), recorded as is.
    settings: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_mapping, validator=_check_params, hash=False
    )
    #: One-line remarks for the operator (printed on stderr by the CLI).
    notes: tuple[str, ...] = attrs.field(default=(), converter=_strings)


#: Where the editor gets each protocol's edit: ``edits(protocol, options)`` returns the
#: :class:`ConsoleEdit` of *protocol* for *options*, or raises (an unknown protocol, one
#: that provisions no XML). :func:`broker.xml.plugin_edits` asks the loaded plugins.
EditSource = Callable[[str, EditOptions], ConsoleEdit]


@attrs.frozen
class ConsoleRecord:
    """What the metadata of a domain records about one enabled console."""

    protocol: str
    mode: str
    #: The device the broker opens, or None if the domain has none.
    device: DeviceRef | None
    #: Its index among the ``<devices>/<tag>`` children of the tree that was
    #: read: the ``idx`` of virDomainOpenGraphicsFD for graphics, the ``N``
    #: of the ``serialN`` alias for a serial port. None when not present.
    index: int | None
    settings: Mapping[str, str] = attrs.field(converter=_frozen_mapping, hash=False)
    #: The slots whose earlier state is kept (what ``disable`` puts back).
    slots: tuple[str, ...] = attrs.field(converter=_strings)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``console-broker xml show --json``)."""
        return {
            "protocol": self.protocol,
            "mode": self.mode,
            "device": None
            if self.device is None
            else {"tag": self.device.tag, "type": self.device.type, "index": self.index},
            "settings": dict(self.settings),
            "slots": list(self.slots),
        }
