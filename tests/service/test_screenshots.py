"""Screenshots without a VM: PPM and PNG to PNG with Pillow (scaling, bounds), the capture
against libvirt's test driver, the route, ``GET /screenshot`` in process against the fake
hypervisor (which tokens grant it, every refusal, the bounds on time and concurrency, the
log line and the metric), and the ``screenshot`` and ``token --protocol screenshot``
commands. tests/vnc/test_screenshot_vm.py takes them on the real stack."""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import libvirt
import pytest
import structlog
from brokerkit import FakeDomain, FakeResolver, Running, make_config, running_broker
from conftest import DOMAIN, FakeClock
from PIL import Image
from test_broker_requests import http_get

from broker import Protocol, hookimpl
from broker.cli import main
from broker.plugins import PluginError, PluginManager
from broker.screenshots import (
    MAX_WIDTH,
    MIN_WIDTH,
    Capture,
    ScreenshotError,
    capture,
    has_screen,
    to_png,
    width_bound,
)
from broker.service import _refusals as R
from broker.service._libvirt import LibvirtResolver
from broker.service._refusals import Refused
from broker.service._request import NotAllowed, NotFound, ScreenshotRoute, route
from broker.tokens import Claims, Rights, TokenIssuer, TokenVerifier

PPM = "image/x-portable-pixmap"
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
STOPPED = "1c2d3e4f-0000-4000-8000-000000000001"
HEADLESS = "1c2d3e4f-0000-4000-8000-000000000002"
BROKEN = "1c2d3e4f-0000-4000-8000-000000000003"
HUGE = "1c2d3e4f-0000-4000-8000-000000000004"
SLOW = "1c2d3e4f-0000-4000-8000-000000000005"


def ppm(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """A binary PPM (P6), as QEMU's screendump writes it."""
    body = bytearray()
    for y in range(height):
        for x in range(width):
            body += bytes(pixel(x, y))
    return f"P6\n{width} {height}\n255\n".encode() + bytes(body)


def text_screen(x: int, y: int) -> tuple[int, int, int]:
    """VGA grey text on black: a 'glyph' every 8 pixels."""
    return (0xA8, 0xA8, 0xA8) if (x % 8 < 3 and y % 16 < 10) else (0, 0, 0)


def png_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


# --- PPM and PNG to PNG ---------------------------------------------------------------------


def test_a_ppm_becomes_the_same_picture_as_png() -> None:
    data = ppm(72, 40, text_screen)
    shot = to_png(Capture(PPM, data))
    assert (shot.width, shot.height, shot.screen_width, shot.screen_height) == (72, 40, 72, 40)
    image = png_image(shot.png)
    assert image.format == "PNG" and image.size == (72, 40)
    assert image.mode == "P"  # two colours: a palette, losing nothing
    assert image.convert("RGB").tobytes() == data.split(b"255\n", 1)[1]  # pixel for pixel
    assert repr(shot).count("bytes>") == 1  # the image is not dumped into a repr


def test_a_picture_of_many_colours_stays_rgb_and_lossless() -> None:
    def gradient(x: int, y: int) -> tuple[int, int, int]:
        return (x % 256, y % 256, (x * y) % 256)

    data = ppm(64, 64, gradient)
    image = png_image(to_png(Capture(PPM, data)).png)
    assert image.mode == "RGB"
    assert image.tobytes() == data.split(b"255\n", 1)[1]


def test_max_width_scales_down_keeping_the_aspect_ratio() -> None:
    data = ppm(720, 400, text_screen)
    shot = to_png(Capture(PPM, data), max_width=180)
    assert (shot.width, shot.height) == (180, 100)
    assert (shot.screen_width, shot.screen_height) == (720, 400)
    assert png_image(shot.png).size == (180, 100)
    odd = to_png(Capture(PPM, ppm(1024, 768, text_screen)), max_width=333)
    assert (odd.width, odd.height) == (333, 250)  # 768 * 333 / 1024 = 249.75
    # Lanczos keeps the text's grey: some pixels stay light, the black stays black
    colours = png_image(shot.png).convert("RGB").getcolors(1 << 16)
    assert colours is not None and max(colours)[1] == (0, 0, 0)
    assert any(sum(colour) > 300 for _count, colour in colours)


def test_a_narrower_screen_is_not_enlarged_nor_a_flat_one_lost() -> None:
    shot = to_png(Capture(PPM, ppm(64, 48, text_screen)), max_width=640)
    assert (shot.width, shot.height) == (64, 48)
    flat = to_png(Capture(PPM, ppm(1000, 2, text_screen)), max_width=16)
    assert (flat.width, flat.height) == (16, 1)


def test_png_from_the_driver_is_read_too_and_made_rgb() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (30, 20), (10, 20, 30, 128)).save(out, "PNG")
    shot = to_png(Capture("image/png", out.getvalue()))
    image = png_image(shot.png)
    assert image.convert("RGB").getpixel((0, 0)) == (10, 20, 30) and image.size == (30, 20)


