"""The broker's configuration: one TOML file, every key documented, defaults that work without it.

Theory of operation. Each TOML table is a frozen attrs class below; each of
its fields is a key, declared with :func:`_key` which records the key's
documentation and value check. The loader (:func:`load_config`), the
documented default file (:func:`render_defaults`, printed by
``console-broker config --defaults``) and the table in ``docs/config.md``
(:func:`render_markdown`) are all derived from these classes, so a key cannot
exist without its documentation, and a file can hold nothing the broker does
not understand: unknown keys and wrong types are errors naming the key and the
file, never ignored.

Values that depend on the host (the node name, the public URL) are empty
strings in the file and resolved by :class:`Config`'s properties. Relative
paths in a file are taken relative to that file's directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from broker.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

#: Read when no file is named and ``CONSOLE_BROKER_CONFIG`` is unset, if it exists.
DEFAULT_CONFIG_PATH = Path("/etc/console-broker/broker.toml")
#: Names the configuration file when no ``--config`` is given.
CONFIG_ENV = "CONSOLE_BROKER_CONFIG"

#: Checks a value; returns a problem ("must be ...") or None.
Check = Callable[[Any], str | None]


class ConfigError(Exception):
    """The configuration file cannot be used. Each problem names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _key(default: Any, doc: str, check: Check | None = None, *, path: bool = False) -> Any:
    """Declare a key: its default, its documentation, an optional value check.

    *path* marks a file-system path (resolved against the file's directory).
    """
    return attrs.field(default=default, metadata={"doc": doc, "check": check, "path": path})


# --- value checks -----------------------------------------------------------------------


def _at_least(minimum: float) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(map(repr, choices))

    return check


def _port(value: Any) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def _not_empty(value: Any) -> str | None:
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

    node: str = _key(
        "",
        "This broker's node name: tokens for another node are refused. "
        "Empty: the host name.",
    )
    state_dir: str = _key(
        "/var/lib/console-broker",
        "Directory (created 0700) holding the signing key pair, created on first start: "
        f"{PRIVATE_KEY_NAME} (0600) and {PUBLIC_KEY_NAME}.",
        _not_empty,
        path=True,
    )
    public_url: str = _key(
        "",
        "Base URL clients reach this broker at, used in the links tokens print "
        "(e.g. behind a reverse proxy). Empty: derived from listen and tls, "
        "http(s)://host:port.",
        _base_url,
    )


@attrs.frozen
class ListenSection:
    """Where the broker accepts connections (WebSocket and HTTP CONNECT)."""

    host: str = _key("127.0.0.1", "Address to listen on.", _not_empty)
    port: int = _key(6080, "TCP port to listen on.", _port)
    connect_port: int = _key(
        0,
        "TCP port of the HTTP CONNECT listener for native clients (remote-viewer with a "
        ".vv file; docs/spice.md), for protocols that serve them. 0: no such listener.",
        _at_least(0),
    )
    connect_host: str = _key(
        "127.0.0.1", "Address the HTTP CONNECT listener listens on.", _not_empty
    )


@attrs.frozen
class TLSSection:
    """TLS for https:// and wss://: set both files, or neither for plain HTTP."""

    cert: str = _key("", "PEM certificate chain file. Empty: no TLS.", path=True)
    key: str = _key("", "PEM private key file of the certificate. Empty: no TLS.", path=True)
    ca: str = _key(
        "",
        "PEM file of the CA that signed tls.cert. Native clients' connection files (.vv) "
        "carry it, so remote-viewer can verify the broker; empty: the files carry no CA "
        "and clients rely on their own trust store.",
        path=True,
    )


