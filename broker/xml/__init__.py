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
"""

from broker.hookspecs import XMLOption
from broker.xml._editor import EditResult, disable, enable
from broker.xml._errors import (
    EditError,
    InputError,
    MetadataError,
    SchemaError,
    UnsafeXmlError,
    XmlError,
)
from broker.xml._metadata import NAMESPACE, PREFIX, read_consoles
from broker.xml._model import (
    DEFAULT_LISTEN,
    DEFAULT_MODE,
    MODES,
    Compare,
    ConsoleEdit,
    ConsoleRecord,
    DeviceRef,
    EditOptions,
    EditSource,
    Slot,
)
from broker.xml._ops import Outcome, check_schema, disable_xml, enable_xml
from broker.xml._plugins import console_edit, plugin_edits
from broker.xml._schema import DOMAIN_SCHEMA, domain_schema, schema_errors
from broker.xml._source import MAX_BYTES, Document, parse_document
from broker.xml.fragments import graphics_for_mode, load_fragment

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_MODE",
    "DOMAIN_SCHEMA",
    "MAX_BYTES",
    "MODES",
    "NAMESPACE",
    "PREFIX",
    "Compare",
    "ConsoleEdit",
    "ConsoleRecord",
    "DeviceRef",
    "Document",
    "EditError",
    "EditOptions",
    "EditResult",
    "EditSource",
    "InputError",
    "MetadataError",
    "Outcome",
    "SchemaError",
    "Slot",
    "UnsafeXmlError",
    "XMLOption",
    "XmlError",
    "check_schema",
    "console_edit",
    "disable",
    "disable_xml",
    "domain_schema",
    "enable",
    "enable_xml",
    "graphics_for_mode",
    "load_fragment",
    "parse_document",
    "plugin_edits",
    "read_consoles",
    "schema_errors",
]
