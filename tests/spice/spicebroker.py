"""Helpers of the SPICE plugin's real-stack tests: a ``console-broker serve`` subprocess,
CLI tokens, SPICE-enabled guests, and a SPICE channel over a WebSocket.

:class:`WebSocketSock` gives a WebSocket the three socket methods the test client of
``spicerelay`` uses, so the same :class:`spicerelay.TestClient` links channels through
the broker.
"""

from __future__ import annotations

import collections
import configparser
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from broker_spice.protocol import (
    MSGC_DISPLAY_INIT,
    ChannelType,
    LinkError,
    MainInit,
    Message,
    build_display_init,
    build_message,
)
from console_broker_testbed import Testbed
from servedbroker import ServedBroker, enabled_guest
from spicerelay import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


class Broker(ServedBroker):
    """A ``console-broker serve`` subprocess logging JSON at debug level into a file,
    with a CONNECT listener; *extra*: more configuration; *tls*: TLS of its own
    (:class:`servedbroker.ServedBroker`)."""

    def __init__(
        self, directory: Path, extra: str = "", tls: dict[str, Path] | None = None
    ) -> None:
        super().__init__(
            directory, protocol="spice", extra_config=extra, connect_port=True, tls=tls
        )

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


#: ssl's names of subject attributes, as a host-subject spells them.
_SUBJECT_KEYS = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                 "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def _tls_tunnel(sock: socket.socket, section: configparser.SectionProxy) -> ssl.SSLSocket:
    """TLS inside the tunnel as spice-gtk does it with a .vv file's ``ca`` and
    ``host-subject``: the chain verified against that CA, the subject compared whole
    (the host is a session handle, not a name the certificate could carry)."""
    context = ssl.create_default_context(cadata=section["ca"].replace("\\n", "\n"))
    context.check_hostname = False
    tls = context.wrap_socket(sock)
    cert = tls.getpeercert()
    assert cert is not None
    subject = ",".join(
        f"{_SUBJECT_KEYS[key]}={value}" for rdn in cert["subject"] for key, value in rdn
    )
    if subject != section["host-subject"]:
        tls.close()
        raise ssl.SSLError(f"subject {subject!r} is not {section['host-subject']!r}")
    return tls


def connect_client(vv: str) -> TestClient:
    """A SPICE test client whose channel goes through the CONNECT proxy a .vv file names,
    using only what the file says (TLS inside the tunnel where it gives a ``tls-port``)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(vv)
    section = parser["virt-viewer"]
    proxy = urlsplit(section["proxy"])
    assert proxy.scheme == "http" and proxy.hostname and proxy.port
    sock = socket.create_connection((proxy.hostname, proxy.port), timeout=10)
    tls = "tls-port" in section
    target = f"{section['host']}:{section['tls-port' if tls else 'port']}"
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
    return TestClient(_tls_tunnel(sock, section) if tls else sock)


def link_main(client: TestClient) -> int:
    """Link a session's main channel; QEMU's connection id for the session (MAIN_INIT)."""
    assert client.link(ChannelType.MAIN, 0) is LinkError.OK
    init = client.wait_for(lambda e: isinstance(e, MainInit), timeout=20)
    assert isinstance(init, MainInit) and init.session_id != 0
    return init.session_id


def display_init(client: TestClient) -> None:
    """Send SPICE_MSGC_DISPLAY_INIT, as every well-behaved client does first."""
    client.send(build_message(MSGC_DISPLAY_INIT, build_display_init(), mini_header=True, serial=1))


#: spice-server's display messages (SPICE_MSG_DISPLAY_*) start at 101.
FIRST_DISPLAY_MSG = 101


@attrs.frozen
class Channels:
    """A session's main, display and inputs channels, linked (see :func:`link_session`)."""

    session_id: int
    main: TestClient
    display: TestClient
    inputs: TestClient

    def close(self) -> None:
        for client in (self.inputs, self.display, self.main):
            client.close()


def link_session(connect: Callable[[], TestClient]) -> Channels:
    """Link main, display and inputs, each on a new connection from *connect*, as
    remote-viewer and spice-html5 do: every link ``OK`` and the display drawing (its
    first display message arrived after ``DISPLAY_INIT``)."""
    main = connect()
    session_id = link_main(main)
    display = connect()
    assert display.link(ChannelType.DISPLAY, session_id) is LinkError.OK
    display_init(display)
    drawn = display.wait_for(
        lambda e: isinstance(e, Message) and e.type >= FIRST_DISPLAY_MSG, timeout=30
    )
    assert isinstance(drawn, Message)
    inputs = connect()
    assert inputs.link(ChannelType.INPUTS, session_id) is LinkError.OK
    return Channels(session_id, main, display, inputs)


