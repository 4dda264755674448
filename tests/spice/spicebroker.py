"""Helpers of the SPICE plugin's real-stack tests: a ``console-broker serve`` subprocess,
CLI tokens, SPICE-enabled guests, and a SPICE channel over a WebSocket.

:class:`WebSocketSock` gives a WebSocket the three socket methods the test client of
``spicerelay`` uses, so the same :class:`spicerelay.TestClient` links channels through
the broker.
"""

from __future__ import annotations

import configparser
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from servedbroker import ServedBroker, enabled_guest
from spicerelay import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from broker.testbed import Testbed


class Broker(ServedBroker):
    """A ``console-broker serve`` subprocess logging JSON at debug level into a file,
    with a CONNECT listener; *extra*: more configuration."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        super().__init__(directory, protocol="spice", extra_config=extra, connect_port=True)

    def assert_no_token_logged(self) -> None:  # type: ignore[override]
        super().assert_no_token_logged(jwt_shape=False)


def spice_guest(testbed: Testbed, mode: str) -> Any:
    """A booted tiny guest with SPICE enabled by ``console-broker xml enable``."""
    return enabled_guest(testbed, "--consoles", "spice", "--mode", mode)


class WebSocketSock:
    """A WebSocket seen as the blocking socket ``spicerelay.TestClient`` drives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._timeout: float | None = 10.0
        self.close_code: int | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def sendall(self, data: bytes) -> None:
        self.ws.send(bytes(data))

    def recv(self, _size: int) -> bytes:
        try:
            message = self.ws.recv(timeout=self._timeout)
        except ConnectionClosed:
            self.close_code = self.ws.close_code
            return b""
        return message if isinstance(message, bytes) else message.encode()

    def close(self) -> None:
        self.ws.close()


def connect_client(vv: str) -> TestClient:
    """A SPICE test client whose channel goes through the CONNECT proxy a .vv file names,
    using only what the file says."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(vv)
    section = parser["virt-viewer"]
    proxy = urlsplit(section["proxy"])
    assert proxy.scheme == "http" and proxy.hostname and proxy.port
    sock = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    target = f"{section['host']}:{section['port']}"
    sock.sendall(f"CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            sock.close()
            raise ConnectionError(f"the proxy closed: {head!r}")
        head += byte
    status = head.split(b" ", 2)[1]
    if status != b"200":
        sock.close()
        raise ConnectionRefusedError(head.decode(errors="replace"))
    return TestClient(sock)


def ws_client(url: str) -> TestClient:
    """A SPICE test client whose channel goes over a WebSocket to *url*."""
    ws = connect(url, subprotocols=["binary"], open_timeout=10, legacy=True)  # type: ignore[list-item]
    return TestClient(WebSocketSock(ws))  # type: ignore[arg-type]
