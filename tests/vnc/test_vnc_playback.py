"""The VNC recording player: its page and assets (beside the console page, under the same
headers, nothing else served), the page without noVNC, what its script relies on (the
URLs it fetches, noVNC's channel interface, the token kept out of the address bar); and,
with the marker ``vm`` (a ``console-broker serve`` and headless Chromium), a recording
played in the browser: its first screen, seeking to the end and back (every pixel the
recording drew), 1x and 4x, a recording whose first part retention deleted, a link that
is not a recording's. The recording of a real guest is test_vnc_recording_vm.py's."""

from __future__ import annotations

import base64
import json
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import broker_vnc
import pytest
from broker_vnc import _page, _playback, _recording

from broker.config import Config, HTTPSection
from broker.hookspecs import Page
from broker.plugins import PluginContext

REPO = Path(__file__).resolve().parents[2]
PLAYBACK_JS = (REPO / "plugins" / "vnc" / "web" / "playback.js").read_text()
UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    core = tmp_path / "node_modules" / "@novnc" / "novnc" / "core"
    core.mkdir(parents=True)
    (core / "rfb.js").write_text("export default class RFB {}\n")
    return tmp_path / "node_modules"


def page(path: str, assets: Path) -> Page | None:
    config = Config(http=HTTPSection(assets_dir=str(assets)))
    return broker_vnc.PROTOCOL.page(path, PluginContext("vnc", config))


def test_the_player_and_its_assets(assets: Path) -> None:
    served = page("playback/", assets)
    assert served is not None and served.status == 200
    assert served.content_type.startswith("text/html")
    assert dict(served.headers) == dict(_page._HEADERS)  # the console page's CSP, no framing
    assert b'<script type="module" src="../app/playback.js">' in served.body
    assert b'href="../app/playback.css"' in served.body
    for name, kind in (("app/playback.js", "text/javascript"), ("app/playback.css", "text/css")):
        asset = page(name, assets)
        assert asset is not None and asset.status == 200 and asset.body
        assert asset.content_type.startswith(kind)
        assert dict(asset.headers) == dict(_page._HEADERS)
    for nothing in ("playback", "playback/index.html", "playback/x", "app/playback.html",
                    "playback/../app/playback.js"):
        assert page(nothing, assets) is None, nothing


def test_without_novnc_the_player_says_what_to_install(tmp_path: Path) -> None:
    served = page("playback/", tmp_path)
    assert served is not None and served.status == 503
    assert b"noVNC" in served.body and str(tmp_path).encode() not in served.body


def test_what_the_script_relies_on() -> None:
    # noVNC's RFB client, fed through a channel with what noVNC's Websock checks for
    assert "import RFB from '../novnc/core/rfb.js';" in PLAYBACK_JS
    channel = PLAYBACK_JS.split("class RecordedChannel {", 1)[1].split("\n}\n", 1)[0]
    for prop in ("send", "close", "binaryType", "onerror", "onmessage", "onopen", "protocol",
                 "readyState"):
        assert re.search(rf"\b{prop}\b", channel), prop
    # the recording from the broker's endpoint, relative to the page (a public_url prefix)
    assert "new URL('../../../recording', location.href)" in PLAYBACK_JS
    assert "&part=${part.part}" in PLAYBACK_JS
    # the token out of the address bar; never sent but to the broker's own endpoint
    assert "history.replaceState(null, '', location.pathname)" in PLAYBACK_JS
    assert "credentials: 'omit'" in PLAYBACK_JS
    assert _playback.PAGE == "playback/" and _recording.KIND.page == _playback.PAGE


# --- in Chromium, against a console-broker serve ----------------------------------------------

W, H = 64, 32
RED, GREY, BLUE = (255, 0, 0), (0xA8, 0xA8, 0xA8), (0, 0, 255)


def server_init() -> bytes:
    pixel_format = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    return struct.pack(">HH", W, H) + pixel_format + struct.pack(">I", 9) + b"recording"


def raw(x: int, y: int, w: int, h: int, rows: bytes) -> bytes:
    """A FramebufferUpdate of one raw rectangle, in noVNC's pixel format (R, G, B, 0)."""
    return struct.pack(">BxHHHHHi", 0, 1, x, y, w, h, 0) + rows


