"""VNC recordings on the real stack: a ``console-broker serve`` with ``vnc.record = true``
and a retention policy, the tiny guest, the console page in headless Chromium as the
recorded session, and the guest printing a marker on its VGA console
(``printf rec-marker-42 > /dev/tty1`` from its serial shell, after clearing the screen).

While the session runs, its part is listed as being written (protocol ``vnc``), and
neither the broker's retention pass every second nor ``recordings --prune --max-total 1``
deletes it, while they delete an old planted recording. Once the page leaves, the
recording is closed; ``console-broker token --recording ID`` gives the player's link,
and the player in Chromium shows, after a seek to the end and again after playing at 4x
from a moment before the marker, the marker on its canvas: VGA grey glyphs on black in
the top row's first 13 cells, the same glyph wherever the marker repeats a character
(``r``, ``e``, ``-``), the rest of the screen black, and every pixel what the live page
showed and what libvirt's screenshot of the guest showed. A screenshot of the player is
kept (``player.png`` in the test's directory). Then the finished part is pruned like a
serial recording, and its link says the recording is gone."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from pagekit import wait_until
from PIL import Image
from servedbroker import CLI, ServedBroker, enabled_guest
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.vm

MARKER = "rec-marker-42"
#: The VGA text console's cells (720x400: 80 columns of 9 pixels, 25 rows of 16).
CELL_W, CELL_H = 9, 16
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
CANVAS_PNG = """
const canvas = document.querySelector('#screen canvas');
return canvas && canvas.width ? canvas.toDataURL('image/png') : null;
"""
STATE = "const s = Object.assign({}, window.playback || {}); delete s.player; return s;"


class Broker(ServedBroker):
    """A broker recording every VNC session, pruning every second (keep 7 days)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            directory, protocol="vnc", grace=2.0, stop_timeout=20,
            extra_config="[vnc]\nrecord = true\n[recordings]\nkeep_days = 7\n"
            "prune_interval = 1\n",
        )

    @property
    def recordings(self) -> Path:
        return self.directory / "state" / "recordings"

    def listed(self, *extra: str) -> list[dict[str, Any]]:
        return json.loads(self.cli("recordings", "--json", *extra))  # type: ignore[no-any-return]


def plant(directory: Path, name: str, days_old: float) -> Path:
    """A finished VNC recording of another domain, last written *days_old* days ago."""
    path = directory / OTHER / name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    header = {"format": "console-broker-rfb", "version": 1, "timestamp": 1577836800,
              "console_broker": {"domain": {"name": "old", "uuid": OTHER}, "protocol": "vnc",
                                 "recording": name.split("-")[1], "part": 1, "offset": 0.0}}
    path.write_text(json.dumps(header) + '\n[1.0, "e", "closed"]\n')
    moment = time.time() - days_old * 86400
    os.utime(path, (moment, moment))
    return path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    # a month-old recording, which the retention pass on start deletes
    plant(tmp_path / "state" / "recordings", "20200101T000000Z-00000001-001.rfb.jsonl", 30)
    served = Broker(tmp_path)
    try:
        yield served
    finally:
        served.stop()
    served.assert_no_token_logged(require_tokens=True)


def image(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data), formats=["PNG"])
    picture.load()
    return picture.convert("RGB")


def canvas(browser: Any) -> Image.Image | None:
    data = browser.execute_script(CANVAS_PNG)
    return image(base64.b64decode(data.split(",", 1)[1])) if data else None


def lit(picture: Image.Image) -> list[list[bool]]:
    """Which pixels are text (VGA grey, or lighter): the picture as a bitmap."""
    pixels = picture.load()
    return [[sum(pixels[x, y]) > 3 * 0x60 for x in range(picture.width)]
            for y in range(picture.height)]


def cell(bitmap: list[list[bool]], column: int, row: int = 0) -> tuple[tuple[bool, ...], ...]:
    return tuple(tuple(line[column * CELL_W:(column + 1) * CELL_W])
                 for line in bitmap[row * CELL_H:(row + 1) * CELL_H])


