"""The broker's configuration: one TOML file, every key documented, defaults that work without it.

Theory of operation. Each TOML table is a frozen attrs class; each of its
fields is a key, declared with :func:`setting`, which records the key's
documentation and value check. The core's tables are the fields of
:class:`Config`; a plugin declares its own tables (``[vnc]``, a third-party
``[monitor]``) as :class:`ConfigTable` values through the
``console_broker_config_tables`` hook, each with its cross-checks, and whoever
loads a configuration passes the loaded plugins' tables (:func:`~broker.configfile.read_config`
does it for the commands). The loader (:func:`load_config`), the documented
default file (:func:`render_defaults`, printed by ``console-broker config
--defaults``) and the table in ``docs/config.md`` (:func:`render_markdown`) are
all derived from these declarations, the core's and the plugins' alike, so a key
cannot exist without its documentation, and a file can hold nothing the broker
and its plugins do not understand: unknown keys and wrong types are errors
naming the key and the file, never ignored. A plugin reads its parsed table
with :meth:`Config.table`.

Values that depend on the host (the node name, the public URL) are empty
strings in the file and resolved by :class:`Config`'s properties. Relative
paths in a file are taken relative to that file's directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload
from urllib.parse import urlsplit

import attrs

if TYPE_CHECKING:
    from cryptography import x509

#: Read when no file is named and ``CONSOLE_BROKER_CONFIG`` is unset, if it exists.
DEFAULT_CONFIG_PATH = Path("/etc/console-broker/broker.toml")
#: Names the configuration file when no ``--config`` is given.
CONFIG_ENV = "CONSOLE_BROKER_CONFIG"
#: The private key's file name in the state directory (:mod:`broker.keys` makes and reads
#: the files; their names are here, so that this module loads without cryptography).
PRIVATE_KEY_NAME = "signing-key.pem"
#: The public key's file name in the state directory.
PUBLIC_KEY_NAME = "signing-key.pub.pem"

#: Checks a value; returns a problem ("must be ...") or None.
Check = Callable[[Any], str | None]

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration file cannot be used. Each problem names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def setting(default: Any, doc: str, check: Check | None = None, *, path: bool = False) -> Any:
    """Declare a key of a table (a field of a frozen attrs class): its default, its
    documentation (a sentence or more, ending with a full stop) and an optional value
    check, called with the value converted to the field's type.

    A key's type is its field's annotation: ``str``, ``int``, ``float`` (an integer
    is accepted too), ``bool`` or ``tuple[str, ...]`` (a TOML array of strings).
    *path* marks a file-system path, or an array of them, taken relative to the
    file's directory.
    """
    return attrs.field(default=default, metadata={"doc": doc, "check": check, "path": path})


# --- value checks -----------------------------------------------------------------------


def at_least(minimum: float) -> Check:
    """A check: the number is *minimum* or more."""

    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def one_of(*choices: str) -> Check:
    """A check: the string is one of *choices*."""

    def check(value: Any) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(map(repr, choices))

    return check


def tcp_port(value: Any) -> str | None:
    """A check: a TCP port number (1-65535)."""
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def not_empty(value: Any) -> str | None:
    """A check: the string or array is not empty."""
    return None if value else "must not be empty"


def _base_url(value: Any) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        return "must have a port from 0 to 65535 if any"
    if parts.query or parts.fragment:
        return "must not have a query or a fragment"
    return None


def _proxy_url(value: Any) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme != "http" or not parts.hostname:
        return "must be an http:// URL with a host and a port (http://console.example:7001)"
    try:
        port = parts.port
    except ValueError:
        return "must have a port from 1 to 65535"
    if not port:
        return "must name its port (http://host:port)"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    if parts.path not in ("", "/") or parts.query or parts.fragment or value.endswith(("?", "#")):
        return "must be http://host:port, with nothing after the port"
    return None


def _split_unescaped(text: str, separators: str) -> list[str]:
    """*text* cut at each of *separators* not escaped with ``\\``, the separators kept
    as parts of their own."""
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            current, escaped = current + char, True
        elif char in separators:
            parts += [current, char]
            current = ""
        else:
            current += char
    return [*parts, current]


def _strip_unescaped(text: str) -> str:
    """*text* without its leading whitespace and its trailing whitespace not escaped."""
    text = text.lstrip()
    stripped = text.rstrip()
    kept = len(stripped)
    if kept < len(text) and (len(stripped) - len(stripped.rstrip("\\"))) % 2 == 1:
        kept += 1  # an odd run of backslashes escapes the first space after it
    return text[:kept]


def rfc4514_name(text: str) -> x509.Name:
    """The :class:`~cryptography.x509.Name` of an RFC 4514 string (``CN=front,O=Example``,
    as ``Name.rfc4514_string()`` prints it); spaces around ``,``, ``+`` and an attribute's
    ``=`` and the case of attribute keys do not matter. ValueError if it is no name."""
    from cryptography import x509

    attributes = []
    for part in _split_unescaped(text, ",+"):
        if part in (",", "+"):
            attributes.append(part)
            continue
        key, equals, value = part.partition("=")
        attributes.append(f"{key.strip()}{equals}{_strip_unescaped(value)}")
    name = x509.Name.from_rfc4514_string("".join(attributes))
    if not len(name):
        raise ValueError("an empty name")
    return name


def _rfc4514_names(value: Any) -> str | None:
    for text in value:
        try:
            rfc4514_name(text)
        except ValueError:
            return (
                f"{text!r} is not an RFC 4514 name (KEY=value pairs joined with ',', the "
                "most specific first: \"CN=front.console.example,O=Example\")"
            )
    return None


def _origins(value: Any) -> str | None:
    for origin in value:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
        ):
            return f"{origin!r} is not an origin (scheme://host[:port], nothing after)"
    return None


def _networks(value: Any) -> str | None:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            return f"{network!r} is not an IP address or network (192.0.2.0/24, 2001:db8::/32)"
    return None


# --- the tables -------------------------------------------------------------------------


@attrs.frozen
class BrokerSection:
    """Who this broker is and where it keeps its state."""

    node: str = setting(
        "",
        "This broker's node name: tokens for another node are refused. "
        "Empty: the host name.",
    )
    state_dir: str = setting(
        "/var/lib/console-broker",
        "Directory (created 0700) holding the signing key pair, created on first start: "
        f"{PRIVATE_KEY_NAME} (0600) and {PUBLIC_KEY_NAME}.",
        not_empty,
        path=True,
    )
    public_url: str = setting(
        "",
        "Base URL clients reach this broker at, used in the links tokens print "
        "(e.g. behind a reverse proxy). Empty: derived from listen and tls, "
        "http(s)://host:port.",
        _base_url,
    )
    public_connect_url: str = setting(
        "",
        "The HTTP proxy native clients are told to use (http://host:port), when they "
        "reach the CONNECT listener through something else, e.g. a front door's port for "
        "this node. Empty: http://listen.connect_host:listen.connect_port (a wildcard "
        "address gives the public URL's host). Needs listen.connect_port.",
        _proxy_url,
    )


@attrs.frozen
class ListenSection:
    """Where the broker accepts connections (WebSocket and HTTP CONNECT)."""

    host: str = setting("127.0.0.1", "Address to listen on.", not_empty)
    port: int = setting(6080, "TCP port to listen on.", tcp_port)
    connect_port: int = setting(
        0,
        "TCP port of the HTTP CONNECT listener for native clients (remote-viewer with a "
        ".vv file; docs/spice.md), for protocols that serve them. 0: no such listener.",
        at_least(0),
    )
    connect_host: str = setting(
        "127.0.0.1", "Address the HTTP CONNECT listener listens on.", not_empty
    )
    connect_proxy_protocol: bool = setting(
        False,
        "Every connection to the HTTP CONNECT listener starts with a PROXY protocol v1 "
        "header (a front door's TCP relay: nginx's stream proxy_protocol on), whose client "
        "address is the session's, for the per-client limits and the logs. The header is "
        "believed only from http.trusted_proxies; a connection from another peer, or "
        "without a valid header within limits.handshake_timeout, is refused. Needs "
        "listen.connect_port and http.trusted_proxies.",
    )


@attrs.frozen
class TLSSection:
    """TLS for https:// and wss://: set both files, or neither for plain HTTP."""

    cert: str = setting("", "PEM certificate chain file. Empty: no TLS.", path=True)
    key: str = setting("", "PEM private key file of the certificate. Empty: no TLS.", path=True)
    ca: str = setting(
        "",
        "PEM file of the CA that signed tls.cert. Native clients' connection files (.vv) "
        "carry it, so remote-viewer can verify the broker; empty: the files carry no CA "
        "and clients rely on their own trust store.",
        path=True,
    )
    client_ca: str = setting(
        "",
        "PEM file of the CA whose client certificates the broker requires: every "
        "connection to either listener must show a certificate it signed (a front door's), "
        "or the TLS handshake fails; the CONNECT listener then speaks TLS too. Needs "
        "tls.cert and tls.key. Empty: no client certificate is asked for.",
        path=True,
    )
    client_subjects: tuple[str, ...] = setting(
        (),
        "Subjects of the client certificates accepted, as RFC 4514 strings "
        "(\"CN=front.console.example,O=Example\", the most specific part first, as "
        "openssl's -nameopt RFC2253 prints them), compared as names; a connection with "
        "another is refused after the handshake (403). Empty: any certificate "
        "tls.client_ca signed. Needs tls.client_ca.",
        _rfc4514_names,
    )