def test_images_are_bounded_before_they_are_decoded() -> None:
    # a header claiming 100000 x 100000 pixels, with almost no data: refused from the header
    for width, height in ((5000, 5000), (100000, 100000)):
        huge = f"P6\n{width} {height}\n255\n".encode() + b"\0" * 64
        with pytest.raises(ScreenshotError) as info:
            to_png(Capture(PPM, huge))
        assert info.value.kind == "too_large" and "16777216" in str(info.value)
    with pytest.raises(ScreenshotError) as info:
        to_png(Capture(PPM, ppm(20, 20, text_screen)), max_pixels=399)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", b"P6\n20 20\n255\n" + b"\0" * 10, b"GIF89a" + b"\0" * 40],
    ids=["empty", "garbage", "truncated", "another-format"],
)
def test_what_is_no_ppm_or_png_is_refused(data: bytes) -> None:
    with pytest.raises(ScreenshotError) as info:
        to_png(Capture(PPM, data))
    assert info.value.kind == "failed"


def test_jpeg_is_not_among_the_formats_read() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG")
    with pytest.raises(ScreenshotError, match="unreadable"):
        to_png(Capture("image/jpeg", out.getvalue()))


def test_width_bounds() -> None:
    assert width_bound(str(MIN_WIDTH)) == MIN_WIDTH and width_bound(str(MAX_WIDTH)) == MAX_WIDTH
    assert width_bound("0320") == 320
    for bad in (str(MIN_WIDTH - 1), str(MAX_WIDTH + 1), "", "abc", "+320", "-320", "32.5",
                "\u0663\u0662\u0660", " 320"):
        with pytest.raises(ValueError, match="max width"):
            width_bound(bad)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ("", False),
        ("<graphics type='vnc'/>", False),
        ("<video><model type='vga'/></video>", True),
        ("<video><model type='none'/></video>", False),
        ("<video/>", True),
        ("<video><model type='none'/></video><video><model type='qxl'/></video>", True),
    ],
)
def test_has_screen(devices: str, expected: bool) -> None:
    assert has_screen(f"<domain><devices>{devices}</devices></domain>") is expected


# --- the capture, against libvirt's test driver -------------------------------------------


def _node(tmp_path: Path) -> str:
    """A test driver node with a running domain with a screen and one without."""
    path = tmp_path / "node.xml"
    path.write_text(f"""<node>
  <domain type='test'>
    <name>screen</name><uuid>{DOMAIN}</uuid><memory unit='MiB'>64</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices><graphics type='vnc'/><video><model type='vga'/></video></devices>
  </domain>
  <domain type='test'>
    <name>headless</name><uuid>{HEADLESS}</uuid><memory unit='MiB'>64</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices/>
  </domain>
</node>
""")
    return f"test://{path}"


