"""The QEMU monitor example (examples/qemu-monitor) on the real stack: installed as a
third-party distribution, served by a real ``console-broker serve`` with a ``[monitor]``
table, running HMP commands on the tiny guest through libvirt, in a WebSocket client and
in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pagekit
import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

pytestmark = pytest.mark.vm
SUBPROTOCOL = "console-broker.monitor.v1"
#: The table the broker serves with: every key changed from its default.
MONITOR = """[monitor]
view_only_commands = ["info", "help"]
timeout = 2
max_output = 3000
"""


class Served(ServedBroker):
    """A ``console-broker serve`` subprocess with the example loaded and its table."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            directory, protocol="monitor", extra_config=MONITOR, subprotocols=[SUBPROTOCOL]
        )


@pytest.fixture(scope="module")
def served(
    monitor_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("monitor"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged(require_tokens=True)


def boot(testbed: Testbed) -> Any:
    """A running tiny guest: nothing to provision, the monitor needs no console."""
    dom = testbed.define(testbed.guest_xml())
    testbed.boot(dom, console=False)
    return dom


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    """A guest the module's tests share (those that stop theirs boot their own)."""
    dom = boot(testbed)
    try:
        yield dom
    finally:
        testbed.remove(dom)


def receive(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=30)
    assert isinstance(message, str), message
    doc: dict[str, Any] = json.loads(message)
    return doc


def hello(ws: ClientConnection) -> dict[str, Any]:
    assert ws.subprotocol == SUBPROTOCOL
    doc = receive(ws)
    assert doc["type"] == "hello"
    return doc


def run(ws: ClientConnection, line: str) -> dict[str, Any]:
    ws.send(line)
    answer = receive(ws)
    assert answer["command"] == line.strip()
    return answer


def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the broker closes *ws*: (close code, reason)."""
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=30)
    return ws.close_code, ws.close_reason


def running(dom: Any) -> bool:
    return bool(dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING)


def commands_metric(served: Served) -> dict[str, float]:
    status, body = served.get("/metrics")
    assert status == 200
    found = re.findall(
        r'^console_broker_monitor_commands_total\{result="(\w+)"\} (\S+)$',
        body.decode(), re.MULTILINE,
    )
    return {result: float(value) for result, value in found}


def test_info_status_is_answered(served: Served, guest: Any) -> None:
    with served.connect(guest.name()) as ws:
        assert hello(ws) == {
            "type": "hello", "domain": guest.name(), "view_only": False, "commands": None
        }
        answer = run(ws, "info status")
        assert answer["type"] == "output" and answer["truncated"] is False
        assert "running" in answer["output"]
        assert "\r" not in answer["output"]
        # QEMU's own complaint is an answer too; the session goes on
        unknown = run(ws, "no-such-command")
        assert unknown["type"] == "output" and "unknown command" in unknown["output"]
        assert guest.name() in run(ws, "info name")["output"]
    opened = [e for e in served.events("session.opened") if e.get("protocol") == "monitor"]
    assert opened and opened[-1]["endpoint_kind"] == "none"


def test_the_table_is_effective_view_only_help_and_its_output_cut(
    served: Served, guest: Any
) -> None:
    """view_only_commands (help added) and max_output (3000) from the broker's table."""
    with served.connect(guest.name(), "--view-only") as ws:
        assert hello(ws)["commands"] == ["info", "help"]
        answer = run(ws, "help")
        assert answer["type"] == "output"
        assert answer["truncated"] is True and len(answer["output"]) == 3000
        assert "running" in run(ws, "info status")["output"]


def test_a_view_only_stop_ends_the_session_and_the_vm_runs_on(
    served: Served, guest: Any
) -> None:
    before = commands_metric(served)
    with served.connect(guest.name(), "--view-only") as ws:
        hello(ws)
        assert "running" in run(ws, "info status")["output"]
        ws.send("stop")  # would pause the VM
        code, reason = closed(ws)
    assert (code, reason) == (4301, "a view-only session may not run this command")
    assert running(guest)  # libvirt's view: not paused
    with served.connect(guest.name()) as ws:
        hello(ws)
        assert "VM status: running" in run(ws, "info status")["output"]
    ended = served.events("session.ended_by_plugin")
    assert ended[-1]["reason"] == "monitor_command_refused" and ended[-1]["code"] == 4301
    after = commands_metric(served)
    assert after["refused"] - before["refused"] == 1
    assert after["ok"] - before["ok"] == 2


def test_a_command_that_does_not_answer_in_time_is_an_error(
    served: Served, guest: Any, tmp_path: Path
) -> None:
    """``pmemsave`` to a FIFO nobody reads: QEMU blocks opening it until the test does,
    past the table's timeout (2 s). The session goes on; its next command waits for the
    slow one to end."""
    fifo = tmp_path / "memory"
    os.mkfifo(fifo)
    read: list[bytes] = []
    before = commands_metric(served)
    with served.connect(guest.name()) as ws:
        hello(ws)
        line = f'pmemsave 0 4096 "{fifo}"'  # quoted: HMP reads "4096 /tmp" as a division
        answer = run(ws, line)
        assert answer == {
            "type": "error", "command": line,
            "error": "no answer within 2 s (the command may still take effect)",
        }

        def drain() -> None:
            with fifo.open("rb") as pipe:  # QEMU's open returns, it writes and closes
                read.append(pipe.read())

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        reader.join(30)
        assert [len(data) for data in read] == [4096]  # the command did take effect
        status = run(ws, "info status")
        assert status["type"] == "output" and "running" in status["output"]
    assert running(guest)
    after = commands_metric(served)
    assert (after["timeout"] - before["timeout"], after["ok"] - before["ok"]) == (1, 1)


def test_the_metric_is_in_metrics(served: Served, guest: Any) -> None:
    before = commands_metric(served)
    assert set(before) == {"ok", "error", "timeout", "refused"}
    with served.connect(guest.name()) as ws:
        hello(ws)
        run(ws, "info status")
        run(ws, "info name")
    after = commands_metric(served)
    assert after["ok"] - before["ok"] == 2
    assert after["error"] == before["error"]


def test_stopping_the_vm_closes_the_session_with_4100(served: Served, testbed: Testbed) -> None:
    dom = boot(testbed)
    try:
        with served.connect(dom.name()) as ws:
            hello(ws)
            assert "running" in run(ws, "info status")["output"]
            dom.destroy()
            assert closed(ws) == (4100, "VM stopped")
    finally:
        testbed.remove(dom)


def test_a_binary_message_is_a_protocol_error(served: Served, guest: Any) -> None:
    with served.connect(guest.name()) as ws:
        hello(ws)
        ws.send(b"info status")
        code, _ = closed(ws)
    assert code == 4104
    assert running(guest)


def test_the_page_and_its_files_are_served(served: Served) -> None:
    with urllib.request.urlopen(f"{served.url}/console/monitor/", timeout=10) as reply:
        assert reply.status == 200
        csp = reply.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert reply.headers["Cache-Control"] == "no-store"
        assert b'<script src="console.js">' in reply.read()
    for path in ("console.js", "console.css"):
        status, body = served.get(f"/console/monitor/{path}")
        assert status == 200 and body
    assert served.get("/console/monitor/../../metrics")[0] == 404
    assert served.get("/console/monitor/static/console.js")[0] == 404


# --- the page in headless Chromium ---------------------------------------------------------


def wait_until(browser: Any, what: str, check: Any, timeout: float = 60.0) -> Any:
    return pagekit.wait_until(
        browser, what, check, timeout,
        shows=lambda: browser.execute_script("return document.getElementById('log').textContent"),
    )


def page_state(browser: Any) -> Any:
    return browser.execute_script("return window.consoleBroker.state")


def type_command(browser: Any, line: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.find_element(By.ID, "command").send_keys(line + Keys.ENTER)


def log_text(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, "log").text)


def test_the_page_runs_a_command_and_shows_the_vm_stopping(
    served: Served, testbed: Testbed, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    dom = boot(testbed)
    try:
        name = dom.name()
        browser.get(served.token(name)["page"])
        wait_until(browser, "connected", lambda: page_state(browser) == "connected")
        assert "token=" not in browser.current_url  # single use: out of the address bar
        wait_until(
            browser, "the domain", lambda: name in browser.find_element(By.ID, "domain").text
        )
        assert name in browser.title
        assert browser.find_element(By.ID, "rights").text == "full access"
        type_command(browser, "info status")
        wait_until(browser, "the answer", lambda: "VM status: running" in log_text(browser))
        assert "info status" in log_text(browser)
        answers = browser.execute_script("return window.consoleBroker.answers")
        assert answers[-1]["type"] == "output" and "running" in answers[-1]["output"]
        dom.destroy()
        wait_until(
            browser, "the close",
            lambda: browser.execute_script("return window.consoleBroker.closeCode") == 4100,
        )
        assert "VM stopped" in browser.find_element(By.ID, "state").text
        notice = browser.find_element(By.ID, "notice")
        assert notice.is_displayed() and "VM stopped (code 4100)" in notice.text
        assert not browser.find_element(By.ID, "command").is_enabled()
    finally:
        testbed.remove(dom)


def test_the_page_shows_why_a_view_only_session_ended(
    served: Served, guest: Any, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.token(guest.name(), "--view-only")["page"])
    wait_until(browser, "connected", lambda: page_state(browser) == "connected")
    wait_until(browser, "the rights",
               lambda: browser.find_element(By.ID, "rights").text == "view only: info, help")
    type_command(browser, "info status")
    wait_until(browser, "the answer", lambda: "VM status: running" in log_text(browser))
    type_command(browser, "stop")
    wait_until(
        browser, "the close",
        lambda: browser.execute_script("return window.consoleBroker.closeCode") == 4301,
    )
    notice = browser.find_element(By.ID, "notice").text
    assert "a view-only session may not run this command (code 4301)" in notice
    assert running(guest)
