"""``console-broker front nginx``: the nodes file, the nginx.conf it writes, and that
configuration in Debian's nginx, in front of real brokers on loopback.

The nginx tests need the ``nginx`` binary and its stream module (``scripts/setup-host``
installs them); without them they are skipped on a developer machine and fail under CI.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from certs import make_certificates
from servedbroker import ServedBroker, end_with_parent, free_port
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import broker._frontnodes
import broker.front
from broker.cli import main
from broker.front import (
    DEBIAN_STREAM_MODULE,
    NodesFileError,
    load_nodes,
    render_markdown,
    render_nginx,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

FRONT = """[front]
server_name = "console.example"
cert = "front.pem"
key = "front-key.pem"
node_ca = "nodes-ca.pem"
client_cert = "front-client.pem"
client_key = "front-client-key.pem"
"""
NODE1 = """[[node]]
name = "node1"
address = "10.0.1.1"
tls_name = "node1.example"
"""
NODE2 = """[[node]]
name = "node2"
address = "node2.example"
"""

# --- the generated text for a sample file ---------------------------------------------

SAMPLE = """[front]
server_name = "console.example"
listen = "[::]:8443"
cert = "tls/front.pem"
key = "tls/front-key.pem"
node_ca = "/etc/ssl/nodes-ca.pem"
client_cert = "tls/front-client.pem"
client_key = "tls/front-client-key.pem"
connect_host = "192.0.2.10"
connect_timeout = "1m"
session_timeout = "12h"
worker_processes = 4
worker_connections = 4096
user = "nginx"
pid = "run/nginx.pid"
error_log = "stderr"
access_log = "log/access.log"
temp_dir = "/var/cache/front"

[[node]]
name = "node1"
address = "10.0.1.1"
tls_name = "node1.example"
connect_port = 6081
front_connect_port = 7001

[[node]]
name = "hv-2"
address = "hv2.example"
port = 7443
"""

EXPECTED = r"""# The console front door's nginx configuration, written by
#     console-broker front nginx --nodes DIR/nodes.toml
# Do not edit it: change the nodes file and write it again (docs/front.md
# explains every directive).

load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user nginx;
worker_processes 4;
worker_rlimit_nofile 8192;
pid DIR/run/nginx.pid;
error_log stderr;

events {
    worker_connections 4096;
}

http {
    server_tokens off;
    default_type application/octet-stream;
    log_format console_front escape=default
        '$remote_addr [$time_local] "$request_method $uri $server_protocol" '
        '$status $body_bytes_sent $request_time $upstream_addr "$http_user_agent"';
    access_log DIR/log/access.log console_front;
    client_body_temp_path /var/cache/front/client_body;
    proxy_temp_path /var/cache/front/proxy;
    fastcgi_temp_path /var/cache/front/fastcgi;
    uwsgi_temp_path /var/cache/front/uwsgi;
    scgi_temp_path /var/cache/front/scgi;

    # WebSocket upgrades pass on; other requests close their node connection.
    map $http_upgrade $connection_upgrade {
        default upgrade;
        "" close;
    }

    upstream node_node1 {
        server 10.0.1.1:6080;
    }

    upstream node_hv-2 {
        server hv2.example:7443;
    }

    server {
        listen [::]:8443 ssl;
        server_name console.example;
        ssl_certificate DIR/tls/front.pem;
        ssl_certificate_key DIR/tls/front-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:console_front:10m;
        absolute_redirect off;

        # To the node brokers (every node's location inherits these): HTTP/1.1 with the
        # upgrade headers, the client's address, nothing buffered, long timeouts, never
        # a retry, TLS verifying the node and showing the front's certificate.
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto https;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_buffer_size 16k;
        proxy_buffers 4 16k;
        proxy_busy_buffers_size 16k;
        proxy_connect_timeout 60s;
        proxy_read_timeout 43200s;
        proxy_send_timeout 43200s;
        proxy_socket_keepalive on;
        proxy_next_upstream off;
        proxy_ssl_certificate DIR/tls/front-client.pem;
        proxy_ssl_certificate_key DIR/tls/front-client-key.pem;
        proxy_ssl_trusted_certificate /etc/ssl/nodes-ca.pem;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;

        # The front's own health, for load balancers.
        location = /healthz {
            access_log off;
            default_type text/plain;
            add_header Cache-Control no-store always;
            add_header X-Content-Type-Options nosniff always;
            return 200 "ok\n";
        }

        # node node1: 10.0.1.1:6080
        location ^~ /n/node1/ {
            proxy_pass https://node_node1/;
            proxy_ssl_name node1.example;
            error_page 502 504 @node1_down;
        }
        location = /n/node1 {
            return 301 /n/node1/$is_args$args;
        }
        location @node1_down {
            default_type text/plain;
            add_header Cache-Control no-store always;
            add_header X-Content-Type-Options nosniff always;
            return 502 "console node node1 is not answering\n";
        }

        # node hv-2: hv2.example:7443
        location ^~ /n/hv-2/ {
            proxy_pass https://node_hv-2/;
            proxy_ssl_name hv2.example;
            error_page 502 504 @hv-2_down;
        }
        location = /n/hv-2 {
            return 301 /n/hv-2/$is_args$args;
        }
        location @hv-2_down {
            default_type text/plain;
            add_header Cache-Control no-store always;
            add_header X-Content-Type-Options nosniff always;
            return 502 "console node hv-2 is not answering\n";
        }

        # Anything else: no such node (a name is echoed only if it could be one).
        location ~ "^/n/(?<front_node>[a-z0-9-]{1,63})(?:/|$)" {
            default_type text/plain;
            add_header Cache-Control no-store always;
            add_header X-Content-Type-Options nosniff always;
            return 404 "no console node named $front_node\n";
        }
        location / {
            default_type text/plain;
            add_header Cache-Control no-store always;
            add_header X-Content-Type-Options nosniff always;
            return 404 "no console node here: console nodes are at /n/NAME/\n";
        }
    }
}

