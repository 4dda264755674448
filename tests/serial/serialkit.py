"""The serial plugin's real-stack kit: a ``console-broker serve`` subprocess, CLI tokens,
guests provisioned with ``console-broker xml enable``, WebSocket clients that speak the
serial console's framed protocol, reading recordings back, and a loaded machine."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker_serial._control import SUBPROTOCOL
from console_broker_testbed import Testbed
from servedbroker import ServedBroker, enabled_guest, end_with_parent
from websockets.sync.client import ClientConnection


class Served(ServedBroker):
    """A ``console-broker serve`` subprocess (its [serial] table from *serial*)."""

    def __init__(self, directory: Path, serial: str = "") -> None:
        super().__init__(
            directory,
            protocol="serial",
            extra_config=f"[serial]\n{serial}",
            subprotocols=[SUBPROTOCOL],
            stop_timeout=15,
        )

    def connect(  # type: ignore[override]
        self, domain: str, *extra: str, framed: bool = True
    ) -> ClientConnection:
        return super().connect(domain, *extra, subprotocols=None if framed else ["binary"])


def serial_guest(testbed: Testbed, devices: str = "") -> Any:
    """A running tiny guest whose serial console ``console-broker xml enable`` enabled
    (*devices*: more XML in its ``<devices>``)."""
    return enabled_guest(testbed, "--consoles", "serial", devices=devices)


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


def cast_output(*parts: Path) -> str:
    """The output a recording holds: the text of its ``o`` events, joined across events
    and across *parts* (in the order given). Search this, not the file: each read of the
    console is one event, and an emulated UART is read a byte or two at a time, so a line
    is often spread over several events."""
    text = []
    for part in parts:
        for line in part.read_text().splitlines()[1:]:
            _, kind, data = json.loads(line)
            if kind == "o":
                text.append(data)
    return "".join(text)


def recording_parts(directory: Path, recording: str) -> list[Path]:
    """The parts of recording *recording* (its id) under *directory*, in order."""
    return sorted(directory.glob(f"*/*-{recording}-*.cast"))


@contextlib.contextmanager
def cpu_load(processes: int | None = None) -> Iterator[None]:
    """Load the machine: *processes* (default: one per core) Python processes that spin
    until the block ends (or the test process dies)."""
    count = processes if processes is not None else os.cpu_count() or 1
    spinners = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], preexec_fn=end_with_parent
        )
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
