"""The audit log (broker/service/_audit.py): one line per session at its end, in the
broker's log (``session.audit``) and with ``audit.file`` appended to that file.

In process against the fake hypervisor (brokerkit): the line's fields for a session an
operator ended and one the client closed, never the token; the file followed across a
rotation (moved away, then a new one at the path) with and without ``reopen``; whole
lines from several processes appending at once; a file that cannot be opened stops the
start.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import structlog
from brokerkit import FakeDomain, FakeResolver, Running, make_config, running_broker
from conftest import DOMAIN
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broker.config import AuditSection, BrokerSection
from broker.errors import CommandError
from broker.plugins import PluginManager
from broker.service._app import Broker
from broker.service._audit import AuditLog
from broker.service._refusals import CLIENT_CLOSED
from broker.service._sessions import Live
from broker.tokens import Claims, Rights, TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    return tmp_path / "log" / "audit.log"


@pytest.fixture
async def running(
    tmp_path: Path, audit_file: Path, verifier: TokenVerifier
) -> AsyncIterator[Running]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = attrs.evolve(
        make_config(), broker=BrokerSection(node="hv1", state_dir=str(state)),
        audit=AuditSection(file=str(audit_file)),
    )
    async with running_broker(config, verifier, FakeResolver(FakeDomain(DOMAIN, name="web1"))
                              ) as found:
        yield found


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def wait_lines(path: Path, count: int) -> list[dict[str, Any]]:
    with anyio.fail_after(5):
        while not path.exists() or len(path.read_text().splitlines()) < count:
            await anyio.sleep(0.01)
    return lines(path)


async def test_the_line_of_a_session_an_operator_ended(
    running: Running, issuer: TokenIssuer, audit_file: Path
) -> None:
    token = issuer.issue(DOMAIN, "vnc", ttl=60, name="Ada Lovelace")
    with structlog.testing.capture_logs() as logged:
        async with connect(running.url("vnc", token.token)) as ws:
            await ws.recv()
            await ws.send(b"hello")
            assert await ws.recv() == b"hello"
            (record,) = await running.broker.admin.live_sessions()
            await running.broker.admin.end_sessions(session=record["id"], reason="patching")
            with anyio.fail_after(5), pytest.raises(ConnectionClosed):
                await ws.recv()
        (line,) = await wait_lines(audit_file, 1)
    assert line == {
        "session": record["id"],
        "name": "Ada Lovelace",
        "sub": DOMAIN,
        "jti": token.claims.jti,
        "domain": DOMAIN,
        "domain_name": "web1",
        "protocol": "vnc",
        "rights": "full",
        "client": "127.0.0.1",
        "start": record["started"],
        "end": line["end"],
        "duration": line["duration"],
        "bytes_to_client": 12 + 5,
        "bytes_to_console": 5,
        "code": 4109,
        "reason": "ended_by_operator",
        "close_reason": "ended by an operator: patching",
        "worker": None,
    }
    assert line["end"] >= line["start"] and line["duration"] >= 0
    assert token.token not in audit_file.read_text()
    assert audit_file.stat().st_mode & 0o777 == 0o640
    # The same line in the broker's log.
    (event,) = [e for e in logged if e["event"] == "session.audit"]
    assert {k: v for k, v in event.items() if k not in ("event", "log_level")} == line


async def test_the_line_of_a_session_its_client_closed(
    running: Running, issuer: TokenIssuer, audit_file: Path
) -> None:
    async with connect(running.url("vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token)) as ws:
        await ws.recv()
    (line,) = await wait_lines(audit_file, 1)
    assert (line["code"], line["reason"], line["name"]) == (1000, "client_closed", None)
    assert (line["bytes_to_client"], line["bytes_to_console"]) == (12, 0)


async def test_the_file_is_followed_across_a_rotation(
    running: Running, issuer: TokenIssuer, audit_file: Path
) -> None:
    async def one_session() -> None:
        async with connect(running.url("vnc", issuer.issue(DOMAIN, "vnc", ttl=60).token)) as ws:
            await ws.recv()

    await one_session()
    await wait_lines(audit_file, 1)
    # logrotate's default: the file moved away, no signal; the next line starts a new one.
    rotated = audit_file.with_suffix(".log.1")
    audit_file.rename(rotated)
    await one_session()
    assert len(await wait_lines(audit_file, 1)) == 1
    assert len(lines(rotated)) == 1
    # With a reopen (SIGHUP) after the move: the same.
    audit_file.rename(rotated)
    running.broker.reopen_audit()
    assert audit_file.exists() and audit_file.read_text() == ""
    await one_session()
    assert len(await wait_lines(audit_file, 1)) == 1
    assert len(lines(rotated)) == 1


def _live(number: int) -> Live:
    claims = Claims(domain_uuid=DOMAIN, protocol="serial", node="hv1", rights=Rights.VIEW,
                    issued_at=0, not_before=0, expires_at=60, jti=f"jti-{number}",
                    name="x" * 3000)
    return Live(f"{number:012d}", DOMAIN, "stream", protocol="serial", domain_name="web1",
                client="192.0.2.7", claims=claims)


def test_lines_of_several_processes_never_interleave(tmp_path: Path) -> None:
    """Two processes (workers) append 300 lines of over 3 KiB each to one file at once."""
    path = tmp_path / "audit.log"
    children = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                audit = AuditLog(path, worker=worker)
                audit.open()
                structlog.configure(logger_factory=structlog.ReturnLoggerFactory())

                async def write(log: AuditLog = audit) -> None:  # a Live needs a loop
                    for number in range(300):
                        log.session_ended(_live(number), CLIENT_CLOSED)

                anyio.run(write)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    found = lines(path)  # every line parses: none was cut into by another
    assert len(found) == 600
    assert {line["worker"] for line in found} == {0, 1}
    assert all(len(line["name"]) == 3000 for line in found)


def test_a_file_that_cannot_be_opened_stops_the_start(
    tmp_path: Path, verifier: TokenVerifier
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = attrs.evolve(make_config(), audit=AuditSection(file=str(blocker / "audit.log")))
    with pytest.raises(CommandError, match=r"audit.file: cannot open .*not-a-directory"):
        Broker(config, verifier=verifier, resolver=FakeResolver(),
               plugins=PluginManager(disabled=(), load_entrypoints=False))
