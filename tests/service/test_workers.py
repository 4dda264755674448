"""Worker processes' pieces (broker.service._workers): who owns what, the request heads'
tokens, passing a socket through an inbox, /metrics of every worker, the supervisor."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.handoff import HandoffTable
from broker.service._workers import (
    Passed,
    WorkerLink,
    head_token,
    merge_metrics,
    owner_index,
    routing_key,
)


def _jwt(payload: dict[str, object]) -> str:
    def part(doc: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part(payload)}.c2ln"


def test_every_worker_agrees_on_the_owner_and_domains_spread() -> None:
    domains = [str(uuid.uuid4()) for _ in range(400)]
    owners = [owner_index(domain, 4) for domain in domains]
    assert owners == [owner_index(domain, 4) for domain in domains]  # no state, no salt
    assert {owners.count(i) for i in range(4)} <= set(range(60, 141))  # ~100 each
    assert owner_index("a", 1) == 0


def test_a_request_routes_by_its_tokens_domain_or_its_handle() -> None:
    domain = str(uuid.uuid4())
    assert routing_key(_jwt({"sub": domain, "proto": "vnc"})) == domain
    assert routing_key("h." + "A" * 32) == "h." + "A" * 32
    for garbage in ("", "a.b", "a.!!!.c", _jwt({"sub": 5}), _jwt({"nosub": "x"}), "x" * 50):
        assert routing_key(garbage) is None
    link = WorkerLink(3)
    try:
        link.become(owner_index(domain, 3))
        assert link.route(_jwt({"sub": domain})) is None  # its own
        link.become((owner_index(domain, 3) + 1) % 3)
        assert link.route(_jwt({"sub": domain})) == owner_index(domain, 3)
        assert link.route(None) is None and link.route("garbage") is None
    finally:
        link.close()


def test_the_head_gives_the_query_token_else_the_bearer_header() -> None:
    assert head_token(b"GET /ws/vnc?token=T1 HTTP/1.1\r\nHost: h\r\n\r\n") == "T1"
    assert head_token(b"GET /n/node/ws/serial/control?x=1&token=T2 HTTP/1.1\r\n\r\n") == "T2"
    assert head_token(b"POST /handoff/vnc HTTP/1.1\r\nHost: h\r\n"
                      b"authorization:  Bearer T3\r\n\r\n") == "T3"
    assert head_token(b"GET /ws/vnc?token=A&token=B HTTP/1.1\r\n\r\n") is None
    assert head_token(b"GET /healthz HTTP/1.1\r\n\r\n") is None
    assert head_token(b"\xff\xfe garbage\r\n\r\n") is None


def test_a_worker_issues_only_handles_that_route_to_itself() -> None:
    from broker.tokens import Claims, Rights

    table = HandoffTable()
    link = WorkerLink(4)
    try:
        link.become(2)
        table.accepts = link.owns
        parent = Claims(
            domain_uuid=str(uuid.uuid4()), protocol="vnc", node="n", rights=Rights.FULL,
            issued_at=0, not_before=0, expires_at=10**10, jti="parent",
        )
        for _ in range(4):
            handle = table.issue(parent, ttl=60, now=1000.0).handle
            assert owner_index(handle, 4) == 2
            assert link.route(handle) is None
            table.used(table.claims(handle, now=1000.0).jti)  # type: ignore[union-attr]
    finally:
        link.close()


def test_a_socket_and_its_first_bytes_reach_the_owners_inbox() -> None:
    link = WorkerLink(2)

    async def main() -> Passed:
        link.become(1)
        arrived: asyncio.Future[Passed] = asyncio.get_running_loop().create_future()
        stop = link.attach(arrived.set_result, lambda: b"")
        client, server = socket.socketpair()
        try:
            assert await link.send(1, {"kind": "http", "peer": ["192.0.2.7", 5555]},
                                   b"GET / HTTP/1.1\r\n\r\n", server.fileno())
            server.close()  # the inbox holds its own reference
            passed = await asyncio.wait_for(arrived, 5)
            client.sendall(b"more")
            assert passed.sock.recv(10) == b"more"  # the very same connection
            passed.sock.close()
            return passed
        finally:
            stop()
            client.close()

    try:
        passed = asyncio.run(main())
    finally:
        link.close()
    assert passed.listener == "http"
    assert passed.peer == ("192.0.2.7", 5555)
    assert passed.head == b"GET / HTTP/1.1\r\n\r\n"


def test_metrics_of_every_worker_are_one_valid_exposition_labelled_by_worker() -> None:
    texts = {}
    for index in range(3):
        registry = CollectorRegistry()
        sessions = Counter("cb_sessions", "Sessions.", ["protocol"], registry=registry)
        sessions.labels("vnc").inc(index + 1)
        Gauge("cb_up", "Up.", registry=registry).set(1)
        texts[index] = generate_latest(registry)
    merged = merge_metrics(texts).decode()
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    totals = {
        (sample.labels["worker"], sample.labels["protocol"]): sample.value
        for sample in families["cb_sessions"].samples if sample.name == "cb_sessions_total"
    }
    assert totals == {("0", "vnc"): 1.0, ("1", "vnc"): 2.0, ("2", "vnc"): 3.0}
    assert sorted(s.labels["worker"] for s in families["cb_up"].samples) == ["0", "1", "2"]
    assert merged.count("# TYPE cb_up gauge") == 1


SUPERVISED = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from broker.service._workers import Supervisor

    out = Path(sys.argv[1])
    forgotten = []

    def run_worker(link):
        marker = out / f"w{link.index}-{os.getpid()}"
        marker.write_text("")
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        while not stopping:
            time.sleep(0.05)
        (out / f"drained-{link.index}-{os.getpid()}").write_text("")
        return 0

    def forget(index):
        (out / f"forgot-{index}-{time.monotonic_ns()}").write_text("")

    sys.exit(Supervisor(2, run_worker, forget=forget).run())
    """
)


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_supervisor_restarts_a_dead_worker_and_drains_all_on_sigterm(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(tmp_path)])
    try:
        _wait(lambda: len(list(tmp_path.glob("w*-*"))) == 2)
        first = {p.name.split("-")[0]: int(p.name.split("-")[1]) for p in tmp_path.glob("w*-*")}
        assert set(first) == {"w0", "w1"}
        os.kill(first["w1"], signal.SIGKILL)
        _wait(lambda: len(list(tmp_path.glob("w1-*"))) == 2)  # restarted, same index
        assert list(tmp_path.glob("forgot-1-*"))  # its sessions were forgotten first
        assert len(list(tmp_path.glob("w0-*"))) == 1  # the other went on
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert len(list(tmp_path.glob("drained-*"))) == 2  # each worker got SIGTERM and drained


def test_serve_refuses_a_port_another_process_listens_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "broker.toml"
        config.write_text(
            f'[broker]\nstate_dir = "{tmp_path / "state"}"\n[listen]\nport = {port}\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "serve", "--config", str(config),
             "--workers", "2"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize("workers", ["0", "-1", "x"])
def test_serve_workers_must_be_a_positive_number(tmp_path: Path, workers: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--workers", workers],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr


FAILING = textwrap.dedent(
    """
    import signal, sys, time
    from broker.service._workers import CANNOT_START, Supervisor

    def run_worker(link):
        if link.index == 1:
            return CANNOT_START  # as a worker that cannot listen
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        while not stopping:
            time.sleep(0.05)
        return 0

    sys.exit(Supervisor(2, run_worker).run())
    """
)


def test_a_worker_that_cannot_start_stops_them_all() -> None:
    done = subprocess.run([sys.executable, "-c", FAILING], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1  # not restarted again and again
    assert "worker.cannot_start" in done.stdout + done.stderr