stream {
    # Native clients' HTTP CONNECT: one front port per node, its bytes passed to the
    # node's CONNECT listener over TLS (the front's client certificate, the node's
    # verified), after a PROXY protocol header naming the client (the nodes need
    # listen.connect_proxy_protocol).
    log_format console_front_connect
        '$remote_addr [$time_local] connect $server_port to $upstream_addr '
        '$status $bytes_received $bytes_sent $session_time';
    access_log DIR/log/access.log console_front_connect;
    proxy_connect_timeout 60s;
    proxy_timeout 43200s;
    proxy_socket_keepalive on;
    proxy_ssl on;
    proxy_ssl_certificate DIR/tls/front-client.pem;
    proxy_ssl_certificate_key DIR/tls/front-client-key.pem;
    proxy_ssl_trusted_certificate /etc/ssl/nodes-ca.pem;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;

    server {
        listen 192.0.2.10:7001;
        proxy_pass 10.0.1.1:6081;
        proxy_ssl_name node1.example;
        proxy_protocol on;
    }
}
"""


def write_nodes(directory: Path, text: str) -> Path:
    path = directory / "nodes.toml"
    path.write_text(text)
    return path


def test_the_sample_file(tmp_path: Path) -> None:
    door = load_nodes(write_nodes(tmp_path, SAMPLE))
    assert render_nginx(door).replace(str(tmp_path), "DIR") == EXPECTED


def test_defaults(tmp_path: Path) -> None:
    """A file with only the required keys: Debian's paths and user, a worker per CPU,
    8192 connections each and twice as many descriptors, 24 h sessions; without a
    connect_port, no stream block and no stream module."""
    door = load_nodes(write_nodes(tmp_path, FRONT + NODE1 + NODE2))
    front = door.front
    assert (front.listen, front.connect_host, front.user) == ("0.0.0.0:443", "0.0.0.0", "www-data")
    assert (front.connect_timeout, front.session_timeout) == (10, 86400)
    assert [node.port for node in door.nodes] == [6080, 6080]
    assert door.nodes[1].verify_name == "node2.example"  # tls_name: the address
    text = render_nginx(door)
    for line in (
        "user www-data;",
        "worker_processes auto;",
        "worker_rlimit_nofile 16384;",
        "pid /run/nginx.pid;",
        "error_log /var/log/nginx/error.log;",
        "    worker_connections 8192;",
        "    access_log /var/log/nginx/access.log console_front;",
        "        proxy_read_timeout 86400s;",
        "        proxy_connect_timeout 10s;",
        f"        ssl_certificate {tmp_path}/front.pem;",
        "        listen 0.0.0.0:443 ssl;",
        "            proxy_ssl_name node2.example;",
    ):
        assert f"\n{line}\n" in text
    assert "load_module" not in text and "stream {" not in text and "_temp_path" not in text
    # Debian's /etc/init.d/nginx finds the pid file like this (signals, log rotation).
    uncommented = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    found = subprocess.run(
        ["awk", 'BEGIN { RS="[;{}]" } { if ($1 == "pid") print $2 }'],
        input=uncommented, capture_output=True, text=True, check=True,
    ).stdout
    assert found.split() == ["/run/nginx.pid"]


def test_stream_module_built_in_and_no_access_log(tmp_path: Path) -> None:
    node = NODE1 + "connect_port = 6081\nfront_connect_port = 7001\n"
    extra = 'stream_module = ""\naccess_log = ""\nuser = ""\n'
    text = render_nginx(load_nodes(write_nodes(tmp_path, FRONT + extra + node)))
    assert "load_module" not in text and "\nstream {\n" in text
    assert "\nuser " not in text
    assert "    access_log off;\n" in text and "console_front_connect" not in text


def test_the_proxy_protocol_header_can_be_turned_off(tmp_path: Path) -> None:
    """proxy_protocol = true (the default) writes ``proxy_protocol on;`` in every stream
    server; false, nowhere (the nodes then see the front as every native client)."""
    nodes = (NODE1 + "connect_port = 6081\nfront_connect_port = 7001\n"
             + NODE2 + "connect_port = 6081\nfront_connect_port = 7002\n")
    door = load_nodes(write_nodes(tmp_path, FRONT + nodes))
    assert door.front.proxy_protocol is True
    assert render_nginx(door).count("        proxy_protocol on;\n") == 2
    door = load_nodes(write_nodes(tmp_path, FRONT + "proxy_protocol = false\n" + nodes))
    text = render_nginx(door)
    assert "proxy_protocol on" not in text and "PROXY" not in text


def test_paths_and_durations(tmp_path: Path) -> None:
    """Relative paths are taken from the nodes file's directory, absolute ones kept;
    durations take seconds or a unit."""
    extra = (
        'pid = "/run/front.pid"\nerror_log = "logs/error.log"\n'
        'stream_module = "modules/stream.so"\nsession_timeout = 3600\nconnect_timeout = "5s"\n'
    )
    door = load_nodes(write_nodes(tmp_path, FRONT + extra + NODE1))
    front = door.front
    assert front.cert == str(tmp_path / "front.pem")
    assert front.pid == "/run/front.pid"
    assert front.error_log == str(tmp_path / "logs" / "error.log")
    assert front.stream_module == str(tmp_path / "modules" / "stream.so")
    assert (front.session_timeout, front.connect_timeout) == (3600, 5)
    for text, seconds in (("90m", 5400), ("2d", 172800), (" 30 ", 30), ("45s", 45)):
        door = load_nodes(write_nodes(tmp_path, FRONT + f'session_timeout = "{text}"\n' + NODE1))
        assert door.front.session_timeout == seconds


def test_quoting(tmp_path: Path) -> None:
    """A file name with a space, a quote or a backslash is written in quotes, escaped as
    nginx's parser reads it back."""
    text = render_nginx(
        load_nodes(write_nodes(tmp_path, FRONT.replace('"front.pem"', r'"/a b/\"c\\d.pem"')
                               + NODE1))
    )
    assert '        ssl_certificate "/a b/\\"c\\\\d.pem";\n' in text


