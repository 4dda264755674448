"""Screenshots on the real stack, beside live VNC sessions: ``echo shot-42`` typed on the
tiny guest's VGA console through a VNC session (proven on its serial port), then
``console-broker screenshot`` and ``GET /screenshot?token=`` give PNGs of the guest's
screen size showing VGA grey text on black, pixel for pixel what the VNC session sees,
while that session stays connected and keeps receiving FramebufferUpdates before, during
and after; and the console page in headless Chromium beside a screenshot: the same
picture.

The screenshot is the core's (libvirt's virDomainScreenshot), whatever the protocol:
these tests live with the VNC tests because a VNC session is what they watch."""

from __future__ import annotations

import base64
import io
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from pagekit import wait_until
from PIL import Image
from servedbroker import CLI, ServedBroker, enabled_guest
from vncstack import CANVAS, RFBSocket, Served, settled_server_init
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.vm

#: The VGA text console's grey (colour 7) and its black.
GREY, BLACK = (0xA8, 0xA8, 0xA8), (0, 0, 0)
#: The noVNC canvas as a PNG data URL, run in the console page.
CANVAS_PNG = """
const canvas = document.querySelector('#screen canvas');
return canvas && canvas.width ? canvas.toDataURL('image/png') : null;
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("screenshots"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged(require_tokens=True)


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = enabled_guest(testbed, "--consoles", "vnc,serial")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def image(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data), formats=["PNG"])
    picture.load()
    return picture.convert("RGB")


def colours(picture: Image.Image) -> dict[tuple[int, int, int], int]:
    found = picture.getcolors(1 << 20)
    assert found is not None
    return {colour: count for count, colour in found}


def assert_text_on_black(picture: Image.Image) -> None:
    """VGA grey text on black: black the most common colour, and many grey pixels."""
    counts = colours(picture)
    assert max(counts, key=counts.__getitem__) == BLACK, sorted(counts.items())[:8]
    assert counts.get(GREY, 0) > 1000, counts.get(GREY, 0)  # the boot messages, the prompt


def same_pixels(a: Image.Image, b: Image.Image) -> float:
    """The share of pixels two pictures of one size have alike."""
    assert a.size == b.size
    first, second = a.tobytes(), b.tobytes()
    alike = sum(first[i : i + 3] == second[i : i + 3] for i in range(0, len(first), 3))
    return alike / (a.width * a.height)


def framebuffer_image(init: Any, pixels: bytes) -> Image.Image:
    """A raw 32-bit true-colour update (QEMU's server format) as an RGB picture."""
    fmt = init.pixel_format
    assert fmt.bits_per_pixel == 32 and fmt.true_colour
    order = "big" if fmt.big_endian else "little"
    out = bytearray()
    for i in range(0, len(pixels), 4):
        value = int.from_bytes(pixels[i : i + 4], order)
        out += bytes((
            (value >> fmt.red_shift & fmt.red_max) * 255 // fmt.red_max,
            (value >> fmt.green_shift & fmt.green_max) * 255 // fmt.green_max,
            (value >> fmt.blue_shift & fmt.blue_max) * 255 // fmt.blue_max,
        ))
    return Image.frombytes("RGB", (init.width, init.height), bytes(out))


class Watcher:
    """A VNC session that keeps asking for the whole screen and counts the
    FramebufferUpdates it gets, in a thread of its own, until stopped."""

    def __init__(self, rfb: RFBSocket, init: Any) -> None:
        self.rfb, self.init = rfb, init
        self.updates: list[float] = []
        self.last = b""
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.rfb.request_raw_update(self.init)
                self.last = self.rfb.read_raw_update(self.init, timeout=10)
                self.updates.append(time.monotonic())
                time.sleep(0.05)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 20
        while len(self.updates) < 3:
            assert self.error is None and time.monotonic() < deadline, self.error
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive() and self.error is None, self.error

    def between(self, start: float, end: float) -> int:
        return sum(start <= moment <= end for moment in self.updates)

    def longest_gap(self) -> float:
        return max(b - a for a, b in zip(self.updates, self.updates[1:], strict=False))


def type_until_serial_says(rfb: RFBSocket, serial: ClientConnection, timeout: float = 90) -> None:
    """Type ``echo shot-42 | tee /dev/ttyS0`` on the VGA console (tty1's shell) until the
    guest's serial port says ``shot-42``: the keys reached the shell, and the VGA screen
    shows the command and its answer."""
    seen = b""
    deadline = time.monotonic() + timeout
    while b"shot-42" not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        rfb.type("echo shot-$((6*7)) | tee /dev/ttyS0\n")
        end = time.monotonic() + 5
        while time.monotonic() < end and b"shot-42" not in seen:
            try:
                message = serial.recv(timeout=0.5)
            except TimeoutError:
                continue
            assert isinstance(message, bytes)
            seen += message


def cli_screenshot(served: Served, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, "screenshot", *args, "--config", str(served.config)],
        capture_output=True, env=served.env, timeout=60,
    )


def get_screenshot(served: Served, token: str, query: str = "") -> tuple[int, bytes]:
    return served.get(f"/screenshot?token={token}{query}")


