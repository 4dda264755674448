"""Hostile clients against ``console-broker serve`` on the real stack (loopback only).

What docs/reliability.md promises, tried as an attacker would: descriptor floods through
each listener, clients that send and never read (WebSocket pings and serial ``ping``
messages, full and view-only tokens), hundreds of connections trickling their headers.
Throughout, a serial session on the tiny guest must keep echoing, and the broker's
resident memory must stay within the documented bounds. Every flood is bounded in count
and time and targets 127.0.0.0/8 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker, enabled_guest, serial_answers
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.vm

#: The framed serial protocol (docs/serial.md).
SERIAL_FRAMED = "console-broker.serial.v1"
#: docs/reliability.md: what one session may make the broker hold whatever its client
#: does (outgoing buffer, one read of automatic replies, the incoming message queue),
#: and what one pending connection may (its request head and the connection's objects).
SESSION_BOUND = 4 << 20
PENDING_BOUND = 64 << 10
#: The broker's resident memory varies by this much on its own (allocator, GC).
NOISE = 24 << 20


@pytest.fixture(scope="module", autouse=True)
def _enough_descriptors() -> Iterator[None]:
    """The flooding side needs more descriptors than a shell's default soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = enabled_guest(testbed, "--consoles", "vnc,serial", "--mode", "fd")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def rss(pid: int) -> int:
    """The resident memory of process *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Sampler:
    """The broker's peak resident memory, sampled every 0.2 s while in use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss(self.pid))
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def echoes(ws: ClientConnection, timeout: float = 20.0) -> float:
    """Type a fresh marker on a raw serial session; the seconds until the guest echoed it."""
    marker = f"m{secrets.token_hex(4)}"
    started = time.monotonic()
    ws.send(f"echo {marker[:1]}''{marker[1:]}\n".encode())  # the echo, not the typing
    seen = b""
    while marker.encode() not in seen:
        remaining = started + timeout - time.monotonic()
        assert remaining > 0, seen[-300:]
        message = ws.recv(timeout=remaining)
        seen += message if isinstance(message, bytes) else message.encode()
    return time.monotonic() - started


def served_broker(directory: Path, limits: str = "", **kwargs: Any) -> ServedBroker:
    return ServedBroker(directory, protocol="serial", limits_config=limits, **kwargs)


# --- descriptors ---------------------------------------------------------------------------


def hold(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """Open up to *count* TCP connections that send nothing (stops at the first failure)."""
    held = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2,
                                            source_address=(source, 0))
        except OSError:
            break
        held.append(sock)
    return held


def refused_or_waiting(socks: list[socket.socket]) -> tuple[int, int]:
    """Of *socks*: how many the broker answered 503 and closed, how many it holds."""
    refused = 0
    for sock in socks:
        sock.settimeout(0.05)
        try:
            data = sock.recv(256)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        refused += data.startswith(b"HTTP/1.1 503 ") or not data
    return refused, len(socks) - refused


@pytest.mark.parametrize("listener", ["websocket", "connect"])
def test_a_descriptor_flood_through_each_listener_leaves_the_broker_serving(
    guest: Any, tmp_path: Path, listener: str
) -> None:
    """The broker may open 200 descriptors; 1,200 connections that never send a byte
    exhaust them. Accepting fails with EMFILE: the broker logs it, refuses the backlog
    with its reserve descriptor and goes on; the serial session keeps echoing, and once
    the flood ends new requests are served."""
    served = served_broker(
        tmp_path, "max_pending = 100000\nmax_pending_per_client = 100000\n",
        connect_port=True, nofile=200,
    )
    flood: list[socket.socket] = []
    try:
        with served.connect(guest.name()) as ws:
            serial_answers(ws)
            port = served.port if listener == "websocket" else served.connect_port
            assert port is not None
            for _ in range(6):
                flood += hold(port, 200)
                echoes(ws)  # the session lives on while the descriptors run out
            failed = served.events("listener.accept_failed")
            assert failed and all(e["error"] in ("EMFILE", "ENFILE") for e in failed)
            assert {e["listener"] for e in failed} == {
                "http" if listener == "websocket" else "connect"}
            refused, waiting = refused_or_waiting(flood)
            print(f"descriptors ({listener}): {len(flood)} connections, {waiting} held, "
                  f"{refused} refused, {len(failed)} accept errors logged")
            assert refused > 0 and waiting > 0
            assert served.process.poll() is None
            for sock in flood:
                sock.close()
            flood.clear()
            # the broker's ends close as it notices (or at the handshake timeout)
            assert served.healthy(15), "no /healthz after the flood"
            echoes(ws)
            metrics = served.get("/metrics")[1].decode()
            assert "console_broker_accept_errors_total{" in metrics
            assert 'reason="out_of_descriptors"' in metrics
        with served.connect(guest.name()) as again:  # a new session after the flood
            echoes(again)
    finally:
        for sock in flood:
            sock.close()
        served.stop()
    served.assert_no_token_logged()


