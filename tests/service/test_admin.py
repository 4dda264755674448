"""The admin socket (broker/service/_admin.py) and ``console-broker sessions``.

In process against the fake hypervisor (brokerkit): the live sessions listed with their
fields, filtered by domain, ended with close code 4109 and the operator's reason;
garbled, unknown and oversized requests answered with an error; the socket's modes and
the peer check (another user is refused). The command line against a served broker on
libvirt's test driver (``test:///default``: no console opens there, so its list is
empty): the table, ``--json``, a ``sessions end`` that matches nothing, and a broker
that is not running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from brokerkit import FakeDomain, FakeResolver, Running, make_config, running_broker
from conftest import DOMAIN
from servedbroker import CLI, ServedBroker
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker import Protocol, hookimpl
from broker.config import BrokerSection, Config, ServiceSection
from broker.plugins import PluginManager
from broker.service._admin import MAX_LINE, BrokerNotReachable, ask, bind_admin_socket
from broker.sessions_cli import table
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
NOBODY = 65534


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(state: Path) -> Config:
    """brokerkit's configuration with a state directory of its own (the admin socket's)."""
    state.mkdir(mode=0o700)
    return attrs.evolve(make_config(), broker=BrokerSection(node="hv1", state_dir=str(state)))


@pytest.fixture
async def running(tmp_path: Path, verifier: TokenVerifier) -> AsyncIterator[Running]:
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"), FakeDomain(OTHER, name="db1"))
    async with running_broker(_config(tmp_path / "state"), verifier, resolver,
                              _plugins()) as found:
        yield found


class _Protocols:
    """vnc and serial served raw, serial with view-only sessions (the test does not type)."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="vnc"),
                Protocol(name="serial", title="serial", view_only=True)]


def _plugins() -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=False, plugins=[("raw", _Protocols())])


def socket_path(running: Running) -> Path:
    return running.broker.config.admin_socket


async def ask_in_thread(running: Running, request: dict[str, Any]) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(ask, socket_path(running), request)


async def raw_exchange(running: Running, data: bytes) -> list[dict[str, Any]]:
    """Send *data* as it is; every answer line until the broker closes."""
    def exchange() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path(running)))
            with contextlib.suppress(OSError):  # the broker may have closed already
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    answers = await anyio.to_thread.run_sync(exchange)
    return [json.loads(line) for line in answers.splitlines()]


async def opened(running: Running, issuer: TokenIssuer, domain: str, protocol: str,
                 **claims: Any) -> ClientConnection:
    ws = await connect(running.url(protocol, issuer.issue(domain, protocol, ttl=60,
                                                          **claims).token))
    await ws.recv()  # the fake console's banner: the session is open
    return ws


async def test_the_live_sessions_with_their_fields(
    running: Running, issuer: TokenIssuer
) -> None:
    first = await opened(running, issuer, DOMAIN, "vnc", name="Ada Lovelace")
    second = await opened(running, issuer, OTHER, "serial", view_only=True)
    try:
        await first.send(b"hello")
        assert await first.recv() == b"hello"
        answer = await ask_in_thread(running, {"op": "sessions"})
        assert answer["ok"] is True
        records = answer["sessions"]
        assert [r["protocol"] for r in records] == ["vnc", "serial"]  # oldest first
        vnc, serial = records
        assert vnc["domain"] == DOMAIN and vnc["domain_name"] == "web1"
        assert vnc["rights"] == "full" and serial["rights"] == "view"
        assert vnc["name"] == "Ada Lovelace" and serial["name"] is None
        assert vnc["client"] == "127.0.0.1"
        assert vnc["bytes_to_console"] == 5 and vnc["bytes_to_client"] >= 5 + 12
        assert vnc["worker"] is None and vnc["connections"] == 1
        assert vnc["started"].endswith("Z") and len(vnc["id"]) == 12
        # The same records for the core's pages, and filtered by name or UUID.
        assert await running.broker.admin.live_sessions() == records
        for domain in ("db1", OTHER, OTHER.upper()):
            found = await ask_in_thread(running, {"op": "sessions", "domain": domain})
            assert [r["id"] for r in found["sessions"]] == [serial["id"]]
        none = await ask_in_thread(running, {"op": "sessions", "domain": "nope"})
        assert none == {"ok": True, "sessions": []}
        status = await ask_in_thread(running, {"op": "status"})
        assert status["ok"] and status["workers"] == 1 and status["pid"] == os.getpid()
    finally:
        await first.close()
        await second.close()