@attrs.frozen
class HTTPSection:
    """Browser request checks and the console pages' assets."""

    allowed_origins: tuple[str, ...] = setting(
        (),
        "Origins (scheme://host[:port]) whose pages may open consoles. Empty: the origin "
        "of the public URL (broker.public_url, or derived from listen), and "
        "http(s)://listen.host:listen.port unless listen.host is a wildcard; never the "
        "request's Host header.",
        _origins,
    )
    allow_missing_origin: bool = setting(
        False, "Accept WebSocket requests without an Origin header (non-browser clients)."
    )
    refusals: str = setting(
        "status",
        "How WebSocket requests are refused: 'status' answers an HTTP error before the "
        "upgrade; 'close' completes the upgrade and closes with the reason's close code, "
        "which browser pages can read (a foreign Origin is always refused with a status).",
        one_of("status", "close"),
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "Addresses or networks (\"10.0.0.5\", \"10.0.0.0/24\", \"::1\") of reverse proxies "
        "in front of the broker whose X-Forwarded-For header is believed: a request from one "
        "of them counts as coming from the nearest address in that header that is not a "
        "trusted proxy (for limits.max_sessions_per_client and the logs). Empty: the "
        "header is ignored and the peer's address is the client's.",
        _networks,
    )
    assets_dir: str = setting(
        "",
        "The node_modules directory the console pages' browser clients are read from: "
        "@novnc/novnc for the VNC page, @spice-project/spice-html5 for the SPICE page, "
        "@xterm/xterm and @xterm/addon-fit for the serial page. Empty: the source tree's "
        "node_modules when the broker runs from one, else the one the wheel bundles "
        "(web_clients/node_modules in the installed broker package) when present, else "
        "/usr/share/console-broker/node_modules.",
        path=True,
    )