def test_screenshots_while_a_vnc_session_keeps_drawing(
    served: Served, guest: Any, tmp_path: Path
) -> None:
    name = guest.name()
    init = settled_server_init(guest)
    assert (init.width, init.height) == (720, 400)  # the VGA text console
    with served.connect(name) as ws:
        rfb = RFBSocket(ws)
        assert rfb.handshake() is not None
        with ServedBroker.connect(served, name, protocol="serial") as serial:
            type_until_serial_says(rfb, serial)
        watcher = Watcher(rfb, init)
        watcher.start()
        started = time.monotonic()
        shots = take_screenshots(served, guest, tmp_path)
        ended = time.monotonic()
        time.sleep(1.0)
        watcher.stop()

        # the VNC session went on throughout: updates before, during and after
        assert watcher.between(0, started) >= 3
        assert watcher.between(started, ended) >= 3
        assert watcher.between(ended, time.monotonic()) >= 3
        assert watcher.longest_gap() < 3.0, watcher.longest_gap()
        rfb.request_raw_update(init)
        seen = framebuffer_image(init, rfb.read_raw_update(init))
    # libvirt's picture is the one the VNC session sees (a blinking cursor aside)
    for shot in shots:
        alike = same_pixels(seen, shot)
        assert alike > 0.99, alike

    taken = served.events("screenshot.taken")
    assert [(e["width"], e["height"]) for e in taken] == [(720, 400), (180, 100), (720, 400)]
    assert {e["protocol"] for e in taken} == {"screenshot", "vnc"}
    assert all(e["domain_name"] == name and e["screen"] == "720x400" for e in taken)
    metrics = served.get("/metrics")[1].decode()
    assert 'console_broker_screenshots_total{result="ok"} 3.0' in metrics
    assert 'console_broker_screenshots_total{result="wrong_protocol"} 1.0' in metrics


def take_screenshots(served: Served, guest: Any, tmp_path: Path) -> list[Image.Image]:
    """The command's and the endpoint's screenshots, each way, checked; the two full-size
    pictures."""
    name = guest.name()
    # console-broker screenshot, straight through libvirt
    png = tmp_path / "shot.png"
    done = cli_screenshot(served, name, "-o", str(png))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(f"{name}: 720x400 PNG, ")
    shot = image(png.read_bytes())
    assert shot.size == (720, 400)
    assert_text_on_black(shot)
    thumb = tmp_path / "thumb.png"
    done = cli_screenshot(served, name, "-o", str(thumb), "--max-width", "360")
    assert done.returncode == 0, done.stderr
    assert image(thumb.read_bytes()).size == (360, 200)
    done = cli_screenshot(served, guest.UUIDString(), "-o", "-")
    assert done.returncode == 0, done.stderr
    assert image(done.stdout).size == (720, 400)

    # GET /screenshot with the core's own screenshot token, view-only, used once
    token = served.issue(name, "--view-only", protocol="screenshot")
    assert set(token) >= {"screenshot", "token"} and "page" not in token
    status, body = get_screenshot(served, token["token"])
    assert status == 200, body
    fetched = image(body)
    assert fetched.size == (720, 400)
    assert_text_on_black(fetched)
    assert get_screenshot(served, token["token"]) == (401, b"token already used\n")
    small = served.issue(name, protocol="screenshot")["token"]
    status, body = get_screenshot(served, small, "&max_width=180")
    assert status == 200 and image(body).size == (180, 100)
    # a VNC token grants a screenshot too; a serial token does not
    vnc = served.token(name, view_only=True)["token"]
    assert get_screenshot(served, vnc)[0] == 200
    serial_token = served.issue(name, protocol="serial")["token"]
    assert get_screenshot(served, serial_token) == (403, b"token is for another protocol\n")
    return [shot, fetched]


def test_the_console_page_and_a_screenshot_side_by_side(
    served: Served, guest: Any, browser: Any, tmp_path: Path
) -> None:
    name = guest.name()
    browser.get(served.token(name)["page"])
    wait_until(browser, "the page connected", lambda: browser.execute_script(
        "return window.consoleStatus && window.consoleStatus.state === 'connected'"))
    wait_until(browser, "the guest's screen on the canvas", lambda: (
        (found := browser.execute_script(CANVAS)) and found[2] > 1))
    status, body = get_screenshot(served, served.issue(name, protocol="screenshot")["token"])
    assert status == 200, body
    shot = image(body)
    assert shot.size == (720, 400)

    def canvas_matches() -> tuple[Image.Image, float] | None:
        data = browser.execute_script(CANVAS_PNG)
        picture = image(base64.b64decode(data.split(",", 1)[1]))
        if picture.size != shot.size:
            return None
        alike = same_pixels(picture, shot)
        seen.append(alike)
        return (picture, alike) if alike > 0.99 else None

    # the libvirt PNG's size is the canvas's framebuffer size, and they show one picture
    # (once noVNC has drawn all of the first update)
    seen: list[float] = []
    canvas, _alike = wait_until(browser, "the canvas showing the screenshot's picture",
                                canvas_matches, timeout=30, shows=lambda: f"alike: {seen}")
    assert_text_on_black(canvas)
    # side by side, for a person to look at: the page as Chromium shows it, the canvas,
    # and the screenshot
    page = image(browser.get_screenshot_as_png())
    side = Image.new("RGB", (page.width + 2 * shot.width + 20, max(page.height, shot.height)))
    side.paste(page, (0, 0))
    side.paste(canvas, (page.width + 10, 0))
    side.paste(shot, (page.width + shot.width + 20, 0))
    side.save(tmp_path / "side-by-side.png")
    # the page shows the guest's text too (scaled by the browser: light greys, not 0xA8 only)
    light = sum(n for colour, n in colours(page).items() if min(colour) > 0x60)
    assert light > 1000, light
