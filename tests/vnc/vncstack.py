"""Real-stack helpers for the VNC tests: a ``console-broker serve`` subprocess with
tokens from the CLI, guests provisioned with ``xml enable``, and a browser-side RFB
client (the sans-I/O layer) over a blocking WebSocket."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import pagekit
from broker_vnc.rfb import NEED_DATA, Event, RFBClient, ServerInit
from console_broker_testbed import SerialConsole, Testbed
from servedbroker import CLI, ServedBroker
from websockets.sync.client import ClientConnection

#: A VGA display and a VNC display with a password; `xml enable` switches how it listens.
GRAPHICS = (
    "<graphics type='vnc' passwd='secret'/>\n"
    "    <video><model type='vga'/></video>\n"
)
GRAPHICS_NO_PASSWORD = "<graphics type='vnc'/>\n    <video><model type='vga'/></video>\n"
RAW = 0
#: Run in a console page (Selenium): the noVNC canvas's size and how many colours a
#: sample of its pixels has.
CANVAS = pagekit.VNC_CANVAS


class Served(ServedBroker):
    """A ``console-broker serve`` subprocess (debug logs in a file) and its tokens."""

    def __init__(self, directory: Path, extra_config: str = "") -> None:
        super().__init__(
            directory,
            protocol="vnc",
            extra_config=extra_config,
            http_config='refusals = "close"\n',
            grace=2.0,
            stop_timeout=15,
        )

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            return super().get(path)
        except OSError:
            return 0, b""

    def token(  # type: ignore[override]
        self, domain: str, *, view_only: bool = False
    ) -> dict[str, Any]:
        return super().token(domain, *(["--view-only"] if view_only else []))

    def connect(  # type: ignore[override]
        self, domain: str, *, view_only: bool = False
    ) -> ClientConnection:
        return super().connect(domain, *(["--view-only"] if view_only else []))

    log_events = ServedBroker.events

    def assert_no_secret_logged(self, *secrets: str) -> None:
        self.assert_no_token_logged(*secrets)


def enabled_guest(
    testbed: Testbed, mode: str, devices: str = GRAPHICS, *, serial: bool = False
) -> tuple[Any, SerialConsole | None]:
    """A guest with *devices*, its consoles enabled by ``xml enable`` in *mode*, booted;
    with *serial*, its serial console (open from the first instruction on; without it,
    the guest may still be booting on return)."""
    xml = testbed.guest_xml(testbed.unique_name(f"vnc-{mode}"), devices=devices)
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "vnc,serial", "--mode", mode],
        input=xml, check=True, capture_output=True, text=True,
    ).stdout
    dom = testbed.define(enabled)
    return dom, testbed.boot(dom, console=serial)


class RFBSocket:
    """A browser-side RFB client (``RFBClient``) over a blocking WebSocket: the
    handshake, then reading whole server messages."""

    def __init__(self, ws: ClientConnection, *, shared: bool = True) -> None:
        self.ws = ws
        self.client = RFBClient(shared=shared)
        self.events: list[Event] = []
        self.buffer = bytearray()

    def handshake(self, timeout: float = 30.0) -> ServerInit:
        deadline = time.monotonic() + timeout
        while True:
            event = self.client.next_event()
            out = self.client.data_to_send()
            if out:
                self.ws.send(out)
            if event is NEED_DATA:
                data = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                assert isinstance(data, bytes)
                self.client.receive_data(data)
                continue
            self.events.append(event)
            if isinstance(event, ServerInit):
                self.buffer += self.client.take_trailing_data()
                return event

    def read(self, size: int, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < size:
            data = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            assert isinstance(data, bytes)
            self.buffer += data
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    def request_raw_update(self, init: ServerInit) -> None:
        """SetEncodings [raw], then a full FramebufferUpdateRequest."""
        self.ws.send(struct.pack(">BxHi", 2, 1, RAW))
        self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, init.width, init.height))

    def read_raw_update(self, init: ServerInit, timeout: float = 30.0) -> bytes:
        """The next FramebufferUpdate (raw rectangles only): all its pixel bytes."""
        bpp = init.pixel_format.bits_per_pixel // 8
        while True:
            kind = self.read(1, timeout)[0]
            if kind == 0:
                break
            assert kind in (1, 2, 3), f"unexpected server message {kind}"
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack(">xxxI", self.read(7, timeout))
                self.read(length, timeout)
                continue
            raise AssertionError("SetColourMapEntries from a true-colour server")
        (count,) = struct.unpack(">xH", self.read(3, timeout))
        pixels = bytearray()
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", self.read(12, timeout))
            assert encoding == RAW, encoding
            assert x + w <= init.width and y + h <= init.height
            pixels += self.read(w * h * bpp, timeout)
        return bytes(pixels)

    def screen(self, init: ServerInit, timeout: float = 60.0) -> bytes:
        """A full raw update showing something (the guest may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            self.request_raw_update(init)
            pixels = self.read_raw_update(init, timeout)
            if distinct_pixels(pixels) > 1 or time.monotonic() > deadline:
                return pixels
            time.sleep(0.5)

    def key(self, keysym: int, down: bool) -> None:
        self.ws.send(struct.pack(">BBxxI", 4, int(down), keysym))

    def type(self, text: str, pause: float = 0.02) -> None:
        """Type *text* as X keysyms (Return for a newline; Shift for '>' and capitals)."""
        shifted = set('>~!@#$%^&*()_+{}|:"<?') | {chr(c) for c in range(65, 91)}
        for char in text:
            keysym = 0xFF0D if char == "\n" else ord(char)
            if char in shifted:
                self.key(0xFFE1, True)
            self.key(keysym, True)
            time.sleep(pause)
            self.key(keysym, False)
            if char in shifted:
                self.key(0xFFE1, False)
            time.sleep(pause)


def direct_server_init(dom: Any) -> ServerInit:
    """QEMU's own ServerInit, over a socket from libvirt (SKIPAUTH: security None)."""
    fd = dom.openGraphicsFD(0, libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH)
    with socket.socket(fileno=fd) as sock:
        sock.settimeout(30)
        client = RFBClient()
        while True:
            event = client.next_event()
            sock.sendall(client.data_to_send())
            if event is NEED_DATA:
                client.receive_data(sock.recv(65536) or None)
            elif isinstance(event, ServerInit):
                return event


def settled_server_init(dom: Any, timeout: float = 60.0) -> ServerInit:
    """QEMU's ServerInit once the guest's display settled: the BIOS shows 640x480, the
    kernel's VGA text console 720x400 (a guest booted without waiting for its serial
    console may still be switching)."""
    deadline = time.monotonic() + timeout
    while True:
        init = direct_server_init(dom)
        if (init.width, init.height) == (720, 400) or time.monotonic() > deadline:
            return init
        time.sleep(0.5)


def distinct_pixels(pixels: bytes, bpp: int = 4) -> int:
    return len({pixels[i : i + bpp] for i in range(0, len(pixels), bpp)})
