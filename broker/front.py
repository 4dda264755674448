"""``console-broker front nginx``: the nginx configuration of a front door before many brokers.

Theory of operation. Each hypervisor runs a node broker; one public address (the
front door, nginx) routes ``/n/{node}/...`` to that node's broker with the prefix
stripped, over TLS that verifies the node's certificate and shows the front's client
certificate. Native clients' HTTP CONNECT cannot go through nginx's http module, so
each node's CONNECT listener gets a TCP port of its own on the front, in nginx's
stream module, forwarded over TLS with the same client certificate.

The node list is a TOML file (``nodes.toml``): one ``[front]`` table and one
``[[node]]`` table per node. Both are frozen attrs classes whose fields are the keys,
each declared with :func:`_key` (its documentation, default and value check), so the
loader (:func:`load_nodes`), the key reference in docs/front.md
(:func:`render_markdown`) and the validation messages come from one declaration. As
for the broker's own configuration, a file can hold nothing this module does not
understand: unknown keys, wrong types, bad values, duplicate names and ports are
reported all at once, each naming the file and the key. :func:`render_nginx` writes a
standalone nginx.conf; every value it writes is either checked to be a plain token
(names, addresses, ports) or quoted, and characters nginx cannot take in a quoted
string (control characters; ``$``, which would start a variable) are refused when the
file is read. docs/front.md explains each directive.

The front names no protocol: it routes paths and bytes, whatever the node brokers'
plugins serve.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import tempfile
import textwrap
import tomllib
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from broker.errors import EXIT_USAGE, CommandError

__all__ = [
    "FrontDoor",
    "FrontSettings",
    "Node",
    "NodesFileError",
    "load_nodes",
    "register",
    "render_markdown",
    "render_nginx",
]

#: Checks a value of the key's type; returns a problem ("must be ...") or None.
Check = Callable[[Any], str | None]


class NodesFileError(Exception):
    """The nodes file cannot be used; each problem names the file and the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _key(
    doc: str,
    default: Any = attrs.NOTHING,
    check: Check | None = None,
    *,
    path: bool = False,
    duration: bool = False,
) -> Any:
    """A key of a table: its documentation, its default (none: required), a check of
    its value; *path*: a file name, taken relative to the nodes file's directory;
    *duration*: seconds (an integer) or a string with a unit ("90s", "30m", "24h",
    "7d"), held as integer seconds."""
    return attrs.field(
        default=default,
        converter=_to_seconds if duration else None,
        metadata={"doc": doc, "check": check, "path": path, "duration": duration},
    )


# --- value checks -----------------------------------------------------------------------

_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?"
)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_LISTEN = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(value: Any) -> tuple[int, str | None]:
    """A duration key's value as seconds, or a problem."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        found = _DURATION.fullmatch(value.strip())
        if found:
            return int(found[1]) * _UNITS[found[2]], None
        return 0, "must be seconds or a number with a unit: s, m, h or d (\"90s\", \"24h\")"
    return 0, f"must be an integer (seconds) or a string (\"24h\"), not {_type_name(value)}"


def _to_seconds(value: Any) -> int:
    """A duration key's value (checked by :func:`_seconds`) as seconds."""
    seconds, problem = _seconds(value)
    if problem is not None:
        raise ValueError(problem)
    return seconds


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _node_name(value: str) -> str | None:
    if _NODE_NAME.fullmatch(value):
        return None
    return (
        "must be 1 to 63 lower-case letters, digits and '-', starting and ending with a "
        "letter or digit (it is the path /n/{name}/)"
    )


def _dns_name(value: str) -> str | None:
    if _DNS_NAME.fullmatch(value) and not _is_ip(value):
        return None
    return "must be a DNS name (letters, digits, '-' and '.')"


def _server_name(value: str) -> str | None:
    return _dns_name(value[2:] if value.startswith("*.") else value)


def _host(value: str) -> str | None:
    if _is_ip(value) or _DNS_NAME.fullmatch(value):
        return None
    return "must be an IP address or a DNS name"


def _ip(value: str) -> str | None:
    return None if _is_ip(value) else "must be an IP address (0.0.0.0 or :: for every address)"