def test_the_front_names_no_protocol() -> None:
    """The front is core code: it routes paths and bytes, whatever the plugins serve."""
    for module in (broker.front, broker._frontnodes):
        source = Path(module.__file__ or "").read_text().lower()
        assert not re.search(r"\b(vnc|spice|serial|rfb|novnc|xterm)\b", source), module


# --- every problem, at once -------------------------------------------------------------

#: (what is added to [front], the [[node]] tables, the problem reported)
PROBLEMS = [
    ("bogus = 1\n", NODE1,
     "front.bogus: unknown key (front has: server_name, listen, cert, key, node_ca, "
     "client_cert, client_key, connect_host, connect_timeout, session_timeout, "
     "worker_processes, worker_connections, user, pid, error_log, access_log, temp_dir, "
     "stream_module, proxy_protocol)"),
    ("listen = 443\n", NODE1, "front.listen: must be a string, not an integer"),
    ('listen = "console.example:443"\n', NODE1, "front.listen: must be IP:PORT or [IPv6]:PORT"),
    ('listen = "::1:443"\n', NODE1, "front.listen: must be IP:PORT or [IPv6]:PORT"),
    ('listen = "[10.0.0.1]:443"\n', NODE1, "front.listen: must be IP:PORT or [IPv6]:PORT"),
    ('listen = "0.0.0.0:70000"\n', NODE1, "front.listen: must be a TCP port (1-65535)"),
    ('listen = "0.0.0.0:443 ssl"\n', NODE1, "front.listen: must be IP:PORT or [IPv6]:PORT"),
    ('connect_host = "localhost"\n', NODE1, "front.connect_host: must be an IP address"),
    ('session_timeout = "1 week"\n', NODE1,
     'front.session_timeout: must be seconds or a number with a unit: s, m, h or d'),
    ("session_timeout = 0\n", NODE1, "front.session_timeout: must be at least 1"),
    ("connect_timeout = true\n", NODE1,
     'front.connect_timeout: must be an integer (seconds) or a string ("24h"), not a boolean'),
    ("worker_connections = 10\n", NODE1, "front.worker_connections: must be at least 64"),
    ("worker_connections = 1.5\n", NODE1,
     "front.worker_connections: must be an integer, not a float"),
    ("worker_processes = -1\n", NODE1, "front.worker_processes: must be at least 0"),
    ("proxy_protocol = 1\n", NODE1, "front.proxy_protocol: must be true or false, not an "
     "integer"),
    ('proxy_protocol = "on"\n', NODE1, "front.proxy_protocol: must be true or false, not a "
     "string"),
    ('user = "Root!"\n', NODE1, "front.user: must be a user name"),
    ('temp_dir = ["a"]\n', NODE1, "front.temp_dir: must be a string, not an array"),
    ('pid = ""\n', NODE1, "front.pid: must not be empty"),
    ('access_log = "/var/log/$host.log"\n', NODE1,
     "front.access_log: must not hold '$' (nginx would read a variable)"),
    ('error_log = "/var/log/a\\nb"\n', NODE1, "front.error_log: must not hold control characters"),
    ("", NODE1 + "colour = 1\n",
     "node[1].colour: unknown key (node has: name, address, port, tls_name, connect_port, "
     "front_connect_port)"),
    ("", NODE1.replace('"node1"', '"Node1"'), "node[1].name: must be 1 to 63 lower-case"),
    ("", NODE1.replace('"node1"', '"node1-"'), "node[1].name: must be 1 to 63 lower-case"),
    ("", NODE1.replace('"node1"', '"n/1"'), "node[1].name: must be 1 to 63 lower-case"),
    ("", NODE1.replace('name = "node1"\n', ""), "node[1].name: required key missing"),
    ("", NODE1 + NODE1.replace("10.0.1.1", "10.0.1.2"),
     "node[2].name: 'node1' is also node[1]'s"),
    ("", NODE1.replace('"10.0.1.1"', '"10.0.1.1/24"'),
     "node[1].address: must be an IP address or a DNS name"),
    ("", NODE1.replace('"10.0.1.1"', '"a b"'),
     "node[1].address: must be an IP address or a DNS name"),
    ("", NODE1 + "port = 0\n", "node[1].port: must be a TCP port (1-65535)"),
    ("", NODE1 + 'port = "6080"\n', "node[1].port: must be an integer, not a string"),
    ("", NODE1.replace('tls_name = "node1.example"\n', ""),
     "node[1].tls_name: required when address is an IP address: nginx verifies a node's "
     "certificate by DNS name only"),
    ("", NODE1.replace('"node1.example"', '"10.0.1.1"'),
     "node[1].tls_name: must be a DNS name"),
    ("", NODE1 + "connect_port = 6081\n",
     "node[1].connect_port, node[1].front_connect_port: set both"),
    ("", NODE1 + "front_connect_port = 7001\n",
     "node[1].connect_port, node[1].front_connect_port: set both"),
    ("", NODE1 + "connect_port = 6081\nfront_connect_port = 443\n",
     "node[1].front_connect_port: 443 is front.listen's port"),
    ("", NODE1 + "connect_port = 6081\nfront_connect_port = 7001\n"
     + NODE2 + "connect_port = 6081\nfront_connect_port = 7001\n",
     "node[2].front_connect_port: 7001 is also node[1]'s"),
    ("", NODE1 + NODE2.replace('"node2.example"', '"10.0.1.1"') + 'tls_name = "n.example"\n',
     "node[2].address, node[2].port: the same broker as node[1] (one broker is one node)"),
    ("", "", "node: no [[node]] table: name at least one node"),
    ("", '[node]\nname = "node1"\n', "node: must be an array of tables ([[node]]), not a table"),
]