def test_capture_through_libvirt(tmp_path: Path) -> None:
    conn = libvirt.open(_node(tmp_path))
    try:
        dom = conn.lookupByName("screen")
        captured = capture(conn, dom)
        assert captured.mime == "image/png"  # the test driver's picture (QEMU sends PPM)
        shot = to_png(captured, max_width=100)
        assert shot.width == 100 and shot.screen_width > 100
        with pytest.raises(ScreenshotError) as info:
            capture(conn, dom, max_bytes=1000)
        assert info.value.kind == "too_large"
        with pytest.raises(ScreenshotError) as info:
            capture(conn, conn.lookupByName("headless"))
        assert info.value.kind == "no_screen" and "headless" in str(info.value)
        dom.destroy()
        with pytest.raises(ScreenshotError) as info:
            capture(conn, dom)
        assert info.value.kind == "not_running"
        dom.undefine()
        with pytest.raises(ScreenshotError) as info:
            capture(conn, dom)
        assert info.value.kind == "unknown_domain"
    finally:
        conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_resolver_captures_in_a_worker_thread(tmp_path: Path) -> None:
    resolver = LibvirtResolver(_node(tmp_path))

    class Events:
        def domain_gone(self, *_args: object) -> None: ...
        def connection_lost(self) -> None: ...
        def connection_restored(self) -> None: ...

    claims = Claims(DOMAIN, "screenshot", "hv1", Rights.VIEW, 0, 0, 60, "jti")
    async with anyio.create_task_group() as group:
        await group.start(resolver.run, Events())
        target = await resolver.target(claims, None)
        captured = await anyio.to_thread.run_sync(
            lambda: resolver.capture_screenshot(target, max_bytes=1 << 24)
        )
        assert captured.mime == "image/png" and captured.data.startswith(b"\x89PNG")
        group.cancel_scope.cancel()


# --- the route ------------------------------------------------------------------------------


def test_the_screenshot_route() -> None:
    assert route("/screenshot?token=abc") == ScreenshotRoute("abc", None)
    assert route("/screenshot?token=abc&max_width=320") == ScreenshotRoute("abc", 320)
    assert route("/hv1/screenshot?token=abc", "/hv1") == ScreenshotRoute("abc", None)
    assert "abc" not in repr(route("/screenshot?token=abc"))
    for method in ("HEAD", "POST", "PUT"):
        assert route("/screenshot?token=abc", method=method) == NotAllowed(("GET",))
    assert isinstance(route("/screenshot/x?token=abc"), NotFound)
    for target, refusal in (
        ("/screenshot", R.INVALID_TOKEN),
        ("/screenshot?token=a&token=b", R.BAD_REQUEST),
        ("/screenshot?token=a&max_width=8", R.BAD_REQUEST),
        ("/screenshot?token=a&max_width=wide", R.BAD_REQUEST),
        ("/screenshot?token=a&max_width=100&max_width=200", R.BAD_REQUEST),
    ):
        with pytest.raises(Refused) as info:
            route(target)
        assert info.value.refusal is refusal, target


# --- GET /screenshot, in process ------------------------------------------------------------


class ScreenProtocols:
    """vnc grants screenshots (as the built-in VNC and SPICE plugins declare), serial not."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="vnc", screenshots=True),
                Protocol(name="serial", title="serial")]


class Gate:
    """A capture that waits until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self) -> Capture:
        self.entered.release()
        assert self.release.wait(30)
        return Capture(PPM, ppm(32, 16, text_screen))


def _fail() -> Capture:
    raise ScreenshotError("failed", "domain broken: internal error: QEMU said no")


def _huge() -> Capture:
    return Capture(PPM, b"P6\n9000 9000\n255\n" + b"\0" * 100)


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.release.set()