def _listen(value: str) -> str | None:
    found = _LISTEN.fullmatch(value)
    host = found and (found["v6"] or found["host"])
    if not found or not host or not (_is_ip(host) and (":" in host) == bool(found["v6"])):
        return "must be IP:PORT or [IPv6]:PORT (0.0.0.0:443, [::]:443)"
    return _port(int(found["port"]))


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def _port_or_none(value: int) -> str | None:
    return None if value == 0 else _port(value)


def _at_least(minimum: int) -> Check:
    def check(value: Any) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def _user(value: str) -> str | None:
    if not value or _USER.fullmatch(value):
        return None
    return "must be a user name (lower-case letters, digits, '_' and '-') or empty"


def _not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


# --- the tables -------------------------------------------------------------------------

#: Debian's nginx-common: the stream module, built as a dynamic module.
DEBIAN_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@attrs.frozen(kw_only=True)
class FrontSettings:
    """The front door itself: its public name and listener, its certificates, the
    node brokers' CA, and nginx's process settings."""

    server_name: str = _key(
        "The public DNS name clients use (nginx's server_name; a leading '*.' allowed).",
        check=_server_name,
    )
    listen: str = _key(
        "The https listener, IP:PORT or [IPv6]:PORT.",
        "0.0.0.0:443",
        _listen,
    )
    cert: str = _key(
        "PEM certificate chain served to clients (for server_name).",
        check=_not_empty,
        path=True,
    )
    key: str = _key("PEM private key of cert.", check=_not_empty, path=True)
    node_ca: str = _key(
        "PEM file of the CA that signed the node brokers' certificates: the front verifies "
        "every node against it (and the node's tls_name).",
        check=_not_empty,
        path=True,
    )
    client_cert: str = _key(
        "PEM certificate the front shows to node brokers (their tls.client_ca verifies "
        "it), on the https and the CONNECT paths alike.",
        check=_not_empty,
        path=True,
    )
    client_key: str = _key("PEM private key of client_cert.", check=_not_empty, path=True)
    connect_host: str = _key(
        "The IP address the per-node CONNECT ports (front_connect_port) listen on.",
        "0.0.0.0",  # noqa: S104 - the front is public; nothing binds here
        _ip,
    )
    connect_timeout: int = _key(
        "How long connecting to a node broker may take before the client gets the 502 "
        "page naming the node: seconds, or a string with a unit (s, m, h, d).",
        10,
        _at_least(1),
        duration=True,
    )
    session_timeout: int = _key(
        "How long a proxied connection may stay silent before nginx closes it (the "
        "brokers' WebSocket pings, every 20 s by default, keep live sessions from "
        "being silent): seconds, or a string with a unit (s, m, h, d).",
        "24h",
        _at_least(1),
        duration=True,
    )
    worker_processes: int = _key(
        "nginx worker processes; 0: one per CPU (auto).", 0, _at_least(0)
    )
    worker_connections: int = _key(
        "Connections one worker holds at once, clients and node brokers together: a "
        "console session holds two (the worker's open-files limit is set to twice this).",
        8192,
        _at_least(64),
    )
    user: str = _key(
        "The user nginx's workers run as when started as root (Debian's nginx "
        "user); empty: nginx's built-in default (nobody).",
        "www-data",
        _user,
    )
    pid: str = _key("nginx's pid file.", "/run/nginx.pid", _not_empty, path=True)
    error_log: str = _key(
        "nginx's error log file, or 'stderr'.",
        "/var/log/nginx/error.log",
        _not_empty,
        path=True,
    )
    access_log: str = _key(
        "The access log file (request lines without their query strings, which hold "
        "tokens; the CONNECT ports' connections too); empty: no access log.",
        "/var/log/nginx/access.log",
        path=True,
    )
    temp_dir: str = _key(
        "An existing directory for nginx's temporary files (nginx makes client_body, "
        "proxy, fastcgi, uwsgi and scgi in it). Empty: nginx's built-in paths (Debian: "
        "/var/lib/nginx).",
        "",
        path=True,
    )
    stream_module: str = _key(
        "The dynamic module of nginx's stream module, loaded (load_module) when a node "
        "has a connect_port; empty: nginx has it built in.",
        DEBIAN_STREAM_MODULE,
        path=True,
    )


