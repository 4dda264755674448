"""The ``[vnc]`` configuration table: its keys, their checks, and the hook declaring it.

The VNC plugin reads it with ``config.table(TABLE)`` (see
:class:`broker_vnc._session.VNCSettings`).
"""

from __future__ import annotations

from typing import Any

import attrs

from broker.api import ConfigTable, at_least, hookimpl, one_of, setting


@attrs.frozen
class VNCSection:
    """The VNC plugin: how the broker logs in to QEMU's VNC server, the console page and
    session recordings (see docs/vnc.md)."""

    shared: bool = setting(
        True,
        "Ask QEMU to share the display (the RFB shared flag), so that several sessions on "
        "one VM stay connected; false asks for exclusive access, and QEMU (sharePolicy "
        "'allow-exclusive') then disconnects the VM's other VNC clients. The browser's own "
        "flag is ignored.",
    )
    input: str = setting(
        "shared",
        "How the sessions of one VM's display share its keyboard and mouse: \"shared\" "
        "(every full-rights session types) or \"single\" (one session at a time holds "
        "them, the others watch, their input dropped by the broker; a full-rights "
        "session takes control or releases it on its page). Sessions in websocket mode, "
        "whose input the broker cannot drop, are refused with \"single\".",
        one_of("shared", "single"),
    )
    tls_ca: str = setting(
        "",
        "PEM file of the CA that signed QEMU's VNC server certificates (QEMU's "
        "vnc_tls_x509_cert_dir/ca-cert.pem). Set: the broker accepts VeNCrypt with TLS "
        "(X509None, X509Vnc), verifying QEMU's certificate. Empty: no TLS to QEMU.",
        path=True,
    )
    tls_cert: str = setting(
        "",
        "PEM client certificate the broker shows QEMU (for vnc_tls_x509_verify = 1). "
        "Empty: none.",
        path=True,
    )
    tls_key: str = setting("", "PEM private key of vnc.tls_cert.", path=True)
    tls_server_name: str = setting(
        "",
        "Name (DNS name or IP address) QEMU's certificate must carry. Empty: the address "
        "connected to (tcp mode); on a UNIX socket or a socket from libvirt, where no "
        "network lies between broker and QEMU, only the certificate chain is verified.",
    )
    record: bool = setting(
        False,
        "Record every VNC session: what the broker sends the client, from the session's "
        "first byte (the RFB handshake as the client saw it, security None), with "
        "timestamps; the playback page plays it (console-broker token --recording ID). "
        "Where and how long: the [recordings] table.",
    )
    record_domains: tuple[str, ...] = setting(
        (),
        "Domains (names or UUIDs) whose VNC sessions are recorded even when vnc.record is "
        "false.",
    )
    record_input: bool = setting(
        False,
        "Also record what the client sends (keystrokes, pointer, clipboard) in VNC "
        "recordings: sensitive, passwords typed into the VM included.",
    )
    recording_max_size: int = setting(
        67_108_864,
        "Size in bytes past which a VNC recording is continued in a new file (the next "
        "part); a recording plays from its first part on.",
        at_least(65_536),
    )
    record_buffer: int = setting(
        8_388_608,
        "Bytes of a session's recording that may wait for the disk; a session with more "
        "waiting waits too (a lower frame rate, nothing lost), and a disk that takes "
        "nothing for limits.write_timeout seconds stops the recording (the session goes "
        "on).",
        at_least(65_536),
    )


def cross_checks(section: VNCSection) -> list[str]:
    """Problems involving several keys of the table, each naming them."""
    problems = []
    if bool(section.tls_cert) != bool(section.tls_key):
        problems.append("vnc.tls_cert, vnc.tls_key: set both (a client certificate) or neither")
    if section.tls_cert and not section.tls_ca:
        problems.append("vnc.tls_cert: a client certificate needs vnc.tls_ca (TLS to QEMU)")
    return problems


#: The ``[vnc]`` table: first of the built-in plugins' tables in the documented defaults.
TABLE = ConfigTable(
    name="vnc",
    schema=VNCSection,
    check=cross_checks,
    order=10,
    moved={"assets_dir": "http.assets_dir"},
)


@hookimpl
def console_broker_config_tables() -> list[ConfigTable[Any]]:
    return [TABLE]