@attrs.frozen
class HTTPSection:
    """Browser request checks and the console pages' assets."""

    allowed_origins: tuple[str, ...] = _key(
        (),
        "Origins (scheme://host[:port]) whose pages may open consoles. Empty: the origin "
        "of the public URL (broker.public_url, or derived from listen), and "
        "http(s)://listen.host:listen.port unless listen.host is a wildcard; never the "
        "request's Host header.",
        _origins,
    )
    allow_missing_origin: bool = _key(
        False, "Accept WebSocket requests without an Origin header (non-browser clients)."
    )
    refusals: str = _key(
        "status",
        "How WebSocket requests are refused: 'status' answers an HTTP error before the "
        "upgrade; 'close' completes the upgrade and closes with the reason's close code, "
        "which browser pages can read (a foreign Origin is always refused with a status).",
        _one_of("status", "close"),
    )
    trusted_proxies: tuple[str, ...] = _key(
        (),
        "Addresses or networks (\"10.0.0.5\", \"10.0.0.0/24\", \"::1\") of reverse proxies "
        "in front of the broker whose X-Forwarded-For header is believed: a request from one "
        "of them counts as coming from the nearest address in that header that is not a "
        "trusted proxy (for limits.max_sessions_per_client and the logs). Empty: the "
        "header is ignored and the peer's address is the client's.",
        _networks,
    )
    assets_dir: str = _key(
        "",
        "The node_modules directory the console pages' browser clients are read from: "
        "@novnc/novnc for the VNC page, @spice-project/spice-html5 for the SPICE page, "
        "@xterm/xterm and @xterm/addon-fit for the serial page. Empty: the source tree's "
        "node_modules when the broker runs from one, else "
        "/usr/share/console-broker/node_modules.",
        path=True,
    )


@attrs.frozen
class LibvirtSection:
    """The hypervisor connection."""

    uri: str = _key("qemu:///system", "libvirt connection URI.", _not_empty)


@attrs.frozen
class TokensSection:
    """Token lifetimes, trusted keys and single use (see docs/tokens.md)."""

    default_ttl: int = _key(60, "Lifetime of an issued token when none is asked, in seconds.",
                            _at_least(1))
    max_ttl: int = _key(
        300,
        "Longest lifetime issued or accepted, in seconds; a token living longer is refused.",
        _at_least(1),
    )
    leeway: int = _key(5, "Clock skew allowed on a token's nbf and exp, in seconds.", _at_least(0))
    replay_cache_size: int = _key(
        100_000,
        "Used tokens remembered until they expire; when full of live tokens, new tokens "
        "are refused.",
        _at_least(1),
    )
    trust_local_key: bool = _key(
        True, "Trust the state directory's own public key (tokens from the local CLI)."
    )
    public_keys: tuple[str, ...] = _key(
        (),
        "Further trusted public key files (PEM): a control plane's key, or the previous "
        "key during a rotation.",
        path=True,
    )


@attrs.frozen
class LimitsSection:
    """Session limits and timeouts (seconds; 0 where allowed means none)."""

    max_sessions: int = _key(10_000, "Concurrent sessions on this broker.", _at_least(1))
    max_sessions_per_domain: int = _key(16, "Concurrent sessions on one domain.", _at_least(1))
    max_sessions_per_client: int = _key(
        64, "Concurrent sessions from one client address.", _at_least(1)
    )
    handshake_timeout: float = _key(
        10.0, "Time a client has to complete its handshake, in seconds.", _at_least(0.001)
    )
    idle_timeout: float = _key(
        0.0, "Close a session idle (no bytes either way) this long, in seconds; 0: never.",
        _at_least(0),
    )
    shutdown_grace: float = _key(
        5.0, "On shutdown, time sessions get to close before they are cut, in seconds.",
        _at_least(0),
    )
    max_pending: int = _key(
        1024,
        "Connections not yet past their request (no token checked yet) held at once, both "
        "listeners together; one more is answered 503 and closed.",
        _at_least(1),
    )
    max_pending_per_client: int = _key(
        32,
        "Connections not yet past their request held at once from one peer address (a "
        "trusted proxy's are counted only against limits.max_pending); one more is "
        "answered 429 and closed.",
        _at_least(1),
    )
    max_request_head: int = _key(
        16_384,
        "Bytes of request line and headers read before the request is complete; more is "
        "answered 431 and closed.",
        _at_least(1024),
    )
    write_timeout: float = _key(
        30.0,
        "A client whose full outgoing buffer has not drained at all for this long (it "
        "stopped reading) is disconnected, in seconds; its session ends as client_stalled "
        "(4108). A slow client that drains is never cut.",
        _at_least(0.1),
    )