@attrs.frozen
class LibvirtSection:
    """The hypervisor connection."""

    uri: str = setting("qemu:///system", "libvirt connection URI.", not_empty)


@attrs.frozen
class TokensSection:
    """Token lifetimes, trusted keys and single use (see docs/tokens.md)."""

    default_ttl: int = setting(
        60, "Lifetime of an issued token when none is asked, in seconds.", at_least(1)
    )
    max_ttl: int = setting(
        300,
        "Longest lifetime issued or accepted, in seconds; a token living longer is refused.",
        at_least(1),
    )
    leeway: int = setting(
        5, "Clock skew allowed on a token's nbf and exp, in seconds.", at_least(0)
    )
    replay_cache_size: int = setting(
        100_000,
        "Used tokens remembered until they expire; when full of live tokens, new tokens "
        "are refused.",
        at_least(1),
    )
    trust_local_key: bool = setting(
        True, "Trust the state directory's own public key (tokens from the local CLI)."
    )
    public_keys: tuple[str, ...] = setting(
        (),
        "Further trusted public key files (PEM): a control plane's key, or the previous "
        "key during a rotation.",
        path=True,
    )


@attrs.frozen
class LimitsSection:
    """Session limits and timeouts (seconds; 0 where allowed means none)."""

    max_sessions: int = setting(10_000, "Concurrent sessions on this broker.", at_least(1))
    max_sessions_per_domain: int = setting(16, "Concurrent sessions on one domain.", at_least(1))
    max_sessions_per_client: int = setting(
        64, "Concurrent sessions from one client address.", at_least(1)
    )
    handshake_timeout: float = setting(
        10.0, "Time a client has to complete its handshake, in seconds.", at_least(0.001)
    )
    idle_timeout: float = setting(
        0.0, "Close a session idle (no bytes either way) this long, in seconds; 0: never.",
        at_least(0),
    )
    shutdown_grace: float = setting(
        5.0, "On shutdown, time sessions get to close before they are cut, in seconds.",
        at_least(0),
    )
    max_pending: int = setting(
        1024,
        "Connections not yet past their request (no token checked yet) held at once, both "
        "listeners together; one more is answered 503 and closed.",
        at_least(1),
    )
    max_pending_per_client: int = setting(
        32,
        "Connections not yet past their request held at once from one peer address (a "
        "trusted proxy's are counted only against limits.max_pending); one more is "
        "answered 429 and closed.",
        at_least(1),
    )
    max_request_head: int = setting(
        16_384,
        "Bytes of request line and headers read before the request is complete; more is "
        "answered 431 and closed.",
        at_least(1024),
    )
    write_timeout: float = setting(
        30.0,
        "A client whose full outgoing buffer has not drained at all for this long (it "
        "stopped reading) is disconnected, in seconds; its session ends as client_stalled "
        "(4108). A slow client that drains is never cut.",
        at_least(0.1),
    )