@pytest.mark.parametrize(("front", "nodes", "problem"), PROBLEMS)
def test_problems(tmp_path: Path, front: str, nodes: str, problem: str) -> None:
    path = write_nodes(tmp_path, FRONT + front + nodes)
    with pytest.raises(NodesFileError) as raised:
        load_nodes(path)
    assert [p for p in raised.value.problems if p.startswith(f"{path}: {problem}")], (
        raised.value.problems
    )
    assert len(raised.value.problems) == 1, raised.value.problems


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (NODE1, "front: the [front] table is missing"),
        ("front = 1\n" + NODE1, "front: must be a table ([front]), not an integer"),
        (FRONT.replace('cert = "front.pem"\n', "") + NODE1, "front.cert: required key missing"),
        (FRONT + NODE1 + "[nodes]\n", "nodes: unknown key (the file has: [front], [[node]])"),
        ("[front\n", "not valid TOML: "),
    ],
)
def test_file_problems(tmp_path: Path, text: str, problem: str) -> None:
    path = write_nodes(tmp_path, text)
    with pytest.raises(NodesFileError) as raised:
        load_nodes(path)
    assert raised.value.problems[0].startswith(f"{path}: {problem}"), raised.value.problems


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NodesFileError, match="cannot read the nodes file: No such file"):
        load_nodes(tmp_path / "nothing.toml")
    path = tmp_path / "nodes.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(NodesFileError, match=r"nodes\.toml: not UTF-8 text"):
        load_nodes(path)


def test_every_problem_at_once_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = FRONT + "listen = 443\nbogus = true\n" + NODE1 + "port = 0\n" + NODE1
    path = write_nodes(tmp_path, text)
    status = main(["front", "nginx", "--nodes", str(path)])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"console-broker: error: {path}: front.listen: must be a string, not an integer",
        f"{path}: front.bogus: unknown key (front has: server_name, listen, cert, key, "
        "node_ca, client_cert, client_key, connect_host, connect_timeout, session_timeout, "
        "worker_processes, worker_connections, user, pid, error_log, access_log, temp_dir, "
        "stream_module, proxy_protocol)",
        f"{path}: node[1].port: must be a TCP port (1-65535)",
        f"{path}: node[2].name: 'node1' is also node[1]'s",
    ]


# --- the command ------------------------------------------------------------------------


