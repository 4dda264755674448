"""``console-broker sessions`` on the real stack: libvirtd, QEMU, the tiny guest.

A serial session opened through a served broker is listed (its domain, protocol, rights,
client, the token's name, bytes); ``sessions end`` closes it and the serial page open in
headless Chromium on the same console with close code 4109 and the operator's reason,
which the page shows; the audit file holds both sessions' lines. With ``--workers 2``
the sessions of two guests owned by different workers are listed together and ended
wherever they live.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pagekit
import pytest
from console_broker_testbed import Testbed
from servedbroker import CLI, ServedBroker, enabled_guest, serial_answers
from websockets.exceptions import ConnectionClosed

from broker.service._workers import owner_index

pytestmark = pytest.mark.vm
REASON = "maintenance window"


def serve(directory: Path, extra: str = "") -> ServedBroker:
    return ServedBroker(
        directory, protocol="serial", stop_timeout=20,
        extra_config=f'[audit]\nfile = "{directory / "audit" / "audit.log"}"\n{extra}',
    )


def sessions(served: ServedBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "sessions", *args, "--config", str(served.config)],
                          capture_output=True, text=True, timeout=60, check=False)


def listed(served: ServedBroker, *args: str) -> list[dict[str, Any]]:
    done = sessions(served, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    records: list[dict[str, Any]] = json.loads(done.stdout)
    return records


def audit_lines(served: ServedBroker) -> list[dict[str, Any]]:
    path = served.directory / "audit" / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    broker = serve(tmp_path_factory.mktemp("admin-vm"))
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


def test_an_operator_ends_a_serial_session_and_the_page_shows_why(
    served: ServedBroker, testbed: Testbed, browser: Any
) -> None:
    dom = enabled_guest(testbed, "--consoles", "serial")
    try:
        name = dom.name()
        with served.connect(name, "--name", "Grace Hopper") as ws:
            serial_answers(ws)  # the guest's shell answers through the session
            # The page on the same console (a second session of the shared console).
            browser.get(served.token(name)["page"])
            pagekit.wait_until(
                browser, "connected",
                lambda: browser.execute_script("return window.consoleBroker.state")
                == "connected", 60,
            )
            records = wait_for("both sessions listed", lambda: (
                found if len(found := listed(served, "--domain", name)) == 2 else None))
            mine = [r for r in records if r["name"] == "Grace Hopper"]
            assert len(mine) == 1, records
            record = mine[0]
            assert record["domain"] == dom.UUIDString() and record["domain_name"] == name
            assert (record["protocol"], record["rights"]) == ("serial", "full")
            assert record["client"] == "127.0.0.1" and record["worker"] is None
            assert record["bytes_to_client"] > 0 and record["bytes_to_console"] > 0
            # The table names it too.
            table = sessions(served)
            assert table.returncode == 0 and record["id"] in table.stdout
            assert "Grace Hopper" in table.stdout and name in table.stdout
            # Ending every session of the domain, with a reason.
            done = sessions(served, "end", "--domain", name, "--reason", REASON)
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("ended ") == 2 and record["id"] in done.stdout
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=10)
            assert ws.close_code == 4109
            assert ws.close_reason == f"ended by an operator: {REASON}"
        # The page shows the reason.
        pagekit.wait_until(
            browser, "the page's close",
            lambda: browser.execute_script("return window.consoleBroker.closeCode") == 4109,
            15,
        )
        from selenium.webdriver.common.by import By

        assert REASON in browser.find_element(By.ID, "state").text
        assert REASON in browser.find_element(By.ID, "notice").text
        # Nothing left; ending again matches nothing.
        assert listed(served, "--domain", name) == []
        again = sessions(served, "end", record["id"])
        assert again.returncode == 1
        # The audit file holds both sessions' lines: who, what, how it ended.
        lines = wait_for("two audit lines", lambda: [
            line for line in audit_lines(served) if line["domain"] == dom.UUIDString()
        ] if len(audit_lines(served)) >= 2 else None)
        assert len(lines) == 2
        assert {line["code"] for line in lines} == {4109}
        assert {line["close_reason"] for line in lines} == {f"ended by an operator: {REASON}"}
        line = next(line for line in lines if line["session"] == record["id"])
        assert (line["name"], line["sub"], line["protocol"], line["rights"]) == (
            "Grace Hopper", dom.UUIDString(), "serial", "full")
        assert line["jti"] and line["bytes_to_console"] >= record["bytes_to_console"]
        assert line["start"] == record["started"] and line["end"] >= line["start"]
        assert served.events("session.audit")
    finally:
        testbed.remove(dom)


def _uuid_owned_by(worker: int) -> str:
    while True:
        candidate = str(uuid.uuid4())
        if owner_index(candidate, 2) == worker:
            return candidate


def test_with_two_workers_every_workers_sessions_are_listed_and_ended(
    testbed: Testbed, tmp_path: Path
) -> None:
    served = serve(tmp_path, "[service]\nworkers = 2\n")
    doms = []
    try:
        for worker in (0, 1):
            xml = subprocess.run(
                [*CLI, "xml", "enable", "--consoles", "serial"],
                input=testbed.guest_xml(domain_uuid=_uuid_owned_by(worker)),
                check=True, capture_output=True, text=True,
            ).stdout
            dom = testbed.define(xml)
            testbed.boot(dom, console=False)
            doms.append(dom)
        with contextlib.ExitStack() as stack:
            clients = []
            for dom in doms:
                clients.append((dom, stack.enter_context(served.connect(dom.name()))))
            records = wait_for("both workers' sessions", lambda: (
                found if len(found := listed(served)) == 2 else None))
            by_domain = {r["domain"]: r for r in records}
            for worker, dom in enumerate(doms):
                assert by_domain[dom.UUIDString()]["worker"] == worker
            assert "WORKER" in sessions(served).stdout
            # Filtered, and ended, wherever the session lives (asked of either worker).
            for worker, dom in enumerate(doms):
                (only,) = listed(served, "--domain", dom.UUIDString())
                assert only["worker"] == worker
            for dom, ws in clients:
                record = by_domain[dom.UUIDString()]
                done = sessions(served, "end", record["id"], "--reason", REASON)
                assert done.returncode == 0, done.stderr
                with pytest.raises(ConnectionClosed):
                    while True:
                        ws.recv(timeout=10)
                assert (ws.close_code, ws.close_reason) == (
                    4109, f"ended by an operator: {REASON}")
            assert listed(served) == []
        lines = wait_for("both audit lines", lambda: (
            found if len(found := audit_lines(served)) >= 2 else None))
        assert {line["worker"] for line in lines} == {0, 1}
        assert {line["code"] for line in lines} == {4109}
    finally:
        served.stop()
        for dom in doms:
            testbed.remove(dom)
    served.assert_no_token_logged()