# --- clients that send and never read ----------------------------------------------------


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    head = struct.pack("!B", 0x80 | opcode)
    if len(payload) < 126:
        head += struct.pack("!B", 0x80 | len(payload))
    else:
        head += struct.pack("!BH", 0x80 | 126, len(payload))
    return head + mask + body


def raw_websocket(port: int, path: str, subprotocol: str | None = None) -> socket.socket:
    """An upgraded WebSocket on a plain socket, to send frames and never read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    offer = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    sock.sendall(
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         f"Sec-WebSocket-Version: 13\r\n{offer}\r\n").encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


class Flooder(threading.Thread):
    """Sends *frames* over and over without ever reading, for *seconds* or until the broker
    cuts the connection; counts the bytes that went."""

    def __init__(self, sock: socket.socket, frames: bytes, seconds: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.frames, self.seconds = sock, frames, seconds
        self.sent = 0
        self.cut_after: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        self.sock.settimeout(1.0)
        while time.monotonic() - started < self.seconds:
            try:
                self.sent += self.sock.send(self.frames)
            except TimeoutError:
                continue  # the broker is not reading: keep trying
            except OSError:
                self.cut_after = time.monotonic() - started
                return


def test_clients_that_flood_and_never_read_are_held_then_cut(
    guest: Any, tmp_path: Path
) -> None:
    """For 60 s, four clients flood without reading: WebSocket pings on VNC and serial
    ``ping`` messages on the serial console, each with a full and a view-only token. The
    broker stops reading each once its replies fill the outgoing buffer, cuts it after
    limits.write_timeout (client_stalled, 4108), and its memory stays within the bound;
    a serial session beside them keeps echoing."""
    served = served_broker(tmp_path, "write_timeout = 20.0\n")
    pid = served.process.pid
    flooders: list[Flooder] = []
    try:
        with served.connect(guest.name()) as ws:
            serial_answers(ws)
            baseline = rss(pid)
            ping = _masked(0x9, b"p" * 125) * 256
            serial_ping = _masked(0x1, json.dumps({"type": "ping", "data": "x" * 64}).encode())
            # A VNC client past the RFB handshake (version, security None, shared), sent
            # without reading the broker's side of it.
            rfb_login = _masked(0x2, b"RFB 003.008\n\x01\x01")
            for protocol, rights, login, frames, subprotocol in (
                ("vnc", (), rfb_login, ping, "binary"),
                ("vnc", ("--view-only",), rfb_login, ping, "binary"),
                ("serial", (), b"", serial_ping * 256, SERIAL_FRAMED),
                ("serial", ("--view-only",), b"", serial_ping * 256, SERIAL_FRAMED),
            ):
                url = served.issue(guest.name(), *rights, protocol=protocol)["websocket"]
                path = url.split(str(served.port), 1)[1]
                sock = raw_websocket(served.port, path, subprotocol)
                sock.sendall(login)
                flooders.append(Flooder(sock, frames, 60.0))
            with Sampler(pid) as sampler:
                for flooder in flooders:
                    flooder.start()
                started = time.monotonic()
                slowest = 0.0
                while any(f.is_alive() for f in flooders):
                    slowest = max(slowest, echoes(ws))
                    time.sleep(1.0)
                    assert time.monotonic() - started < 90
            grew = sampler.peak - baseline
            cut = [f.cut_after for f in flooders]
            print(f"flood: sent {[f.sent >> 20 for f in flooders]} MiB, cut after {cut} s, "
                  f"RSS {baseline >> 20} MiB then at most +{grew / 2**20:.1f} MiB, "
                  f"slowest echo beside it {slowest:.2f} s")
            assert all(c is not None for c in cut), "a flooding client was never cut"
            assert grew < 4 * SESSION_BOUND + NOISE
            closed = [e for e in served.events("session.closed") if e["reason"] != "client_closed"]
            assert sorted((e["protocol"], e["code"]) for e in closed) == [
                ("serial", 4108), ("serial", 4108), ("vnc", 4108), ("vnc", 4108)]
            echoes(ws)  # the session beside them is still there
    finally:
        for flooder in flooders:
            flooder.sock.close()
        served.stop()
    served.assert_no_token_logged()


# --- connections trickling their headers -----------------------------------------------------


def _answered(sock: socket.socket) -> bytes | None:
    """What the broker answered on *sock* so far (b"": it closed), or None: nothing yet."""
    try:
        return sock.recv(64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def test_five_hundred_trickling_connections(guest: Any, tmp_path: Path) -> None:
    """500 connections from 25 loopback addresses each send a header line every 0.4 s and
    never finish their request: the broker holds each within the bound (431 once its head
    passes limits.max_request_head), and a valid client meanwhile opens its session as
    fast as before."""
    # The handshake deadline out of the way: a loaded machine must not turn the head
    # bound's 431 into a timeout.
    served = served_broker(tmp_path, "handshake_timeout = 60.0\n")
    pid = served.process.pid
    trickling: list[socket.socket] = []
    try:
        with served.connect(guest.name()) as ws:
            serial_answers(ws)
        opened = time.monotonic()
        with served.connect(guest.name()) as ws:
            echoes(ws)
        before = time.monotonic() - opened
        baseline = rss(pid)
        for index in range(500):
            source = f"127.0.1.{index % 25 + 1}"
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=5,
                                            source_address=(source, 0))
            sock.settimeout(None)  # blocking, so that MSG_DONTWAIT alone decides
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            trickling.append(sock)
        url = served.issue(guest.name())["websocket"]  # before the clock starts
        line = b"X-Trickle: " + b"t" * 1500 + b"\r\n"  # the 11th line passes 16 KiB
        answers: dict[socket.socket, bytes] = {}
        with Sampler(pid) as sampler:
            for round_ in range(20):  # 0.4 s apart, within the handshake timeout
                if len(answers) == len(trickling):
                    break
                for sock in trickling:
                    if sock in answers:
                        continue
                    answer = _answered(sock)
                    if answer is not None:  # sending more would reset it, losing the answer
                        answers[sock] = answer
                        continue
                    with contextlib.suppress(OSError):
                        sock.sendall(line)
                time.sleep(0.4)
                if round_ == 4:  # with every connection held, a valid client comes in
                    opened = time.monotonic()
                    with connect(url, subprotocols=[Subprotocol("binary")],
                                 open_timeout=10) as ws:
                        echoes(ws)
                    during = time.monotonic() - opened
        for sock in trickling:
            if sock not in answers:
                sock.settimeout(5)
                with contextlib.suppress(OSError):
                    answers[sock] = sock.recv(64)
        statuses = sorted({answer[:12] for answer in answers.values()})
        grew = sampler.peak - baseline
        print(f"trickle: 500 held, RSS {baseline >> 20} MiB then at most "
              f"+{grew / 2**20:.1f} MiB ({grew // 500} bytes each); a session opened in "
              f"{before:.2f} s before and {during:.2f} s during; answers {statuses}")
        assert statuses == [b"HTTP/1.1 431"] and len(answers) == 500
        assert grew < 500 * PENDING_BOUND + NOISE
        assert during < max(2.0, 4 * before)
    finally:
        for sock in trickling:
            sock.close()
        served.stop()
    served.assert_no_token_logged()