async def test_an_operator_ends_a_session_with_4109_and_the_reason(
    running: Running, issuer: TokenIssuer
) -> None:
    kept = await opened(running, issuer, DOMAIN, "vnc")
    ended = await opened(running, issuer, OTHER, "vnc")
    try:
        records = (await ask_in_thread(running, {"op": "sessions", "domain": "db1"}))["sessions"]
        answer = await ask_in_thread(
            running, {"op": "end", "session": records[0]["id"], "reason": "disk  swap\nnow"}
        )
        assert answer["ok"] and [r["id"] for r in answer["ended"]] == [records[0]["id"]]
        with anyio.fail_after(5), pytest.raises(ConnectionClosed):
            await ended.recv()
        assert ended.close_code == 4109
        assert ended.close_reason == "ended by an operator: disk swap now"
        # The other session goes on; a second end finds nothing.
        await kept.send(b"x")
        assert await kept.recv() == b"x"
        again = await ask_in_thread(running, {"op": "end", "session": records[0]["id"]})
        assert again == {"ok": True, "ended": []}
        # Every session of a domain, by name; without a reason, the code's own text.
        by_domain = await ask_in_thread(running, {"op": "end", "domain": "web1"})
        assert len(by_domain["ended"]) == 1
        with anyio.fail_after(5), pytest.raises(ConnectionClosed):
            await kept.recv()
        assert (kept.close_code, kept.close_reason) == (4109, "ended by an operator")
    finally:
        await kept.close()
        await ended.close()


async def test_a_long_reason_is_cut_to_fit_a_close_frame(
    running: Running, issuer: TokenIssuer
) -> None:
    ws = await opened(running, issuer, DOMAIN, "vnc")
    await ask_in_thread(running, {"op": "end", "domain": DOMAIN, "reason": "é" * 300})
    with anyio.fail_after(5), pytest.raises(ConnectionClosed):
        await ws.recv()
    assert ws.close_code == 4109
    assert len(ws.close_reason.encode()) <= 123
    assert ws.close_reason.startswith("ended by an operator: éé")


