"""Edits from bytes to bytes: what the commands, the libvirt hook and the
libvirt-backed commands share."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from broker.xml._editor import EditResult, disable, enable
from broker.xml._errors import SchemaError
from broker.xml._model import EditOptions, EditSource
from broker.xml._platform import CapabilitiesSource
from broker.xml._schema import DOMAIN_SCHEMA, domain_schema, schema_errors
from broker.xml._source import Document, parse_document


@attrs.frozen
class Outcome:
    """The input and output of one edit."""

    before: bytes
    after: bytes
    #: The document's encoding (for showing a diff).
    encoding: str
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the edit changed anything."""
        return self.before != self.after


def check_schema(doc: Document, before: bytes, *, schema_path: str = DOMAIN_SCHEMA) -> None:
    """Raise :class:`SchemaError` if *doc* does not validate (no schema: no check)."""
    schema = domain_schema(schema_path)
    if schema is None:
        return
    errors = schema_errors(doc.tree, schema)
    if not errors:
        return
    message = f"the result does not validate against libvirt's domain schema: {errors[0]}"
    original = schema_errors(parse_document(before).tree, schema)
    if original:
        message += f"; nor does the input: {original[0]}"
    raise SchemaError(message + " (--no-validate skips this check)", input_valid=not original)


def _finish(doc: Document, data: bytes, result: EditResult, validate: bool) -> Outcome:
    after = doc.to_bytes()
    if validate:
        check_schema(doc, data)
    return Outcome(before=data, after=after, encoding=doc.encoding, notes=result.notes)


def enable_xml(
    data: bytes,
    consoles: Sequence[str],
    options: EditOptions,
    *,
    edits: EditSource,
    validate: bool = True,
    hardware: bool = True,
    capabilities: CapabilitiesSource | None = None,
) -> Outcome:
    """Parse *data*, enable *consoles*, validate, write back (see :func:`broker.xml.enable`)."""
    doc = parse_document(data)
    result = enable(
        doc, consoles, options, edits=edits, hardware=hardware, capabilities=capabilities
    )
    return _finish(doc, data, result, validate)


def disable_xml(
    data: bytes,
    consoles: Sequence[str] | None = None,
    *,
    edits: EditSource,
    validate: bool = True,
) -> Outcome:
    """Parse *data*, disable *consoles* (default: all recorded), validate, write back."""
    doc = parse_document(data)
    result = disable(doc, consoles, edits=edits)
    return _finish(doc, data, result, validate)