def test_stdout_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_nodes(tmp_path, FRONT + NODE1)
    assert main(["front", "nginx", "--nodes", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed == render_nginx(load_nodes(path))
    output = tmp_path / "nginx.conf"
    output.write_text("old")
    assert main(["front", "nginx", "--nodes", str(path), "--output", str(output)]) == 0
    assert capsys.readouterr().out == ""
    assert output.read_text() == printed
    assert output.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nginx.conf", "nodes.toml"]


def test_output_into_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_nodes(tmp_path, FRONT + NODE1)
    output = tmp_path / "no" / "nginx.conf"
    assert main(["front", "nginx", "--nodes", str(path), "-o", str(output)]) == 1
    assert f"console-broker: error: cannot write {output}: No such file" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["front", "nginx", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--nodes FILE", "--output FILE", "[[node]]", "docs/front.md",
                  "nginx -s reload", "X-Forwarded-For", "atomically"):
        assert words in text
    with pytest.raises(SystemExit) as exit_info:
        main(["front"])
    assert exit_info.value.code == 2


def test_the_key_reference_in_docs_is_current() -> None:
    begin = "<!-- BEGIN GENERATED: broker.front.render_markdown() -->\n"
    text = (DOCS / "front.md").read_text()
    assert begin in text, "docs/front.md lacks its generated key reference"
    table = text.split(begin, 1)[1].split("<!-- END GENERATED -->", 1)[0]
    assert table == render_markdown(), (
        "docs/front.md is out of date: paste broker.front.render_markdown() between its "
        "GENERATED markers"
    )


# --- real nginx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx() -> str:
    if NGINX is None or not Path(DEBIAN_STREAM_MODULE).exists():
        if os.environ.get("CI"):
            pytest.fail("nginx and libnginx-mod-stream are required when CI is set "
                        "(scripts/setup-host installs them)", pytrace=False)
        pytest.skip("no nginx with the stream module here (scripts/setup-host installs it)")
    return NGINX


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CA: the front's certificate (127.0.0.1), the nodes' (node1.test, ...), and the
    front's client certificate (CN=client)."""
    return make_certificates(
        tmp_path_factory.mktemp("certs"),
        names=("127.0.0.1", "node1.test", "node2.test", "node3.test", "echo.test"),
        client=True,
    )


def front_file(directory: Path, certs: dict[str, Path], nodes: str, port: int) -> Path:
    """A nodes file for a front on 127.0.0.1:*port*, its pid, logs and temporary files in
    *directory*, one worker, running as whoever runs the tests."""
    (directory / "temp").mkdir(exist_ok=True)
    return write_nodes(
        directory,
        f"""[front]
server_name = "localhost"
listen = "127.0.0.1:{port}"
cert = "{certs["server"]}"
key = "{certs["server-key"]}"
node_ca = "{certs["ca"]}"
client_cert = "{certs["client"]}"
client_key = "{certs["client-key"]}"
connect_host = "127.0.0.1"
user = ""
worker_processes = 1
worker_connections = 256
pid = "nginx.pid"
error_log = "error.log"
access_log = "access.log"
temp_dir = "temp"
{nodes}""",
    )


def test_nginx_accepts_the_configuration(
    nginx: str, tmp_path: Path, certs: dict[str, Path]
) -> None:
    """``nginx -t`` on the sample's shape, in a directory whose name has a space."""
    directory = tmp_path / "front door"
    directory.mkdir()
    nodes = (
        NODE1.replace("10.0.1.1", "127.0.0.1") + "connect_port = 6081\nfront_connect_port = "
        f"{free_port()}\n" + NODE2.replace("node2.example", "localhost")
        + 'tls_name = "node2.test"\n'
    )
    conf = directory / "nginx.conf"
    path = front_file(directory, certs, nodes, free_port())
    assert main(["front", "nginx", "--nodes", str(path), "--output", str(conf)]) == 0
    done = subprocess.run(
        [nginx, "-t", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


class Nginx:
    """``nginx -g 'daemon off;'`` with a configuration written from *nodes*; SIGTERM
    if the test process dies first."""

    def __init__(
        self, binary: str, directory: Path, certs: dict[str, Path], nodes: str
    ) -> None:
        self.binary, self.directory, self.certs = binary, directory, certs
        self.port = free_port()
        self.conf = directory / "nginx.conf"
        self.write(nodes)
        self.process = subprocess.Popen(
            [binary, "-p", str(directory), "-e", str(directory / "error.log"),
             "-c", str(self.conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=end_with_parent,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nginx did not come up:\n{self.error_log()}")
            time.sleep(0.05)

    def write(self, nodes: str) -> None:
        path = front_file(self.directory, self.certs, nodes, self.port)
        assert main(["front", "nginx", "--nodes", str(path), "--output", str(self.conf)]) == 0

    def reload(self, nodes: str) -> None:
        """Write the configuration for *nodes* and ``nginx -s reload``."""
        self.write(nodes)
        subprocess.run(
            [self.binary, "-p", str(self.directory), "-e", str(self.directory / "error.log"),
             "-c", str(self.conf), "-s", "reload"],
            check=True, capture_output=True, timeout=30,
        )

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs["ca"]))

    def get(
        self, path: str, headers: dict[str, str] | None = None, source: str = "127.0.0.2"
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """GET *path* from the front (its certificate verified), from address *source*."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(), timeout=10,
            source_address=(source, 0),
        )
        try:
            connection.request("GET", path, headers=headers or {})
            reply = connection.getresponse()
            return reply.status, reply.headers, reply.read()
        finally:
            connection.close()

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        return (self.directory / "access.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def logged(front: Nginx, found: Callable[[str], object], timeout: float = 10) -> None:
    """Wait until the front's access log has what *found* looks for (nginx writes a
    line once the request or session has ended, after the client got its answer)."""
    deadline = time.monotonic() + timeout
    while not found(front.access_log()):
        assert time.monotonic() < deadline, front.access_log()
        time.sleep(0.05)


def node_table(name: str, port: int, **extra: Any) -> str:
    lines = [f'[[node]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {port}\n'
             f'tls_name = "{name}.test"\n']
    lines += [f"{key} = {value}\n" for key, value in extra.items()]
    return "".join(lines)


# --- in front of real brokers -----------------------------------------------------------

#: Looks like a token (a JWS), verifies as none.
FAKE_TOKEN = "eyJhbGciOiJFZERTQSIsImtpZCI6ImZyb250In0.eyJzdWIiOiJmcm9udCJ9.c2lnbmF0dXJl"


class Cluster:
    """Three node brokers (TLS, libvirt's test driver) behind the front: node1 trusts
    the front's X-Forwarded-For, node2 does not, node3 is there to be stopped."""

    def __init__(self, binary: str, directory: Path, certs: dict[str, Path]) -> None:
        tls = {"server": certs["server"], "server-key": certs["server-key"], "ca": certs["ca"]}
        libvirt = '[libvirt]\nuri = "test:///default"\n'
        self.brokers: dict[str, ServedBroker] = {}
        for name, http_config in (
            ("node1", 'trusted_proxies = ["127.0.0.1"]\n'), ("node2", ""), ("node3", ""),
        ):
            (directory / name).mkdir()
            self.brokers[name] = ServedBroker(
                directory / name, tls=tls, http_config=http_config, extra_config=libvirt
            )
        (directory / "front").mkdir()
        nodes = "".join(node_table(name, b.port) for name, b in self.brokers.items())
        self.front = Nginx(binary, directory / "front", certs, nodes)

    def stop(self) -> None:
        self.front.stop()
        for served in self.brokers.values():
            served.stop()


@pytest.fixture(scope="module")
def cluster(
    nginx: str, tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]
) -> Iterator[Cluster]:
    running = Cluster(nginx, tmp_path_factory.mktemp("cluster"), certs)
    try:
        yield running
    finally:
        running.stop()


def requested(served: ServedBroker, path: str) -> list[dict[str, Any]]:
    return [event for event in served.events("http.request") if event["path"] == path]


def test_each_node_path_reaches_its_broker(cluster: Cluster) -> None:
    for name in ("node1", "node2"):
        status, _, body = cluster.front.get(f"/n/{name}/healthz")
        assert status == 200
        assert json.loads(body)["status"] == "ok"
        # The broker's own 404 for a path only this test asks for, in that node's log only.
        status, headers, body = cluster.front.get(f"/n/{name}/probe-{name}")
        assert (status, body) == (404, b"not found\n")
        assert headers["Referrer-Policy"] == "no-referrer"  # the broker's answer
        for other, served in cluster.brokers.items():
            assert bool(requested(served, f"/probe-{name}")) == (other == name)


def test_the_front_health(cluster: Cluster) -> None:
    status, headers, body = cluster.front.get("/healthz")
    assert (status, body, headers["Content-Type"]) == (200, b"ok\n", "text/plain")


def test_a_node_path_without_its_slash_redirects(cluster: Cluster) -> None:
    status, headers, _ = cluster.front.get("/n/node1")
    assert (status, headers["Location"]) == (301, "/n/node1/")
    status, headers, _ = cluster.front.get("/n/node2?a=b")
    assert (status, headers["Location"]) == (301, "/n/node2/?a=b")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/n/nosuch/healthz", b"no console node named nosuch\n"),
        ("/n/node9", b"no console node named node9\n"),
        ("/n/node1x/", b"no console node named node1x\n"),
        ("/elsewhere", b"no console node here: console nodes are at /n/NAME/\n"),
        ("/n/", b"no console node here: console nodes are at /n/NAME/\n"),
        ("/n/%3Cscript%3Ealert(1)%3C%2Fscript%3E/",
         b"no console node here: console nodes are at /n/NAME/\n"),
        ("/n/NODE1/healthz", b"no console node here: console nodes are at /n/NAME/\n"),
    ],
)
def test_an_unknown_node_is_a_clear_404(cluster: Cluster, path: str, body: bytes) -> None:
    status, headers, answer = cluster.front.get(path)
    assert (status, answer) == (404, body)
    assert headers["Content-Type"] == "text/plain"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_a_stopped_node_is_a_502_naming_it(cluster: Cluster) -> None:
    cluster.brokers["node3"].stop()
    status, headers, body = cluster.front.get("/n/node3/healthz")
    assert (status, body) == (502, b"console node node3 is not answering\n")
    assert headers["Content-Type"] == "text/plain"
    assert cluster.front.get("/n/node1/healthz")[0] == 200


def test_a_websocket_upgrade_reaches_the_token_check(cluster: Cluster) -> None:
    """The upgrade headers pass: the broker checks the token and refuses it with its own
    status and text, which nginx passes on; the access log holds no token."""
    url = f"wss://127.0.0.1:{cluster.front.port}/n/node1/ws/vnc?token={FAKE_TOKEN}"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, ssl=cluster.front.context(), proxy=None, open_timeout=10,
                source_address=("127.0.0.2", 0))
    assert refused.value.response.status_code == 401
    assert refused.value.response.body == b"invalid token\n"
    node1 = cluster.brokers["node1"]
    refusals = node1.events("request.refused")
    assert refusals and refusals[-1]["reason"] == "invalid_token"
    assert refusals[-1]["client"] == "127.0.0.2"  # X-Forwarded-For, believed
    logged(cluster.front, lambda text: "/n/node1/ws/vnc" in text)
    assert FAKE_TOKEN not in cluster.front.access_log()
    node1.assert_no_token_logged(FAKE_TOKEN)


def test_the_brokers_see_the_client_address(cluster: Cluster) -> None:
    """node1 trusts 127.0.0.1 (the front) and logs the client's own address, not what
    the client wrote into X-Forwarded-For; node2 trusts nobody and logs the front's."""
    forged = {"X-Forwarded-For": "203.0.113.9"}
    for name in ("node1", "node2"):
        assert cluster.front.get(f"/n/{name}/xff-{name}", headers=forged)[0] == 404
    assert [e["client"] for e in requested(cluster.brokers["node1"], "/xff-node1")] == [
        "127.0.0.2"
    ]
    assert [e["client"] for e in requested(cluster.brokers["node2"], "/xff-node2")] == [
        "127.0.0.1"
    ]


class RelayedNode(ServedBroker):
    """A node broker whose CONNECT listener speaks TLS requiring the front's client
    certificate and reads the front's PROXY headers (127.0.0.1 trusted); its own
    requests show the front's certificate."""

    def __init__(self, directory: Path, certs: dict[str, Path]) -> None:
        self.certs = certs
        tls = (
            f'[tls]\ncert = "{certs["server"]}"\nkey = "{certs["server-key"]}"\n'
            f'client_ca = "{certs["ca"]}"\n[libvirt]\nuri = "test:///default"\n'
        )
        super().__init__(
            directory, protocol="vnc", connect_port=True, extra_config=tls,
            listen_config="connect_proxy_protocol = true\n",
            http_config='trusted_proxies = ["127.0.0.1"]\n',
        )

    def get(self, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.certs["ca"]))
        context.check_hostname = False
        context.load_cert_chain(self.certs["client"], self.certs["client-key"])
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context,
                                                 timeout=5)
        try:
            connection.request("GET", path)
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()