@attrs.frozen
class ProxySection:
    """Buffers between clients and consoles (per session, each direction)."""

    read_size: int = setting(
        262_144,
        "Largest read from a console, in bytes: one WebSocket message at most.",
        at_least(4096),
    )
    write_buffer: int = setting(
        262_144,
        "High-water mark of a session's outgoing WebSocket buffer, in bytes: reading "
        "the console pauses above it.",
        at_least(4096),
    )
    max_message: int = setting(
        1_048_576, "Largest message a client may send, in bytes.", at_least(1024)
    )
    max_queue: int = setting(
        16, "Messages from a client queued before reading from it pauses.", at_least(1)
    )
    ping_interval: float = setting(
        20.0,
        "Seconds between keepalive pings to a client (a client not answering within as "
        "long is dropped); 0: no pings.",
        at_least(0),
    )


@attrs.frozen
class LoggingSection:
    """Structured logs (tokens and secrets never reach a log line)."""

    format: str = setting(
        "json", "'json' (one object per line) or 'console' (for humans).",
        one_of("json", "console"),
    )
    level: str = setting(
        "info", "Least severe level logged.", one_of("debug", "info", "warning", "error")
    )


@attrs.frozen
class RecordingsSection:
    """Where the plugins' session recordings go and how long they are kept: one
    directory and one retention policy for every protocol (``serial.record``,
    ``vnc.record``; see docs/recordings.md)."""

    dir: str = setting(
        "",
        "Directory the recordings are written to (created 0700), one subdirectory per "
        "domain UUID. Empty: 'recordings' in broker.state_dir.",
        path=True,
    )
    keep_days: int = setting(
        0,
        "Days a recording file is kept after its last write; older files are deleted "
        "(never a part being written). 0: kept forever.",
        at_least(0),
    )
    max_total: int = setting(
        0,
        "Bytes all recording files in recordings.dir may take together; past it, the files "
        "written longest ago are deleted first (never a part being written). 0: no limit.",
        at_least(0),
    )
    prune_interval: float = setting(
        3600.0,
        "Seconds between two retention passes while the broker runs (it also prunes on "
        "start and after a recording moves on to its next part), when "
        "recordings.keep_days or recordings.max_total is set.",
        at_least(1),
    )


@attrs.frozen
class ServiceSection:
    """How ``serve`` runs: its event loop and its worker processes (docs/service.md)."""

    event_loop: str = setting(
        "auto",
        "The event loop: 'uvloop' (libuv's, faster), 'asyncio' (the standard library's), "
        "or 'auto': uvloop when it is installed, else asyncio.",
        one_of("auto", "uvloop", "asyncio"),
    )
    workers: int = setting(
        1,
        "Worker processes serving the listeners (SO_REUSEPORT), each with its own libvirt "
        "connection; every domain's sessions are served by one of them. serve --workers "
        "overrides it.",
        at_least(1),
    )
    admin_socket: str = setting(
        "",
        "The local admin socket (a Unix socket, mode 0600, for root and the broker's own "
        "user) that console-broker sessions talks to; its directory is made 0700 when "
        "missing and must not be writable by others. Empty: admin/admin.sock in "
        "broker.state_dir.",
        path=True,
    )


@attrs.frozen
class AuditSection:
    """The audit log: one line per console session as it ends, who opened it, from where,
    how long, how many bytes, how it ended (docs/service.md, "The audit log"). The line
    always goes to the broker's log as ``session.audit``."""

    file: str = setting(
        "",
        "A file the audit lines are also appended to, one JSON object a line (opened at "
        "start, O_APPEND; a file moved away by logrotate is followed by a new one). "
        "Empty: the broker's log only.",
        path=True,
    )


#: Listen addresses meaning "every address" (named here, not bound).
_WILDCARD_HOSTS = ("0.0.0.0", "::")  # noqa: S104
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _bracketed(host: str) -> str:
    """*host* as a URL holds it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def _origin_of(url: str) -> str:
    """The serialized origin of an http(s) *url*: scheme, lower-case host, and the port
    unless it is the scheme's default."""
    parts = urlsplit(url)
    scheme, host, port = parts.scheme.lower(), parts.hostname or "", parts.port
    suffix = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{_bracketed(host)}{suffix}"


