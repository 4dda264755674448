"""Applying and reverting the plugins' slots on a parsed domain.

Theory of operation. ``enable`` gets each protocol's slots from the edit
source it is handed (the plugins', :mod:`broker.xml._plugins`).
For every slot it first builds what the slot wants from what is in place
now; if that is already there (exactly, or covered where libvirt completes
devices with defaults), nothing is touched, which makes a second run a no-op
byte for byte, also on libvirt's own rewrite of the XML. Otherwise the
slot's earlier edit, if any, is undone first (so the first-recorded
originals are kept), the slot is built again from the original elements,
and the wanted elements are put in: new elements take the places of dropped
ones, the rest go where libvirt would write them. Each dropped original
moves into the metadata record, next to the position of the element that
replaced it; ``disable`` moves it back. See :mod:`broker.xml._metadata`
for the record format.

A shared slot (``Slot.shared``: the keyboard and pointer of every graphical
console, :func:`broker.xml.input_slot`) is held alike by several protocols,
its record by one of them: the first whose edit adds elements records them,
an enable of another finds them in place (or edits them under the record
where it is); ``disable`` hands the record to a protocol that stays enabled
and holds the same slot, and only the last one takes the elements away.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import attrs
from lxml import etree

from broker.errors import PluginError
from broker.xml import _layout as lay
from broker.xml._errors import EditError, XmlError
from broker.xml._metadata import (
    NAMESPACE,
    PREFIX,
    Placed,
    SlotRecord,
    console_elements,
    find_consoles,
    new_console,
    new_setting,
    new_slot,
    q,
    set_console,
    settings_of,
    slot_records,
    words,
)
from broker.xml._model import Compare, ConsoleEdit, DeviceRef, EditOptions, EditSource, Slot
from broker.xml._platform import CapabilitiesSource, Platform
from broker.xml._source import Document

_RECORD_ORDER = (q("setting"), q("slot"))


@attrs.frozen
class EditResult:
    """What an edit did besides changing the tree."""

    #: Remarks for the operator, one line each (e.g. SPICE provisioned as tcp).
    notes: tuple[str, ...] = ()


@functools.lru_cache(maxsize=256)
def _xpath(expression: str) -> etree.XPath:
    return etree.XPath(expression)


def _select(devices: etree._Element | None, slot: Slot, protocol: str) -> list[etree._Element]:
    if devices is None:
        return []
    try:
        found = _xpath(slot.select)(devices)
    except etree.XPathError as exc:
        raise PluginError(
            f"{protocol} slot {slot.name!r}: select {slot.select!r} failed: {exc}"
        ) from None
    elements: list[etree._Element] = []
    for el in found if isinstance(found, list) else [found]:
        if not (
            isinstance(el, etree._Element) and lay.is_element(el) and el.getparent() is devices
        ):
            raise PluginError(
                f"{protocol} slot {slot.name!r}: select {slot.select!r} must select child "
                "elements of <devices>"
            )
        elements.append(el)
    return elements


def _build(
    slot: Slot, protocol: str, current: Sequence[etree._Element], devices: etree._Element
) -> list[etree._Element]:
    before = [etree.tostring(el, with_tail=False) for el in current]
    try:
        desired = list(slot.build(current, devices))
    except (XmlError, PluginError):
        raise
    except Exception as exc:
        raise PluginError(f"{protocol} slot {slot.name!r} failed: {exc}") from exc
    what = f"{protocol} slot {slot.name!r}"
    if [etree.tostring(el, with_tail=False) for el in current] != before:
        raise PluginError(f"{what} changed the elements it was given; change a copy.deepcopy")
    seen: set[int] = set()
    for el in desired:
        if not isinstance(el, etree._Element) or not lay.is_element(el):
            raise PluginError(f"{what} must return elements, got {el!r}")
        if id(el) in seen:
            raise PluginError(f"{what} returned the same element twice")
        seen.add(id(el))
        if el.getparent() is not None and not any(el is c for c in current):
            raise PluginError(f"{what} returned an element that belongs to another tree")
    return desired


def _text(el: etree._Element) -> str:
    return (el.text or "").strip()


def _children(el: etree._Element) -> list[etree._Element]:
    return [child for child in el if lay.is_element(child)]


def _same(a: etree._Element, b: etree._Element) -> bool:
    if a.tag != b.tag or sorted(a.attrib.items()) != sorted(b.attrib.items()):
        return False
    if _text(a) != _text(b):
        return False
    ak, bk = _children(a), _children(b)
    return len(ak) == len(bk) and all(_same(x, y) for x, y in zip(ak, bk, strict=True))


def _covers(have: etree._Element, want: etree._Element) -> bool:
    if have.tag != want.tag or any(have.get(k) != v for k, v in want.attrib.items()):
        return False
    if _text(want) and _text(want) != _text(have):
        return False
    candidates = iter(_children(have))
    return all(any(_covers(h, w) for h in candidates) for w in _children(want))


def _by_tag(elements: Sequence[etree._Element]) -> dict[str, list[etree._Element]]:
    groups: dict[str, list[etree._Element]] = {}
    for el in elements:
        groups.setdefault(str(el.tag), []).append(el)
    return groups


def _satisfied(
    current: Sequence[etree._Element], desired: Sequence[etree._Element], compare: Compare
) -> bool:
    """Whether *desired* is already in place (compared tag by tag, in order)."""
    have, want = _by_tag(current), _by_tag(desired)
    if have.keys() != want.keys() or any(len(have[k]) != len(want[k]) for k in have):
        return False
    match = _same if compare is Compare.EXACT else _covers
    return all(
        c is d or match(c, d) for tag in have for c, d in zip(have[tag], want[tag], strict=True)
    )


def _unredact(original: etree._Element, secrets: Iterable[str], source: etree._Element) -> None:
    for name in secrets:
        value = source.get(name)
        if value is None:
            if name in original.attrib:
                del original.attrib[name]
        else:
            original.set(name, value)


def _is_record(el: etree._Element) -> bool:
    return str(el.tag).startswith(f"{{{NAMESPACE}}}")


class _Editor:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.root = doc.root
        self.layout = lay.Layout(self.root)
        self.consoles = find_consoles(self.root)
        self.created: set[str] = set()
        self.was_empty: set[str] = set()

    # -- the containers ------------------------------------------------------

    def devices(self, *, create: bool = False) -> etree._Element | None:
        devices = self.root.find("devices")
        if devices is None and create:
            devices = etree.Element("devices")
            lay.insert_in_order(self.root, devices, lay.DOMAIN_ORDER, self.layout)
            self.created.add("devices")
        return devices

    def console(self, protocol: str, *, create: bool = False) -> etree._Element | None:
        found = console_elements(self.consoles).get(protocol)
        if found is not None or not create:
            return found
        if self.consoles is None:
            metadata = self.root.find("metadata")
            if metadata is None:
                metadata = etree.Element("metadata")
                lay.insert_in_order(self.root, metadata, lay.DOMAIN_ORDER, self.layout)
                self.created.add("metadata")
            elif lay.written_empty(metadata):
                self._note_empty(metadata, "metadata")
            self.consoles = etree.Element(q("consoles"), nsmap={PREFIX: NAMESPACE})
            lay.append(metadata, self.consoles, self.layout)
        console = new_console(protocol)
        lay.append(self.consoles, console, self.layout)
        return console

    def _note_empty(self, el: etree._Element, name: str) -> None:
        """Remember that *el* was written empty: ``<name/>`` or ``<name></name>``."""
        self.was_empty.add(name if self.doc.written_self_closing(el) else f"{name}-pair")

    # -- slots ---------------------------------------------------------------

    def _targets(
        self, current: Sequence[etree._Element], record: SlotRecord, protocol: str
    ) -> list[tuple[Placed, etree._Element]]:
        by_tag: dict[str, list[etree._Element]] = {}
        for el in current:
            by_tag.setdefault(str(el.tag), []).append(el)
        targets = []
        for entry in record.placed:
            candidates = by_tag.get(entry.tag, [])
            if entry.index >= len(candidates):
                raise EditError(
                    f"the {protocol} slot {record.name!r} placed <{entry.tag}> #{entry.index}, "
                    "which is gone: <devices> changed since console-broker edited it, so the "
                    "earlier state cannot be restored safely"
                )
            targets.append((entry, candidates[entry.index]))
        return targets

    def undo_slot(self, protocol: str, slot: Slot, record: SlotRecord) -> None:
        devices = self.devices()
        current = _select(devices, slot, protocol)
        for entry, el in self._targets(current, record, protocol):
            if entry.original is None:
                lay.remove(el)
                continue
            original = entry.original
            _unredact(original, entry.secrets, el)
            delta = lay.indent_delta(lay.indent_of(el), lay.indent_of(original))
            if delta:
                lay.unshift(original, delta)
            lay.replace(el, original, self.layout, reindent=False)
        for original in record.removed:
            if devices is None:
                break
            inner = lay.indent_of(original)
            lay.insert_in_order(devices, original, lay.DEVICE_ORDER, self.layout, reindent=False)
            delta = lay.indent_delta(lay.indent_of(original), inner)
            if delta:
                lay.unshift(original, delta)

    def _apply_slot(
        self,
        protocol: str,
        slot: Slot,
        current: Sequence[etree._Element],
        desired: Sequence[etree._Element],
    ) -> tuple[etree._Element, list[tuple[etree._Element, str | None]]] | None:
        removed = [c for c in current if not any(c is d for d in desired)]
        new = [d for d in desired if not any(d is c for c in current)]
        if not removed and not new:
            return None
        devices = self.devices(create=bool(new))
        assert devices is not None
        if "devices" not in self.created and lay.written_empty(devices):
            self._note_empty(devices, "devices")
        indents = [lay.indent_of(c) for c in removed]
        paired = list(zip(removed, new, strict=False))
        for old, el in paired:
            lay.replace(old, el, self.layout)
        for el in new[len(paired) :]:
            lay.insert_in_order(devices, el, lay.DEVICE_ORDER, self.layout)
        for old in removed[len(paired) :]:
            lay.remove(old)
        after = _select(devices, slot, protocol)
        record = new_slot(slot.name)
        moved: list[tuple[etree._Element, str | None]] = []
        originals: dict[int, tuple[etree._Element, str | None]] = {}
        for (old, el), indent in zip(paired, indents, strict=False):
            originals[id(el)] = (old, indent)
        for el in new:
            index = next(
                (n for n, e in enumerate(x for x in after if x.tag == el.tag) if e is el), None
            )
            if index is None:
                raise PluginError(
                    f"{protocol} slot {slot.name!r} placed a <{el.tag}> that its select "
                    f"{slot.select!r} does not match"
                )
            placed = etree.SubElement(record, q("placed"))
            placed.set("tag", str(el.tag))
            placed.set("index", str(index))
            if id(el) in originals:
                old, indent = originals[id(el)]
                self._keep(placed, old, slot)
                moved.append((old, indent))
        for old, indent in zip(removed[len(paired) :], indents[len(paired) :], strict=True):
            self._keep(etree.SubElement(record, q("removed")), old, slot)
            moved.append((old, indent))
        return record, moved

    @staticmethod
    def _keep(holder: etree._Element, original: etree._Element, slot: Slot) -> None:
        secrets = [name for name in slot.secret_attributes if original.get(name) is not None]
        for name in secrets:
            original.set(name, "")
        if secrets and holder.tag == q("placed"):
            holder.set("secrets", " ".join(secrets))
        holder.append(original)

    def _store(
        self,
        console: etree._Element,
        old: etree._Element | None,
        new: tuple[etree._Element, list[tuple[etree._Element, str | None]]] | None,
    ) -> None:
        """Put a new slot record in place of *old* (or add it); lay it out."""
        if new is None:
            if old is not None:
                lay.remove(old)
            return
        record, moved = new
        if old is not None:
            lay.replace(old, record, self.layout, reindent=False)
        else:
            lay.insert_in_order(console, record, _RECORD_ORDER, self.layout, reindent=False)
        self.layout.reindent(record, lay.indent_of(record), opaque=lambda el: not _is_record(el))
        for original, indent in moved:
            delta = lay.indent_delta(indent, lay.indent_of(original))
            if delta:
                lay.shift(original, delta)

    def shared_record(
        self, protocol: str, slot: Slot, holds: Callable[[str, Slot], bool]
    ) -> SlotRecord | None:
        """The record of the shared *slot* that another protocol's console holds."""
        for other, console in console_elements(self.consoles).items():
            if other == protocol:
                continue
            for record in slot_records(console, other):
                if record.name == slot.name and holds(other, slot):
                    return record
        return None

    def hand_over(self, record: SlotRecord, heir: etree._Element) -> None:
        """Move the record of a shared slot into the console *heir*."""
        el = record.element
        lay.remove(el)
        lay.insert_in_order(heir, el, _RECORD_ORDER, self.layout, reindent=False)
        self.layout.reindent(el, lay.indent_of(el), opaque=lambda e: not _is_record(e))

    def enable_slot(
        self, protocol: str, slot: Slot, record: SlotRecord | None, *, hardware: bool
    ) -> None:
        devices = self.devices()
        current = _select(devices, slot, protocol)
        if not hardware and (slot.guest_visible or not current):
            return
        context = devices if devices is not None else etree.Element("devices")
        desired = _build(slot, protocol, current, context)
        if _satisfied(current, desired, slot.compare):
            return
        if record is not None:
            self.undo_slot(protocol, slot, record)
            current = _select(self.devices(), slot, protocol)
            desired = _build(slot, protocol, current, context)
        applied = self._apply_slot(protocol, slot, current, desired)
        if applied is None and record is None:
            return
        console = self.console(protocol, create=True)
        assert console is not None
        self._store(console, record.element if record else None, applied)

    # -- consoles ------------------------------------------------------------

    def write_console(self, protocol: str, edit: ConsoleEdit, *, hardware: bool) -> None:
        devices = self.devices()
        device: DeviceRef | None = None
        console = self.console(protocol)
        if devices is not None:
            present = [ref for ref in edit.devices if ref.find(devices) is not None]
            device = present[0] if present else None
            # Keep a recorded device that is still there: libvirt turning a lone
            # <console> into a serial port and its mirror changes nothing the broker opens.
            recorded = (
                DeviceRef(console.get("device", ""), console.get("device-type"))
                if console is not None
                else None
            )
            if recorded is not None and recorded in present:
                device = recorded
        if console is None:
            if not hardware and device is None:
                return
            console = self.console(protocol, create=True)
            assert console is not None
        set_console(console, edit.mode, device)
        wanted = dict(edit.settings)
        if settings_of(console, protocol) != wanted or len(
            list(console.iterchildren(q("setting")))
        ) != len(wanted):
            for old in list(console.iterchildren(q("setting"))):
                lay.remove(old)
            for name, value in wanted.items():
                lay.insert_in_order(console, new_setting(name, value), _RECORD_ORDER, self.layout)

    def finish(self) -> None:
        """Write the bookkeeping attributes, or clean up after the last console."""
        if self.consoles is None:
            return
        created = words(self.consoles, "created") | self.created
        was_empty = words(self.consoles, "was-empty") | self.was_empty
        remaining = bool(console_elements(self.consoles))
        if remaining:
            for name, value in (("created", created), ("was-empty", was_empty)):
                if value and words(self.consoles, name) != value:
                    self.consoles.set(name, " ".join(sorted(value)))
        else:
            lay.remove(self.consoles)
            self.consoles = None
        for name in ("metadata", "devices"):
            el = self.root.find(name)
            if el is None:
                continue
            if name in was_empty or f"{name}-pair" in was_empty:
                lay.make_empty(el)
            if name in was_empty:
                self.doc.write_self_closing(el)
            if not remaining and name in created and not len(el) and not (el.text or "").strip():
                lay.remove(el)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def enable(
    doc: Document,
    protocols: Sequence[str],
    options: EditOptions,
    *,
    edits: EditSource,
    hardware: bool = True,
    capabilities: CapabilitiesSource | None = None,
) -> EditResult:
    """Provision the consoles *protocols* on *doc* (in place), with the edits *edits*
    gives for them (:func:`broker.xml.plugin_edits`: the loaded plugins').

    The plugins get the domain's :class:`~broker.xml.Platform` in ``options.platform``
    (its ``<os><type arch machine>``), with what *capabilities* reports for it (a live
    libvirt's domain capabilities) when given.

    With ``hardware=False`` (the libvirt hook) only slots that change no
    guest-visible hardware and already have elements in place are applied.
    """
    wanted = _unique(protocols)
    if not wanted:
        raise EditError("no console protocol given")
    platform = Platform.of_domain(doc.root)
    if capabilities is not None:
        platform = attrs.evolve(platform, capabilities=capabilities(platform))
    elif options.platform.capabilities is not None:
        platform = attrs.evolve(platform, capabilities=options.platform.capabilities)
    options = attrs.evolve(options, platform=platform)
    wanted_edits = {protocol: edits(protocol, options) for protocol in wanted}
    editor = _Editor(doc)
    _check_disjoint(editor.devices(), wanted_edits)
    holds = _holder(edits, wanted_edits)
    for protocol, edit in wanted_edits.items():
        console = editor.console(protocol)
        records = (
            {r.name: r for r in slot_records(console, protocol)} if console is not None else {}
        )
        for slot in edit.slots:
            record = records.get(slot.name)
            if record is None and slot.shared:
                record = editor.shared_record(protocol, slot, holds)
            editor.enable_slot(protocol, slot, record, hardware=hardware)
        editor.write_console(protocol, edit, hardware=hardware)
    editor.finish()
    return EditResult(notes=tuple(note for edit in wanted_edits.values() for note in edit.notes))