@attrs.frozen(kw_only=True)
class Node:
    """A node broker (one [[node]] table each): its name in the front's paths and how
    the front reaches it."""

    name: str = _key(
        "The node's name: its paths are /n/{name}/ on the front. Lower-case letters, "
        "digits and '-'; unique. As a rule, the node broker's broker.node.",
        check=_node_name,
    )
    address: str = _key(
        "The node broker's IP address or DNS name (a name is resolved when nginx "
        "starts or reloads).",
        check=_host,
    )
    port: int = _key("The node broker's https listener (listen.port).", 6080, _port)
    tls_name: str = _key(
        "The DNS name the node broker's certificate carries, verified and sent as SNI. "
        "Empty: address, which must then be a DNS name (nginx does not match IP "
        "addresses in certificates).",
        "",
        lambda value: _dns_name(value) if value else None,
    )
    connect_port: int = _key(
        "The node broker's CONNECT listener for native clients (listen.connect_port); "
        "0: none.",
        0,
        _port_or_none,
    )
    front_connect_port: int = _key(
        "The front's TCP port forwarded to connect_port (required with it; unique).",
        0,
        _port_or_none,
    )

    @property
    def verify_name(self) -> str:
        """The name the node's certificate is verified against."""
        return self.tls_name or self.address

    @property
    def upstream(self) -> str:
        """The node's upstream block in nginx.conf."""
        return f"node_{self.name}"


@attrs.frozen
class FrontDoor:
    """A loaded nodes file: the front's settings, the nodes in file order, the file."""

    front: FrontSettings
    nodes: tuple[Node, ...]
    source: Path | None = None

    @property
    def has_connect(self) -> bool:
        return any(node.connect_port for node in self.nodes)


# --- reading the file -------------------------------------------------------------------

_TABLES: tuple[tuple[str, type[Any]], ...] = (("front", FrontSettings), ("node", Node))


@attrs.frozen
class KeySpec:
    """One documented key of the nodes file."""

    table: str
    name: str
    type: type[Any]
    default: Any
    doc: str
    check: Check | None
    path: bool
    duration: bool

    @property
    def required(self) -> bool:
        return self.default is attrs.NOTHING


def key_specs(schema: type[Any], table: str) -> list[KeySpec]:
    """The keys of *schema* (:class:`FrontSettings` or :class:`Node`), in file order."""
    hints = typing.get_type_hints(schema)
    return [
        KeySpec(
            table=table,
            name=field.name,
            type=hints[field.name],
            default=field.default,
            doc=field.metadata["doc"],
            check=field.metadata["check"],
            path=field.metadata["path"],
            duration=field.metadata["duration"],
        )
        for field in attrs.fields(schema)
    ]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _unquotable(value: str) -> str | None:
    """Why nginx cannot take *value* in a quoted string, or None."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "must not hold control characters"
    if "$" in value:
        return "must not hold '$' (nginx would read a variable)"
    return None


def _typed(spec: KeySpec, raw: Any) -> tuple[Any, str | None]:
    """*raw* as the key's type (a duration as seconds), or a problem."""
    if spec.duration:
        return _seconds(raw)
    if spec.type is int:
        ok = isinstance(raw, int) and not isinstance(raw, bool)
        return raw, None if ok else f"must be an integer, not {_type_name(raw)}"
    if not isinstance(raw, str):
        return raw, f"must be a string, not {_type_name(raw)}"
    return raw, _unquotable(raw)


def _resolve(value: str, base: Path | None, spec: KeySpec) -> str:
    if not value or base is None or Path(value).is_absolute():
        return value
    if spec.name == "error_log" and value == "stderr":
        return value
    return str(base / value)


@attrs.frozen
class _Parsed:
    """A table as read: the valid keys' values (absent keys: their defaults), and the
    keys that have a problem (or are required and missing)."""

    values: dict[str, Any]
    bad: frozenset[str]

    def known(self, *keys: str) -> bool:
        """Whether every one of *keys* has a valid value (a cross-check may use them)."""
        return not self.bad.intersection(keys)