@attrs.frozen
class Config:
    """The whole configuration; every table has working defaults."""

    broker: BrokerSection = attrs.field(factory=BrokerSection)
    listen: ListenSection = attrs.field(factory=ListenSection)
    tls: TLSSection = attrs.field(factory=TLSSection)
    http: HTTPSection = attrs.field(factory=HTTPSection)
    libvirt: LibvirtSection = attrs.field(factory=LibvirtSection)
    tokens: TokensSection = attrs.field(factory=TokensSection)
    limits: LimitsSection = attrs.field(factory=LimitsSection)
    proxy: ProxySection = attrs.field(factory=ProxySection)
    logging: LoggingSection = attrs.field(factory=LoggingSection)
    recordings: RecordingsSection = attrs.field(factory=RecordingsSection)
    service: ServiceSection = attrs.field(factory=ServiceSection)
    audit: AuditSection = attrs.field(factory=AuditSection)
    #: The plugins' tables by name (instances of their declared classes): every table
    #: declared when the configuration was loaded, its defaults when the file has none.
    #: Read one with :meth:`table`.
    plugin_tables: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    #: The file it was read from (None: the embedded defaults).
    source: Path | None = attrs.field(default=None, eq=False)

    @overload
    def table(self, which: ConfigTable[T]) -> T: ...

    @overload
    def table(self, which: str) -> Any: ...

    def table(self, which: ConfigTable[Any] | str) -> Any:
        """A table, parsed: a plugin's by its :class:`ConfigTable` (typed as its class;
        its defaults when the configuration was built without it) or by name, or a
        core table by name (``"listen"``)."""
        name = which if isinstance(which, str) else which.name
        if name in self.plugin_tables:
            found = self.plugin_tables[name]
            if not isinstance(which, str) and not isinstance(found, which.schema):
                raise TypeError(
                    f"table {name!r} holds a {type(found).__name__}, "
                    f"not a {which.schema.__name__}"
                )
            return found
        if name in _CORE_NAMES:
            return getattr(self, name)
        if not isinstance(which, str):
            return which.schema()
        known = ", ".join([*_CORE_NAMES, *self.plugin_tables])
        raise KeyError(f"no table {name!r} in this configuration (tables: {known})")

    @property
    def node_name(self) -> str:
        return self.broker.node or socket.gethostname()

    @property
    def state_dir(self) -> Path:
        return Path(self.broker.state_dir)

    @property
    def private_key_path(self) -> Path:
        return self.state_dir / PRIVATE_KEY_NAME

    @property
    def public_key_paths(self) -> list[Path]:
        """The trusted public key files, the local one first."""
        local = [self.state_dir / PUBLIC_KEY_NAME] if self.tokens.trust_local_key else []
        return [*local, *map(Path, self.tokens.public_keys)]

    @property
    def admin_socket(self) -> Path:
        """The admin socket: ``service.admin_socket`` (resolved against the file's
        directory), else ``admin/admin.sock`` in ``broker.state_dir``."""
        return Path(self.service.admin_socket or self.state_dir / "admin" / "admin.sock")

    @property
    def recordings_dir(self) -> Path:
        """Where recordings go: ``recordings.dir`` (already resolved against the file's
        directory), else ``recordings`` in ``broker.state_dir``."""
        return Path(self.recordings.dir or self.state_dir / "recordings")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls.cert)

    @property
    def public_url(self) -> str:
        """Where clients reach the broker (http/https), without a trailing slash."""
        if self.broker.public_url:
            return self.broker.public_url.rstrip("/")
        host = self.listen.host
        if host in _WILDCARD_HOSTS:
            host = self.node_name
        host = _bracketed(host)
        scheme = "https" if self.tls_enabled else "http"
        return f"{scheme}://{host}:{self.listen.port}"

    @property
    def connect_proxy_url(self) -> str | None:
        """The HTTP proxy URL native clients are given (``http://host:port``):
        ``broker.public_connect_url``, else the CONNECT listener's address (a wildcard
        address gives :attr:`public_url`'s host); None without a CONNECT listener."""
        if not self.listen.connect_port:
            return None
        if self.broker.public_connect_url:
            parts = urlsplit(self.broker.public_connect_url)
            return f"http://{_bracketed(parts.hostname or '')}:{parts.port}"
        host = self.listen.connect_host
        if host in _WILDCARD_HOSTS:
            host = urlsplit(self.public_url).hostname or "127.0.0.1"
        return f"http://{_bracketed(host)}:{self.listen.connect_port}"

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        """The origins whose pages may open consoles: ``http.allowed_origins``, or when
        empty the origin of :attr:`public_url` and, unless ``listen.host`` is a wildcard,
        that of the listen address (``http(s)://host:port``)."""
        if self.http.allowed_origins:
            return self.http.allowed_origins
        found = [_origin_of(self.public_url)]
        if self.listen.host not in _WILDCARD_HOSTS:
            scheme = "https" if self.tls_enabled else "http"
            found.append(_origin_of(f"{scheme}://{_bracketed(self.listen.host)}:{self.listen.port}"))
        return tuple(dict.fromkeys(found))

    @property
    def ws_url(self) -> str:
        """:attr:`public_url` with ws/wss for the scheme."""
        scheme, rest = self.public_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}"


