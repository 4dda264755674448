"""The console-broker record inside a domain's ``<metadata>``.

One ``<cb:consoles>`` element (libvirt keeps a single metadata child per
namespace and drops the others, so everything lives under one element)::

    <metadata>
      <cb:consoles xmlns:cb="https://console-broker.dev/xmlns/consoles/1" created="metadata">
        <cb:console protocol="vnc" mode="fd" device="graphics" device-type="vnc">
          <cb:slot name="graphics">
            <cb:placed tag="graphics" index="0" secrets="passwd">
              <graphics type='vnc' port='5901' autoport='no' passwd=''/>
            </cb:placed>
          </cb:slot>
        </cb:console>
      </cb:consoles>
    </metadata>

``cb:placed`` says: the ``index``-th ``<tag>`` element the slot selects was
put there by console-broker, and replaced the element inside (nothing inside:
it was added). ``cb:removed`` holds an element dropped without replacement.
``secrets`` lists attributes blanked in the kept copy. ``created`` names the
elements console-broker created (removed again with the last console);
``was-empty`` names elements that were written empty (``<devices/>``).

A second element, in its own namespace, records the devices libvirt added on
its own when ``enable DOMAIN`` defined the edited domain (a virtio-serial
controller for the SPICE agent channel, a video card for a display, PCI
controllers), so that ``disable`` can remove them too::

    <cbl:libvirt-added xmlns:cbl="https://console-broker.dev/xmlns/libvirt-added/1">
      <controller type="virtio-serial" index="0">
        <address type="pci" domain="0x0000" bus="0x00" slot="0x03" function="0x0"/>
      </controller>
    </cbl:libvirt-added>

Each child is a copy of a device as libvirt wrote it. It is a separate element
(not a child of ``cb:consoles``) because console-broker versions before it
refuse unknown elements in ``cb:consoles``: they ignore this one, read the
consoles as before, and disable without removing these devices.
"""

from __future__ import annotations

import re
from copy import deepcopy

import attrs
from lxml import etree

from broker.xml._errors import MetadataError
from broker.xml._layout import is_element
from broker.xml._model import ConsoleRecord, DeviceRef

#: The namespace of console-broker's metadata.
NAMESPACE = "https://console-broker.dev/xmlns/consoles/1"
#: The prefix console-broker declares for it.
PREFIX = "cb"
#: The namespace of the record of devices libvirt added (see :func:`find_added`).
ADDED_NAMESPACE = "https://console-broker.dev/xmlns/libvirt-added/1"
#: The prefix console-broker declares for it.
ADDED_PREFIX = "cbl"
#: The Clark name of that record's element.
ADDED = f"{{{ADDED_NAMESPACE}}}libvirt-added"

_TOKEN = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_TAG = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


def q(name: str) -> str:
    """The Clark name ``{namespace}name`` of a console-broker metadata element."""
    return f"{{{NAMESPACE}}}{name}"


@attrs.frozen
class Placed:
    """One ``cb:placed`` record."""

    element: etree._Element
    tag: str
    index: int
    original: etree._Element | None
    secrets: tuple[str, ...]


@attrs.frozen
class SlotRecord:
    """One ``cb:slot`` record."""

    element: etree._Element
    name: str
    placed: tuple[Placed, ...]
    removed: tuple[etree._Element, ...]


def _elements(parent: etree._Element) -> list[etree._Element]:
    return [child for child in parent if is_element(child)]


def _only_child(el: etree._Element, what: str) -> etree._Element | None:
    children = _elements(el)
    if len(children) > 1:
        raise MetadataError(f"{what} holds {len(children)} elements, expected at most one")
    return children[0] if children else None


def _attribute(el: etree._Element, name: str, what: str, pattern: re.Pattern[str]) -> str:
    value = el.get(name)
    if value is None or not pattern.match(value):
        raise MetadataError(f"{what} has a missing or malformed {name!r} attribute: {value!r}")
    return value


def parse_slot(el: etree._Element, protocol: str) -> SlotRecord:
    """Read a ``cb:slot`` element, checking its shape."""
    name = _attribute(el, "name", f"a {protocol} slot record", _TOKEN)
    what = f"the {protocol} slot record {name!r}"
    placed: list[Placed] = []
    removed: list[etree._Element] = []
    seen: set[tuple[str, int]] = set()
    for child in _elements(el):
        if child.tag == q("placed"):
            tag = _attribute(child, "tag", what, _TAG)
            index_text = child.get("index", "")
            if not index_text.isdigit() or len(index_text) > 6:
                raise MetadataError(f"{what} has a malformed index {index_text!r}")
            index = int(index_text)
            if (tag, index) in seen:
                raise MetadataError(f"{what} records <{tag}> #{index} twice")
            seen.add((tag, index))
            original = _only_child(child, what)
            if original is not None and original.tag != tag:
                raise MetadataError(f"{what} kept a <{original.tag}> for a <{tag}>")
            secrets = tuple(child.get("secrets", "").split())
            placed.append(Placed(child, tag, index, original, secrets))
        elif child.tag == q("removed"):
            original = _only_child(child, what)
            if original is not None:
                removed.append(original)
        else:
            raise MetadataError(f"{what} holds an unexpected <{child.tag}>")
    return SlotRecord(el, name, tuple(placed), tuple(removed))


def find_consoles(root: etree._Element) -> etree._Element | None:
    """The ``cb:consoles`` element of a domain, if any."""
    metadata = root.find("metadata")
    if metadata is None:
        return None
    found = metadata.findall(q("consoles"))
    if len(found) > 1:
        raise MetadataError("the domain has more than one console-broker metadata element")
    return found[0] if found else None