def _parse_table(
    specs: list[KeySpec], value: dict[str, Any], where: str, base: Path | None,
    problems: list[str],
) -> _Parsed:
    """A table of the file's, each problem appended to *problems* (named
    ``{where}.{key}``)."""
    by_name = {spec.name: spec for spec in specs}
    values = {spec.name: spec.default for spec in specs if not spec.required}
    bad: set[str] = set()
    for name, raw in value.items():
        spec = by_name.get(name)
        if spec is None:
            problems.append(f"{where}.{name}: unknown key ({where.split('[')[0]} has: "
                            f"{', '.join(by_name)})")
            bad.add(name)
            continue
        converted, problem = _typed(spec, raw)
        if problem is None and spec.check is not None:
            problem = spec.check(converted)
        if problem is not None:
            problems.append(f"{where}.{name}: {problem}")
            bad.add(name)
            continue
        values[name] = _resolve(converted, base, spec) if spec.path else converted
    for spec in specs:
        if spec.required and spec.name not in value:
            problems.append(f"{where}.{spec.name}: required key missing")
            bad.add(spec.name)
    return _Parsed({k: v for k, v in values.items() if k not in bad}, frozenset(bad))


def nodes_from_dict(data: dict[str, Any], source: Path | None = None) -> FrontDoor:
    """A :class:`FrontDoor` from a parsed nodes file; :class:`NodesFileError` lists
    every problem."""
    base = source.absolute().parent if source is not None else None
    problems: list[str] = []
    for name in data:
        if name not in dict(_TABLES):
            problems.append(f"{name}: unknown key (the file has: [front], [[node]])")
    front: _Parsed | None = None
    raw_front = data.get("front")
    if raw_front is None:
        problems.append("front: the [front] table is missing")
    elif not isinstance(raw_front, dict):
        problems.append(f"front: must be a table ([front]), not {_type_name(raw_front)}")
    else:
        front = _parse_table(key_specs(FrontSettings, "front"), raw_front, "front", base,
                             problems)
    nodes: list[_Parsed] = []
    raw_nodes = data.get("node")
    if raw_nodes is None or raw_nodes == []:
        problems.append("node: no [[node]] table: name at least one node")
    elif not isinstance(raw_nodes, list) or not all(isinstance(n, dict) for n in raw_nodes):
        problems.append(
            f"node: must be an array of tables ([[node]]), not {_type_name(raw_nodes)}"
        )
    else:
        specs = key_specs(Node, "node")
        nodes = [
            _parse_table(specs, raw, f"node[{index}]", base, problems)
            for index, raw in enumerate(raw_nodes, 1)
        ]
    problems.extend(_cross_checks(front, nodes))
    if problems:
        where = str(source) if source is not None else "<nodes>"
        raise NodesFileError([f"{where}: {problem}" for problem in problems])
    assert front is not None
    return FrontDoor(
        front=FrontSettings(**front.values),
        nodes=tuple(Node(**node.values) for node in nodes),
        source=source,
    )


def _cross_checks(front: _Parsed | None, nodes: list[_Parsed]) -> list[str]:
    """Problems involving several keys or nodes, each naming them; a check runs only
    when the keys it involves are valid themselves."""
    problems: list[str] = []
    names: dict[str, int] = {}
    targets: dict[tuple[str, int], int] = {}
    front_ports: dict[int, int] = {}
    listen_port = None
    if front is not None and front.known("listen"):
        listen_port = int(front.values["listen"].rpartition(":")[2])
    for index, node in enumerate(nodes, 1):
        where, values = f"node[{index}]", node.values
        if node.known("name"):
            name = values["name"]
            if name in names:
                problems.append(f"{where}.name: {name!r} is also node[{names[name]}]'s")
            names.setdefault(name, index)
        if node.known("address", "port"):
            target = (values["address"].lower(), values["port"])
            if target in targets:
                problems.append(
                    f"{where}.address, {where}.port: the same broker as "
                    f"node[{targets[target]}] (one broker is one node)"
                )
            targets.setdefault(target, index)
        if node.known("address", "tls_name") and not values["tls_name"] and _is_ip(
            values["address"]
        ):
            problems.append(
                f"{where}.tls_name: required when address is an IP address: nginx verifies "
                "a node's certificate by DNS name only"
            )
        if not node.known("connect_port", "front_connect_port"):
            continue
        if bool(values["connect_port"]) != bool(values["front_connect_port"]):
            problems.append(
                f"{where}.connect_port, {where}.front_connect_port: set both (the front "
                "forwards its front_connect_port to the node's connect_port) or neither"
            )
        port = values["front_connect_port"]
        if port and port in front_ports:
            problems.append(
                f"{where}.front_connect_port: {port} is also node[{front_ports[port]}]'s"
            )
        elif port and port == listen_port:
            problems.append(f"{where}.front_connect_port: {port} is front.listen's port")
        if port:
            front_ports.setdefault(port, index)
    return problems


