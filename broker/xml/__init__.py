"""Domain XML provisioning: make a libvirt domain console-ready.

Each protocol plugin contributes its edit through the
``xml_edit`` of a protocol or XML edit object (a :class:`ConsoleEdit` made of
:class:`Slot`); this package merges, orders, records and validates them,
keeping everything else of the document as it was, byte for byte.

Reading what a domain has enabled (for the broker)::

    from broker.xml import parse_document, read_consoles
    records = read_consoles(parse_document(xml_bytes))
    records["vnc"].mode, records["vnc"].index

:func:`read_consoles` also accepts an lxml tree of the live XML.

The names are imported from their modules when first used (PEP 562), so that importing
this package, as :mod:`broker.xml.cli` does to build the commands' parsers, loads neither
lxml nor libvirt: ``console-broker --help`` runs on a client-only install, without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.hookspecs import XMLOption
    from broker.xml._constants import DEFAULT_LISTEN, DEFAULT_MODE, MODES
    from broker.xml._editor import EditResult, disable, enable
    from broker.xml._errors import (
        EditError,
        InputError,
        MetadataError,
        SchemaError,
        UnsafeXmlError,
        XmlError,
    )
    from broker.xml._input import input_slot
    from broker.xml._metadata import NAMESPACE, PREFIX, read_consoles
    from broker.xml._model import (
        Compare,
        ConsoleEdit,
        ConsoleRecord,
        DeviceRef,
        EditOptions,
        EditSource,
        Slot,
    )
    from broker.xml._ops import Outcome, check_schema, disable_xml, enable_xml
    from broker.xml._platform import (
        CapabilitiesSource,
        DomainCapabilities,
        Platform,
        connection_capabilities,
        libvirt_capabilities,
    )
    from broker.xml._plugins import console_edit, plugin_edits
    from broker.xml._schema import DOMAIN_SCHEMA, domain_schema, schema_errors
    from broker.xml._source import MAX_BYTES, Document, parse_document
    from broker.xml.fragments import graphics_for_mode, load_fragment

#: The module each name comes from (tests/xml/test_xml_package.py keeps this table and the
#: imports above in step).
_SOURCES: dict[str, str] = {
    "XMLOption": "broker.hookspecs",
    "DEFAULT_LISTEN": "broker.xml._constants",
    "DEFAULT_MODE": "broker.xml._constants",
    "MODES": "broker.xml._constants",
    "EditResult": "broker.xml._editor",
    "disable": "broker.xml._editor",
    "enable": "broker.xml._editor",
    "EditError": "broker.xml._errors",
    "InputError": "broker.xml._errors",
    "MetadataError": "broker.xml._errors",
    "SchemaError": "broker.xml._errors",
    "UnsafeXmlError": "broker.xml._errors",
    "XmlError": "broker.xml._errors",
    "input_slot": "broker.xml._input",
    "NAMESPACE": "broker.xml._metadata",
    "PREFIX": "broker.xml._metadata",
    "read_consoles": "broker.xml._metadata",
    "Compare": "broker.xml._model",
    "ConsoleEdit": "broker.xml._model",
    "ConsoleRecord": "broker.xml._model",
    "DeviceRef": "broker.xml._model",
    "EditOptions": "broker.xml._model",
    "EditSource": "broker.xml._model",
    "Slot": "broker.xml._model",
    "Outcome": "broker.xml._ops",
    "check_schema": "broker.xml._ops",
    "disable_xml": "broker.xml._ops",
    "enable_xml": "broker.xml._ops",
    "CapabilitiesSource": "broker.xml._platform",
    "DomainCapabilities": "broker.xml._platform",
    "Platform": "broker.xml._platform",
    "connection_capabilities": "broker.xml._platform",
    "libvirt_capabilities": "broker.xml._platform",
    "console_edit": "broker.xml._plugins",
    "plugin_edits": "broker.xml._plugins",
    "DOMAIN_SCHEMA": "broker.xml._schema",
    "domain_schema": "broker.xml._schema",
    "schema_errors": "broker.xml._schema",
    "MAX_BYTES": "broker.xml._source",
    "Document": "broker.xml._source",
    "parse_document": "broker.xml._source",
    "graphics_for_mode": "broker.xml.fragments",
    "load_fragment": "broker.xml.fragments",
}

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MODE",
    "DOMAIN_SCHEMA",
    "MAX_BYTES",
    "MODES",
    "NAMESPACE",
    "PREFIX",
    "CapabilitiesSource",
    "Compare",
    "ConsoleEdit",
    "ConsoleRecord",
    "DeviceRef",
    "Document",
    "DomainCapabilities",
    "EditError",
    "EditOptions",
    "EditResult",
    "EditSource",
    "InputError",
    "MetadataError",
    "Outcome",
    "Platform",
    "SchemaError",
    "Slot",
    "UnsafeXmlError",
    "XMLOption",
    "XmlError",
    "check_schema",
    "connection_capabilities",
    "console_edit",
    "disable",
    "disable_xml",
    "domain_schema",
    "enable",
    "enable_xml",
    "graphics_for_mode",
    "input_slot",
    "libvirt_capabilities",
    "load_fragment",
    "parse_document",
    "plugin_edits",
    "read_consoles",
    "schema_errors",
]

if not TYPE_CHECKING:  # type checkers see the imports above, and no other name

    def __getattr__(name: str) -> Any:
        """Import *name* from its module, once (PEP 562)."""
        try:
            source = _SOURCES[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(source), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
