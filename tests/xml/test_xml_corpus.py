"""Every domain of tests/xml_corpus: enable is idempotent, keeps every unrelated node,
validates, and disable restores the input byte for byte. Every hostile input is refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from pathlib import Path

import pytest
from lxml import etree
from xmlhelpers import CliRunner, corpus_files, hostile_files

from broker.plugins import PluginManager
from broker.xml import (
    NAMESPACE,
    EditOptions,
    console_edit,
    disable_xml,
    domain_schema,
    enable_xml,
    parse_document,
    plugin_edits,
    read_consoles,
    schema_errors,
)
from broker.xml._metadata import console_elements, find_consoles, slot_records

ALL = ("vnc", "spice", "serial")
CASES = [
    *((path, ALL, mode) for path in corpus_files() for mode in ("fd", "tcp", "websocket")),
    *((path, (protocol,), "fd") for path in corpus_files() for protocol in ALL),
]


def case_id(case: object) -> str:
    if isinstance(case, Path):
        return case.stem
    if isinstance(case, tuple):
        return "+".join(case)
    return str(case)


def is_element(node: etree._Element) -> bool:
    return isinstance(node.tag, str)


def canon(el: etree._Element) -> Hashable:
    """An element's content, ignoring whitespace, attribute order and (blanked) passwords."""
    return (
        el.tag,
        tuple(sorted((str(k), str(v)) for k, v in el.attrib.items() if k != "passwd")),
        (el.text or "").strip(),
        tuple(canon(c) if is_element(c) else ("#node", c.text) for c in el),
    )


def owned(
    root: etree._Element, manager: PluginManager, protocols: tuple[str, ...]
) -> dict[tuple[str, str], list[etree._Element]]:
    """(protocol, slot) -> the <devices> children that slot selects."""
    devices = root.find("devices")
    found: dict[tuple[str, str], list[etree._Element]] = {}
    for protocol in protocols:
        for slot in console_edit(manager, protocol, EditOptions()).slots:
            selected = devices.xpath(slot.select) if devices is not None else []
            assert isinstance(selected, list)
            found[(protocol, slot.name)] = [el for el in selected if isinstance(el, etree._Element)]
    return found


def listing(root: etree._Element, skip: set[etree._Element]) -> list[Hashable]:
    """Every node outside *skip* and console-broker's metadata, in document order.

    <metadata> and <devices> themselves are left out (the edit may create them),
    their children are not."""
    out: list[Hashable] = [
        (
            "domain",
            tuple(sorted(root.attrib.items())),
            tuple(sorted((k or "", v) for k, v in root.nsmap.items())),
        )
    ]

    def walk(node: etree._Element, path: tuple[str, ...]) -> None:
        for child in node:
            if child in skip or child.tag == f"{{{NAMESPACE}}}consoles":
                continue
            if isinstance(child, etree._Comment):
                out.append((path, "#comment", child.text))
            elif isinstance(child, etree._ProcessingInstruction):
                out.append((path, "#pi", child.target, child.text))
            else:
                tag = str(child.tag)
                if not (node is root and tag in ("metadata", "devices")):
                    namespaces = tuple(sorted((k or "", v) for k, v in child.nsmap.items()))
                    out.append(
                        (
                            path,
                            canon(child) if len(child) == 0 else tag,
                            namespaces,
                            tuple(sorted(child.attrib.items())),
                            (child.text or "").strip(),
                        )
                    )
                walk(child, (*path, tag))

    walk(root, ("domain",))
    return out


@pytest.mark.parametrize(("path", "protocols", "mode"), CASES, ids=case_id)
def test_enable_on_the_corpus(
    manager: PluginManager, path: Path, protocols: tuple[str, ...], mode: str
) -> None:
    data = path.read_bytes()
    options = EditOptions(mode=mode)
    outcome = enable_xml(data, protocols, options, edits=plugin_edits(manager))
    out = outcome.after

    # it validates against libvirt's schema (enable_xml checks too, this says so)
    schema = domain_schema()
    if schema is not None:
        assert schema_errors(parse_document(out).tree, schema) == []

    # a second run yields the very same bytes
    assert enable_xml(out, protocols, options, edits=plugin_edits(manager)).after == out

    # what the consoles do not own is all there, in order
    before = parse_document(data).root
    after = parse_document(out).root
    owned_before = owned(before, manager, protocols)
    owned_after = owned(after, manager, protocols)
    skip_before = {el for els in owned_before.values() for el in els}
    skip_after = {el for els in owned_after.values() for el in els}
    assert listing(after, skip_after) == listing(before, skip_before)

    # what they own is either still in place, unchanged, or kept in the metadata
    placed: set[etree._Element] = set()
    originals: list[etree._Element] = []
    for protocol, console in console_elements(find_consoles(after)).items():
        for record in slot_records(console, protocol):
            selected = owned_after[(protocol, record.name)]
            for entry in record.placed:
                placed.add([el for el in selected if el.tag == entry.tag][entry.index])
                if entry.original is not None:
                    originals.append(entry.original)
            originals.extend(record.removed)
    kept = [el for el in skip_after if el not in placed]
    assert Counter(map(canon, skip_before)) == Counter(map(canon, kept)) + Counter(
        map(canon, originals)
    )
    assert set(read_consoles(parse_document(out))) == set(protocols)

    # and disable gives back the input, byte for byte
    assert disable_xml(out, edits=plugin_edits(manager)).after == data


@pytest.mark.parametrize("path", hostile_files(), ids=lambda p: p.name)
def test_hostile_inputs_are_refused_by_the_command(cli: CliRunner, path: Path) -> None:
    done = cli("xml", "enable", "--consoles", "vnc,spice,serial", str(path))
    assert done.status == 2
    assert done.stdout == b""
    assert done.stderr.startswith("console-broker: error: ")
    assert done.stderr.count("\n") == 1
    assert "root:" not in done.stderr  # nothing of /etc/passwd
