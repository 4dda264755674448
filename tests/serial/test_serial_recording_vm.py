"""Recordings on the real stack, on a loaded machine: whatever a client of a recorded
console was sent is in the recording when its session ends, however it ends (the client
leaves, the VM stops, the broker gets SIGTERM, a retention pass runs meanwhile), while
parts rotate every 4 KiB and the broker's pruner runs every second.

12 sessions of 100 echoed markers each (every ending three times), with every core kept
busy by spinning processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_serial._recording import KIND
from console_broker_testbed import Testbed
from serialkit import Client, Served, cast_output, cpu_load, serial_guest
from websockets.exceptions import ConnectionClosed

from broker.keys import load_private_key
from broker.recordings import list_recordings
from broker.retention import Policy, is_being_written, prune
from broker.tokens import TokenIssuer

pytestmark = pytest.mark.vm

SERIAL = (
    "record = true\n"
    "recording_max_size = 4096\n"  # a new part every few lines: rotations mid-session
    "[recordings]\n"
    "keep_days = 7\n"  # a policy that keeps everything written this week ...
    "prune_interval = 1\n"  # ... applied every second and after each rotation
)
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
MARKERS = 100
BATCH = 25
#: How each of the 12 sessions ends.
ENDINGS = ["leave", "prune", "vm_stop", "sigterm"] * 3


def markers(run: int, first: int, count: int) -> bytes:
    """One command line of *count* echo commands, whose output ``rRR-NNNN.`` their echo
    does not contain. One line a batch, the next typed once its output came: input typed
    ahead while the shell runs is echoed by the guest's tty in the middle of the output."""
    echoes = (b"echo r%02d-$((%d+1000))." % (run, i) for i in range(first, first + count))
    return b"; ".join(echoes) + b"\n"


def marker(run: int, i: int) -> str:
    return f"\r\nr{run:02d}-{1000 + i}.\r\n"


def plant(broker: Broker, run: int, n: int) -> Path:
    """A recording of another domain, last written 30 days ago: retention deletes it."""
    name = f"20200101T000000Z-{run:04d}{n:04d}-001.cast"
    path = broker.recordings / OTHER / name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text('{"version": 2, "width": 80, "height": 24, "timestamp": 1577836800}\n')
    os.utime(path, (time.time() - 30 * 86400,) * 2)
    return path


class Broker(Served):
    """A served broker whose tokens the test signs itself with the broker's key: the
    ``console-broker token`` command, a Python process for each, is slow on a loaded
    machine."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, SERIAL)
        key = load_private_key(directory / "state" / "signing-key.pem")
        self.issuer = TokenIssuer(key, "testnode")
        self.uuids: dict[str, str] = {}

    def issue(self, domain: str, *extra: str, protocol: str | None = None) -> dict[str, Any]:
        assert not extra
        token = self.issuer.issue(self.uuids[domain], "serial", ttl=60).token
        self.tokens.append(token)
        return {"token": token, "websocket": f"ws://127.0.0.1:{self.port}/ws/serial?token={token}"}

    @property
    def recordings(self) -> Path:
        return self.directory / "state" / "recordings"


class Stack:
    """The broker and the guest the sessions use; each is replaced once an ending took it.
    A spare guest boots meanwhile, so a stopped VM's successor has its shell ready."""

    def __init__(self, directory: Path, testbed: Testbed) -> None:
        self.directory = directory
        self.testbed = testbed
        self.brokers = 0
        self.broker = self._start_broker()
        self.guest: Any = serial_guest(testbed)
        self.spare: Any = serial_guest(testbed)
        self.guests = [self.guest, self.spare]

    def _start_broker(self) -> Broker:
        self.brokers += 1
        place = self.directory / f"broker{self.brokers}"
        place.mkdir()
        return Broker(place)

    @property
    def recordings(self) -> Path:
        return self.broker.recordings / self.guest.UUIDString()

    def new_broker(self) -> None:
        self.broker.assert_no_token_logged()
        self.broker = self._start_broker()

    def new_guest(self, *, spare: bool) -> None:
        """Go on with the spare guest (and boot another, with *spare*)."""
        self.guest, self.spare = self.spare, None
        if spare:
            self.spare = serial_guest(self.testbed)
            self.guests.append(self.spare)

    def connect(self) -> Any:
        self.broker.uuids[self.guest.name()] = self.guest.UUIDString()
        return self.broker.connect(self.guest.name())

    def close(self) -> None:
        self.broker.stop()
        self.broker.assert_no_token_logged()
        for guest in self.guests:
            self.testbed.remove(guest)