@attrs.frozen
class ProxySection:
    """Buffers between clients and consoles (per session, each direction)."""

    read_size: int = _key(
        262_144,
        "Largest read from a console, in bytes: one WebSocket message at most.",
        _at_least(4096),
    )
    write_buffer: int = _key(
        262_144,
        "High-water mark of a session's outgoing WebSocket buffer, in bytes: reading "
        "the console pauses above it.",
        _at_least(4096),
    )
    max_message: int = _key(
        1_048_576, "Largest message a client may send, in bytes.", _at_least(1024)
    )
    max_queue: int = _key(
        16, "Messages from a client queued before reading from it pauses.", _at_least(1)
    )
    ping_interval: float = _key(
        20.0,
        "Seconds between keepalive pings to a client (a client not answering within as "
        "long is dropped); 0: no pings.",
        _at_least(0),
    )


@attrs.frozen
class LoggingSection:
    """Structured logs (tokens and secrets never reach a log line)."""

    format: str = _key("json", "'json' (one object per line) or 'console' (for humans).",
                       _one_of("json", "console"))
    level: str = _key(
        "info", "Least severe level logged.", _one_of("debug", "info", "warning", "error")
    )


@attrs.frozen
class VNCSection:
    """The VNC plugin: how the broker logs in to QEMU's VNC server, and the console page
    (see docs/vnc.md)."""

    shared: bool = _key(
        True,
        "Ask QEMU to share the display (the RFB shared flag), so that several sessions on "
        "one VM stay connected; false asks for exclusive access, and QEMU (sharePolicy "
        "'allow-exclusive') then disconnects the VM's other VNC clients. The browser's own "
        "flag is ignored.",
    )
    tls_ca: str = _key(
        "",
        "PEM file of the CA that signed QEMU's VNC server certificates (QEMU's "
        "vnc_tls_x509_cert_dir/ca-cert.pem). Set: the broker accepts VeNCrypt with TLS "
        "(X509None, X509Vnc), verifying QEMU's certificate. Empty: no TLS to QEMU.",
        path=True,
    )
    tls_cert: str = _key(
        "",
        "PEM client certificate the broker shows QEMU (for vnc_tls_x509_verify = 1). "
        "Empty: none.",
        path=True,
    )
    tls_key: str = _key("", "PEM private key of vnc.tls_cert.", path=True)
    tls_server_name: str = _key(
        "",
        "Name (DNS name or IP address) QEMU's certificate must carry. Empty: the address "
        "connected to (tcp mode); on a UNIX socket or a socket from libvirt, where no "
        "network lies between broker and QEMU, only the certificate chain is verified.",
    )


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

    deny_channels: tuple[str, ...] = _key(
        (),
        "SPICE channel types no session may open, whatever its token grants (for example "
        "[\"usbredir\", \"webdav\"]); the broker answers them with permission denied. "
        "View-only sessions get display, cursor and playback only in any case.",
        _spice_channels,
    )
    tls_ca: str = _key(
        "",
        "PEM file of the CA that signed QEMU's SPICE server certificates (QEMU's "
        "spice_tls_x509_cert_dir/ca-cert.pem). Set: in tcp mode the broker connects to "
        "the SPICE server's TLS port (tlsPort) where it has one, verifying its "
        "certificate. Empty: the plain port; a server listening for TLS only is refused.",
        path=True,
    )
    tls_cert: str = _key(
        "",
        "PEM client certificate the broker shows QEMU's SPICE server, for servers that "
        "verify their clients. Empty: none.",
        path=True,
    )
    tls_key: str = _key("", "PEM private key of spice.tls_cert.", path=True)
    tls_server_name: str = _key(
        "",
        "Name (DNS name or IP address) QEMU's SPICE certificate must carry. Empty: the "
        "address connected to.",
    )