def test_a_connect_port_brings_the_client_address_to_a_broker(
    nginx: str, tmp_path: Path, certs: dict[str, Path]
) -> None:
    """The generated stream server in front of a real node broker: the PROXY header
    before the front's TLS, then the client's CONNECT; the broker answers its own
    refusal through the front and logs the client's address, not the front's."""
    (tmp_path / "node").mkdir()
    (tmp_path / "front").mkdir()
    node = RelayedNode(tmp_path / "node", certs)
    assert node.connect_port is not None
    front_port = free_port()
    front = Nginx(nginx, tmp_path / "front", certs, node_table(
        "node1", node.port, connect_port=node.connect_port, front_connect_port=front_port))
    try:
        with socket.create_connection(("127.0.0.1", front_port), timeout=10,
                                      source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(b"CONNECT not-a-handle:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        deadline = time.monotonic() + 10
        while not [e for e in node.events("request.refused") if e.get("route") == "connect"]:
            assert time.monotonic() < deadline, node.log_text()[-3000:]
            time.sleep(0.05)
        refused = [e for e in node.events("request.refused") if e.get("route") == "connect"]
        assert refused[-1]["client"] == "127.0.0.2"
        assert not node.events("connect.proxy_refused")
    finally:
        front.stop()
        node.stop()


# --- what the front sends: a node that shows it -----------------------------------------


class EchoNode:
    """A TLS node on loopback that requires the front's client certificate: an HTTPS
    server answering each request with what it got (path, headers, the client
    certificate's subject, the SNI name), and a byte echo standing in for a CONNECT
    listener: it reads the PROXY protocol header in the clear, then speaks TLS, sends the
    header back and the client certificate's subject, and echoes."""

    def __init__(self, certs: dict[str, Path]) -> None:
        self.server_names: list[str | None] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs["ca"]))
        context.load_cert_chain(str(certs["server"]), str(certs["server-key"]))
        context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = self._sni
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                assert isinstance(self.connection, ssl.SSLSocket)
                body = json.dumps({
                    "path": self.path,
                    "headers": [[k.lower(), v] for k, v in self.headers.items()],
                    "subject": _subject(self.connection),
                    "sni": node.server_names[-1] if node.server_names else None,
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Echo(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                header = b""  # byte by byte: nothing of the TLS handshake is read here
                while not header.endswith(b"\r\n") and len(header) < 107:
                    data = self.request.recv(1)
                    if not data:
                        return
                    header += data
                with context.wrap_socket(self.request, server_side=True) as tls:
                    tls.sendall(header + f"subject={_subject(tls)}\n".encode())
                    while data := tls.recv(65536):
                        tls.sendall(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
        self.echo.daemon_threads = True
        self.threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
            for server in (self.http, self.echo)
        ]
        for thread in self.threads:
            thread.start()

    def _sni(self, _sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        self.server_names.append(name)

    @property
    def http_port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def echo_port(self) -> int:
        return int(self.echo.server_address[1])

    def close(self) -> None:
        for server in (self.http, self.echo):
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join()


def _subject(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert() or {}
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


@pytest.fixture
def echo_node(certs: dict[str, Path]) -> Iterator[EchoNode]:
    node = EchoNode(certs)
    try:
        yield node
    finally:
        node.close()


def echo_table(name: str, node: EchoNode, front_connect_port: int) -> str:
    return (
        f'[[node]]\nname = "{name}"\naddress = "127.0.0.1"\nport = {node.http_port}\n'
        f'tls_name = "echo.test"\nconnect_port = {node.echo_port}\n'
        f"front_connect_port = {front_connect_port}\n"
    )


@pytest.fixture
def echo_front(
    nginx: str, tmp_path: Path, certs: dict[str, Path], echo_node: EchoNode
) -> Iterator[tuple[Nginx, int]]:
    connect_port = free_port()
    front = Nginx(nginx, tmp_path, certs, echo_table("echo", echo_node, connect_port))
    try:
        yield front, connect_port
    finally:
        front.stop()


def test_what_a_node_gets(echo_front: tuple[Nginx, int]) -> None:
    """The prefix stripped, the query kept, the front's client certificate, the node's
    tls_name as SNI, X-Forwarded-For appended, X-Forwarded-Proto reset, Host, and the
    upgrade headers only for an upgrade."""
    front, _ = echo_front
    status, _, body = front.get(
        "/n/echo/console/page/?token=abc",
        headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"},
    )
    assert status == 200
    seen = json.loads(body)
    headers = dict(seen["headers"])
    assert seen["path"] == "/console/page/?token=abc"
    assert (seen["subject"], seen["sni"]) == ("commonName=client", "echo.test")
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.2"
    assert [v for k, v in seen["headers"] if k == "x-forwarded-proto"] == ["https"]
    assert headers["host"] == "127.0.0.1"
    assert headers["connection"] == "close" and "upgrade" not in headers
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    headers = dict(json.loads(front.get("/n/echo/ws/x", headers=upgrade)[2])["headers"])
    assert (headers["upgrade"], headers["connection"]) == ("websocket", "upgrade")


def tunnel(port: int) -> socket.socket:
    """A connection from 127.0.0.2 to a front CONNECT port, past the echo's greeting:
    the PROXY header nginx sent ahead of its TLS (the client's address and port, the
    front's), and the subject of the client certificate it showed in that TLS."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=("127.0.0.2", 0))
    greeting = b""
    while greeting.count(b"\n") < 2:
        data = sock.recv(1)
        assert data, greeting
        greeting += data
    client_port = sock.getsockname()[1]
    assert greeting == (
        f"PROXY TCP4 127.0.0.2 127.0.0.1 {client_port} {port}\r\n"
        "subject=commonName=client\n"
    ).encode()
    return sock


def echoed(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk
        got += chunk
    return got


def test_a_connect_port_reaches_its_node_over_tls(
    echo_front: tuple[Nginx, int], echo_node: EchoNode
) -> None:
    """Bytes on the front's port reach the node's CONNECT listener over TLS with the
    front's client certificate and the node's tls_name, after the PROXY header in the
    clear (nginx sends it before its TLS handshake), and come back."""
    front, port = echo_front
    with tunnel(port) as sock:
        request = b"CONNECT handle:443 HTTP/1.1\r\n\r\n" + os.urandom(100_000)
        assert echoed(sock, request) == request
    assert echo_node.server_names[-1] == "echo.test"
    # nginx logs a stream session once it has ended
    logged(front, lambda text: re.search(r"connect \d+ to 127\.0\.0\.1:\d+ 200", text))


def test_reload_with_another_node_list(
    echo_front: tuple[Nginx, int], echo_node: EchoNode, certs: dict[str, Path]
) -> None:
    """``nginx -s reload`` after writing the configuration again: the new node answers,
    and a tunnel opened before goes on (the old worker keeps its connections)."""
    front, port = echo_front
    second = EchoNode(certs)
    try:
        with tunnel(port) as sock:
            front.reload(echo_table("echo", echo_node, port)
                         + echo_table("again", second, free_port()))
            deadline = time.monotonic() + 20
            while front.get("/n/again/after-reload")[0] != 200:
                assert time.monotonic() < deadline, front.error_log()
                time.sleep(0.1)
            assert echoed(sock, b"still here") == b"still here"
    finally:
        second.close()
