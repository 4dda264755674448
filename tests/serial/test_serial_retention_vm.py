"""Retention on the real stack: a ``console-broker serve`` with a tiny retention prunes a
planted old recording on start; ``console-broker recordings --prune`` in another process,
while a session records, deletes every finished file and keeps the part being written."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from console_broker_testbed import Testbed
from serialkit import Client, Served, cast_output, serial_guest

pytestmark = pytest.mark.vm

OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"


def plant(path: Path, days_old: float) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    header = {"version": 2, "width": 80, "height": 24, "timestamp": 1_577_836_800}
    path.write_text(json.dumps(header) + '\n[0.5, "o", "old"]\n')
    moment = time.time() - days_old * 86400
    os.utime(path, (moment, moment))
    return path


def test_the_broker_prunes_and_never_the_live_part(tmp_path: Path, testbed: Testbed) -> None:
    recordings = tmp_path / "state" / "recordings"
    ancient = plant(recordings / OTHER / "20200101T000000Z-00000000-001.cast", days_old=30)
    recent = plant(recordings / OTHER / "20200102T000000Z-00000001-001.cast", days_old=1)
    broker = Served(tmp_path, "record = true\n[recordings]\nkeep_days = 7\n")
    try:
        deadline = time.monotonic() + 10
        while not broker.events("recordings.pruned"):  # the pass on start, in its thread
            assert time.monotonic() < deadline, broker.log_text()
            time.sleep(0.1)
        (started,) = broker.events("recordings.pruned")
        assert started["trigger"] == "start" and started["deleted"] == 1
        assert started["kept"] == 1 and started["errors"] == 0
        assert not ancient.exists() and recent.exists()
        dom = serial_guest(testbed)
        try:
            with broker.connect(dom.name()) as ws:
                client = Client(ws)
                assert client.wait_control("hello")["recording"] is True
                client.shell_ready()
                client.send(b"echo pruned-$((6*7))\n")
                client.wait_for(b"\r\npruned-42\r\n")
                (live,) = json.loads(broker.cli("recordings", "--domain", dom.name(), "--json"))
                assert live["live"] is True
                live_path = Path(live["path"])
                os.utime(live_path, (0, 0))  # even "last written" in 1970, it is kept
                out = broker.cli("recordings", "--prune", "--max-total", "1")
                assert "deleted  " in out and str(recent) in out
                assert "1 being written, kept" in out
                assert live_path.exists() and not recent.exists()
                client.send(b"echo still-$((6*7))\n")
                client.wait_for(b"\r\nstill-42\r\n")
            deadline = time.monotonic() + 10
            while json.loads(broker.cli("recordings", "--json"))[0]["live"]:
                assert time.monotonic() < deadline, "the recording did not end"
                time.sleep(0.2)
            # Its output, joined across events (a line is often spread over several), is
            # what the client was sent: the client was the console's only one.
            recorded = cast_output(live_path)
            assert "\r\nstill-42\r\n" in recorded
            assert recorded.startswith(bytes(client.output).decode("utf-8", "replace"))
        finally:
            testbed.remove(dom)
    finally:
        broker.stop()
    broker.assert_no_token_logged()