# --- schema walking ---------------------------------------------------------------------


@attrs.frozen
class KeySpec:
    """One documented key: ``table.name``, its TOML type, default and text."""

    table: str
    name: str
    type: type[Any]
    default: Any
    doc: str
    check: Check | None
    path: bool

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}"


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    tuple: "an array of strings",
}


def _key_type(annotation: Any) -> type[Any]:
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...):
        return tuple
    if annotation not in _TYPE_NAMES:
        raise TypeError(
            f"has type {annotation!r}: a key is a str, int, float, bool or tuple[str, ...]"
        )
    assert isinstance(annotation, type)
    return annotation


def _schema_keys(table: str, schema: type[Any]) -> list[KeySpec]:
    """The keys of a table class, checked; TypeError names what is wrong."""
    if not attrs.has(schema):
        raise TypeError(f"table {table!r}: {schema!r} is not an attrs class")
    if not (schema.__doc__ or "").strip():
        raise TypeError(f"table {table!r}: {schema.__name__} has no docstring (its doc)")
    hints = typing.get_type_hints(schema)
    specs = []
    for field in attrs.fields(schema):
        where = f"table {table!r}: key {field.name!r}"
        if "doc" not in field.metadata:
            raise TypeError(f"{where}: not declared with broker.config.setting()")
        try:
            kind = _key_type(hints[field.name])
        except TypeError as exc:
            raise TypeError(f"{where}: {exc}") from None
        specs.append(
            KeySpec(
                table=table,
                name=field.name,
                type=kind,
                default=field.default,
                doc=field.metadata["doc"],
                check=field.metadata["check"],
                path=field.metadata["path"],
            )
        )
    return specs


_TABLE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _check_table_name(_instance: object, _attribute: object, value: str) -> None:
    if not _TABLE_NAME.fullmatch(value):
        raise ValueError(
            f"table name {value!r} must be lower-case ASCII letters, digits and '_', "
            "starting with a letter"
        )


def _moved(moved: Mapping[str, str]) -> Mapping[str, str]:
    return dict(moved)


@attrs.frozen(eq=False)
class ConfigTable(Generic[T]):
    """A table of the configuration file, as a plugin declares it
    (``console_broker_config_tables``) and the core declares its own.

    *schema* is a frozen attrs class whose docstring documents the table and whose
    fields are its keys, each declared with :func:`setting`; the loader parses the
    file's ``[name]`` table into an instance of it (its defaults when the file has
    none), which :meth:`Config.table` returns.
    """

    #: The TOML table's name (``vnc``): lower-case letters, digits and ``_``.
    name: str = attrs.field(validator=_check_table_name)
    schema: type[T]
    #: Cross-checks: called with the parsed table once every key passed its own
    #: check; returns the problems involving several keys, each naming them in full
    #: (``"vnc.tls_cert, vnc.tls_key: set both ... or neither"``).
    check: Callable[[T], Iterable[str]] | None = None
    #: Where the plugins' tables come in the documented defaults (after the core's):
    #: by order, then by name.
    order: int = 100
    #: Keys that moved out of this table: old key name -> new ``table.key``. A file
    #: still setting one gets an error naming the new place.
    moved: Mapping[str, str] = attrs.field(factory=dict, converter=_moved)

    def __attrs_post_init__(self) -> None:
        _schema_keys(self.name, self.schema)  # TypeError when it is not a table

    @property
    def doc(self) -> str:
        """The table's documentation: its class's docstring."""
        return self.schema.__doc__ or ""

    def key_specs(self) -> list[KeySpec]:
        """The table's keys, in declaration order."""
        return _schema_keys(self.name, self.schema)


#: Fields of :class:`Config` that are not tables.
_NOT_TABLES = ("plugin_tables", "source")