def marker_problems(picture: Image.Image) -> list[str]:
    """Why *picture* is not the cleared screen with the marker in its top row's first
    cells (empty: it is)."""
    if picture.size != (720, 400):
        return [f"a {picture.size} screen, not the VGA text console's 720x400"]
    bitmap = lit(picture)
    cells = [cell(bitmap, i) for i in range(len(MARKER))]
    problems = []
    for i, char in enumerate(MARKER):
        if not any(any(line) for line in cells[i]):
            problems.append(f"cell {i} ({char!r}) is empty")
        for j in range(i):
            if (MARKER[j] == char) != (cells[j] == cells[i]):
                problems.append(f"cells {j} and {i} ({MARKER[j]!r}, {char!r}) "
                                f"{'differ' if MARKER[j] == char else 'are alike'}")
    # nothing else on the screen: the rest of the top row (but the cursor's cell, just
    # after the marker) and every other row are black
    first_row_rest = sum(
        value for line in bitmap[:CELL_H] for value in line[(len(MARKER) + 1) * CELL_W:]
    )
    others = sum(value for line in bitmap[CELL_H:] for value in line)
    if first_row_rest or others:
        problems.append(f"{first_row_rest + others} lit pixels beyond the marker")
    return problems


def without_cursor(picture: Image.Image) -> bytes:
    """The picture's pixels but the cursor's cell (just after the marker: it blinks)."""
    copy = picture.copy()
    x = len(MARKER) * CELL_W
    copy.paste((0, 0, 0), (x, 0, x + CELL_W, CELL_H))
    return copy.tobytes()


def shell_ready(ws: ClientConnection) -> None:
    """Wait until the guest's serial shell (a raw session) answers."""
    seen = b""
    deadline = time.monotonic() + 90
    while b"ready-42" not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        ws.send(b"echo ready-$((6*7))\n")
        end = time.monotonic() + 2
        while time.monotonic() < end and b"ready-42" not in seen:
            try:
                message = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            assert isinstance(message, bytes)
            seen += message


def screenshot(broker: Broker, name: str, path: Path) -> Image.Image:
    subprocess.run([*CLI, "screenshot", name, "-o", str(path), "--config", str(broker.config)],
                   check=True, capture_output=True, env=broker.env, timeout=60)
    return image(path.read_bytes())


def test_a_recorded_vnc_session_plays_back_with_its_marker(
    broker: Broker, testbed: Testbed, browser: Any, tmp_path: Path
) -> None:
    # the pass on start deleted a month-old recording, whatever its protocol
    ancient = broker.recordings / OTHER / "20200101T000000Z-00000001-001.rfb.jsonl"
    wait_until(browser, "the first retention pass", lambda: broker.events("recordings.pruned"))
    assert not ancient.exists()
    pruned = broker.events("recordings.pruned")
    assert pruned[0]["trigger"] == "start" and pruned[0]["deleted"] == 1

    dom = enabled_guest(testbed, "--consoles", "vnc,serial",
                        devices="<video><model type='vga'/></video>\n")
    try:
        name = dom.name()
        with broker.connect(name, protocol="serial", subprotocols=["binary"]) as serial:
            shell_ready(serial)
            played = record_and_play(broker, name, serial, browser, tmp_path)
        # -- pruned like any recording once finished; then its link says it is gone ---------
        live_path, index = played
        out = broker.cli("recordings", "--prune", "--max-total", "1")
        assert str(live_path) in out and not live_path.exists()
        assert broker.listed("--domain", name) == []
        status, body = broker.get(index.removeprefix(broker.url))
        assert status == 404 and b"no such recording" in body
    finally:
        testbed.remove(dom)