@attrs.frozen
class SerialSection:
    """The serial plugin: shared sessions, scrollback and recordings (see docs/serial.md)."""

    scrollback: int = _key(
        65_536,
        "Bytes of a console's latest output kept and replayed to each client that "
        "attaches, so it sees the current screen at once; 0: none.",
        _at_least(0),
    )
    client_queue: int = _key(
        262_144,
        "Bytes of output queued for one client: a client further behind skips to the "
        "scrollback (it is sent the screen again) instead of slowing the others.",
        _at_least(4096),
    )
    record: bool = _key(
        False, "Record every serial console's output as asciicast v2 files."
    )
    record_domains: tuple[str, ...] = _key(
        (), "Domains (names or UUIDs) whose serial consoles are recorded even when "
        "serial.record is false.",
    )
    record_input: bool = _key(
        False, "Also record what the writing client typed ('i' events), in recordings."
    )
    recordings_dir: str = _key(
        "",
        "Directory the recordings are written to (created 0700), one subdirectory per "
        "domain UUID. Empty: 'recordings' in broker.state_dir.",
        path=True,
    )
    recording_max_size: int = _key(
        10_485_760,
        "Size in bytes past which a recording is continued in a new file (the next part).",
        _at_least(4096),
    )
    recordings_keep_days: int = _key(
        0,
        "Days a recording file is kept after its last write; older files are deleted "
        "(never the part being written). 0: kept forever.",
        _at_least(0),
    )
    recordings_max_total: int = _key(
        0,
        "Bytes all files in serial.recordings_dir may take together; past it, the files "
        "written longest ago are deleted first (never a part being written). 0: no limit.",
        _at_least(0),
    )
    recordings_prune_interval: float = _key(
        3600.0,
        "Seconds between two retention passes while the broker runs (it also prunes on "
        "start and after a recording moves on to its next part), when "
        "serial.recordings_keep_days or serial.recordings_max_total is set.",
        _at_least(1),
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
    vnc: VNCSection = attrs.field(factory=VNCSection)
    spice: SpiceSection = attrs.field(factory=SpiceSection)
    serial: SerialSection = attrs.field(factory=SerialSection)
    #: The file it was read from (None: the embedded defaults).
    source: Path | None = attrs.field(default=None, eq=False)

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
    def recordings_dir(self) -> Path:
        """Where serial console recordings go (``serial.recordings_dir``, resolved)."""
        return Path(self.serial.recordings_dir or self.state_dir / "recordings")

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


def _tables() -> Iterator[tuple[str, type[Any]]]:
    hints = typing.get_type_hints(Config)
    for field in attrs.fields(Config):
        if field.name != "source":
            yield field.name, hints[field.name]


def _key_type(annotation: Any) -> type[Any]:
    if typing.get_origin(annotation) is tuple:
        return tuple
    assert isinstance(annotation, type), annotation
    return annotation


def key_specs() -> list[KeySpec]:
    """Every key of the configuration, table by table, in file order."""
    specs = []
    for table, cls in _tables():
        hints = typing.get_type_hints(cls)
        for field in attrs.fields(cls):
            specs.append(
                KeySpec(
                    table=table,
                    name=field.name,
                    type=_key_type(hints[field.name]),
                    default=field.default,
                    doc=field.metadata["doc"],
                    check=field.metadata["check"],
                    path=field.metadata["path"],
                )
            )
    return specs


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    tuple: "an array of strings",
}


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


#: Keys that moved: old ``table.name`` -> new. A file still setting the old key is an
#: error that names the new one.
MOVED_KEYS = {"vnc.assets_dir": "http.assets_dir"}


