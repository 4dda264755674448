"""A cluster on one machine: node brokers behind nginx front doors, in network namespaces.

The hosts (``console_broker_testbed.netns``):

* ``client`` on the public LAN only: it reaches the front hosts and nothing else;
* ``front1`` and ``front2`` on both LANs, each running Debian's nginx with the
  configuration ``console-broker front nginx`` generated from one node list;
* ``node1`` ... ``nodeN`` on the back LAN only, each running ``console-broker serve``
  with its own node name, certificate and configuration: TLS on both listeners, the
  front's client certificate required (``tls.client_ca``, ``tls.client_subjects``), the
  control plane's public key the only one trusted (``tokens.trust_local_key = false``),
  the fronts' X-Forwarded-For and PROXY protocol headers believed (``http.trusted_proxies``,
  ``listen.connect_proxy_protocol``: the generated stream servers send one ahead of each
  native client's connection), ``broker.public_url`` naming the front door.

The control plane is a key directory and the ``console-broker token`` command run with
it, the node's name and public URL, and a domain UUID: no libvirt, no broker config.

Certificates (``certs.make_certificates``): the front door's CA signs the certificate
clients see (``console.example``) and the client certificate the fronts show the nodes;
each node's own CA signs that node's server certificate, and the fronts trust those CAs.

Used by tests/cluster/test_cluster_vm.py and benchmarks/cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from certs import make_certificates
from console_broker_testbed.netns import Host, Network
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

CLI = [sys.executable, "-m", "broker.cli"]
NODE_MODULES = Path(__file__).resolve().parents[2] / "node_modules"
#: The public name of the front door.
PUBLIC_NAME = "console.example"
PUBLIC_ORIGIN = f"https://{PUBLIC_NAME}"
#: The subject of the client certificate the fronts show the node brokers.
FRONT_SUBJECT = "CN=client"
PUBLIC_LAN = "10.77.1.0/24"
BACK_LAN = "10.77.2.0/24"
NODE_PORT = 6080
NODE_CONNECT_PORT = 6081
#: The front's port for node *i*'s CONNECT listener is FRONT_CONNECT_BASE + i.
FRONT_CONNECT_BASE = 7000


class Node:
    """One node host running ``console-broker serve``."""

    def __init__(self, cluster: Cluster, index: int, host: Host, extra_config: str = "") -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.host = host
        self.directory = cluster.directory / self.name
        self.directory.mkdir()
        self.certs = make_certificates(self.directory / "tls", names=(host.address(), self.name))
        self.public_url = f"{PUBLIC_ORIGIN}/n/{self.name}"
        self.front_connect_port = FRONT_CONNECT_BASE + index
        self.config = self.directory / "broker.toml"
        address = host.address()
        self.config.write_text(
            f"""[broker]
