"""Helpers for plugins that build their slots from XML fragments.

Fragments are small XML files shipped as package data (the built-in plugins
keep theirs in the ``broker_xml_templates`` package). They are parsed with
the same safe parser as domain XML; values such as a listen address are set
on the parsed elements, never formatted into XML text.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from importlib import resources

from lxml import etree

from broker.xml._errors import XmlError
from broker.xml._layout import is_element, remove
from broker.xml._source import parse_fragment

#: The attributes of ``<graphics>`` that say how it listens.
LISTEN_ATTRIBUTES = (
    "port",
    "autoport",
    "websocket",
    "websocketGenerated",
    "tlsPort",
    "listen",
    "socket",
)


@functools.lru_cache(maxsize=128)
def _fragment(package: str, resource: str) -> etree._Element:
    try:
        data = resources.files(package).joinpath(resource).read_bytes()
    except (OSError, ModuleNotFoundError) as exc:
        raise XmlError(f"cannot read the XML fragment {resource!r} of {package!r}: {exc}") from None
    root = parse_fragment(data)
    for el in root.iter():
        if el.text is not None and not el.text.strip() and len(el):
            el.text = None
        if el is not root and el.tail is not None and not el.tail.strip():
            el.tail = None
    return root


def load_fragment(package: str, resource: str) -> etree._Element:
    """A fresh copy of the element in the file *resource* of *package*.

    Blank text between elements is dropped; the core indents new elements
    like their neighbours when it places them.
    """
    return copy.deepcopy(_fragment(package, resource))


def _listen_children(el: etree._Element) -> list[etree._Element]:
    return [child for child in el if is_element(child) and child.tag == "listen"]


def graphics_for_mode(
    current: etree._Element | None,
    new: etree._Element,
    mode: etree._Element,
    *,
    listen: str | None = None,
) -> etree._Element:
    """A ``<graphics>`` that listens the way the fragment *mode* says.

    Starts from a copy of *current* (or of *new* when the domain has none),
    drops everything about listening (:data:`LISTEN_ATTRIBUTES` and the
    ``<listen>`` children) and keeps everything else: passwords, keymap,
    share policy, SPICE's sub-elements. Then takes the attributes and
    ``<listen>`` children of *mode*, and sets *listen* as the address of the
    ``listen`` attribute and of every ``<listen type='address'>``.
    """
    el = copy.deepcopy(current if current is not None else new)
    for child in _listen_children(el):
        remove(child)
    kept = [(k, v) for k, v in el.attrib.items() if k not in LISTEN_ATTRIBUTES and k != "type"]
    wanted = [(k, v) for k, v in mode.attrib.items() if k != "type"]
    ordered = (
        [("type", el.get("type") or new.get("type") or "")]
        + wanted
        + [(k, v) for k, v in kept if k not in dict(wanted)]
    )
    el.attrib.clear()
    for key, value in ordered:
        el.set(key, value)
    for n, child in enumerate(_listen_children(mode)):
        el.insert(n, copy.deepcopy(child))
    if listen is not None:
        if el.get("listen") is not None:
            el.set("listen", listen)
        for child in _listen_children(el):
            if child.get("type") == "address":
                child.set("address", listen)
    return el


def drop_attributes(el: etree._Element, names: Iterable[str]) -> None:
    """Remove the attributes *names* from *el* where present."""
    for name in names:
        if name in el.attrib:
            del el.attrib[name]