def record_and_play(
    broker: Broker, name: str, serial: ClientConnection, browser: Any, tmp_path: Path
) -> tuple[Path, str]:
    """The recorded session with the marker, checked while recorded; then played back.
    Returns the recording's file and its index URL."""
    # -- the recorded session: the console page, from its first byte --------------------
    started = time.monotonic()
    browser.get(broker.token(name)["page"])
    wait_until(browser, "the page connected", lambda: browser.execute_script(
        "return window.consoleStatus && window.consoleStatus.state === 'connected'"))
    time.sleep(1.5)  # a moment of the boot screen, before the marker
    before_marker = time.monotonic() - started
    serial.send(b"printf '\\033[2J\\033[H' > /dev/tty1; printf " + MARKER.encode()
                + b" > /dev/tty1; echo printed-$((6*7))\n")
    live = wait_until(browser, "the marker on the live page's canvas", lambda: (
        (picture := canvas(browser)) is not None and not marker_problems(picture)
        and picture), timeout=60)
    shot = screenshot(broker, name, tmp_path / "live.png")
    # the page shows the guest's screen exactly (but the blinking cursor)
    assert without_cursor(shot) == without_cursor(live)

    # -- while it is recorded: listed as being written, and never pruned ----------------
    (part,) = broker.listed("--domain", name)
    assert part["protocol"] == "vnc" and part["live"] is True and part["part"] == 1
    assert part["format"] == "RFB (JSON lines)" and part["input"] is False
    live_path = Path(part["path"])
    assert live_path.parent.parent == broker.recordings
    os.utime(live_path, (0, 0))  # "last written" in 1970: kept all the same
    old = plant(broker.recordings, "20200102T000000Z-00000002-001.rfb.jsonl", 1)
    out = broker.cli("recordings", "--prune", "--max-total", "1")
    assert "deleted  " in out and str(old) in out and "1 being written, kept" in out
    passes = len(broker.events("recordings.pruned"))
    time.sleep(2.5)  # the broker's own passes, every second, meanwhile
    assert len(broker.events("recordings.pruned")) > passes
    assert live_path.exists() and not old.exists()

    # -- the session ends: the recording is closed ---------------------------------------
    browser.get("about:blank")
    wait_until(browser, "the recording closed",
               lambda: not broker.listed("--domain", name)[0]["live"], timeout=30)
    text = live_path.read_text().splitlines()
    assert json.loads(text[-1])[1:] == ["e", "closed"]
    first = base64.b64decode(json.loads(text[1])[2])
    assert first == b"RFB 003.008\n"  # the broker's handshake, from its first byte
    (listed,) = [r for r in broker.listed("--protocol", "vnc") if r["domain"]["name"] == name]
    assert listed["recording"] == part["recording"] and listed["duration"] > before_marker

    # -- the player -----------------------------------------------------------------------
    doc = json.loads(broker.cli("token", "--recording", part["recording"], "--json"))
    broker.tokens.append(doc["token"])
    assert doc["page"].startswith(f"{broker.url}/console/vnc/playback/?token=")
    browser.get(doc["page"])
    state = wait_until(browser, "the player ready", lambda: (
        (s := browser.execute_script(STATE)) and s.get("state") == "ready" and s))
    assert (state["width"], state["height"], state["end"]) == (720, 400, "closed")
    browser.execute_script(
        "const s = document.getElementById('seek'); s.value = s.max;"
        "s.dispatchEvent(new Event('change'));")
    wait_until(browser, "the end", lambda: browser.execute_script(STATE)["state"] == "ended",
               shows=lambda: str(browser.execute_script(STATE)) + str(
                   browser.get_log("browser")[-20:]))
    played = wait_until(browser, "the marker on the player's canvas", lambda: (
        (picture := canvas(browser)) is not None and not marker_problems(picture)
        and picture), timeout=30, shows=lambda: str(marker_problems(canvas(browser))))
    assert without_cursor(played) == without_cursor(live) == without_cursor(shot)
    browser.save_screenshot(str(tmp_path / "player.png"))
    # back before the marker: not there; then at 4x to the end: there again
    browser.execute_script(
        "const s = document.getElementById('seek'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('change'));", str(max(0.1, before_marker - 1)))
    wait_until(browser, "paused before the marker",
               lambda: browser.execute_script(STATE)["state"] in ("paused", "ready"))
    earlier = canvas(browser)
    assert earlier is not None and marker_problems(earlier)
    browser.find_element("id", "speed-4").click()
    browser.find_element("id", "play").click()
    wait_until(browser, "played to the end at 4x",
               lambda: browser.execute_script(STATE)["state"] == "ended", timeout=120)
    again = canvas(browser)
    assert again is not None and not marker_problems(again)
    return live_path, str(doc["index"])
