"""Validating against libvirt's own RelaxNG schema for domains."""

from __future__ import annotations

import functools
import os

from lxml import etree

from broker.xml._errors import SchemaError

#: Where libvirt installs its domain schema (it includes its siblings).
DOMAIN_SCHEMA = "/usr/share/libvirt/schemas/domain.rng"


@functools.lru_cache(maxsize=4)
def _compile(path: str) -> etree.RelaxNG:
    try:
        return etree.RelaxNG(file=path)
    except (etree.RelaxNGParseError, OSError) as exc:
        raise SchemaError(f"cannot load libvirt's domain schema {path}: {exc}") from None


def domain_schema(path: str = DOMAIN_SCHEMA) -> etree.RelaxNG | None:
    """The compiled schema (cached), or None if libvirt's schemas are not installed."""
    if not os.path.exists(path):
        return None
    return _compile(path)


def schema_errors(tree: etree._ElementTree, schema: etree.RelaxNG) -> list[str]:
    """The validation errors of *tree*, one line each (empty: valid)."""
    if schema.validate(tree):
        return []
    return [
        f"line {error.line}: {' '.join(error.message.split())}" if error.line else error.message
        for error in schema.error_log
    ]
