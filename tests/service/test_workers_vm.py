"""``console-broker serve --workers 2`` on the real stack: libvirtd, QEMU, the tiny guest.

Connections land on either worker (SO_REUSEPORT spreads them by their addresses); every
session of the guest must end up in the worker that owns the domain, whichever worker
accepted it: VNC sessions, a serial session shared by two clients, native clients'
CONNECT tunnels. Tokens stay single-use across the workers, ``/metrics`` answers for both,
a killed worker is replaced, and SIGTERM drains every worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import make_certificates
from console_broker_testbed import Testbed
from prometheus_client.parser import text_string_to_metric_families
from servedbroker import CLI, ServedBroker, enabled_guest, read_at_least, serial_answers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from broker.service._connect import handle_for_token
from broker.service._workers import owner_index

pytestmark = pytest.mark.vm
RFB_BANNER = b"RFB 003.008\n"


@pytest.fixture(scope="module")
def served(example_installed: None, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServedBroker]:
    broker = ServedBroker(
        tmp_path_factory.mktemp("workers"),
        protocol="vnc",
        connect_port=True,
        extra_config="[service]\nworkers = 2\n",
    )
    try:
        _both_listening(broker)
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


@pytest.fixture(scope="module")
def guest(served: ServedBroker, testbed: Testbed) -> Iterator[Any]:
    dom = enabled_guest(testbed, "--consoles", "vnc,spice,serial", "--mode", "fd")
    try:
        yield dom
    finally:
        testbed.remove(dom)


def _both_listening(broker: ServedBroker) -> None:
    deadline = time.monotonic() + 30
    while len(_owner_events(broker, "broker.listening")) < 2:
        assert time.monotonic() < deadline, broker.log_text()[-3000:]
        time.sleep(0.1)


def _owner_events(served: ServedBroker, event: str) -> set[int]:
    return {doc["worker"] for doc in served.events(event) if "worker" in doc}


def test_both_workers_serve_and_each_answers_health_for_all(served: ServedBroker) -> None:
    seen = set()
    for _ in range(40):
        status, body = served.get("/healthz")
        assert status == 200
        doc = json.loads(body)
        assert doc["workers"] == 2
        seen.add(doc["worker"])
    assert seen == {0, 1}  # forty connections, from forty source ports, hit both


def test_every_vnc_session_of_a_domain_is_served_by_its_owner(
    served: ServedBroker, guest: Any
) -> None:
    before = len(served.events("session.opened"))
    for _ in range(12):
        with served.connect(guest.name()) as ws:
            assert read_at_least(ws, len(RFB_BANNER))[: len(RFB_BANNER)] == RFB_BANNER
    opened = served.events("session.opened")[before:]
    assert len(opened) == 12
    assert {doc["worker"] for doc in opened} == {owner_index(guest.UUIDString(), 2)}
    # Twelve connections, each on either worker: some were passed on (1 in 4096 not).
    assert served.events("worker.passed")


def test_two_clients_share_one_serial_session_across_workers(
    served: ServedBroker, guest: Any
) -> None:
    with served.connect(guest.name(), protocol="serial") as first, \
            served.connect(guest.name(), protocol="serial") as second:
        serial_answers(first)  # the first types (the guest's shell answers)
        seen = b""
        deadline = time.monotonic() + 30
        while b"hello-42" not in seen:  # the second sees the same console
            assert time.monotonic() < deadline, seen[-300:]
            first.send(b"echo hello-$((6*7))\n")
            with contextlib.suppress(TimeoutError):
                seen += second.recv(timeout=2)  # type: ignore[operator]
    opened = [doc for doc in served.events("session.opened") if doc.get("protocol") == "serial"]
    assert len({doc["worker"] for doc in opened}) == 1


def test_spice_channels_with_one_token_join_one_group_across_workers(
    served: ServedBroker, guest: Any
) -> None:
    url = served.token(guest.name(), protocol="spice")["websocket"]
    before = len(served.events("session.opened"))
    with contextlib.ExitStack() as stack:
        for _ in range(6):  # the main channel, then five more connections with its token
            stack.enter_context(connect(url, subprotocols=["binary"],  # type: ignore[list-item]
                                        open_timeout=10))
        deadline = time.monotonic() + 10
        while len(served.events("session.opened")) < before + 6:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    opened = served.events("session.opened")[before:]
    assert [bool(doc.get("joined")) for doc in opened] == [False] + [True] * 5
    assert len({doc["worker"] for doc in opened}) == 1


def test_a_token_is_single_use_whichever_worker_gets_it(served: ServedBroker, guest: Any) -> None:
    url = served.token(guest.name())["websocket"]
    with connect(url, subprotocols=["binary"], open_timeout=10) as ws:  # type: ignore[list-item]
        read_at_least(ws, len(RFB_BANNER))
    refused = 0
    for _ in range(8):
        try:
            with connect(url, subprotocols=["binary"], open_timeout=10):  # type: ignore[list-item]
                pass
        except InvalidStatus as exc:
            assert exc.response.status_code == 401
            assert exc.response.body == b"token already used\n"
            refused += 1
    assert refused == 8


def test_native_clients_tunnels_reach_the_owner(served: ServedBroker, guest: Any) -> None:
    assert served.connect_port is not None
    before = len(served.events("session.opened"))
    for _ in range(6):  # each tunnel lands on either worker
        handle = handle_for_token(served.token(guest.name(), protocol="spice")["token"])
        with socket.create_connection(("127.0.0.1", served.connect_port), timeout=10) as sock:
            sock.sendall(f"CONNECT {handle}:5900 HTTP/1.1\r\nHost: {handle}:5900\r\n\r\n"
                         .encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 10
    while len(served.events("session.opened")) < before + 6:  # logged once it is open
        assert time.monotonic() < deadline
        time.sleep(0.1)
    opened = served.events("session.opened")[before:]
    assert [doc["protocol"] for doc in opened] == ["spice"] * 6
    owner = owner_index(guest.UUIDString(), 2)
    assert {doc["worker"] for doc in opened} == {owner}  # the domain's one owner
    assert served.events("worker.relayed")


def test_metrics_answer_for_every_worker(served: ServedBroker, guest: Any) -> None:
    with served.connect(guest.name()) as ws:
        read_at_least(ws, len(RFB_BANNER))
        status, body = served.get("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    workers = {s.labels.get("worker") for s in families["console_broker_libvirt_connected"].samples}
    assert workers == {"0", "1"}
    active = [s for s in families["console_broker_sessions_active"].samples
              if s.labels.get("protocol") == "vnc" and s.value == 1]
    assert len(active) == 1  # counted once, by the owner


def test_a_killed_worker_is_replaced_and_its_domains_served_again(
    served: ServedBroker, guest: Any
) -> None:
    started = served.events("worker.started")
    pids = {doc["worker"]: doc["pid"] for doc in started}
    owner = owner_index(guest.UUIDString(), 2)
    os.kill(pids[owner], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(served.events("worker.started")) == len(started):
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.2)
    died = served.events("worker.died")
    assert died and died[-1]["worker"] == owner and died[-1]["signal"] == "SIGKILL"
    deadline = time.monotonic() + 60
    while True:  # its domain is served again once the new worker listens
        try:
            with served.connect(guest.name()) as ws:
                assert read_at_least(ws, len(RFB_BANNER))[:len(RFB_BANNER)] == RFB_BANNER
            break
        except (InvalidStatus, ConnectionClosed, OSError, TimeoutError):
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_sigterm_drains_every_worker(
    example_installed: None, testbed: Testbed, guest: Any, tmp_path: Path
) -> None:
    broker = ServedBroker(tmp_path, protocol="vnc", extra_config="[service]\nworkers = 2\n")
    with contextlib.ExitStack() as stack:
        try:
            _both_listening(broker)
            sessions = [stack.enter_context(broker.connect(guest.name())) for _ in range(4)]
            for ws in sessions:
                read_at_least(ws, len(RFB_BANNER))
            took = broker.stop()
        finally:
            if broker.process.poll() is None:
                broker.process.kill()
                broker.stop()
        assert broker.process.returncode == 0
        for ws in sessions:
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert took < broker.grace + 10
    stopped = broker.events("worker.stopped")
    assert sorted(doc["worker"] for doc in stopped) == [0, 1]
    assert all(doc["code"] == 0 for doc in stopped)


def test_tls_connections_are_relayed_to_the_owner(
    example_installed: None, guest: Any, tmp_path: Path
) -> None:
    paths = make_certificates(tmp_path / "certs")
    broker = ServedBroker(tmp_path, protocol="vnc", tls=paths,
                          extra_config="[service]\nworkers = 2\n")
    context = ssl.create_default_context(cafile=str(paths["ca"]))
    context.check_hostname = False
    try:
        _both_listening(broker)
        for _ in range(10):
            url = broker.token(guest.name())["websocket"]
            assert url.startswith("wss://")
            with connect(url, subprotocols=["binary"], ssl=context,  # type: ignore[list-item]
                         open_timeout=10) as ws:
                assert read_at_least(ws, len(RFB_BANNER))[:len(RFB_BANNER)] == RFB_BANNER
                ws.send(RFB_BANNER)  # both ways through the relay
                assert read_at_least(ws, 2)[0] >= 1
    finally:
        broker.stop()
    opened = broker.events("session.opened")
    assert len(opened) == 10 and len({doc["worker"] for doc in opened}) == 1
    assert broker.events("worker.relayed")  # ten connections: some landed elsewhere
    broker.assert_no_token_logged(require_tokens=True)


def test_a_clients_limit_holds_across_workers(
    example_installed: None, testbed: Testbed, guest: Any, tmp_path: Path
) -> None:
    other_owner = 1 - owner_index(guest.UUIDString(), 2)
    domain_uuid = next(u for u in (str(uuid.uuid4()) for _ in range(64))
                       if owner_index(u, 2) == other_owner)
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "vnc", "--mode", "fd"],
        input=testbed.guest_xml(domain_uuid=domain_uuid, serial=False),
        check=True, capture_output=True, text=True,
    ).stdout
    second = testbed.define(enabled)
    testbed.boot(second, console=False)
    broker = ServedBroker(tmp_path, protocol="vnc", extra_config="[service]\nworkers = 2\n",
                          limits_config="max_sessions_per_client = 2\n")
    try:
        _both_listening(broker)
        with broker.connect(guest.name()) as first, broker.connect(second.name()) as other:
            read_at_least(first, len(RFB_BANNER))
            read_at_least(other, len(RFB_BANNER))
            for domain in (guest.name(), second.name()):  # either worker refuses a third
                with pytest.raises(InvalidStatus) as refused, broker.connect(domain):
                    pass
                assert refused.value.response.status_code == 429
        details = [doc.get("detail", "") for doc in broker.events("request.refused")]
        assert len([d for d in details if "the client has 2 sessions" in d]) == 2
        opened = broker.events("session.opened")
        assert len({doc["worker"] for doc in opened}) == 2  # one session in each worker
        deadline = time.monotonic() + 10
        while True:  # both released: a new session is admitted again
            try:
                with broker.connect(second.name()) as again:
                    read_at_least(again, len(RFB_BANNER))
                break
            except InvalidStatus:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        broker.stop()
        testbed.remove(second)
