"""``console-broker front nginx``: the nginx configuration of a front door before many brokers.

Theory of operation. Each hypervisor runs a node broker; one public address (the
front door, nginx) routes ``/n/{node}/...`` to that node's broker with the prefix
stripped, over TLS that verifies the node's certificate and shows the front's client
certificate. Native clients' HTTP CONNECT cannot go through nginx's http module, so
each node's CONNECT listener gets a TCP port of its own on the front, in nginx's
stream module, forwarded over TLS with the same client certificate, after a PROXY
protocol header that names the client (``proxy_protocol``, unless turned off).

The node list is a TOML file (``nodes.toml``), read and checked by
:mod:`broker._frontnodes` (whose public names this module re-exports).
:func:`render_nginx` writes a standalone nginx.conf from it; every value it writes is
either checked to be a plain token (names, addresses, ports) or written as nginx reads
it back (:func:`_argument`). docs/front.md explains each directive.

The front names no protocol: it routes paths and bytes, whatever the node brokers'
plugins serve.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker._frontnodes import (
    DEBIAN_STREAM_MODULE,
    FrontDoor,
    FrontSettings,
    Node,
    NodesFileError,
    load_nodes,
    render_markdown,
    unquotable,
)
from broker.errors import EXIT_USAGE, CommandError

__all__ = [
    "DEBIAN_STREAM_MODULE",
    "FrontDoor",
    "FrontSettings",
    "Node",
    "NodesFileError",
    "load_nodes",
    "register",
    "render_markdown",
    "render_nginx",
]


# --- nginx.conf -------------------------------------------------------------------------


_BARE = re.compile(r"[A-Za-z0-9._/:@%+,=~-]+")


def _argument(value: str) -> str:
    """*value* as one nginx argument: as it is when it is plain (``/run/nginx.pid``:
    Debian's init script reads the pid file's name from nginx.conf unquoted), else in
    double quotes with ``\\`` and ``"`` escaped (nginx's parser undoes exactly these).
    The loader refused what cannot be quoted."""
    assert unquotable(value) is None, value
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
        # unbuffered, a node's bytes pass through one proxy_buffer_size buffer: 16k
        # (4k by default) halves nginx's CPU per GiB (docs/benchmarks.md); nginx then
        # wants proxy_buffers and proxy_busy_buffers_size to fit it
        conf("proxy_buffer_size", "16k")
        conf("proxy_buffers", "4", "16k")
        conf("proxy_busy_buffers_size", "16k")
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
        "verified)"
        + (
            ", after a PROXY protocol header naming the client (the nodes need "
            "listen.connect_proxy_protocol)."
            if front.proxy_protocol else "."
        )
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
            if front.proxy_protocol:
                conf("proxy_protocol", "on")


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
            "to its CONNECT listener (stream module; with a PROXY protocol header naming the "
            "client unless proxy_protocol = false). Every problem in FILE is reported at "
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
