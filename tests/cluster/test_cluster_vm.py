"""A cluster behind one front door, on real hosts: network namespaces on this machine.

Three node hosts, each running ``console-broker serve`` (its own node name, certificate
and key trust) for its own tiny guest on the machine's libvirtd; two front hosts running
Debian's nginx with the configuration ``console-broker front nginx`` generated; a client
host that reaches the front hosts only. Tokens come from the control plane's key
(``console-broker token --node --key-dir --public-url``, no libvirt asked). See
tests/cluster/clusterkit.py for the set-up and docs/scale-out.md for the design.
"""

from __future__ import annotations

import errno
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterkit import CLI, NODE_CONNECT_PORT, NODE_PORT, Cluster, Front, Node, path_of
from console_broker_testbed import Testbed
from servedbroker import enabled_guest, read_at_least, serial_answers
from spicebroker import RemoteViewer, WebSocketSock, link_main
from spicerelay import TestClient
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.vm

RFB_BANNER = b"RFB 003.008\n"
CLIENT_ADDRESS = "10.77.1.100"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, testbed: Testbed) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as built:
        yield built


@pytest.fixture(scope="module")
def guests(cluster: Cluster, testbed: Testbed) -> Iterator[dict[str, Any]]:
    """Each node's own guest, with VNC, SPICE and serial consoles."""
    doms: dict[str, Any] = {}
    try:
        for node in cluster.nodes:
            doms[node.name] = enabled_guest(testbed, "--consoles", "vnc,spice,serial")
        yield doms
    finally:
        for dom in doms.values():
            testbed.remove(dom)


def _token(cluster: Cluster, guests: dict[str, Any], node: Node, protocol: str,
           *extra: str) -> dict[str, Any]:
    return cluster.token(node, guests[node.name].UUIDString(), protocol, *extra)


def _server_init(ws: Any) -> tuple[int, int, bytes]:
    """RFB through *ws* up to QEMU's ServerInit: security None, shared. The framebuffer's
    width, height and the desktop name."""
    assert read_at_least(ws, len(RFB_BANNER))[: len(RFB_BANNER)] == RFB_BANNER
    ws.send(RFB_BANNER)
    types = read_at_least(ws, 2)
    assert 1 in types[1 : 1 + types[0]], types  # None offered
    ws.send(b"\x01")
    assert read_at_least(ws, 4) == b"\0\0\0\0"  # SecurityResult OK
    ws.send(b"\x01")  # ClientInit: shared
    init = read_at_least(ws, 24)
    width, height = struct.unpack("!HH", init[:4])
    (name_length,) = struct.unpack("!I", init[20:24])
    name = init[24:]
    if len(name) < name_length:
        name += read_at_least(ws, name_length - len(name))
    return width, height, name


def _vnc_through(cluster: Cluster, guests: dict[str, Any], node: Node,
                 front: Front | None = None) -> tuple[int, int, bytes]:
    url = _token(cluster, guests, node, "vnc")["websocket"]
    with cluster.websocket(url, front) as ws:
        return _server_init(ws)


@pytest.mark.parametrize("name", ["node1", "node2", "node3"])
def test_vnc_serial_and_spice_of_each_node_through_the_front_door(
    cluster: Cluster, guests: dict[str, Any], name: str
) -> None:
    node = cluster.node(name)
    issued = _token(cluster, guests, node, "vnc")
    assert issued["node"] == name
    assert issued["websocket"].startswith(f"wss://console.example/n/{name}/ws/vnc?token=")
    assert issued["page"].startswith(f"https://console.example/n/{name}/console/vnc/?token=")
    with cluster.websocket(issued["websocket"]) as ws:
        width, height, _name = _server_init(ws)
    assert width > 0 and height > 0

    with cluster.websocket(_token(cluster, guests, node, "serial")["websocket"]) as ws:
        serial_answers(ws)

    with cluster.websocket(_token(cluster, guests, node, "spice")["websocket"]) as ws:
        main = TestClient(WebSocketSock(ws))  # type: ignore[arg-type]
        assert link_main(main) != 0

    # the node saw the client's address (X-Forwarded-For from a trusted front), and its
    # own sessions only
    opened = [e for e in node.events("session.opened")
              if e.get("domain") == guests[name].UUIDString()]
    assert {e["protocol"] for e in opened} >= {"vnc", "serial", "spice"}
    assert {e["client"] for e in opened} == {CLIENT_ADDRESS}, opened


