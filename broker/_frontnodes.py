"""The front door's nodes file (``nodes.toml``): its tables, their checks, the loader.

Theory of operation. The file has one ``[front]`` table and one ``[[node]]`` table per
node broker. Both are frozen attrs classes whose fields are the keys, each declared
with :func:`_key` (its documentation, default and value check), so the loader
(:func:`load_nodes`), the key reference in docs/front.md (:func:`render_markdown`) and
the problems reported come from one declaration. As for the broker's own
configuration, a file can hold nothing this module does not understand: unknown keys,
wrong types, bad values, duplicate names and ports are reported all at once, each
naming the file and the key; a check across keys runs when those keys are valid
themselves. Values the configuration will hold are refused when nginx could not take
them even quoted (:func:`unquotable`). :mod:`broker.front` writes nginx.conf from a
loaded file and re-exports what is public here.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

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
    proxy_protocol: bool = _key(
        "Open each connection to a node's CONNECT listener with a PROXY protocol v1 "
        "header naming the native client (nginx's proxy_protocol), so that the node's "
        "per-client limits and logs see the client, not the front. The nodes then need "
        "listen.connect_proxy_protocol = true and the fronts in http.trusted_proxies; a "
        "node without them refuses every connection (and one with them, a front "
        "without this).",
        True,
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


def unquotable(value: str) -> str | None:
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
    if spec.type is bool:
        ok = isinstance(raw, bool)
        return raw, None if ok else f"must be true or false, not {_type_name(raw)}"
    if not isinstance(raw, str):
        return raw, f"must be a string, not {_type_name(raw)}"
    return raw, unquotable(raw)


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


# --- documentation ----------------------------------------------------------------------


def render_markdown() -> str:
    """The reference of every key of the nodes file, for docs/front.md."""
    out = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for table, schema in _TABLES:
        for spec in key_specs(schema, table):
            kind = "seconds or string" if spec.duration else {
                str: "string", int: "integer", bool: "boolean"
            }[spec.type]
            if spec.required:
                default = "required"
            elif isinstance(spec.default, bool):
                default = f"`{str(spec.default).lower()}`"
            elif isinstance(spec.default, str):
                default = f'`"{spec.default}"`'
            else:
                default = f"`{spec.default}`"
            out.append(f"| `{table}.{spec.name}` | {kind} | {default} | {spec.doc} |")
    return "\n".join(out) + "\n"