def load_nodes(path: Path) -> FrontDoor:
    """Read the nodes file at *path*; :class:`NodesFileError` lists every problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise NodesFileError([f"{path}: cannot read the nodes file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise NodesFileError([f"{path}: not UTF-8 text"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NodesFileError([f"{path}: not valid TOML: {exc}"]) from None
    return nodes_from_dict(data, source=path)


# --- nginx.conf -------------------------------------------------------------------------


_BARE = re.compile(r"[A-Za-z0-9._/:@%+,=~-]+")


def _argument(value: str) -> str:
    """*value* as one nginx argument: as it is when it is plain (``/run/nginx.pid``:
    Debian's init script reads the pid file's name from nginx.conf unquoted), else in
    double quotes with ``\\`` and ``"`` escaped (nginx's parser undoes exactly these).
    The loader refused what cannot be quoted."""
    assert _unquotable(value) is None, value
    if _BARE.fullmatch(value) and not value.startswith("#"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Conf:
    """nginx.conf text: directives, blocks and comments, indented."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append("    " * self.depth + text if text else "")

    def __call__(self, *words: str) -> None:
        self.line(" ".join(words) + ";")

    def long(self, *words: str, parts: tuple[str, ...]) -> None:
        """A directive whose last arguments, *parts*, go on lines of their own."""
        self.line(" ".join(words))
        for index, part in enumerate(parts):
            self.line(f"    {part}" + (";" if index == len(parts) - 1 else ""))

    def comment(self, text: str) -> None:
        width = 88 - 4 * self.depth
        for line in textwrap.wrap(text, width - 2):
            self.line(f"# {line}")

    @contextmanager
    def block(self, *words: str) -> Iterator[None]:
        self.line(" ".join(words) + " {")
        self.depth += 1
        yield
        self.depth -= 1
        self.line("}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


#: The access log's format, in parts nginx joins: never the query string (it holds tokens).
_HTTP_LOG = (
    "'$remote_addr [$time_local] \"$request_method $uri $server_protocol\" '",
    "'$status $body_bytes_sent $request_time $upstream_addr \"$http_user_agent\"'",
)
_STREAM_LOG = (
    "'$remote_addr [$time_local] connect $server_port to $upstream_addr '",
    "'$status $bytes_received $bytes_sent $session_time'",
)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _proxy_tls(conf: _Conf, front: FrontSettings) -> None:
    """The TLS directives towards node brokers, the same in http and stream."""
    conf("proxy_ssl_certificate", _argument(front.client_cert))
    conf("proxy_ssl_certificate_key", _argument(front.client_key))
    conf("proxy_ssl_trusted_certificate", _argument(front.node_ca))
    conf("proxy_ssl_verify", "on")
    conf("proxy_ssl_verify_depth", "2")
    conf("proxy_ssl_protocols", "TLSv1.2", "TLSv1.3")
    conf("proxy_ssl_server_name", "on")
    conf("proxy_ssl_session_reuse", "on")


def _text_answer(conf: _Conf, status: int, text: str) -> None:
    """A short text/plain answer of nginx's own. *text* is written here, from checked
    node names; a ``$name`` in it is a variable on purpose (a location's regex capture,
    which lets nothing but a node name's characters through)."""
    conf("default_type", "text/plain")
    conf("add_header", "Cache-Control", "no-store", "always")
    conf("add_header", "X-Content-Type-Options", "nosniff", "always")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    conf("return", str(status), f'"{escaped}"')


def render_nginx(door: FrontDoor) -> str:
    """The standalone nginx.conf of the front door for *door*'s nodes."""
    front = door.front
    conf = _Conf()
    nodes = f" --nodes {door.source.absolute()}" if door.source is not None else ""
    conf.line("# The console front door's nginx configuration, written by")
    conf.line(f"#     console-broker front nginx{nodes}")
    conf.line("# Do not edit it: change the nodes file and write it again (docs/front.md")
    conf.line("# explains every directive).")
    conf.line()
    if door.has_connect and front.stream_module:
        conf("load_module", _argument(front.stream_module))
    if front.user:
        conf("user", front.user)
    conf("worker_processes", str(front.worker_processes or "auto"))
    conf("worker_rlimit_nofile", str(2 * front.worker_connections))
    conf("pid", _argument(front.pid))
    conf("error_log", _argument(front.error_log))
    conf.line()
    with conf.block("events"):
        conf("worker_connections", str(front.worker_connections))
    conf.line()
    with conf.block("http"):
        _http(conf, door)
    if door.has_connect:
        conf.line()
        with conf.block("stream"):
            _stream(conf, door)
    return conf.text()


def _http(conf: _Conf, door: FrontDoor) -> None:
    front = door.front
    conf("server_tokens", "off")
    conf("default_type", "application/octet-stream")
    if front.access_log:
        conf.long("log_format", "console_front", "escape=default", parts=_HTTP_LOG)
        conf("access_log", _argument(front.access_log), "console_front")
    else:
        conf("access_log", "off")
    if front.temp_dir:
        for name in _TEMP_PATHS:
            conf(f"{name}_temp_path", _argument(str(Path(front.temp_dir) / name)))
    conf.line()
    conf.comment("WebSocket upgrades pass on; other requests close their node connection.")
    with conf.block("map", "$http_upgrade", "$connection_upgrade"):
        conf("default", "upgrade")
        conf('""', "close")
    for node in door.nodes:
        conf.line()
        with conf.block("upstream", node.upstream):
            conf("server", _address(node.address, node.port))
    conf.line()
    with conf.block("server"):
        conf("listen", front.listen, "ssl")
        conf("server_name", front.server_name)
        conf("ssl_certificate", _argument(front.cert))
        conf("ssl_certificate_key", _argument(front.key))
        conf("ssl_protocols", "TLSv1.2", "TLSv1.3")
        conf("ssl_session_cache", "shared:console_front:10m")
        conf("absolute_redirect", "off")
        conf.line()
        conf.comment(
            "To the node brokers (every node's location inherits these): HTTP/1.1 with "
            "the upgrade headers, the client's address, nothing buffered, long timeouts, "
            "never a retry, TLS verifying the node and showing the front's certificate."
        )
        conf("proxy_http_version", "1.1")
        conf("proxy_set_header", "Host", "$host")
        conf("proxy_set_header", "Upgrade", "$http_upgrade")
        conf("proxy_set_header", "Connection", "$connection_upgrade")
        conf("proxy_set_header", "X-Forwarded-For", "$proxy_add_x_forwarded_for")
        conf("proxy_set_header", "X-Forwarded-Proto", "https")
        conf("proxy_buffering", "off")
        conf("proxy_request_buffering", "off")
        conf("proxy_connect_timeout", f"{front.connect_timeout}s")
        conf("proxy_read_timeout", f"{front.session_timeout}s")
        conf("proxy_send_timeout", f"{front.session_timeout}s")
        conf("proxy_socket_keepalive", "on")
        conf("proxy_next_upstream", "off")
        _proxy_tls(conf, front)
        conf.line()
        conf.comment("The front's own health, for load balancers.")
        with conf.block("location", "=", "/healthz"):
            conf("access_log", "off")
            _text_answer(conf, 200, "ok\n")
        for node in door.nodes:
            conf.line()
            conf.comment(f"node {node.name}: {_address(node.address, node.port)}")
            with conf.block("location", "^~", f"/n/{node.name}/"):
                conf("proxy_pass", f"https://{node.upstream}/")
                conf("proxy_ssl_name", node.verify_name)
                conf("error_page", "502", "504", f"@{node.name}_down")
            with conf.block("location", "=", f"/n/{node.name}"):
                conf("return", "301", f"/n/{node.name}/$is_args$args")
            with conf.block("location", f"@{node.name}_down"):
                _text_answer(conf, 502, f"console node {node.name} is not answering\n")
        conf.line()
        conf.comment("Anything else: no such node (a name is echoed only if it could be one).")
        with conf.block("location", "~", '"^/n/(?<front_node>[a-z0-9-]{1,63})(?:/|$)"'):
            _text_answer(conf, 404, "no console node named $front_node\n")
        with conf.block("location", "/"):
            _text_answer(conf, 404, "no console node here: console nodes are at /n/NAME/\n")


def _stream(conf: _Conf, door: FrontDoor) -> None:
    front = door.front
    conf.comment(
        "Native clients' HTTP CONNECT: one front port per node, its bytes passed to the "
        "node's CONNECT listener over TLS (the front's client certificate, the node's "
        "verified)."
    )
    if front.access_log:
        conf.long("log_format", "console_front_connect", parts=_STREAM_LOG)
        conf("access_log", _argument(front.access_log), "console_front_connect")
    conf("proxy_connect_timeout", f"{front.connect_timeout}s")
    conf("proxy_timeout", f"{front.session_timeout}s")
    conf("proxy_socket_keepalive", "on")
    conf("proxy_ssl", "on")
    _proxy_tls(conf, front)
    for node in door.nodes:
        if not node.connect_port:
            continue
        conf.line()
        with conf.block("server"):
            conf("listen", _address(front.connect_host, node.front_connect_port))
            conf("proxy_pass", _address(node.address, node.connect_port))
            conf("proxy_ssl_name", node.verify_name)


# --- documentation ----------------------------------------------------------------------


def render_markdown() -> str:
    """The reference of every key of the nodes file, for docs/front.md."""
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for table, schema in _TABLES:
        for spec in key_specs(schema, table):
            kind = "seconds or string" if spec.duration else {str: "string", int: "integer"}[
                spec.type
            ]
            if spec.required:
                default = "required"
            elif isinstance(spec.default, str):
                default = f'`"{spec.default}"`'
            else:
                default = f"`{spec.default}`"
            out.append(f"| `{table}.{spec.name}` | {kind} | {default} | {spec.doc} |")
    return "\n".join(out) + "\n"


# --- the command ------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    """*text* into *path* through a temporary file in its directory, renamed over it."""
    directory = path.absolute().parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # a configuration nginx reads: no secret in it
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _nginx_command(args: argparse.Namespace) -> int:
    try:
        door = load_nodes(args.nodes)
    except NodesFileError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    text = render_nginx(door)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        _write_atomically(args.output, text)
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``console-broker front nginx``."""
    front = subparsers.add_parser(
        "front",
        help="the front door before many node brokers (nginx configuration)",
        description=(
            "A front door gives many node brokers one public address: /n/{node}/... goes "
            "to that node's broker, and each node's CONNECT listener (native clients) gets "
            "a port of its own. See docs/front.md."
        ),
    )
    commands = front.add_subparsers(title="commands", metavar="COMMAND", required=True)
    nginx = commands.add_parser(
        "nginx",
        help="write the front door's nginx.conf for a list of nodes",
        description=(
            "Write a complete, standalone nginx.conf for the front door of the nodes in "
            "FILE (nodes.toml: one [front] table, one [[node]] table per node broker; "
            "docs/front.md describes every key). nginx terminates the clients' TLS, routes "
            "/n/{node}/... to that node's broker (the prefix stripped) over TLS that "
            "verifies the node and shows the front's client certificate, passes WebSocket "
            "upgrades and X-Forwarded-For, answers 404 for unknown nodes and a 502 page "
            "naming a node that does not answer, and forwards each node's front_connect_port "
            "to its CONNECT listener (stream module). Every problem in FILE is reported at "
            "once (exit status 2). Check the result with `nginx -t -c OUTPUT`; after "
            "changing the node list, write it again and run `nginx -s reload`."
        ),
    )
    nginx.add_argument(
        "--nodes", type=Path, required=True, metavar="FILE",
        help="the nodes file (TOML); relative paths in it are taken from its directory",
    )
    nginx.add_argument(
        "--output", "-o", type=Path, metavar="FILE",
        help="write the configuration to FILE (atomically: a temporary file renamed over "
        "it) instead of standard output",
    )
    nginx.set_defaults(func=_nginx_command)


REGISTRARS = [register]