@pytest.mark.parametrize(("sent", "error"), [
    (b"not json\n", "not JSON"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[1, 2]\n", "a request is one JSON object"),
    (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    (b'{"no": "op"}\n', "unknown op None"),
    (b'{"op": "sessions", "extra": 1}\n', "unknown field 'extra'"),
    (b'{"op": "end"}\n', "name a session or a domain"),
    (b'{"op": "end", "session": 7}\n', "'session' must be a non-empty string"),
    (b'{"op": "end", "domain": ""}\n', "'domain' must be a non-empty string"),
])
async def test_garbled_requests_are_answered_with_an_error(
    running: Running, sent: bytes, error: str
) -> None:
    answers = await raw_exchange(running, sent + b'{"op": "status"}\n')
    assert answers[0]["ok"] is False and error in answers[0]["error"]
    assert answers[1]["ok"] is True  # the connection goes on


async def test_an_oversized_request_is_refused_and_the_connection_closed(
    running: Running,
) -> None:
    answers = await raw_exchange(running, b'{"op": "' + b"x" * (MAX_LINE + 10) + b'"}\n')
    assert answers == [{"ok": False, "error": f"request longer than {MAX_LINE} bytes"}]


async def test_the_socket_is_for_root_and_the_brokers_user_only(running: Running) -> None:
    path = socket_path(running)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_another_user_is_refused(
    tmp_path: Path, verifier: TokenVerifier
) -> None:
    if os.getuid() != 0:
        pytest.skip("another user's connection needs root to make")
    # A socket another user can reach the directory of: /tmp's, not pytest's (0700).
    outside = Path(tempfile.mkdtemp(prefix="cb-admin-"))
    try:
        config = attrs.evolve(_config(tmp_path / "state"), service=ServiceSection(
            admin_socket=str(outside / "admin" / "admin.sock")))
        async with running_broker(config, verifier, FakeResolver()) as running:
            await _another_user_is_refused(socket_path(running))
    finally:
        shutil.rmtree(outside)


async def _another_user_is_refused(path: Path) -> None:
    path.parent.parent.chmod(0o755)

    def as_nobody() -> str:
        """Connect as another user (a forked child that drops to nobody): the answer, or
        the error."""
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only system calls, then _exit
            code = 0
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    sock.sendall(b'{"op": "sessions"}\n')
                    os.write(writing, sock.recv(65536))
            except OSError as exc:
                os.write(writing, f"error: {exc.strerror}".encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(writing)
        with os.fdopen(reading, "rb") as pipe:
            found = pipe.read().decode()
        assert os.waitpid(pid, 0)[1] == 0
        return found

    # The directory (0700) keeps another user out before the socket does.
    assert await anyio.to_thread.run_sync(as_nobody) == "error: Permission denied"
    # With the modes opened up, the broker itself refuses the peer (SO_PEERCRED).
    path.parent.chmod(0o755)
    path.chmod(0o666)
    try:
        answer = await anyio.to_thread.run_sync(as_nobody)
    finally:
        path.parent.chmod(0o700)
        path.chmod(0o600)
    assert answer and json.loads(answer) == {
        "ok": False, "error": "permission denied: root or the broker's own user only"
    }


def test_a_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    with pytest.raises(OSError, match="writable by others"):
        bind_admin_socket(directory / "admin.sock")


def test_a_stale_socket_is_replaced_and_a_live_one_kept(tmp_path: Path) -> None:
    path = tmp_path / "admin" / "admin.sock"
    first = bind_admin_socket(path)
    try:
        with pytest.raises(OSError, match="another broker answers"):
            bind_admin_socket(path)
    finally:
        first.close()
    bind_admin_socket(path).close()  # nothing listens any more: replaced


def test_a_long_path_is_bound_and_reached(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "admin" / "admin.sock"
    sock = bind_admin_socket(path)
    with sock:
        assert path.is_socket()
        with pytest.raises(BrokerNotReachable, match=r"did not answer|not JSON"):
            ask(path, {"op": "status"}, timeout=0.5)  # bound, nothing serves it


def test_the_table() -> None:
    records = [{
        "id": "3f2a9c0d11b2", "domain": DOMAIN, "domain_name": "web1", "protocol": "serial",
        "rights": "full", "client": "192.0.2.7", "started": "2026-12-07T00:31:02Z",
        "bytes_to_client": 2048, "bytes_to_console": 17, "name": "Ada", "connections": 1,
        "worker": None,
    }]
    text = table(records)
    header, row = text.splitlines()
    assert header.split() == ["ID", "DOMAIN", "UUID", "PROTOCOL", "RIGHTS", "CLIENT",
                              "STARTED", "FOR", "TO", "CLIENT", "TO", "CONSOLE", "NAME"]
    assert row.split()[:7] == ["3f2a9c0d11b2", "web1", DOMAIN, "serial", "full",
                               "192.0.2.7", "2026-12-07T00:31:02Z"]
    assert "2.0 KiB" in row and "17 B" in row and row.endswith("Ada")
    assert "WORKER" in table([{**records[0], "worker": 1}])


# --- the command line, against a served broker on libvirt's test driver --------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    broker = ServedBroker(tmp_path_factory.mktemp("admin"), protocol="serial",
                          extra_config='[libvirt]\nuri = "test:///default"\n')
    try:
        yield broker
    finally:
        broker.stop()


def sessions(served: ServedBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "sessions", *args, "--config", str(served.config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_command_against_a_running_broker(served: ServedBroker) -> None:
    done = sessions(served)
    assert (done.returncode, done.stdout) == (0, "no live sessions\n"), done.stderr
    done = sessions(served, "list", "--json")
    assert (done.returncode, json.loads(done.stdout)) == (0, [])
    done = sessions(served, "end", "3f2a9c0d11b2", "--reason", "maintenance")
    assert done.returncode == 1
    assert done.stderr == "console-broker: no live session 3f2a9c0d11b2\n"
    done = sessions(served, "end", "--domain", "test")
    assert done.returncode == 1 and "no live session on domain test" in done.stderr
    done = sessions(served, "end")
    assert done.returncode == 2 and "name a session" in done.stderr
    assert served.events("admin.listening")


def test_the_command_when_no_broker_runs(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run([*CLI, "sessions", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("console-broker: error: the broker is not running")
    assert str(tmp_path / "state" / "admin" / "admin.sock") in done.stderr
