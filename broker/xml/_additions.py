"""The devices libvirt adds when it defines an edited domain: found, recorded, taken away.

Theory of operation. libvirt completes every definition it stores: a virtio
``<channel>`` needs a virtio-serial controller, a display a video card, and on
a PCIe machine (q35) a new PCI device a ``pcie-root-port`` or a
``pcie-to-pci-bridge``. After ``enable DOMAIN`` defined the edited domain, it
compares the children of ``<devices>`` that libvirt stored with those it
handed in (:func:`added_devices`); the devices libvirt added that none the
domain had before uses are copied into the ``cbl:libvirt-added`` record
(:func:`record_additions`; the format is in :mod:`broker.xml._metadata`).
``disable`` undoes console-broker's own edit first, then removes each recorded
device that no remaining device uses, again until nothing more goes: a PCI
controller is free only once the controller or card on it is gone
(:func:`disable_recorded`).

Devices are told apart by their identity (:func:`identity`): the tag, the
``type``, ``model``, ``index``, ``bus``, ``device`` and ``id`` attributes, the
``<model type>``, ``<target>`` and ``<mac>`` children, a user ``<alias>`` and
the ``<address>``. An element written without an address or index (libvirt
assigns them) matches a stored one whose identity covers its own.

A device uses a controller when its own ``<address>`` names the controller's
index (``pci`` by ``bus``, ``usb`` by ``bus``, ``virtio-serial``, ``ccid`` and
``drive`` by ``controller``), when it is a virtio console or channel or a USB
device without an address yet, or when it is a USB companion controller of its
``<master>``. A device uses an ``<audio id>`` that an ``<audio>`` inside it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
from lxml import etree

from broker.xml import _layout as lay
from broker.xml._metadata import find_added, find_consoles, new_added, read_added
from broker.xml._ops import Outcome, check_schema, disable_xml
from broker.xml._source import parse_document

if TYPE_CHECKING:
    from broker.xml._model import EditSource

_ATTRIBUTES = ("type", "model", "index", "bus", "device", "id")
_NUMERIC = frozenset({"index", "id"})
_TARGET = ("type", "name", "port", "dev", "bus")
#: The controller types a ``drive`` address may name (the disk's bus decides which).
_DRIVE_CONTROLLERS = ("ide", "fdc", "scsi", "sata")
#: The controller types an address names by its ``controller`` attribute.
_BY_CONTROLLER = {"virtio-serial": "virtio-serial", "ccid": "ccid"}
#: ... and by its ``bus`` attribute.
_BY_BUS = {"pci": "pci", "usb": "usb"}
#: How many times ``enable`` defines the record again if libvirt keeps adding devices.
MAX_DEFINES = 3


@attrs.frozen
class Identity:
    """What tells a device apart from the others of a domain."""

    tag: str
    fields: frozenset[tuple[str, str]]

    def covers(self, other: Identity) -> bool:
        """Whether *other* has every field of this identity (and maybe more)."""
        return self.tag == other.tag and self.fields <= other.fields


def _number(value: str) -> str:
    """``0x03``, ``3`` and ``03`` alike, so addresses compare however they are written."""
    text = value.strip().lower()
    try:
        return str(int(text, 16) if text.startswith("0x") else int(text, 10))
    except ValueError:
        return value


def _address(el: etree._Element) -> str:
    attributes = sorted(
        (str(name), _number(str(value)))
        for name, value in el.attrib.items()
        if name not in ("type", "multifunction")
    )
    return ":".join([el.get("type", ""), *(f"{name}={value}" for name, value in attributes)])


def identity(el: etree._Element) -> Identity:
    """The identity of the device *el* (a child of ``<devices>``)."""
    fields: set[tuple[str, str]] = set()
    for name in _ATTRIBUTES:
        value = el.get(name)
        if value is not None:
            fields.add((name, _number(value) if name in _NUMERIC else value))
    model = el.find("model")
    if model is not None and model.get("type") is not None:
        fields.add(("model-type", str(model.get("type"))))
    target = el.find("target")
    if target is not None:
        for name in _TARGET:
            value = target.get(name)
            if value is not None:
                fields.add((f"target-{name}", value))
    mac = el.find("mac")
    if mac is not None and mac.get("address"):
        fields.add(("mac", str(mac.get("address")).lower()))
    alias = el.find("alias")
    if alias is not None and str(alias.get("name", "")).startswith("ua-"):
        fields.add(("alias", str(alias.get("name"))))
    address = el.find("address")
    if address is not None:
        fields.add(("address", _address(address)))
    return Identity(str(el.tag), frozenset(fields))


def describe(el: etree._Element) -> str:
    """A short description of a device for the operator: ``<controller type='usb' index='0'>``."""
    attributes = "".join(
        f" {name}='{el.get(name)}'" for name in _ATTRIBUTES if el.get(name) is not None
    )
    model = el.find("model")
    extra = f" (model {model.get('type')})" if model is not None and model.get("type") else ""
    return f"<{el.tag}{attributes}>{extra}"


def device_children(root: etree._Element) -> list[etree._Element]:
    """The element children of ``<devices>`` (none without ``<devices>``)."""
    devices = root.find("devices")
    if devices is None:
        return []
    return [child for child in devices if lay.is_element(child)]


def pairs(
    older: Sequence[etree._Element], newer: Sequence[etree._Element]
) -> list[tuple[etree._Element, etree._Element]]:
    """Pair elements of *older* with elements of *newer* that are the same device.

    The most specific identities pair first; an exact match is preferred to one
    whose identity only covers it. Each element pairs at most once.
    """
    new = [(identity(el), el) for el in newer]
    old = sorted(((identity(el), el) for el in older), key=lambda item: -len(item[0].fields))
    taken: set[int] = set()
    found: list[tuple[etree._Element, etree._Element]] = []
    for wanted, el in old:
        free = [n for n in range(len(new)) if n not in taken]
        match = next((n for n in free if new[n][0] == wanted), None)
        if match is None:
            match = next((n for n in free if wanted.covers(new[n][0])), None)
        if match is not None:
            taken.add(match)
            found.append((el, new[match][1]))
    return found


def unmatched(
    older: Sequence[etree._Element], newer: Sequence[etree._Element]
) -> list[etree._Element]:
    """The elements of *newer* that no element of *older* pairs with, in document order."""
    paired = {id(new) for _old, new in pairs(older, newer)}
    return [el for el in newer if id(el) not in paired]


def references(el: etree._Element) -> set[tuple[str, str | None]]:
    """The (controller type or ``audio``, index or id) the device *el* uses; None: any index."""
    refs: set[tuple[str, str | None]] = set()
    address = el.find("address")
    if address is not None:
        kind = address.get("type", "")
        if kind in _BY_BUS:
            refs.add((_BY_BUS[kind], _number(address.get("bus", "0"))))
        elif kind in _BY_CONTROLLER:
            refs.add((_BY_CONTROLLER[kind], _number(address.get("controller", "0"))))
        elif kind == "drive":
            index = _number(address.get("controller", "0"))
            refs.update((controller, index) for controller in _DRIVE_CONTROLLERS)
    else:
        target = el.find("target")
        virtio = target is not None and target.get("type") == "virtio"
        if el.tag in ("console", "channel") and virtio:
            refs.add(("virtio-serial", None))
        if el.get("bus") == "usb":
            refs.add(("usb", None))
    if el.tag == "controller" and el.find("master") is not None:
        refs.add((el.get("type", ""), _number(el.get("index", "0"))))
    for audio in el.iter("audio"):
        if audio is not el and audio.get("id") is not None:
            refs.add(("audio", _number(str(audio.get("id")))))
    return refs


def _provides(el: etree._Element) -> tuple[str, str] | None:
    if el.tag == "controller":
        return el.get("type", ""), _number(el.get("index", "0"))
    if el.tag == "audio" and el.get("id") is not None:
        return "audio", _number(str(el.get("id")))
    return None


def uses(user: etree._Element, device: etree._Element) -> bool:
    """Whether *user* needs *device* (a controller or an ``<audio>``) to be there."""
    provided = _provides(device)
    if provided is None or user is device:
        return False
    refs = references(user)
    return provided in refs or (provided[0], None) in refs


def added_devices(
    before: etree._Element, defined: etree._Element, stored: etree._Element
) -> list[etree._Element]:
    """The devices of *stored* (libvirt's definition) that *defined* (the domain as
    handed to libvirt) does not have, without those a device of *before* (the
    definition before the edit) uses. Each argument is a ``<domain>`` element."""
    stored_devices = device_children(stored)
    defined_devices = device_children(defined)
    added = unmatched(defined_devices, stored_devices)
    # the devices handed in that the domain had before: not one that disable just removed
    # and libvirt added again (it is in *before*, but not in *defined*)
    kept = [new for _old, new in pairs(device_children(before), defined_devices)]
    existing = [new for _old, new in pairs(kept, stored_devices)]
    return [el for el in added if not any(uses(user, el) for user in existing)]


def record_additions(
    before: bytes, defined: bytes, stored: bytes
) -> tuple[bytes | None, list[str]]:
    """Record in *stored* what libvirt added on defining *defined* (see :func:`added_devices`).

    Returns the definition to store again (None if the record is right as it is)
    and a description of each device newly recorded. The record is the union of
    what it held (where the device is still there) and the new additions; nothing
    is recorded on a domain without console-broker consoles.
    """
    doc = parse_document(stored)
    root = doc.root
    metadata = root.find("metadata")
    if find_consoles(root) is None or metadata is None:
        return None, []
    current = device_children(root)
    record = find_added(root)
    entries = read_added(record)
    still = [el for _entry, el in pairs(entries, current)]
    fresh = [
        el
        for el in added_devices(parse_document(before).root, parse_document(defined).root, root)
        if not any(el is kept for kept in still)
    ]
    wanted = [el for el in current if any(el is x for x in [*still, *fresh])]
    if [identity(el) for el in wanted] == [identity(el) for el in entries]:
        return None, []
    if record is not None:
        lay.remove(record)
    if wanted:
        lay.append(metadata, new_added(wanted), lay.Layout(root))
    return doc.to_bytes(), [describe(el) for el in fresh]


def remove_unused(
    root: etree._Element, entries: Sequence[etree._Element]
) -> tuple[list[etree._Element], list[tuple[etree._Element, etree._Element]]]:
    """Remove from *root*'s ``<devices>`` each device *entries* records that no other
    device uses, until nothing more goes. Returns the devices removed and, for each
    recorded device kept, one device that uses it."""
    current = device_children(root)  # holds the proxies, so that their ids stay theirs
    paired = {id(el) for _entry, el in pairs(entries, current)}
    targets = [el for el in current if id(el) in paired]
    removed: list[etree._Element] = []
    progress = True
    while progress:
        progress = False
        for el in targets:
            if any(el is gone for gone in removed):
                continue
            if not any(uses(other, el) for other in device_children(root)):
                lay.remove(el)
                removed.append(el)
                progress = True
    kept: list[tuple[etree._Element, etree._Element]] = []
    for el in targets:
        if not any(el is gone for gone in removed):
            user = next(other for other in device_children(root) if uses(other, el))
            kept.append((el, user))
    return removed, kept


def disable_recorded(
    data: bytes,
    consoles: Sequence[str] | None = None,
    *,
    edits: EditSource,
    validate: bool = True,
) -> Outcome:
    """:func:`broker.xml.disable_xml`, then the recorded devices libvirt added that
    nothing uses any more go too (see the module's notes). Without a record this is
    :func:`broker.xml.disable_xml` itself."""
    doc = parse_document(data)
    record = find_added(doc.root)
    if record is None:
        return disable_xml(data, consoles, edits=edits, validate=validate)
    entries = read_added(record)
    lay.remove(record)  # the editor sees the metadata as console-broker left it
    undone = disable_xml(doc.to_bytes(), consoles, edits=edits, validate=False)
    doc = parse_document(undone.after)
    root = doc.root
    removed, kept = remove_unused(root, entries)
    notes = list(undone.notes)
    if not undone.changed and not removed:
        return Outcome(before=data, after=data, encoding=doc.encoding, notes=tuple(notes))
    metadata = root.find("metadata")
    if find_consoles(root) is not None and metadata is not None:
        if not removed:
            lay.append(metadata, record, lay.Layout(root), reindent=False)
        elif kept:
            lay.append(metadata, new_added([el for el, _user in kept]), lay.Layout(root))
    else:
        notes.extend(
            f"kept {describe(el)}, which libvirt added for the consoles: {describe(user)} uses it"
            for el, user in kept
        )
    if validate:
        check_schema(doc, data)
    after = doc.to_bytes()
    return Outcome(before=data, after=after, encoding=doc.encoding, notes=tuple(notes))