node = "{self.name}"
state_dir = "state"
public_url = "{self.public_url}"
public_connect_url = "http://{PUBLIC_NAME}:{self.front_connect_port}"
[listen]
host = "{address}"
port = {NODE_PORT}
connect_host = "{address}"
connect_port = {NODE_CONNECT_PORT}
connect_proxy_protocol = true
[tls]
cert = "{self.certs['server']}"
key = "{self.certs['server-key']}"
ca = "{self.certs['ca']}"
client_ca = "{cluster.front_certs['ca']}"
client_subjects = ["{FRONT_SUBJECT}"]
[http]
trusted_proxies = ["{BACK_LAN}"]
assets_dir = "{NODE_MODULES}"
[tokens]
trust_local_key = false
public_keys = ["{cluster.control_plane_public_key}"]
[logging]
format = "json"
level = "debug"
{extra_config}
"""
        )
        self.log_path = self.directory / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = self.host.popen(
                [*CLI, "serve", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        process = self.process
        try:
            self.host.wait_for_port(self.host.address(), NODE_PORT,
                                    alive=lambda: process.poll() is None)
        except OSError:
            raise AssertionError(f"{self.name} did not come up:\n{self.log_text()}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found


class Front:
    """One front host running nginx with the generated configuration."""

    def __init__(self, cluster: Cluster, index: int, host: Host) -> None:
        self.cluster = cluster
        self.name = f"front{index}"
        self.host = host
        self.directory = cluster.directory / self.name
        self.directory.mkdir()
        self.config = self.directory / "nginx.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.host.address("public")

    def write_config(self, nodes: list[Node]) -> None:
        """Generate this front's nginx.conf from a node list naming *nodes*."""
        listen = self.host.address("public")
        lines = [
            "[front]",
            f'server_name = "{PUBLIC_NAME}"',
            f'listen = "{listen}:443"',
            f'cert = "{self.cluster.front_certs["server"]}"',
            f'key = "{self.cluster.front_certs["server-key"]}"',
            f'node_ca = "{self.cluster.node_ca_bundle}"',
            f'client_cert = "{self.cluster.front_certs["client"]}"',
            f'client_key = "{self.cluster.front_certs["client-key"]}"',
            f'connect_host = "{listen}"',
            f'pid = "{self.directory / "nginx.pid"}"',
            f'error_log = "{self.directory / "error.log"}"',
            f'access_log = "{self.directory / "access.log"}"',
        ]
        for node in nodes:
            lines += [
                "",
                "[[node]]",
                f'name = "{node.name}"',
                f'address = "{node.host.address()}"',
                f"port = {NODE_PORT}",
                f'tls_name = "{node.name}"',
                f"connect_port = {NODE_CONNECT_PORT}",
                f"front_connect_port = {node.front_connect_port}",
            ]
        nodes_file = self.directory / "nodes.toml"
        nodes_file.write_text("\n".join(lines) + "\n")
        subprocess.run(
            [*CLI, "front", "nginx", "--nodes", str(nodes_file), "--output", str(self.config)],
            check=True, capture_output=True, text=True,
        )

    def start(self) -> None:
        with (self.directory / "nginx.out").open("ab") as log:
            self.process = self.host.popen(
                ["nginx", "-c", str(self.config), "-g", "daemon off;"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        process = self.process
        try:
            self.host.wait_for_port(self.address, 443, alive=lambda: process.poll() is None)
        except OSError:
            log_text = (self.directory / "error.log").read_text(errors="replace") if (
                self.directory / "error.log").exists() else ""
            raise AssertionError(f"{self.name}'s nginx did not come up:\n{log_text}") from None

    def stop(self) -> None:
        """End nginx (SIGQUIT: a graceful shutdown) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """End nginx at once (SIGKILL to the master, then its workers)."""
        deadline = time.monotonic() + 10
        while pids := self.host.pids():
            assert time.monotonic() < deadline, f"{self.name}: {pids} outlived SIGKILL"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if self.process is not None:
            self.process.wait(timeout=10)
        self.process = None


class Cluster:
    """The whole set-up (see the module's docstring); a context manager."""

    def __init__(self, directory: Path, nodes: int = 3, fronts: int = 2,
                 node_config: str = "") -> None:
        self.directory = directory
        self.network = Network()
        try:
            self._build(nodes, fronts, node_config)
        except BaseException:
            self.close()
            raise

    def _build(self, nodes: int, fronts: int, node_config: str) -> None:
        self.network.add_lan("public", PUBLIC_LAN)
        self.network.add_lan("back", BACK_LAN)
        self.client = self.network.add_host("client", {"public": 100})
        front_hosts = [self.network.add_host(f"front{i}", {"public": 10 + i, "back": 10 + i})
                       for i in range(1, fronts + 1)]
        node_hosts = [self.network.add_host(f"node{i}", {"back": 20 + i})
                      for i in range(1, nodes + 1)]
        self.front_certs = make_certificates(self.directory / "front-tls", names=(PUBLIC_NAME,),
                                             client=True)
        keys = self.directory / "control-plane"
        subprocess.run([*CLI, "keygen", "--state-dir", str(keys)], check=True,
                       capture_output=True)
        self.control_plane_keys = keys
        self.control_plane_public_key = keys / "signing-key.pub.pem"
        self.nodes = [Node(self, i, host, node_config) for i, host in enumerate(node_hosts, 1)]
        self.node_ca_bundle = self.directory / "node-cas.pem"
        self.node_ca_bundle.write_text("".join(n.certs["ca"].read_text() for n in self.nodes))
        self.fronts = [Front(self, i, host) for i, host in enumerate(front_hosts, 1)]
        # the client resolves the public name to the first front (its /etc/hosts)
        self._hosts_dir = Path("/etc/netns") / self.client.namespace
        self._hosts_dir.mkdir(parents=True, exist_ok=True)
        (self._hosts_dir / "hosts").write_text(
            f"127.0.0.1 localhost\n{self.fronts[0].address} {PUBLIC_NAME}\n")
        for node in self.nodes:
            node.start()
        for front in self.fronts:
            front.write_config(self.nodes)
            front.start()

    def close(self) -> None:
        for member in [*getattr(self, "fronts", []), *getattr(self, "nodes", [])]:
            with contextlib.suppress(Exception):
                member.stop()
        self.network.close()
        if hasattr(self, "_hosts_dir"):
            shutil.rmtree(self._hosts_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    # --- the control plane --------------------------------------------------------------

    def token(self, node: Node, domain_uuid: str, protocol: str, *extra: str) -> dict[str, Any]:
        """A token minted by the control plane (``--json`` output) for *domain_uuid* on
        *node*, with the node's public URL in its links."""
        done = subprocess.run(
            [*CLI, "token", domain_uuid, "--protocol", protocol, "--node", node.name,
             "--key-dir", str(self.control_plane_keys), "--public-url", node.public_url,
             "--json", *extra],
            check=True, capture_output=True, text=True,
        )
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    # --- the client ---------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """What a client verifies the front door with: the front's CA."""
        return ssl.create_default_context(cafile=str(self.front_certs["ca"]))

    def front_socket(self, front: Front | None = None, port: int = 443) -> socket.socket:
        """A TCP connection from the client host to a front (default: the first)."""
        front = front or self.fronts[0]
        return self.client.connect(front.address, port, timeout=10)

    def websocket(self, url: str, front: Front | None = None,
                  subprotocols: tuple[str, ...] = ("binary",)) -> ClientConnection:
        """A WebSocket from the client host to *url* (``wss://console.example/...``)
        through *front*, with the browser's Origin."""
        sock = self.front_socket(front)
        # TLS 1.2 for websockets' sync client. It reads the socket on a thread of its own
        # from the moment the connection exists, while this thread writes the upgrade
        # request; with TLS 1.3 the front's session tickets arrive just then, and one
        # SSL object read and written by two threads at once failed the upgrade now and
        # then ("[SSL] internal error" on the write, the request never reaching nginx:
        # OpenSSL objects are not safe for that, the race python-socketio #1568
        # describes). After its handshake TLS 1.2 sends nothing the reading thread would
        # process before the answer.
        context = self.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        # 40 s: on a loaded 2-core machine with three TCG guests a SPICE upgrade once took
        # longer than 15 s (the broker admits the session, asking libvirt, before answering)
        return connect(
            url, sock=sock, ssl=context, server_hostname=PUBLIC_NAME,
            origin=Origin(PUBLIC_ORIGIN),
            subprotocols=[Subprotocol(p) for p in subprotocols], open_timeout=40,
        )

    def get(self, path: str, front: Front | None = None) -> tuple[int, bytes, dict[str, str]]:
        """``GET https://console.example{path}`` from the client host through *front*."""
        sock = self.front_socket(front)
        tls = self.client_context().wrap_socket(sock, server_hostname=PUBLIC_NAME)
        with tls:
            tls.settimeout(15)
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n"
                        "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = _dechunk(body)
        return status, body, headers


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def path_of(url: str) -> str:
    """The path and query of *url*."""
    parts = urllib.parse.urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