def test_pages_and_health_are_routed_per_node(cluster: Cluster) -> None:
    for node in cluster.nodes:
        status, body, _ = cluster.get(f"/n/{node.name}/healthz")
        assert status == 200, body
    status, body, _ = cluster.get("/n/node1/console/vnc/")
    assert status == 200 and b"<html" in body.lower()
    status, body, _ = cluster.get("/n/nosuchnode/healthz")
    assert status == 404 and b"nosuchnode" in body


def test_a_token_for_one_node_is_refused_on_another_and_stays_usable(
    cluster: Cluster, guests: dict[str, Any]
) -> None:
    node1, node2 = cluster.node("node1"), cluster.node("node2")
    issued = _token(cluster, guests, node1, "vnc")
    wrong = issued["websocket"].replace("/n/node1/", "/n/node2/")
    with pytest.raises(InvalidStatus) as refused:
        cluster.websocket(wrong)
    assert refused.value.response.status_code == 421  # wrong_node
    assert any(e.get("reason") == "wrong_node" for e in node2.events("token.rejected"))
    with cluster.websocket(issued["websocket"]) as ws:
        width, _height, _name = _server_init(ws)
    assert width > 0


def test_remote_viewer_reaches_a_nodes_guest_through_the_front_door_only(
    cluster: Cluster, guests: dict[str, Any], tmp_path: Path
) -> None:
    node = cluster.node("node2")
    issued = _token(cluster, guests, node, "spice")
    status, body, headers = cluster.get(path_of(issued["file"]))
    assert status == 200, body
    assert headers["content-type"].startswith("application/x-virt-viewer")
    vv = body.decode()
    assert f"proxy=http://console.example:{node.front_connect_port}" in vv
    assert "10.77.2." not in vv  # no node address in the file
    path = tmp_path / "console.vv"
    path.write_text(vv)
    with RemoteViewer(path, tmp_path, prefix=cluster.client.command([])) as viewer:
        viewer.wait_for_the_guests_screen()
    tunnels = [e for e in node.events("session.opened")
               if e.get("domain") == guests["node2"].UUIDString() and e.get("protocol") == "spice"]
    assert tunnels
    # the front's PROXY protocol header named the client: the node counts and logs it
    assert {e["client"] for e in tunnels} == {CLIENT_ADDRESS}, tunnels
    assert not node.events("connect.proxy_refused")


def test_only_the_front_door_reaches_a_node_broker(cluster: Cluster) -> None:
    node = cluster.node("node1")
    address = node.host.address()
    # the client host has no route to the nodes' network at all
    for port in (NODE_PORT, NODE_CONNECT_PORT):
        with pytest.raises(OSError) as unreachable:
            cluster.client.connect(address, port, timeout=5)
        assert unreachable.value.errno == errno.ENETUNREACH
    # a host on the nodes' network without the front's client certificate is refused (on
    # the CONNECT listener after the PROXY header it expects first)
    front = cluster.fronts[0]
    verify_node = ssl.create_default_context(cafile=str(node.certs["ca"]))
    verify_node.check_hostname = False
    header = f"PROXY TCP4 {CLIENT_ADDRESS} {front.address} 40000 7001\r\n".encode()
    assert _https_status(front.host, address, NODE_PORT, verify_node) is None
    assert _https_status(front.host, address, NODE_CONNECT_PORT, verify_node, header) is None
    refused = [e for e in node.events("tls.client_refused") if e.get("reason") == "no certificate"]
    assert {e["listener"] for e in refused} == {"http", "connect"}, refused
    # and without the header, before any TLS
    assert _https_status(front.host, address, NODE_CONNECT_PORT, verify_node) is None
    proxy_refused = node.events("connect.proxy_refused")
    assert proxy_refused and proxy_refused[-1]["detail"] == (
        "no PROXY header: the connection starts with a TLS handshake"), proxy_refused
    # the same host with the front's certificate gets an answer (a control)
    with_cert = ssl.create_default_context(cafile=str(node.certs["ca"]))
    with_cert.check_hostname = False
    with_cert.load_cert_chain(cluster.front_certs["client"], cluster.front_certs["client-key"])
    assert _https_status(front.host, address, NODE_PORT, with_cert) == 200