def config_from_dict(data: dict[str, Any], source: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; :class:`ConfigError` lists every problem."""
    where = str(source) if source is not None else "<config>"
    base = source.absolute().parent if source is not None else None
    problems: list[str] = []
    specs: dict[str, dict[str, KeySpec]] = {}
    for spec in key_specs():
        specs.setdefault(spec.table, {})[spec.name] = spec
    sections: dict[str, Any] = {}
    for table, value in data.items():
        if table not in specs:
            problems.append(
                f"{where}: {table}: unknown key (tables: {', '.join(specs)})"
            )
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}: {table}: must be a table ([{table}]), not "
                            f"{_toml_type_name(value)}")
            continue
        kwargs: dict[str, Any] = {}
        for name, raw in value.items():
            found = specs[table].get(name)
            if found is None and f"{table}.{name}" in MOVED_KEYS:
                moved = MOVED_KEYS[f"{table}.{name}"]
                problems.append(
                    f"{where}: {table}.{name}: unknown key: it is now {moved} "
                    f"(set {moved.split('.', 1)[1]} in the [{moved.split('.', 1)[0]}] table)"
                )
                continue
            if found is None:
                problems.append(
                    f"{where}: {table}.{name}: unknown key "
                    f"({table} has: {', '.join(specs[table])})"
                )
                continue
            spec = found
            converted, problem = _typed(spec, raw)
            if problem is None and spec.check is not None:
                problem = spec.check(converted)
            if problem is not None:
                problems.append(f"{where}: {spec.dotted}: {problem}")
                continue
            if spec.path:
                converted = (
                    tuple(_resolve_path(p, base) for p in converted)
                    if isinstance(converted, tuple)
                    else _resolve_path(converted, base)
                )
            kwargs[name] = converted
        sections[table] = kwargs
    if problems:
        raise ConfigError(problems)
    config = Config(
        **{table: cls(**sections.get(table, {})) for table, cls in _tables()},
        source=source,
    )
    problems = [f"{where}: {problem}" for problem in _cross_checks(config)]
    if problems:
        raise ConfigError(problems)
    return config


def _cross_checks(config: Config) -> list[str]:
    """Problems involving several keys, each naming them."""
    problems = []
    if bool(config.tls.cert) != bool(config.tls.key):
        problems.append("tls.cert, tls.key: set both (TLS) or neither (plain HTTP)")
    if bool(config.vnc.tls_cert) != bool(config.vnc.tls_key):
        problems.append("vnc.tls_cert, vnc.tls_key: set both (a client certificate) or neither")
    if config.vnc.tls_cert and not config.vnc.tls_ca:
        problems.append("vnc.tls_cert: a client certificate needs vnc.tls_ca (TLS to QEMU)")
    if bool(config.spice.tls_cert) != bool(config.spice.tls_key):
        problems.append(
            "spice.tls_cert, spice.tls_key: set both (a client certificate) or neither"
        )
    if config.spice.tls_cert and not config.spice.tls_ca:
        problems.append("spice.tls_cert: a client certificate needs spice.tls_ca (TLS to QEMU)")
    if config.tls.ca and not config.tls.cert:
        problems.append("tls.ca: names the CA of tls.cert, which is not set")
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


def load_config(path: Path | None) -> Config:
    """Read the configuration file at *path*; None: the embedded defaults."""
    if path is None:
        return Config()
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
    return config_from_dict(data, source=path)


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


def render_defaults() -> str:
    """The fully documented default configuration, as TOML that loads to ``Config()``."""
    out = [
        "# console-broker configuration (every key shown with its default).",
        "# Unknown keys and wrong types are errors. Relative paths are taken relative",
        "# to this file's directory.",
    ]
    tables = dict(_tables())
    current = None
    for spec in key_specs():
        if spec.table != current:
            current = spec.table
            out.append("")
            out.extend(_wrap(tables[spec.table].__doc__ or "", "# "))
            out.append(f"[{spec.table}]")
        out.extend(_wrap(spec.doc, "# "))
        out.append(f"{spec.name} = {_toml_value(spec.default)}")
    return "\n".join(out) + "\n"


def render_markdown() -> str:
    """The reference table of every key, for docs/config.md."""
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in key_specs():
        kind = "array of strings" if spec.type is tuple else {
            str: "string", int: "integer", float: "number", bool: "boolean"
        }[spec.type]
        default = _toml_value(spec.default).replace("|", "\\|")
        doc = spec.doc.replace("|", "\\|")
        out.append(f"| `{spec.dotted}` | {kind} | `{default}` | {doc} |")
    return "\n".join(out) + "\n"
