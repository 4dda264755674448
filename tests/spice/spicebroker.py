"""Helpers of the SPICE plugin's real-stack tests: a ``console-broker serve`` subprocess,
CLI tokens, SPICE-enabled guests, and a SPICE channel over a WebSocket.

:class:`WebSocketSock` gives a WebSocket the three socket methods the test client of
``spicerelay`` uses, so the same :class:`spicerelay.TestClient` links channels through
the broker.
"""

from __future__ import annotations

import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spicerelay import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from broker.plugins import DISABLE_ENV
from broker.testbed import Testbed

CLI = [sys.executable, "-m", "broker.cli"]
GRACE = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A ``console-broker serve`` subprocess logging JSON at debug level into a file."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        self.port = free_port()
        self.connect_port = free_port()
        self.config = directory / "broker.toml"
        self.config.write_text(
            f"""[broker]
node = "testnode"
state_dir = "state"
[listen]
host = "127.0.0.1"
port = {self.port}
connect_port = {self.connect_port}
[http]
allow_missing_origin = true
[limits]
shutdown_grace = {GRACE}
[logging]
format = "json"
level = "debug"
{extra}
"""
        )
        self.log_path = directory / "broker.log"
        self.env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*CLI, "serve", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.tokens: list[str] = []
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _ = self.get("/healthz")
            except OSError:
                status = 0
            if status == 200:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the broker did not come up:\n{self.log_text()}")
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def token(self, domain: str, *extra: str) -> dict[str, Any]:
        out = subprocess.run(
            [*CLI, "token", domain, "--protocol", "spice", "--json", "--config",
             str(self.config), *extra],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        self.tokens.append(doc["token"])
        return doc

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            if f'"{name}"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == name:
                    found.append(doc)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=GRACE + 10)
        self._log.close()

    def assert_no_token_logged(self) -> None:
        text = self.log_text()
        for token in self.tokens:
            assert token not in text
            assert token.split(".")[2] not in text


def spice_guest(testbed: Testbed, mode: str) -> Any:
    """A booted tiny guest with SPICE enabled by ``console-broker xml enable``."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "spice", "--mode", mode],
        input=testbed.guest_xml(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    dom = testbed.define(enabled)
    testbed.boot(dom, console=False)
    return dom


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
