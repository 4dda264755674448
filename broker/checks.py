"""What ``console-broker doctor``'s checks are made of, the core's and the plugins' alike.

:class:`Finding` is one line of the report: a status (:data:`OK`, :data:`WARN`,
:data:`FAIL`, :data:`SKIP`), a title, a detail and, for a warning or a failure, the fix.
The core's checks return them, and so does :meth:`broker.hookspecs.Protocol.doctor`, the
method through which each protocol checks what it alone knows (its page's browser
client, what its console needs of the hypervisor's settings).

:class:`QemuConf` is the configuration file of libvirt's QEMU driver on this host, as
far as the host's checks need it: the file a ``libvirt.uri`` of this host reads, and its
``key = value`` settings. Which keys matter is each plugin's to say.

A leaf module: it imports nothing of ``broker``, so that ``broker.api`` gives it cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import attrs

#: Works as the broker needs it.
OK = "ok"
#: Works, but look at it (a certificate near its end, a clock not synchronised).
WARN = "warn"
#: Something the broker needs is missing or wrong.
FAIL = "fail"
#: The check does not apply here (no ``[tls]``, a remote libvirt).
SKIP = "skip"
#: Every status, in the order of their weight.
STATUSES = (OK, SKIP, WARN, FAIL)


def _check_status(_instance: object, _attribute: object, value: str) -> None:
    if value not in STATUSES:
        raise ValueError(f"finding status {value!r} must be one of {', '.join(STATUSES)}")


@attrs.frozen
class Finding:
    """One line of ``console-broker doctor``'s report.

    A :data:`WARN` or :data:`FAIL` finding must say what to do about it (*fix*): doctor
    prints each problem with its fix.
    """

    #: :data:`OK`, :data:`WARN`, :data:`FAIL` or :data:`SKIP`.
    status: str = attrs.field(validator=_check_status)
    #: What was checked, in a few words (``key pair``, ``listen.port 127.0.0.1:6080``).
    title: str
    #: What was found, one line (``held by the console-broker running here``).
    detail: str = ""
    #: What to do about it, one line (``chmod 600 /var/lib/console-broker/signing-key.pem``).
    fix: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.title.strip():
            raise ValueError("a finding needs a title")
        if self.status in (WARN, FAIL) and not self.fix.strip():
            raise ValueError(f"a {self.status} finding needs a fix: {self.title}")

    @property
    def message(self) -> str:
        """The title and the detail, as the report prints them."""
        return f"{self.title}: {self.detail}" if self.detail else self.title


#: The system instance's qemu.conf (``qemu:///system``).
SYSTEM_QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def qemu_conf_path(uri: str) -> Path | None:
    """The qemu.conf that libvirt's QEMU driver at *uri* reads on this host
    (``qemu:///system``: ``/etc/libvirt/qemu.conf``; ``qemu:///session``: the user's
    ``$XDG_CONFIG_HOME/libvirt/qemu.conf``); None for a remote URI or another driver."""
    parts = urlsplit(uri)
    driver = parts.scheme.partition("+")[0]
    transport = parts.scheme.partition("+")[2]
    if driver != "qemu" or transport not in ("", "unix") or parts.hostname not in (
        None, "", "localhost"
    ):
        return None
    if parts.path == "/session":
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base, "libvirt", "qemu.conf")
    return SYSTEM_QEMU_CONF


def parse_qemu_conf(text: str) -> dict[str, str]:
    """The ``key = value`` settings of a qemu.conf's text: quotes removed, comments and
    lists' brackets left as they are (libvirt's own format, qemu.conf(5))."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if value.startswith('"'):
            value = value[1:].partition('"')[0]
        else:
            value = value.split("#", 1)[0].strip()
        settings[key.strip()] = value
    return settings


@attrs.frozen
class QemuConf:
    """libvirt's QEMU driver configuration on this host, for the checks.

    :attr:`path` is None when ``libvirt.uri`` is not a QEMU driver of this host (then
    nothing of it can be checked here); :attr:`error` says why an existing file could
    not be read. A file that does not exist has no settings: libvirt's defaults apply.
    """

    path: Path | None
    settings: Mapping[str, str] = attrs.field(factory=dict)
    error: str = ""

    @classmethod
    def read(cls, uri: str, path: Path | None = None) -> QemuConf:
        """The qemu.conf libvirt at *uri* reads (*path*: that file instead)."""
        path = path if path is not None else qemu_conf_path(uri)
        if path is None:
            return cls(None)
        try:
            return cls(path, parse_qemu_conf(path.read_text(errors="replace")))
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            return cls(path, error=exc.strerror or str(exc))

    @property
    def readable(self) -> bool:
        """Whether its settings are known (a local driver, the file read or absent)."""
        return self.path is not None and not self.error

    def get(self, key: str, default: str = "") -> str:
        """The value of *key*, or *default* when the file does not set it."""
        return self.settings.get(key, default)

    def enabled(self, key: str) -> bool:
        """Whether the file sets *key* to 1 (``dynamic_ownership = 1``)."""
        return self.settings.get(key, "").strip() == "1"
