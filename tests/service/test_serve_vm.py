"""console-broker serve on the real stack: a broker subprocess, the CLI's tokens, the tiny guest.

Each guest is provisioned with the real ``console-broker xml enable``; the
broker runs as ``console-broker serve --config ...`` with a temporary state
directory on a free port, logging JSON at debug level into a file that must
never hold a token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker, enabled_guest, read_at_least, serial_answers
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.vm
RFB_BANNER = b"RFB 003.008\n"
GRACE = 3.0


class Served(ServedBroker):
    """A ``console-broker serve`` subprocess and the tokens issued for it."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, grace=GRACE)

    def token(self, domain: str, protocol: str) -> dict[str, Any]:  # type: ignore[override]
        return super().token(domain, protocol=protocol)

    def connect(self, domain: str, protocol: str) -> ClientConnection:  # type: ignore[override]
        return super().connect(domain, protocol=protocol)

    def assert_no_token_logged(self) -> None:  # type: ignore[override]
        super().assert_no_token_logged(require_tokens=True)


@pytest.fixture(scope="module")
def served(example_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("serve"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


def _guest(testbed: Testbed, mode: str, consoles: str = "vnc,serial") -> Any:
    return enabled_guest(testbed, "--consoles", consoles, "--mode", mode)


@pytest.mark.parametrize("mode", ["fd", "tcp", "websocket"])
def test_a_cli_token_reaches_the_guests_vnc_server(
    served: Served, testbed: Testbed, mode: str
) -> None:
    dom = _guest(testbed, mode)
    try:
        with served.connect(dom.name(), "vnc") as ws:
            assert ws.subprotocol == "binary"
            assert read_at_least(ws, len(RFB_BANNER))[: len(RFB_BANNER)] == RFB_BANNER
            ws.send(RFB_BANNER)  # the client's version: QEMU answers with its security types
            types = read_at_least(ws, 2)
            assert types[0] >= 1 and 1 in types[1 : 1 + types[0]]  # None offered
    finally:
        testbed.remove(dom)
    log = served.log_text()
    assert '"event": "session.opened"' in log and f'"endpoint_kind": "{mode}"' in log


def test_a_stopping_vm_closes_the_session_within_a_second(served: Served, testbed: Testbed) -> None:
    dom = _guest(testbed, "fd")
    try:
        with served.connect(dom.name(), "vnc") as ws:
            read_at_least(ws, len(RFB_BANNER))
            dom.destroy()  # returns once libvirt has stopped the VM (about 1 s under TCG)
            stopped = time.monotonic()
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=5)
            elapsed = time.monotonic() - stopped
            assert ws.close_code == 4100 and ws.close_reason == "VM stopped"
            assert elapsed < 1.0, elapsed
    finally:
        testbed.remove(dom)
    # A stopped VM refuses new sessions.
    status, _body = served.get("/healthz")
    assert status == 200


def test_the_serial_console_through_the_broker(served: Served, testbed: Testbed) -> None:
    dom = _guest(testbed, "fd", consoles="serial")
    try:
        with served.connect(dom.name(), "serial") as ws:
            serial_answers(ws)
            # Serial sessions share the console's one libvirt stream (tests/serial); a
            # session of another protocol on that console cannot open a second one.
            with served.connect(dom.name(), "raw-serial") as second:
                with pytest.raises(ConnectionClosed):
                    second.recv(timeout=5)
                assert second.close_code == 4013 and second.close_reason == "console busy"
    finally:
        testbed.remove(dom)


def test_a_third_party_plugin_serves_sessions_through_the_same_hooks(
    served: Served, testbed: Testbed
) -> None:
    dom = _guest(testbed, "fd")
    try:
        with served.connect(dom.name(), "raw-vnc") as ws:
            assert read_at_least(ws, len(RFB_BANNER))[: len(RFB_BANNER)] == RFB_BANNER
    finally:
        testbed.remove(dom)
    assert '"event": "example.session"' in served.log_text()
    status, body = served.get("/console/raw-vnc/")
    assert status == 200 and b"cb-example-plugin page" in body


def test_healthz_and_metrics_answer(served: Served) -> None:
    status, body = served.get("/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok" and doc["libvirt"]["connected"] is True
    status, body = served.get("/metrics")
    text = body.decode()
    assert status == 200 and "console_broker_libvirt_connected 1.0" in text
    assert "console_broker_handshake_seconds_bucket" in text


def test_sigterm_closes_sessions_and_exits_within_the_grace(
    testbed: Testbed, tmp_path: Path
) -> None:
    served = Served(tmp_path)
    dom = _guest(testbed, "fd")
    try:
        with served.connect(dom.name(), "vnc") as ws:
            read_at_least(ws, len(RFB_BANNER))
            took = served.stop()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1001 and ws.close_reason == "broker shutting down"
        assert served.process.returncode == 0
        assert took < GRACE, took
    finally:
        served.stop()
        testbed.remove(dom)
    log = served.log_text()
    assert '"event": "broker.stopped"' in log and '"reason": "shutdown"' in log
    served.assert_no_token_logged()