def _core_tables() -> tuple[ConfigTable[Any], ...]:
    hints = typing.get_type_hints(Config)
    return tuple(
        ConfigTable(field.name, hints[field.name])
        for field in attrs.fields(Config)
        if field.name not in _NOT_TABLES
    )


#: The core's tables, in file order.
CORE_TABLES = _core_tables()
_CORE_NAMES = tuple(table.name for table in CORE_TABLES)


def all_tables(tables: Iterable[ConfigTable[Any]] = ()) -> tuple[ConfigTable[Any], ...]:
    """The core's tables, then the plugins' *tables* by order and name.

    ValueError when two tables have one name.
    """
    plugins = sorted(tables, key=lambda table: (table.order, table.name))
    seen: set[str] = set()
    for table in (*CORE_TABLES, *plugins):
        if table.name in seen:
            raise ValueError(f"table {table.name!r} is declared twice")
        seen.add(table.name)
    return (*CORE_TABLES, *plugins)


def key_specs(tables: Iterable[ConfigTable[Any]] = ()) -> list[KeySpec]:
    """Every key of the configuration (the core's and those of the plugins' *tables*),
    table by table, in file order."""
    return [spec for table in all_tables(tables) for spec in table.key_specs()]


def _typed(spec: KeySpec, value: Any) -> tuple[Any, str | None]:
    """*value* converted to the key's Python type, or a problem."""
    wanted = spec.type
    if wanted is bool:
        ok = isinstance(value, bool)
    elif wanted is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif wanted is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif wanted is tuple:
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        return value, f"must be {_TYPE_NAMES[wanted]}, not {_toml_type_name(value)}"
    return value, None


def _toml_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array" if all(isinstance(i, str) for i in value) else "an array of non-strings"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _resolve_path(value: str, base: Path | None) -> str:
    if not value or base is None or Path(value).is_absolute():
        return value
    return str(base / value)


def _parse_table(
    table: ConfigTable[Any], value: dict[str, Any], base: Path | None, problems: list[str]
) -> dict[str, Any]:
    """The keyword arguments of *table*'s class from the file's table *value*; each
    problem is appended to *problems* (without the file's name)."""
    specs = {spec.name: spec for spec in table.key_specs()}
    kwargs: dict[str, Any] = {}
    for name, raw in value.items():
        spec = specs.get(name)
        if spec is None and name in table.moved:
            moved = table.moved[name]
            problems.append(
                f"{table.name}.{name}: unknown key: it is now {moved} "
                f"(set {moved.split('.', 1)[1]} in the [{moved.split('.', 1)[0]}] table)"
            )
            continue
        if spec is None:
            problems.append(
                f"{table.name}.{name}: unknown key ({table.name} has: {', '.join(specs)})"
            )
            continue
        converted, problem = _typed(spec, raw)
        if problem is None and spec.check is not None:
            problem = spec.check(converted)
        if problem is not None:
            problems.append(f"{spec.dotted}: {problem}")
            continue
        if spec.path:
            converted = (
                tuple(_resolve_path(p, base) for p in converted)
                if isinstance(converted, tuple)
                else _resolve_path(converted, base)
            )
        kwargs[name] = converted
    return kwargs


def config_from_dict(
    data: dict[str, Any],
    source: Path | None = None,
    tables: Iterable[ConfigTable[Any]] = (),
) -> Config:
    """Build a :class:`Config` from parsed TOML; :class:`ConfigError` lists every problem.

    *tables* are the loaded plugins' tables (``PluginManager.config_tables``): a file's
    table that is neither the core's nor one of them is an error.
    """
    where = str(source) if source is not None else "<config>"
    base = source.absolute().parent if source is not None else None
    declared = {table.name: table for table in all_tables(tables)}
    problems: list[str] = []
    sections: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        table = declared.get(name)
        if table is None:
            problems.append(f"{name}: unknown key (tables: {', '.join(declared)})")
            continue
        if not isinstance(value, dict):
            problems.append(
                f"{name}: must be a table ([{name}]), not {_toml_type_name(value)}"
            )
            continue
        sections[name] = _parse_table(table, value, base, problems)
    if problems:
        raise ConfigError([f"{where}: {problem}" for problem in problems])
    built: dict[str, Any] = {}
    for name, table in declared.items():
        try:
            built[name] = table.schema(**sections.get(name, {}))
        except (TypeError, ValueError) as exc:  # a check of the class's own
            problems.append(f"{name}: {exc}")
    if problems:
        raise ConfigError([f"{where}: {problem}" for problem in problems])
    config = Config(
        **{name: built[name] for name in _CORE_NAMES},
        plugin_tables={name: built[name] for name in declared if name not in _CORE_NAMES},
        source=source,
    )
    problems = _cross_checks(config)
    for name, table in declared.items():
        if name not in _CORE_NAMES and table.check is not None:
            problems.extend(table.check(built[name]))
    if problems:
        raise ConfigError([f"{where}: {problem}" for problem in problems])
    return config