def disable(
    doc: Document,
    protocols: Sequence[str] | None = None,
    *,
    edits: EditSource,
) -> EditResult:
    """Undo what the metadata records for *protocols* (default: everything); *edits*
    gives each recorded protocol's slots. A shared slot's record goes to a protocol that
    stays enabled and holds the slot too, rather than being undone."""
    editor = _Editor(doc)
    recorded = console_elements(editor.consoles)
    wanted = list(recorded) if protocols is None else _unique(protocols)
    notes = [
        f"{protocol}: not enabled in this domain" for protocol in wanted if protocol not in recorded
    ]
    staying = [p for p in recorded if p not in wanted]
    holds = _holder(edits, {})
    for protocol in reversed([p for p in recorded if p in wanted]):
        console = recorded[protocol]
        records = slot_records(console, protocol)
        if records:
            slots = {
                slot.name: slot
                for slot in edits(protocol, EditOptions()).slots
            }
            for record in reversed(records):
                slot = slots.get(record.name)
                if slot is None:
                    raise EditError(
                        f"cannot disable {protocol}: its plugin has no slot {record.name!r} "
                        "any more"
                    )
                heir = _heir(slot, staying, recorded, holds)
                if heir is not None:
                    editor.hand_over(record, recorded[heir])
                else:
                    editor.undo_slot(protocol, slot, record)
        lay.remove(console)
    editor.finish()
    return EditResult(notes=tuple(notes))