@pytest.fixture
async def broker(verifier: TokenVerifier, gate: Gate) -> AsyncIterator[Running]:
    resolver = FakeResolver(
        FakeDomain(DOMAIN, name="web1", screen=lambda: Capture(PPM, ppm(720, 400, text_screen))),
        FakeDomain(STOPPED, running=False),
        FakeDomain(HEADLESS),
        FakeDomain(BROKEN, screen=_fail),
        FakeDomain(HUGE, screen=_huge),
        FakeDomain(SLOW, screen=gate),
    )
    plugins = PluginManager(disabled=(), load_entrypoints=False,
                            plugins=[("screens", ScreenProtocols())])
    async with running_broker(make_config(), verifier, resolver, plugins) as running:
        yield running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_screenshot_token_gets_the_screen_as_png(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    issued = issuer.issue(DOMAIN, "screenshot", ttl=60, view_only=True)
    with structlog.testing.capture_logs() as logs:
        status, headers, body = await http_get(broker, f"/screenshot?token={issued.token}")
    assert status == 200, body
    assert headers["content-type"] == "image/png"
    assert headers["cache-control"] == "no-store"
    assert headers["content-disposition"] == 'inline; filename="screenshot.png"'
    assert int(headers["content-length"]) == len(body)
    image = png_image(body)
    assert image.size == (720, 400)
    assert verifier.used(issued.claims)  # single use
    taken = [entry for entry in logs if entry["event"] == "screenshot.taken"]
    assert len(taken) == 1
    assert taken[0]["domain"] == DOMAIN and taken[0]["domain_name"] == "web1"
    assert (taken[0]["width"], taken[0]["height"], taken[0]["screen"]) == (720, 400, "720x400")
    assert taken[0]["bytes"] == len(body) and taken[0]["ms"] >= 0
    assert taken[0]["jti"] == issued.claims.jti and taken[0]["protocol"] == "screenshot"
    assert issued.token not in repr(logs)
    status, _, body = await http_get(broker, f"/screenshot?token={issued.token}")
    assert (status, body) == (401, b"token already used\n")
    metrics = (await http_get(broker, "/metrics"))[2].decode()
    assert 'console_broker_screenshots_total{result="ok"} 1.0' in metrics
    assert 'console_broker_screenshots_total{result="replayed_token"} 1.0' in metrics


@pytest.mark.anyio
async def test_max_width_gives_a_thumbnail(broker: Running, issuer: TokenIssuer) -> None:
    token = issuer.issue(DOMAIN, "screenshot", ttl=60).token
    status, _, body = await http_get(broker, f"/screenshot?token={token}&max_width=200")
    assert status == 200
    assert png_image(body).size == (200, 111)  # 400 * 200 / 720 = 111.1
    token = issuer.issue(DOMAIN, "screenshot", ttl=60).token
    status, _, body = await http_get(broker, f"/screenshot?token={token}&max_width=4")
    assert (status, body) == (400, b"malformed console request\n")
    status, _, _ = await http_get(broker, f"/screenshot?token={token}")
    assert status == 200  # the malformed request left the token usable


@pytest.mark.anyio
async def test_which_tokens_grant_a_screenshot(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    vnc = issuer.issue(DOMAIN, "vnc", ttl=60, view_only=True)  # view rights are enough
    assert (await http_get(broker, f"/screenshot?token={vnc.token}"))[0] == 200
    assert verifier.used(vnc.claims)
    serial = issuer.issue(DOMAIN, "serial", ttl=60)
    status, _, body = await http_get(broker, f"/screenshot?token={serial.token}")
    assert (status, body) == (403, b"token is for another protocol\n")
    assert not verifier.used(serial.claims)  # refused before it is used up
    unknown = issuer.issue(DOMAIN, "spice", ttl=60)  # no plugin serves it here
    assert (await http_get(broker, f"/screenshot?token={unknown.token}"))[0] == 403
    # and a screenshot token opens no console
    screenshot = issuer.issue(DOMAIN, "screenshot", ttl=60)
    status, _, _ = await http_get(
        broker, f"/ws/screenshot?token={screenshot.token}",
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
    )
    assert status == 404
    assert not verifier.used(screenshot.claims)


@pytest.mark.anyio
async def test_refusals(broker: Running, issuer: TokenIssuer, clock: FakeClock) -> None:
    async def refused(domain: str) -> tuple[int, bytes]:
        token = issuer.issue(domain, "screenshot", ttl=60).token
        status, headers, body = await http_get(broker, f"/screenshot?token={token}")
        assert headers["content-type"].startswith("text/plain")
        return status, body

    assert await refused(STOPPED) == (409, b"VM not running\n")
    assert await refused(OTHER) == (404, b"unknown domain\n")
    assert await refused(HEADLESS) == (404, b"the VM has no screen (no video device)\n")
    assert await refused(BROKEN) == (502, b"the hypervisor could not take a screenshot\n")
    assert await refused(HUGE) == (502, b"the screen is too large to capture\n")
    assert (await http_get(broker, "/screenshot?token=nonsense"))[0] == 401
    assert (await http_get(broker, "/screenshot"))[0] == 401
    expired = issuer.issue(DOMAIN, "screenshot", ttl=10).token
    clock.advance(20)
    assert (await http_get(broker, f"/screenshot?token={expired}"))[:3:2] == (
        401, b"token expired\n"
    )
    broker.resolver.available = False
    assert (await refused(DOMAIN))[0] == 503
    metrics = (await http_get(broker, "/metrics"))[2].decode()
    for reason in ("vm_not_running", "unknown_domain", "no_screen", "screenshot_failed",
                   "screenshot_too_large", "invalid_token", "expired_token",
                   "hypervisor_unavailable"):
        assert f'console_broker_screenshots_total{{result="{reason}"}} 1.0' in metrics, reason
        assert f'console_broker_refusals_total{{reason="{reason}"}}' in metrics, reason


@pytest.mark.anyio
async def test_head_and_post_are_not_allowed(broker: Running, issuer: TokenIssuer) -> None:
    token = issuer.issue(DOMAIN, "screenshot", ttl=60).token
    stream = await anyio.connect_tcp("127.0.0.1", broker.port)
    async with stream:
        await stream.send(f"HEAD /screenshot?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await stream.receive()
    assert head.startswith(b"HTTP/1.1 405") and b"Allow: GET" in head
    assert (await http_get(broker, f"/screenshot?token={token}"))[0] == 200


@pytest.mark.anyio
async def test_four_at_once_then_busy(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier, gate: Gate
) -> None:
    results: list[int] = []

    async def slow() -> None:
        token = issuer.issue(SLOW, "screenshot", ttl=60).token
        results.append((await http_get(broker, f"/screenshot?token={token}"))[0])

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(slow)
        for _ in range(4):
            assert await anyio.to_thread.run_sync(gate.entered.acquire, True, 10)
        assert broker.broker.screenshots.running == 4
        fifth = issuer.issue(DOMAIN, "screenshot", ttl=60)
        status, _, body = await http_get(broker, f"/screenshot?token={fifth.token}")
        assert (status, body) == (429, b"too many screenshots at once; try again\n")
        assert not verifier.used(fifth.claims)  # refused before it was used up
        gate.release.set()
    assert results == [200] * 4
    assert broker.broker.screenshots.running == 0
    assert (await http_get(broker, f"/screenshot?token={fifth.token}"))[0] == 200


@pytest.mark.anyio
async def test_a_capture_that_hangs_times_out_and_still_counts(
    broker: Running, issuer: TokenIssuer, verifier: TokenVerifier, gate: Gate
) -> None:
    broker.broker.screenshots.timeout = 0.3
    slow = issuer.issue(SLOW, "screenshot", ttl=60)
    status, _, body = await http_get(broker, f"/screenshot?token={slow.token}")
    assert (status, body) == (504, b"the screenshot took too long\n")
    assert verifier.used(slow.claims)  # the capture had started: used up
    # the abandoned capture holds its slot until libvirt returns
    assert broker.broker.screenshots.running == 1
    gate.release.set()
    with anyio.fail_after(10):
        while broker.broker.screenshots.running:
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_shutting_down_broker_takes_none(broker: Running, issuer: TokenIssuer) -> None:
    broker.broker._runner.closing = True
    token = issuer.issue(DOMAIN, "screenshot", ttl=60).token
    assert (await http_get(broker, f"/screenshot?token={token}"))[0] == 503


def test_no_plugin_may_declare_the_screenshot_protocol() -> None:
    class Squatter:
        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            return [Protocol(name="screenshot", title="mine")]

    with pytest.raises(PluginError, match="'screenshot': the name is the core's own"):
        PluginManager(disabled=(), load_entrypoints=False, plugins=[("squat", Squatter())])


def test_the_built_in_graphical_protocols_grant_screenshots() -> None:
    protocols = {name: p for name, (_, p) in PluginManager(disabled=()).protocols.items()}
    assert protocols["vnc"].screenshots and protocols["spice"].screenshots
    assert not protocols["serial"].screenshots


# --- the commands ---------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_the_screenshot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = _node(tmp_path)
    out = tmp_path / "shot.png"
    status, stdout, err = run(capsys, "screenshot", "screen", "-o", str(out), "--connect", uri)
    assert status == 0, err
    image = png_image(out.read_bytes())
    assert stdout.startswith(f"screen: {image.width}x{image.height} PNG, ")
    assert stdout.rstrip().endswith(f"-> {out}")
    status, stdout, err = run(capsys, "screenshot", DOMAIN, "-o", str(out), "--connect", uri,
                              "--max-width", "64")
    assert status == 0, err
    assert png_image(out.read_bytes()).width == 64 and "(screen " in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.xml", "shot.png"]  # no leftovers


def test_the_screenshot_command_to_stdout(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert main(["screenshot", "screen", "-o", "-", "--connect", _node(tmp_path)]) == 0
    out, err = capsysbinary.readouterr()
    assert png_image(out).format == "PNG" and err.startswith(b"screen: ")


def test_the_screenshot_command_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = _node(tmp_path)
    out = tmp_path / "shot.png"
    out.write_bytes(b"the previous one")
    cases = [
        (["headless"], "no screenshot: domain headless has no screen (no video device)"),
        (["nowhere"], f"no domain 'nowhere' at {uri}"),
    ]
    for args, line in cases:
        status, stdout, err = run(capsys, "screenshot", *args, "-o", str(out), "--connect", uri)
        assert (status, stdout, err) == (1, "", f"console-broker: error: {line}\n")
    status, _, err = run(capsys, "screenshot", "screen", "-o", str(out),
                         "--connect", "test:///nonexistent/node.xml")
    assert status == 1 and err.startswith("console-broker: error: cannot reach libvirt at ")
    assert err.count("\n") == 1
    assert out.read_bytes() == b"the previous one"  # never half written
    with pytest.raises(SystemExit) as info:
        main(["screenshot", "screen", "-o", str(out), "--max-width", "9999"])
    assert info.value.code == 2
    assert "max width: a whole number from 16 to 8192" in capsys.readouterr().err


def test_a_screenshot_token(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    status, out, err = run(capsys, "token", DOMAIN, "--uuid", "--protocol", "screenshot",
                           "--json", "--view-only", "--config", str(keyed_config))
    assert status == 0, err
    doc = json.loads(out)
    assert doc["screenshot"].startswith("http://127.0.0.1:6080/screenshot?token=eyJ")
    assert "page" not in doc and "websocket" not in doc
    assert doc["protocol"] == "screenshot" and doc["view_only"] is True
    status, out, err = run(capsys, "token", DOMAIN, "--uuid", "--protocol", "screenshot",
                           "--config", str(keyed_config))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"domain:     {DOMAIN}"
    assert lines[1] == "purpose:    screenshot, node hv1"
    assert lines[3].startswith("screenshot: http://127.0.0.1:6080/screenshot?token=eyJ")
    status, _, err = run(capsys, "token", DOMAIN, "--uuid", "--protocol", "screenshot",
                         "--device", "serial0", "--config", str(keyed_config))
    assert status == 2 and "not for a screenshot token" in err


@pytest.fixture
def keyed_config(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(capsys, "keygen", "--config", str(config_file))[0] == 0
    return config_file