def _cross_checks(config: Config) -> list[str]:
    """Problems of the core's tables involving several keys, each naming them."""
    problems = []
    if bool(config.tls.cert) != bool(config.tls.key):
        problems.append("tls.cert, tls.key: set both (TLS) or neither (plain HTTP)")
    if config.tls.ca and not config.tls.cert:
        problems.append("tls.ca: names the CA of tls.cert, which is not set")
    if config.tls.client_ca and not config.tls.cert:
        problems.append(
            "tls.client_ca: client certificates need TLS (tls.cert, tls.key), which is not set"
        )
    if config.tls.client_subjects and not config.tls.client_ca:
        problems.append(
            "tls.client_subjects: names accepted client certificates, but tls.client_ca "
            "(the CA that signs them) is not set"
        )
    if config.broker.public_connect_url and not config.listen.connect_port:
        problems.append(
            "broker.public_connect_url: names a way to the CONNECT listener, which is off "
            "(listen.connect_port = 0)"
        )
    if config.listen.connect_proxy_protocol and not config.listen.connect_port:
        problems.append(
            "listen.connect_proxy_protocol: reads a PROXY header on the CONNECT listener, "
            "which is off (listen.connect_port = 0)"
        )
    if config.listen.connect_proxy_protocol and not config.http.trusted_proxies:
        problems.append(
            "listen.connect_proxy_protocol: the PROXY header is believed only from "
            "http.trusted_proxies, which is empty: every connection would be refused"
        )
    if config.tokens.default_ttl > config.tokens.max_ttl:
        problems.append(
            f"tokens.default_ttl: {config.tokens.default_ttl} exceeds "
            f"tokens.max_ttl ({config.tokens.max_ttl})"
        )
    if not config.tokens.trust_local_key and not config.tokens.public_keys:
        problems.append(
            "tokens.trust_local_key, tokens.public_keys: no public key is trusted; "
            "every token would be refused"
        )
    return problems


def find_config(path: Path | None) -> Path | None:
    """The file to read: *path*, else ``$CONSOLE_BROKER_CONFIG``, else the default if present."""
    if path is not None:
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(path: Path | None, tables: Iterable[ConfigTable[Any]] = ()) -> Config:
    """Read the configuration file at *path*; None: the embedded defaults.

    *tables* are the loaded plugins' tables (``PluginManager.config_tables``), parsed
    like the core's; see :func:`config_from_dict`.
    """
    if path is None:
        return config_from_dict({}, tables=tables)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the configuration: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return config_from_dict(data, source=path, tables=tables)


# --- rendering --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes are a subset of TOML's.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _wrap(text: str, prefix: str, width: int = 88) -> list[str]:
    lines: list[str] = []
    current = prefix
    for word in text.split():
        if current != prefix and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = prefix
        current = f"{current}{word}" if current == prefix else f"{current} {word}"
    lines.append(current)
    return lines


def render_defaults(tables: Iterable[ConfigTable[Any]] = ()) -> str:
    """The fully documented default configuration, as TOML that loads to the defaults:
    the core's tables, then the plugins' *tables*."""
    out = [
        "# console-broker configuration (every key shown with its default).",
        "# Unknown keys and wrong types are errors. Relative paths are taken relative",
        "# to this file's directory.",
    ]
    for table in all_tables(tables):
        out.append("")
        out.extend(_wrap(table.doc, "# "))
        out.append(f"[{table.name}]")
        for spec in table.key_specs():
            out.extend(_wrap(spec.doc, "# "))
            out.append(f"{spec.name} = {_toml_value(spec.default)}")
    return "\n".join(out) + "\n"


def render_markdown(tables: Iterable[ConfigTable[Any]] = ()) -> str:
    """The reference table of every key (the core's, then those of the plugins'
    *tables*), for docs/config.md."""
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in key_specs(tables):
        kind = "array of strings" if spec.type is tuple else {
            str: "string", int: "integer", float: "number", bool: "boolean"
        }[spec.type]
        default = _toml_value(spec.default).replace("|", "\\|")
        doc = spec.doc.replace("|", "\\|")
        out.append(f"| `{spec.dotted}` | {kind} | `{default}` | {doc} |")
    return "\n".join(out) + "\n"