def console_elements(consoles: etree._Element | None) -> dict[str, etree._Element]:
    """protocol -> ``cb:console`` element, in document order."""
    found: dict[str, etree._Element] = {}
    if consoles is None:
        return found
    for child in _elements(consoles):
        if child.tag != q("console"):
            raise MetadataError(f"unexpected <{child.tag}> in the console-broker metadata")
        protocol = _attribute(child, "protocol", "a console record", _TOKEN)
        if protocol in found:
            raise MetadataError(f"the console-broker metadata records {protocol!r} twice")
        found[protocol] = child
    return found


def slot_records(console: etree._Element, protocol: str) -> list[SlotRecord]:
    """The ``cb:slot`` records of one ``cb:console``, in document order."""
    records = [parse_slot(child, protocol) for child in console.iterchildren(q("slot"))]
    names = [record.name for record in records]
    if len(set(names)) != len(names):
        raise MetadataError(f"the {protocol} console record lists a slot twice")
    return records


def settings_of(console: etree._Element, protocol: str) -> dict[str, str]:
    """The ``cb:setting`` name/value pairs of one ``cb:console``."""
    settings: dict[str, str] = {}
    for child in console.iterchildren(q("setting")):
        name = child.get("name")
        if not name:
            raise MetadataError(f"the {protocol} console record has a setting without a name")
        settings[name] = child.get("value", "")
    return settings


def device_of(console: etree._Element) -> DeviceRef | None:
    """The device a ``cb:console`` names, if it names one."""
    tag = console.get("device")
    if tag is None:
        return None
    if not _TAG.match(tag):
        raise MetadataError(f"the console record names a malformed device {tag!r}")
    return DeviceRef(tag, console.get("device-type"))


def words(el: etree._Element, name: str) -> set[str]:
    """The space-separated words of an attribute."""
    return set(el.get(name, "").split())


def _domain_root(source: object) -> etree._Element:
    root = getattr(source, "root", source)
    if isinstance(root, etree._ElementTree):
        root = root.getroot()
    if not isinstance(root, etree._Element) or root.tag != "domain":
        raise TypeError("expected a Document, an lxml tree or its <domain> element")
    return root


def read_consoles(source: object) -> dict[str, ConsoleRecord]:
    """What the metadata of a domain records: protocol -> :class:`ConsoleRecord`.

    *source* is a :class:`broker.xml.Document`, an lxml tree or its
    ``<domain>`` element (the live XML of a running domain works too: the
    device index is computed from the tree given). Raises
    :class:`MetadataError` if the record is malformed.
    """
    root = _domain_root(source)
    devices = root.find("devices")
    records: dict[str, ConsoleRecord] = {}
    for protocol, console in console_elements(find_consoles(root)).items():
        device = device_of(console)
        found = device.find(devices) if device is not None and devices is not None else None
        records[protocol] = ConsoleRecord(
            protocol=protocol,
            mode=_attribute(console, "mode", f"the {protocol} console record", _TOKEN),
            device=device,
            index=found[0] if found is not None else None,
            settings=settings_of(console, protocol),
            slots=tuple(record.name for record in slot_records(console, protocol)),
        )
    return records


def new_console(protocol: str) -> etree._Element:
    """A detached, empty ``cb:console`` element."""
    el = etree.Element(q("console"), nsmap={PREFIX: NAMESPACE})
    el.set("protocol", protocol)
    return el


def set_console(console: etree._Element, mode: str, device: DeviceRef | None) -> None:
    """Write the attributes of a ``cb:console``."""
    console.set("mode", mode)
    for name, value in (
        ("device", device.tag if device else None),
        ("device-type", device.type if device else None),
    ):
        if value is None:
            if name in console.attrib:
                del console.attrib[name]
        else:
            console.set(name, value)


def new_setting(name: str, value: str) -> etree._Element:
    """A detached ``cb:setting`` element."""
    el = etree.Element(q("setting"), nsmap={PREFIX: NAMESPACE})
    el.set("name", name)
    el.set("value", value)
    return el


def new_slot(name: str) -> etree._Element:
    """A detached ``cb:slot`` element."""
    el = etree.Element(q("slot"), nsmap={PREFIX: NAMESPACE})
    el.set("name", name)
    return el


def find_added(root: etree._Element) -> etree._Element | None:
    """The ``cbl:libvirt-added`` record of a domain, if any."""
    metadata = root.find("metadata")
    if metadata is None:
        return None
    found = metadata.findall(ADDED)
    if len(found) > 1:
        raise MetadataError("the domain has more than one record of devices libvirt added")
    return found[0] if found else None


def read_added(record: etree._Element | None) -> list[etree._Element]:
    """The device copies a ``cbl:libvirt-added`` record holds, checking their shape."""
    if record is None:
        return []
    devices = _elements(record)
    for device in devices:
        if not isinstance(device.tag, str) or not _TAG.match(device.tag):
            raise MetadataError(
                f"the record of devices libvirt added holds an unexpected <{device.tag}>"
            )
    return devices


def new_added(devices: list[etree._Element]) -> etree._Element:
    """A detached ``cbl:libvirt-added`` record holding copies of *devices*."""
    el = etree.Element(ADDED, nsmap={ADDED_PREFIX: ADDED_NAMESPACE})
    for device in devices:
        copy = deepcopy(device)
        copy.tail = None
        el.append(copy)
    return el