def _https_status(host: Any, address: str, port: int, context: ssl.SSLContext,
                  proxy_header: bytes = b"") -> int | None:
    """``GET /healthz`` from *host* to *address*:*port* over TLS (after *proxy_header*, in
    the clear): the status, or None when the connection is refused during or right after
    the handshake."""
    sock = host.connect(address, port, timeout=10)
    try:
        sock.sendall(proxy_header)
        with context.wrap_socket(sock) as tls:
            tls.settimeout(10)
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            head = tls.recv(4096)
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        sock.close()
    if not head:
        return None
    return int(head.split(b" ", 2)[1])


def test_a_stopped_node_answers_a_clear_error_and_the_others_go_on(
    cluster: Cluster, guests: dict[str, Any]
) -> None:
    node1, node3 = cluster.node("node1"), cluster.node("node3")
    with cluster.websocket(_token(cluster, guests, node1, "serial")["websocket"]) as ws:
        serial_answers(ws)
        node3.stop()
        try:
            status, body, _ = cluster.get("/n/node3/healthz")
            assert status == 502, body
            assert b"node3" in body and b"not answering" in body
            with pytest.raises(InvalidStatus) as refused:
                cluster.websocket(_token(cluster, guests, node3, "vnc")["websocket"])
            assert refused.value.response.status_code == 502
            # the session on node1 goes on, and node1 takes new ones
            serial_answers(ws)
            assert _vnc_through(cluster, guests, node1)[0] > 0
        finally:
            node3.start()
    assert cluster.get("/n/node3/healthz")[0] == 200


def test_with_one_nginx_replica_killed_new_sessions_go_through_the_other(
    cluster: Cluster, guests: dict[str, Any]
) -> None:
    front1, front2 = cluster.fronts
    front1.kill()
    try:
        with pytest.raises(OSError):
            cluster.front_socket(front1)
        for node in cluster.nodes:
            assert _vnc_through(cluster, guests, node, front2)[0] > 0
    finally:
        front1.start()
    time.sleep(0.1)
    assert _vnc_through(cluster, guests, cluster.node("node1"), front1)[0] > 0


def test_console_broker_open_through_the_front_door(
    cluster: Cluster, guests: dict[str, Any], tmp_path: Path
) -> None:
    """A native VNC client on the client host through ``console-broker open``: the front
    door's wss:// URL, verified with --ca, bridged to a local port a viewer connects to."""
    node = cluster.node("node3")
    page = _token(cluster, guests, node, "vnc")["page"]
    assert page.startswith("https://console.example/n/node3/console/vnc/?token=")
    port = 5999
    log = tmp_path / "open.log"
    with log.open("wb") as out:
        opened = cluster.client.popen(
            [*CLI, "open", page, "--no-viewer", "--listen", f"127.0.0.1:{port}",
             "--ca", str(cluster.front_certs["ca"])],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        viewer = _first_connection(cluster, port, opened)
        with viewer:
            viewer.settimeout(15)
            assert _recv_exactly(viewer, 12) == RFB_BANNER
            viewer.sendall(RFB_BANNER)
            count = _recv_exactly(viewer, 1)[0]
            assert 1 in _recv_exactly(viewer, count)  # security None, as the broker offers
            viewer.sendall(b"\x01")
            assert _recv_exactly(viewer, 4) == b"\0\0\0\0"
            viewer.sendall(b"\x01")
            width, height = struct.unpack("!HH", _recv_exactly(viewer, 4))
            assert width > 0 and height > 0
        assert opened.wait(timeout=15) == 0, log.read_text()
    finally:
        if opened.poll() is None:
            opened.kill()
            opened.wait()
    opened_events = [e for e in node.events("session.opened")
                     if e.get("domain") == guests["node3"].UUIDString()]
    assert opened_events and opened_events[-1]["client"] == CLIENT_ADDRESS


def _first_connection(cluster: Cluster, port: int, opened: subprocess.Popen[bytes]) -> Any:
    """The viewer's connection to ``open``'s local port, once it listens (the first
    connection is the one bridged: no probing connection before it)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return cluster.client.connect("127.0.0.1", port, timeout=15)
        except ConnectionRefusedError:
            assert opened.poll() is None and time.monotonic() < deadline, "open did not listen"
            time.sleep(0.1)


def _recv_exactly(sock: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data