def close_code(client: TestClient, timeout: float = 5.0) -> int | None:
    """The close code of a channel over a WebSocket (reading on until it closes)."""
    sock = client.sock
    assert isinstance(sock, WebSocketSock)
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while sock.close_code is None and time.monotonic() < deadline:
        try:
            if not sock.recv(65536) and sock.close_code is None:
                break
        except TimeoutError:
            continue
    return sock.close_code


def ws_client(url: str) -> TestClient:
    """A SPICE test client whose channel goes over a WebSocket to *url*."""
    ws = connect(url, subprotocols=["binary"], open_timeout=10, legacy=True)  # type: ignore[list-item]
    return TestClient(WebSocketSock(ws))  # type: ignore[arg-type]


def _free_display() -> int:
    for number in range(90, 200):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(
            f"/tmp/.X{number}-lock"
        ).exists():
            return number
    raise AssertionError("no free X display number")


def _xwd_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the 32-bit pixels of Xvfb's screen dump (XWD, -fbdir)."""
    data = path.read_bytes()
    fields = struct.unpack(">25I", data[:100])
    header_size, width, height = fields[0], fields[4], fields[5]
    bits_per_pixel, bytes_per_line, ncolors = fields[11], fields[12], fields[19]
    assert bits_per_pixel == 32, bits_per_pixel
    start = header_size + ncolors * 12
    pixels = data[start : start + bytes_per_line * height]
    return width, height, pixels


class XScreen:
    """An Xvfb screen of its own (1024x768, white root) whose frame buffer is dumped into
    *directory* (``Xvfb_screen0``), for native clients to draw on: :attr:`env` is the
    environment to start them with."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.number = _free_display()
        self.xvfb = subprocess.Popen(
            ["Xvfb", f":{self.number}", "-screen", "0", "1024x768x24", "-wr", "-nolisten",
             "tcp", "-fbdir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not Path(f"/tmp/.X11-unix/X{self.number}").exists():
                assert time.monotonic() < deadline, "Xvfb did not start"
                assert self.xvfb.poll() is None, "Xvfb exited"
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise
        self.env = {**os.environ, "DISPLAY": f":{self.number}"}

    def colors(self) -> collections.Counter[bytes]:
        """How many pixels of each colour (RGB bytes) the screen shows."""
        _width, _height, pixels = _xwd_pixels(self.directory / "Xvfb_screen0")
        return collections.Counter(pixels[i : i + 3] for i in range(0, len(pixels), 4))

    def wait_for_the_guests_screen(
        self, alive: Callable[[], bool], detail: Callable[[], str], timeout: float = 60.0
    ) -> None:
        """Until the screen shows the guest's VGA text console: black with text in VGA grey
        (0xA8A8A8: the 6-bit palette); the root is white (-wr), GTK's chrome light. The
        client must still run (*alive*); *detail*: what to show when it does not."""
        colors: collections.Counter[bytes] = collections.Counter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            time.sleep(1.0)
            colors = self.colors()
            if colors[b"\0\0\0"] > 100_000 and colors[b"\xa8\xa8\xa8"] > 500:
                break
        text = f"{colors.most_common(8)}\n{detail()}"
        assert colors[b"\0\0\0"] > 100_000, text
        assert colors[b"\xa8\xa8\xa8"] > 500, text
        assert alive(), detail()

    def close(self) -> None:
        self.xvfb.terminate()
        self.xvfb.wait(timeout=10)


class RemoteViewer:
    """remote-viewer (Debian virt-viewer) opening a .vv file on its own Xvfb screen
    (:class:`XScreen`), whose frame buffer is dumped into *directory*; *prefix*: the
    command remote-viewer runs under (``ip netns exec HOST`` to run it in another host)."""

    def __init__(self, vv: Path, directory: Path, prefix: Sequence[str] = ()) -> None:
        self.vv = vv
        self.directory = directory
        self.screen = XScreen(directory)
        self.viewer: subprocess.Popen[bytes] | None = None
        self.log = directory / "remote-viewer.log"
        try:
            env = {**self.screen.env, "SPICE_DEBUG": "1"}
            with self.log.open("wb") as log:
                self.viewer = subprocess.Popen(
                    [*prefix, "remote-viewer", str(vv)], env=env, stdout=log,
                    stderr=subprocess.STDOUT,
                )
        except BaseException:
            self.close()
            raise

    def wait_for_the_guests_screen(self, timeout: float = 60.0) -> None:
        """Until the screen shows the guest's VGA text console (see :class:`XScreen`)."""
        self.screen.wait_for_the_guests_screen(
            lambda: self.viewer is not None and self.viewer.poll() is None, self.log_tail,
            timeout,
        )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def close(self) -> None:
        if self.viewer is not None:
            self.viewer.terminate()
            self.viewer.wait(timeout=10)
        self.screen.close()

    def __enter__(self) -> RemoteViewer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
