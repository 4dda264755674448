"""Editing a domain's persistent definition through libvirt.

The inactive definition is read with ``VIR_DOMAIN_XML_SECURE`` (so VNC and
SPICE passwords are part of it and survive), edited like any other XML and
stored with ``defineXML``. A running domain keeps its current devices until
it is started again; :class:`DomainEdit` says whether that is pending.

libvirt completes what it is handed (a virtio-serial controller for a virtio
channel, a video card for a display, PCI controllers): after each define the
definition libvirt stored is compared with the one handed in, and what libvirt
added for the consoles is recorded in the metadata, defining once more
(:mod:`broker.xml._additions`), so that ``disable`` can remove it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from broker.xml._additions import MAX_DEFINES, record_additions
from broker.xml._errors import XmlError
from broker.xml._metadata import read_consoles
from broker.xml._ops import Outcome
from broker.xml._source import parse_document

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z"
)


class LibvirtError(XmlError):
    """libvirt could not be reached, or refused a request."""


@attrs.frozen
class DomainEdit:
    """What an edit through libvirt did."""

    name: str
    outcome: Outcome
    #: Whether the definition was stored (False when unchanged or a dry run).
    defined: bool
    running: bool
    #: Whether the running domain still has other consoles than its definition.
    restart_pending: bool
    #: The devices libvirt added on its own that this edit recorded, described.
    libvirt_added: tuple[str, ...] = ()


def _ignore(_context: object, _error: object) -> None:
    """libvirt's default handler prints every error on stderr; ours are reported once."""


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise LibvirtError(f"the libvirt Python binding is not installed: {exc}") from None
    libvirt.registerErrorHandler(_ignore, None)
    return libvirt


def _message(exc: Any) -> str:
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else None
    return " ".join(str(text or exc).split())


def open_connection(uri: str) -> Any:
    """A read-write libvirt connection, or :class:`LibvirtError`."""
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {_message(exc)}") from None


def lookup_domain(conn: Any, domain: str, uri: str) -> Any:
    """The domain named *domain*, or with that UUID."""
    libvirt = _libvirt()
    lookups = [conn.lookupByName]
    if _UUID.match(domain):
        lookups.insert(0, conn.lookupByUUIDString)
    for lookup in lookups:
        try:
            return lookup(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise LibvirtError(f"cannot look up domain {domain!r}: {_message(exc)}") from None
    raise LibvirtError(f"no domain named {domain!r} (nor with that UUID) at {uri}")


def _consoles_of(xml: bytes) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        protocol: (record.mode, dict(record.settings))
        for protocol, record in read_consoles(parse_document(xml)).items()
    }


def edit_domain(
    uri: str, domain: str, edit: Callable[[bytes], Outcome], *, dry_run: bool = False
) -> DomainEdit:
    """Apply *edit* to the persistent definition of *domain* and store the result."""
    libvirt = _libvirt()
    conn = open_connection(uri)
    try:
        dom = lookup_domain(conn, domain, uri)
        try:
            name = dom.name()
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
            current = dom.XMLDesc(flags).encode("utf-8")
            running = bool(dom.isActive())
            live = dom.XMLDesc(0).encode("utf-8") if running else b""
        except libvirt.libvirtError as exc:
            raise LibvirtError(
                f"cannot read the definition of {domain!r}: {_message(exc)}"
            ) from None
        outcome = edit(current)
        defined = False
        added: tuple[str, ...] = ()
        if outcome.changed and not dry_run:
            dom = _define(conn, outcome.after, f"libvirt refused the edited definition of {name}")
            defined = True
            added = _record(conn, dom, name, current, outcome.after)
        pending = running and (defined or _consoles_of(live) != _consoles_of(outcome.after))
        return DomainEdit(name, outcome, defined, running, pending, added)
    finally:
        conn.close()


def _define(conn: Any, xml: bytes, failure: str) -> Any:
    libvirt = _libvirt()
    try:
        return conn.defineXML(xml.decode("utf-8"))
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"{failure}: {_message(exc)}") from None


def _record(conn: Any, dom: Any, name: str, before: bytes, defined: bytes) -> tuple[str, ...]:
    """Record what libvirt added on defining *defined* (see :mod:`broker.xml._additions`),
    defining the domain again with the record; the descriptions of what was recorded."""
    libvirt = _libvirt()
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    found: list[str] = []
    for _ in range(MAX_DEFINES):
        try:
            stored = dom.XMLDesc(flags).encode("utf-8")
        except libvirt.libvirtError as exc:
            raise LibvirtError(
                f"{name} was defined, but its definition cannot be read back to record what "
                f"libvirt added: {_message(exc)}"
            ) from None
        updated, fresh = record_additions(before, defined, stored)
        found.extend(fresh)
        if updated is None:
            break
        dom = _define(
            conn, updated, f"{name} was defined, but libvirt refused the record of what it added"
        )
        defined = updated
    return tuple(found)