def fill(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    return bytes((*colour, 0)) * (w * h)


def two_halves() -> bytes:
    row = fill(W // 2, 1, RED) + fill(W // 2, 1, GREY)
    return row * H


def plant(directory: Path, recording: str, parts: list[list[list[Any]]]) -> None:
    """A VNC recording as the plugin writes it, one list of events per part."""
    where = directory / UUID
    where.mkdir(parents=True, exist_ok=True)
    offset = 0.0
    for number, events in enumerate(parts, 1):
        header = {"format": "console-broker-rfb", "version": 1,
                  "timestamp": 1893456000 + int(offset),
                  "console_broker": {"domain": {"name": "synth", "uuid": UUID},
                                     "protocol": "vnc", "device": None,
                                     "recording": recording, "part": number,
                                     "offset": offset, "input": False}}
        lines = [json.dumps(header)]
        for t, kind, data in events:
            if isinstance(data, bytes):
                data = base64.b64encode(data).decode()
            lines.append(json.dumps([t, kind, data]))
        path = where / f"20300101T000000Z-{recording}-{number:03d}.rfb.jsonl"
        path.write_text("\n".join(lines) + "\n")
        offset = events[-1][0]


#: The handshake as the broker sends it, QEMU's screen, then a blue square at 5 s.
SESSION = [
    [0.0, "o", b"RFB 003.008\n"], [0.01, "o", b"\x01\x01"], [0.02, "o", b"\x00\x00\x00\x00"],
    [0.03, "o", server_init()], [0.5, "o", raw(0, 0, W, H, two_halves())],
    [0.6, "i", b"\x04\x01\x00\x00\x00\x00\x00a"],  # input: never fed to the player
    [5.0, "o", raw(8, 8, 8, 8, fill(8, 8, BLUE))], [6.0, "e", "rotated"],
]

PIXELS = """
const c = document.querySelector('#screen canvas');
if (!c || !c.width) return null;
const g = c.getContext('2d');
const at = (x, y) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3));
return [c.width, c.height, at(2, 2), at(40, 2), at(10, 10)];
"""
STATE = "const s = Object.assign({}, window.playback || {}); delete s.player; return s;"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from servedbroker import ServedBroker

    directory = tmp_path_factory.mktemp("playback")
    recordings = directory / "state" / "recordings"
    plant(recordings, "0badcafe", [SESSION, [[6.5, "o", raw(0, 0, 8, 8, fill(8, 8, BLUE))],
                                            [7.0, "e", "closed"]]])
    plant(recordings, "feedface", [SESSION, [[7.0, "e", "closed"]]])
    (recordings / UUID / "20300101T000000Z-feedface-001.rfb.jsonl").unlink()  # retention
    broker = ServedBroker(directory, protocol="vnc", grace=1.0)
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


def wait_for(browser: Any, what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen; {browser.execute_script(STATE)}")
        time.sleep(0.1)


def open_player(browser: Any, served: Any, recording: str) -> dict[str, Any]:
    doc = json.loads(served.cli("token", "--recording", recording, "--json"))
    served.tokens.append(doc["token"])
    browser.get(doc["page"])
    wait_for(browser, "the player loaded", lambda: (browser.execute_script(STATE) or {})
             .get("state") not in (None, "loading"))
    return browser.execute_script(STATE)  # type: ignore[no-any-return]


def seek(browser: Any, seconds: float | str) -> None:
    browser.execute_script(
        "const s = document.getElementById('seek');"
        "s.value = arguments[0] === 'max' ? s.max : arguments[0];"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));",
        str(seconds),
    )


@pytest.mark.vm
def test_a_recording_plays_seeks_and_speeds_up(browser: Any, served: Any) -> None:
    state = open_player(browser, served, "0badcafe")
    assert state["state"] == "ready" and state["connected"], (
        state, browser.find_element("id", "message").text)
    assert (state["width"], state["height"], state["duration"]) == (W, H, 7.0)
    assert state["frames"] == 7 and state["parts"] == 2 and state["end"] == "closed"
    assert "token=" not in browser.current_url
    assert browser.find_element("id", "time").text == "0:00 / 0:07"
    seek(browser, "max")
    wait_for(browser, "the end", lambda: browser.execute_script(STATE)["state"] == "ended")
    assert browser.execute_script(PIXELS) == [W, H, list(BLUE), list(GREY), list(BLUE)]
    seek(browser, 1)  # back: a new RFB client fed from the start
    wait_for(browser, "paused at 1 s",
             lambda: browser.execute_script(STATE)["state"] == "paused")
    assert browser.execute_script(PIXELS) == [W, H, list(RED), list(GREY), list(RED)]
    browser.find_element("id", "speed-4").click()
    assert browser.execute_script(STATE)["speed"] == 4
    browser.find_element("id", "play").click()
    # It plays through the recording (positions between the start and the end seen while
    # playing), not a jump to its end; how fast is the benchmarks' business, not a test's.
    playing: list[float] = []
    deadline = time.monotonic() + 20
    while (state := browser.execute_script(STATE))["state"] != "ended":
        assert time.monotonic() < deadline, state
        if state["state"] == "playing":
            playing.append(state["position"])
        time.sleep(0.05)
    assert any(1 < position < 6.5 for position in playing), playing
    assert browser.execute_script(PIXELS)[2:] == [list(BLUE), list(GREY), list(BLUE)]
    browser.find_element("id", "speed-1").click()
    seek(browser, 4.5)
    browser.find_element("id", "play").click()
    wait_for(browser, "the square at 5 s",
             lambda: browser.execute_script(PIXELS)[4] == list(BLUE), timeout=5)
    position = browser.execute_script(STATE)["position"]
    assert 4.9 < position < 6.0, position  # at 1x: half a second later


@pytest.mark.vm
def test_what_cannot_be_played_is_said(browser: Any, served: Any) -> None:
    state = open_player(browser, served, "feedface")
    assert state["state"] == "error"
    assert "first parts have been deleted by retention" in state["error"]
    assert "parts here: 2" in browser.find_element("id", "message-detail").text
    browser.get(f"{served.url}/console/vnc/playback/?token=nonsense")
    state = wait_for(browser, "refused", lambda: browser.execute_script(STATE)["state"] == "error"
                     and browser.execute_script(STATE))
    assert "expired or is not valid" in state["error"]
    browser.get(f"{served.url}/console/vnc/playback/")
    wait_for(browser, "no token", lambda: browser.execute_script(STATE)["error"] == "no token")
