"""The libvirt QEMU hook: apply this host's console policy to incoming domains.

libvirt runs ``/etc/libvirt/hooks/qemu <domain> <operation> <sub-op> <extra>``
with the domain XML on standard input, for every operation. Only for
``migrate`` (an incoming migration) and ``restore`` (a saved image being
restored) does it read a rewritten XML back from standard output; empty
output means "unchanged". For these the hook applies the policy, but only to
what does not change guest-visible hardware (the listening of existing
displays), because the guest's devices must stay the same across a migration
or a restore. For every other operation it prints nothing and succeeds.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from typing import IO, Any

import attrs

from broker.hookspecs import XMLOption
from broker.xml._constants import POLICY_PATH
from broker.xml._errors import EditError, InputError, SchemaError
from broker.xml._model import EditOptions, EditSource
from broker.xml._ops import check_schema, enable_xml
from broker.xml._source import MAX_BYTES, parse_document

#: The operations whose standard output libvirt reads back as the new XML.
REWRITE_OPERATIONS = ("migrate", "restore")

_KEYS = ("consoles", "mode", "listen")


@attrs.frozen
class HookPolicy:
    """Which consoles, in which mode, this host provisions on incoming domains."""

    consoles: tuple[str, ...]
    options: EditOptions


def parse_policy(
    doc: Mapping[str, Any], where: str, xml_options: Sequence[XMLOption] = ()
) -> HookPolicy:
    """A :class:`HookPolicy` from a parsed TOML document; beside ``consoles``, ``mode``
    and ``listen`` it takes the plugins' *xml_options* by their policy keys
    (``spice-tls``, ``usbredir``)."""
    by_key = {option.key: option for option in xml_options}
    known = [*_KEYS, *sorted(by_key)]
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )
    consoles = doc.get("consoles")
    if (
        not isinstance(consoles, list)
        or not consoles
        or not all(isinstance(c, str) for c in consoles)
    ):
        raise InputError(f"{where}: 'consoles' must be a non-empty list of protocol names")
    for key in ("mode", "listen"):
        if key in doc and not isinstance(doc[key], str):
            raise InputError(f"{where}: {key!r} must be a str")
    params = {}
    for key, option in by_key.items():
        if key in doc:
            try:
                params[option.name] = option.text(option.parse(doc[key]))
            except ValueError as exc:
                raise InputError(f"{where}: {key!r}: {exc}") from None
    try:
        options = EditOptions(mode=doc.get("mode", "fd"), listen=doc.get("listen"), params=params)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    return HookPolicy(tuple(consoles), options)


def load_policy(path: str, xml_options: Sequence[XMLOption] = ()) -> HookPolicy | None:
    """The policy in *path*, or None if there is no such file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read the hook policy {path}: {exc}") from None
    return parse_policy(doc, path, xml_options)


def run_hook(
    operation: str,
    stdin: IO[bytes],
    stdout: IO[bytes],
    *,
    policy_path: str = POLICY_PATH,
    edits: EditSource | None = None,
    xml_options: Sequence[XMLOption] = (),
) -> list[str]:
    """Handle one hook call; returns remarks for standard error. *edits* gives the
    protocols' edits (:func:`broker.xml.plugin_edits`) and *xml_options* the options
    the policy may set; only a rewrite needs them."""
    data = stdin.read(MAX_BYTES + 1)  # always drain what libvirt writes
    if operation not in REWRITE_OPERATIONS:
        return []
    policy = load_policy(policy_path, xml_options)
    if policy is None:
        return []
    if edits is None:
        raise EditError(f"the hook needs the protocols' edits to {operation} a domain")
    outcome = enable_xml(
        data, policy.consoles, policy.options, edits=edits, validate=False, hardware=False
    )
    if not outcome.changed:
        return []
    try:
        check_schema(parse_document(outcome.after), data)
    except SchemaError as exc:
        if exc.input_valid is False:  # not ours to fix: leave the domain alone
            return [f"left the domain unchanged: {exc}"]
        raise
    stdout.write(outcome.after)
    stdout.flush()
    return list(outcome.notes)
