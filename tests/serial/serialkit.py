"""The serial plugin's real-stack kit: a ``console-broker serve`` subprocess, CLI tokens,
guests provisioned with ``console-broker xml enable``, and WebSocket clients that
speak the serial console's framed protocol."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from broker_serial._control import SUBPROTOCOL
from websockets.sync.client import ClientConnection, connect

from broker.plugins import DISABLE_ENV
from broker.testbed import Testbed

CLI = [sys.executable, "-m", "broker.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A ``console-broker serve`` subprocess (its [serial] table from *serial*)."""

    def __init__(self, directory: Path, serial: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.config = directory / "broker.toml"
        self.config.write_text(
            f"""[broker]
node = "testnode"
state_dir = "state"
[listen]
host = "127.0.0.1"
port = {self.port}
[http]
allow_missing_origin = true
[limits]
shutdown_grace = 3
[logging]
format = "json"
level = "debug"
[serial]
{serial}
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*CLI, *args, "--config", str(self.config)],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        )
        return out.stdout

    def token(self, domain: str, *extra: str) -> dict[str, Any]:
        """``console-broker token DOMAIN --protocol serial --json`` (and *extra*)."""
        doc: dict[str, Any] = json.loads(
            self.cli("token", domain, "--protocol", "serial", "--json", *extra)
        )
        self.tokens.append(doc["token"])
        return doc

    def connect(self, domain: str, *extra: str, framed: bool = True) -> ClientConnection:
        url = self.token(domain, *extra)["websocket"]
        subprotocols = [SUBPROTOCOL] if framed else ["binary"]
        return connect(url, subprotocols=subprotocols, open_timeout=10)  # type: ignore[arg-type]

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=15)
        self._log.close()

    def assert_no_token_logged(self) -> None:
        text = self.log_text()
        for token in self.tokens:
            assert token not in text
            assert token.split(".")[2] not in text
        assert not re.search(r"eyJ[A-Za-z0-9_-]{8,}\.", text)


def serial_guest(testbed: Testbed, devices: str = "") -> Any:
    """A running tiny guest whose serial console ``console-broker xml enable`` enabled
    (*devices*: more XML in its ``<devices>``)."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "serial"],
        input=testbed.guest_xml(devices=devices),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    dom = testbed.define(enabled)
    testbed.boot(dom, console=False)
    return dom


class Client:
    """A framed (or raw) serial console client: output collected, control messages parsed."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.output = bytearray()
        self.controls: list[dict[str, Any]] = []
        #: Every message in order: bytes, or a parsed control message.
        self.messages: list[bytes | dict[str, Any]] = []

    def poll(self, timeout: float = 0.2) -> None:
        """Take what arrives within *timeout*."""
        try:
            message = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return
        if isinstance(message, str):
            doc = json.loads(message)
            self.controls.append(doc)
            self.messages.append(doc)
        else:
            self.output += message
            self.messages.append(message)

    def wait_for(self, pattern: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in self.output:
            assert time.monotonic() < deadline, (pattern, bytes(self.output[-400:]))
            self.poll()

    def wait_control(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for doc in self.controls:
                if doc["type"] == kind and all(doc.get(k) == v for k, v in fields.items()):
                    return doc
            assert time.monotonic() < deadline, (kind, fields, self.controls)
            self.poll()

    def send(self, data: bytes) -> None:
        self.ws.send(data)

    def control(self, **message: Any) -> None:
        self.ws.send(json.dumps(message))

    def shell_ready(self, timeout: float = 90.0) -> None:
        """Press Enter until the guest's prompt answers (the guest may still be booting)."""
        deadline = time.monotonic() + timeout
        mark = len(self.output)
        while b"guest# " not in self.output[mark:]:
            assert time.monotonic() < deadline, bytes(self.output[-400:])
            self.send(b"\n")
            end = time.monotonic() + 1.0
            while time.monotonic() < end and b"guest# " not in self.output[mark:]:
                self.poll(0.2)