@pytest.fixture
def stack(tmp_path: Path, testbed: Testbed) -> Iterator[Stack]:
    with cpu_load():
        stack = Stack(tmp_path, testbed)
        try:
            yield stack
        finally:
            stack.close()


def closed_with(ws: Any, *codes: int) -> None:
    """Read *ws* until the broker closes it, with one of *codes*."""
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=30)
    assert ws.close_code in codes, (ws.close_code, ws.close_reason)


def session(stack: Stack, run: int, ending: str) -> tuple[bytes, list[Path]]:
    """One recorded session: 100 markers echoed and seen, then the *ending*. Returns what
    the client was sent and the recording's parts."""
    directory = stack.recordings
    before = set(directory.glob("*.cast")) if directory.exists() else set()
    broker = stack.broker
    with stack.connect() as ws:
        client = Client(ws)
        assert client.wait_control("hello")["recording"] is True
        client.shell_ready()
        for first in range(0, MARKERS, BATCH):
            client.send(markers(run, first, BATCH))
            for i in range(first, first + BATCH):
                client.wait_for(marker(run, i).encode())
        client.wait_for(marker(run, MARKERS - 1).encode() + b"guest# ")  # idle at its prompt
        if ending == "prune":  # passes in another process, and the broker's, meanwhile
            planted = [plant(broker, run, n) for n in range(3)]
            result = prune(broker.recordings, Policy(keep_days=7), suffixes=[KIND.suffix])
            assert result.errors == [] and result.kept > 0
            listed = list_recordings(broker.recordings, [KIND], stack.guest.name())
            live = [rec.live for rec in listed]
            assert live.count(True) == 1, live
            client.send(b"echo pruned-$((6*7))\n")
            client.wait_for(b"\r\npruned-42\r\n")
            assert not any(path.exists() for path in planted)  # by either pass
        elif ending == "vm_stop":
            stack.guest.destroy()
            # 4100 (VM stopped) when libvirt confirms the stop within the broker's short
            # wait, which a loaded machine can outlast: then 1000 (the console closed).
            closed_with(ws, 4100, 1000)
        elif ending == "sigterm":
            broker.stop()
            closed_with(ws, 1001)
    sent = bytes(client.output)
    if ending == "vm_stop":
        stack.new_guest(spare="vm_stop" in ENDINGS[run + 1 :])
    # The session is over once no part is being written any more.
    deadline = time.monotonic() + 30
    while True:
        parts = sorted(set(directory.glob("*.cast")) - before)
        if parts and not any(is_being_written(part) for part in parts):
            break
        assert time.monotonic() < deadline, f"run {run}: the recording did not end: {parts}"
        time.sleep(0.05)
    if ending == "sigterm":
        stack.new_broker()
    return sent, parts


def test_every_byte_a_client_was_sent_is_recorded_however_the_session_ends(
    stack: Stack,
) -> None:
    rotated = 0
    for run, ending in enumerate(ENDINGS):
        sent, parts = session(stack, run, ending)
        # One recording (its id in every part's name), in parts numbered from 1.
        names = [part.name.split("-") for part in parts]
        assert len({name[1] for name in names}) == 1, parts
        assert [int(name[2].removesuffix(".cast")) for name in names] == list(
            range(1, len(parts) + 1)
        )
        rotated += len(parts) > 1
        recorded = cast_output(*parts)
        for i in range(MARKERS):
            assert marker(run, i) in recorded, (run, ending, i)
        # The client was the console's only one, from the recording's start: what it was
        # sent is where the recording begins (what it was not sent yet may follow).
        assert recorded.startswith(sent.decode("utf-8", "replace")), (run, ending)
    assert rotated == len(ENDINGS)  # every session went on in further parts