def _alike(a: Slot, b: Slot) -> bool:
    """Whether *a* and *b* are the same shared slot (of two protocols)."""
    return a.shared and b.shared and a.name == b.name and a.select == b.select


def _holder(edits: EditSource, known: dict[str, ConsoleEdit]) -> Callable[[str, Slot], bool]:
    """``holds(protocol, slot)``: whether *protocol*'s edit (from *known*, else from
    *edits* with default options) has the shared *slot* too; a protocol whose edit
    cannot be had holds nothing."""
    cache = dict(known)

    def holds(protocol: str, slot: Slot) -> bool:
        edit = cache.get(protocol)
        if edit is None:
            try:
                edit = edits(protocol, EditOptions())
            except (XmlError, PluginError):
                return False
            cache[protocol] = edit
        return any(_alike(slot, own) for own in edit.slots)

    return holds


def _heir(
    slot: Slot,
    staying: Sequence[str],
    recorded: dict[str, etree._Element],
    holds: Callable[[str, Slot], bool],
) -> str | None:
    """The protocol that stays enabled and takes over the record of the shared *slot*
    (one without a record of its own for it), or None."""
    if not slot.shared:
        return None
    for protocol in staying:
        own = {record.name for record in slot_records(recorded[protocol], protocol)}
        if slot.name not in own and holds(protocol, slot):
            return protocol
    return None


def _check_disjoint(devices: etree._Element | None, edits: dict[str, ConsoleEdit]) -> None:
    # the element is held too, so that its proxy (and id) lives as long as the entry
    owners: dict[int, tuple[etree._Element, Slot, str]] = {}
    for protocol, edit in edits.items():
        for slot in edit.slots:
            for el in _select(devices, slot, protocol):
                owner = f"{protocol} slot {slot.name!r}"
                if id(el) in owners:
                    if _alike(owners[id(el)][1], slot):
                        continue
                    raise PluginError(
                        f"a <{el.tag}> is claimed by both {owners[id(el)][2]} and {owner}"
                    )
                owners[id(el)] = (el, slot, owner)
