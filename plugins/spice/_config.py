"""The ``[spice]`` configuration table: its keys, their checks, and the hook declaring it.

The SPICE plugin reads it with ``config.table(TABLE)``.
"""

from __future__ import annotations

from typing import Any

import attrs

from broker.api import ConfigTable, hookimpl, one_of, setting

_SPICE_CHANNELS = (
    "main", "display", "inputs", "cursor", "playback", "record", "tunnel", "smartcard",
    "usbredir", "port", "webdav",
)


def _spice_channels(value: Any) -> str | None:
    for name in value:
        if name not in _SPICE_CHANNELS or name == "main":
            allowed = ", ".join(_SPICE_CHANNELS[1:])
            return f"{name!r} is not a SPICE channel type one can deny ({allowed})"
    return None


@attrs.frozen
class SpiceSection:
    """The SPICE plugin: channel policy and the console page (see docs/spice.md)."""

    deny_channels: tuple[str, ...] = setting(
        (),
        "SPICE channel types no session may open, whatever its token grants (for example "
        "[\"usbredir\", \"webdav\"]); the broker answers them with permission denied. "
        "View-only sessions get display, cursor and playback only in any case.",
        _spice_channels,
    )
    input: str = setting(
        "shared",
        "How the sessions of one VM's display share its keyboard and mouse: \"shared\" "
        "(every full-rights session types) or \"single\" (one session at a time holds "
        "them, the others watch, their inputs channel's keyboard and mouse messages "
        "dropped by the broker; a full-rights session takes control or releases it on "
        "its page).",
        one_of("shared", "single"),
    )
    tls_ca: str = setting(
        "",
        "PEM file of the CA that signed QEMU's SPICE server certificates (QEMU's "
        "spice_tls_x509_cert_dir/ca-cert.pem). Set: in tcp mode the broker connects to "
        "the SPICE server's TLS port (tlsPort) where it has one, verifying its "
        "certificate. Empty: the plain port; a server listening for TLS only is refused.",
        path=True,
    )
    tls_cert: str = setting(
        "",
        "PEM client certificate the broker shows QEMU's SPICE server, for servers that "
        "verify their clients. Empty: none.",
        path=True,
    )
    tls_key: str = setting("", "PEM private key of spice.tls_cert.", path=True)
    tls_server_name: str = setting(
        "",
        "Name (DNS name or IP address) QEMU's SPICE certificate must carry. Empty: the "
        "address connected to.",
    )


def cross_checks(section: SpiceSection) -> list[str]:
    """Problems involving several keys of the table, each naming them."""
    problems = []
    if bool(section.tls_cert) != bool(section.tls_key):
        problems.append(
            "spice.tls_cert, spice.tls_key: set both (a client certificate) or neither"
        )
    if section.tls_cert and not section.tls_ca:
        problems.append("spice.tls_cert: a client certificate needs spice.tls_ca (TLS to QEMU)")
    return problems


#: The ``[spice]`` table: after ``[vnc]`` in the documented defaults.
TABLE = ConfigTable(name="spice", schema=SpiceSection, check=cross_checks, order=20)


@hookimpl
def console_broker_config_tables() -> list[ConfigTable[Any]]:
    return [TABLE]
