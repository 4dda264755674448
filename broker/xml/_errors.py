"""The errors :mod:`broker.xml` raises: each one reads well as a single line."""

from __future__ import annotations


class XmlError(Exception):
    """A domain XML could not be read, edited or written; the message says why."""


class InputError(XmlError):
    """The input is not a domain XML this editor accepts (malformed, wrong root, too big)."""


class UnsafeXmlError(InputError):
    """The input carries something refused on principle: a DOCTYPE, entities, XInclude."""


class SchemaError(XmlError):
    """The result does not validate against libvirt's RelaxNG schema."""

    def __init__(self, message: str, *, input_valid: bool | None = None) -> None:
        super().__init__(message)
        #: Whether the input validated (None: not checked).
        self.input_valid = input_valid


class EditError(XmlError):
    """The edit cannot be made, e.g. the recorded state no longer matches the domain."""


class MetadataError(EditError):
    """The console-broker metadata in the domain is malformed."""
