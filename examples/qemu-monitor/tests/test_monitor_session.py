"""The monitor's session handler against a fake client and a fake monitor call: the
protocol of cb_qemu_monitor._session (hello, answers, errors, limits, view-only), its
metric and the traffic it counts. No broker, no VM (tests/test_example_monitor_vm.py of
console-broker runs it on the real stack)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import cb_qemu_monitor
import libvirt
import pytest
import structlog
from cb_qemu_monitor import COMMAND_REFUSED, TABLE, MonitorSection
from cb_qemu_monitor._session import (
    MAX_LINE,
    MonitorSessions,
    _Call,
    _Dropped,
    command_line,
    command_name,
)
from prometheus_client import CollectorRegistry, generate_latest

from broker.api import (
    CLIENT_PROTOCOL_ERROR,
    ClientClosed,
    Endpoint,
    PluginContext,
    Refused,
    Session,
    Traffic,
    load_config,
)
from broker.tokens import Claims, Rights

pytestmark = pytest.mark.anyio
UUID = "0b7e3b8e-47a4-4f6c-9b3f-5a4c1d2e3f40"
#: The domain handle the fake monitor expects to be handed.
DOMAIN = object()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClient:
    """A session's client: the test types messages, the handler's answers are kept."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[bytes | str | None](100)
        self.sent: list[dict[str, Any]] = []

    subprotocol = cb_qemu_monitor.SUBPROTOCOL
    request_headers: dict[str, str] = {}  # noqa: RUF012 (read-only here)

    def type(self, message: bytes | str) -> None:
        self._send.send_nowait(message)

    def leave(self) -> None:
        self._send.send_nowait(None)

    def answers(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] != "hello"]

    async def receive_message(self) -> bytes | str:
        item = await self._receive.receive()
        if item is None:
            raise ClientClosed
        return item

    async def receive(self) -> bytes:
        item = await self.receive_message()
        return item.encode() if isinstance(item, str) else item

    async def send(self, data: bytes) -> None:
        raise AssertionError(f"the monitor sends text messages only, not {data!r}")

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def close(self) -> None:
        self._send.close()
        self._receive.close()


class FakeMonitor:
    """The monitor call: answers from *outputs* (a line -> its output, or an exception),
    and records the lines it ran and the domain it was handed."""

    def __init__(self, outputs: dict[str, str | Exception] | None = None) -> None:
        self.outputs = outputs or {}
        self.ran: list[str] = []
        #: Lines that wait for this before answering (a command QEMU is slow to answer).
        self.release = threading.Event()
        self.slow: set[str] = set()

    def __call__(self, domain: Any, line: str) -> str:
        assert domain is DOMAIN
        self.ran.append(line)
        if line in self.slow:
            self.release.wait(30)
        output = self.outputs.get(line, f"ran {line}\r\n")
        if isinstance(output, Exception):
            raise output
        return output


def make_session(client: FakeClient, *, view_only: bool = False) -> Session:
    claims = Claims(
        domain_uuid=UUID, protocol="monitor", node="hv1",
        rights=Rights.VIEW if view_only else Rights.FULL,
        issued_at=0, not_before=0, expires_at=60, jti="j",
    )

    async def no_endpoint() -> Endpoint:
        raise AssertionError("the monitor opens no endpoint")

    return Session(
        id="s", protocol="monitor", console="monitor", claims=claims, client=client,
        endpoint=None, log=structlog.get_logger("test"), traffic=Traffic(),
        open_endpoint=no_endpoint, client_address="127.0.0.1", domain_name="web1",
        domain_handle=DOMAIN,
    )


def sessions(monitor: FakeMonitor, registry: CollectorRegistry | None = None,
             config: Path | None = None) -> MonitorSessions:
    """The plugin's sessions, as a broker makes them (the table from *config*)."""
    context = PluginContext(
        "monitor", load_config(config, [TABLE]), registry or CollectorRegistry()
    )
    return MonitorSessions.from_context(context, call=monitor)


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not check():
            await anyio.sleep(0.005)


async def run(
    plugin: MonitorSessions, client: FakeClient, body: Callable[[], Coroutine[Any, Any, None]],
    *, view_only: bool = False,
) -> Session:
    """Serve one session while *body* types; the session must end by the client leaving."""
    session = make_session(client, view_only=view_only)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(body)
            with pytest.raises(ClientClosed):
                await plugin.serve(session)
    finally:
        client.close()
    return session


def counted(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value(
        "console_broker_monitor_commands_total", {"result": result}
    )
    assert value is not None
    return value


async def test_hello_then_each_line_answered_in_order() -> None:
    monitor = FakeMonitor({"info status": "VM status: running\r\n"})
    registry = CollectorRegistry()
    client = FakeClient()

    async def body() -> None:
        client.type("info status")
        client.type("  info   version ")  # blanks around it are dropped, inside kept
        client.type("")                    # ignored: no call, no answer
        client.type("   ")
        client.type("x/4x 0")
        await until(lambda: len(client.answers()) == 3)
        client.leave()

    session = await run(sessions(monitor, registry), client, body)
    assert client.sent[0] == {
        "type": "hello", "domain": "web1", "view_only": False, "commands": None
    }
    assert client.answers() == [
        {"type": "output", "command": "info status", "output": "VM status: running\n",
         "truncated": False},
        {"type": "output", "command": "info   version", "output": "ran info   version\n",
         "truncated": False},
        {"type": "output", "command": "x/4x 0", "output": "ran x/4x 0\n", "truncated": False},
    ]
    assert monitor.ran == ["info status", "info   version", "x/4x 0"]
    assert counted(registry, "ok") == 3
    assert counted(registry, "error") == counted(registry, "refused") == 0
    # the core's idle timeout and byte counts see the session's traffic
    assert session.traffic.to_console == len("info status") + len("info   version") + 6
    assert session.traffic.to_client == sum(
        len(json.dumps(message).encode()) for message in client.sent
    )


async def test_a_libvirt_error_is_answered_and_the_session_goes_on() -> None:
    monitor = FakeMonitor({"info status": libvirt.libvirtError("Requested operation is not valid")})
    registry = CollectorRegistry()
    client = FakeClient()

    async def body() -> None:
        client.type("info status")
        client.type("info version")
        await until(lambda: len(client.answers()) == 2)
        client.leave()

    await run(sessions(monitor, registry), client, body)
    first, second = client.answers()
    assert first["type"] == "error" and first["command"] == "info status"
    assert "Requested operation is not valid" in first["error"]
    assert second["type"] == "output" and second["output"] == "ran info version\n"
    assert (counted(registry, "error"), counted(registry, "ok")) == (1, 1)


async def test_the_output_is_cut_to_max_output(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("[monitor]\nmax_output = 10\n")
    monitor = FakeMonitor({"help": "0123456789abcdef\r\n", "info name": "0123456789"})
    client = FakeClient()

    async def body() -> None:
        client.type("help")
        client.type("info name")
        await until(lambda: len(client.answers()) == 2)
        client.leave()

    await run(sessions(monitor, config=config), client, body)
    cut, whole = client.answers()
    assert (cut["output"], cut["truncated"]) == ("0123456789", True)
    assert (whole["output"], whole["truncated"]) == ("0123456789", False)


async def test_a_command_that_times_out_is_an_error_and_the_next_waits_for_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("[monitor]\ntimeout = 0.1\n")
    monitor = FakeMonitor()
    monitor.slow.add("pmemsave 0 4096 /run/fifo")
    registry = CollectorRegistry()
    client = FakeClient()

    async def body() -> None:
        client.type("pmemsave 0 4096 /run/fifo")
        await until(lambda: len(client.answers()) == 1)
        # still running in its thread: the next command waits (the timeout), then is
        # answered without running
        client.type("info status")
        await until(lambda: len(client.answers()) == 2)
        assert monitor.ran == ["pmemsave 0 4096 /run/fifo"]
        monitor.release.set()
        client.type("info status")
        await until(lambda: len(client.answers()) == 3)
        client.leave()

    await run(sessions(monitor, registry, config), client, body)
    slow, busy, done = client.answers()
    assert slow == {
        "type": "error", "command": "pmemsave 0 4096 /run/fifo",
        "error": "no answer within 0.1 s (the command may still take effect)",
    }
    assert busy == {
        "type": "error", "command": "info status",
        "error": "the previous command, which timed out, has not ended yet",
    }
    assert done["type"] == "output" and done["output"] == "ran info status\n"
    assert monitor.ran == ["pmemsave 0 4096 /run/fifo", "info status"]
    assert (counted(registry, "timeout"), counted(registry, "error"),
            counted(registry, "ok")) == (1, 1, 1)


async def test_a_command_dropped_before_its_thread_started_never_runs() -> None:
    call = _Call()
    assert call.abandon() is False  # timed out while queued: dropped
    assert call.ended.is_set()
    ran: list[str] = []

    def monitor(domain: Any, line: str) -> str:
        ran.append(line)
        return ""

    with pytest.raises(_Dropped):
        await anyio.to_thread.run_sync(call.run, monitor, DOMAIN, "stop")
    assert ran == []


async def test_a_command_that_started_runs_on_after_its_timeout() -> None:
    call = _Call()
    started, release = threading.Event(), threading.Event()

    def slow(domain: Any, line: str) -> str:
        started.set()
        release.wait(30)
        return "done"

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: anyio.to_thread.run_sync(call.run, slow, DOMAIN, "x"))
        await anyio.to_thread.run_sync(started.wait, 30)
        assert call.abandon() is True  # it runs: it may still take effect
        assert not call.ended.is_set()
        release.set()
        await call.ended.wait()


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"info status", "a binary message"),
        ("info status\ninfo version", "a control character"),
        ("info\tstatus", "a control character"),
        ("info status\x00", "a control character"),
        ("info " + "x" * MAX_LINE, f"more than {MAX_LINE} characters"),
    ],
    ids=["binary", "newline", "tab", "nul", "too-long"],
)
async def test_what_is_no_command_line_ends_the_session(message: bytes | str, why: str) -> None:
    monitor = FakeMonitor()
    client = FakeClient()
    client.type(message)
    with pytest.raises(Refused) as refused:
        await sessions(monitor).serve(make_session(client))
    client.close()
    assert refused.value.refusal is CLIENT_PROTOCOL_ERROR
    assert why in refused.value.detail
    assert monitor.ran == []
    assert client.answers() == []


async def test_a_view_only_session_runs_its_commands_and_is_ended_for_another() -> None:
    monitor = FakeMonitor()
    registry = CollectorRegistry()
    client = FakeClient()
    for line in ("info status", "info/x status", "stop"):
        client.type(line)
    session = make_session(client, view_only=True)
    with pytest.raises(Refused) as refused:
        await sessions(monitor, registry).serve(session)
    client.close()
    assert refused.value.refusal is COMMAND_REFUSED
    assert refused.value.refusal.close_code == 4301
    assert "'stop'" in refused.value.detail
    assert client.sent[0] == {
        "type": "hello", "domain": "web1", "view_only": True, "commands": ["info"]
    }
    # "info/x status" is HMP's info with a format: allowed (QEMU answers it as it will)
    assert monitor.ran == ["info status", "info/x status"]  # stop never reached QEMU
    assert (counted(registry, "ok"), counted(registry, "refused")) == (2, 1)


async def test_view_only_commands_is_effective(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[monitor]\nview_only_commands = ["info", "help"]\n')
    monitor = FakeMonitor()
    client = FakeClient()
    client.type("help")
    client.type("system_reset")
    with pytest.raises(Refused) as refused:
        await sessions(monitor, config=config).serve(make_session(client, view_only=True))
    client.close()
    assert refused.value.refusal is COMMAND_REFUSED
    assert client.sent[0]["commands"] == ["info", "help"]
    assert [answer["type"] for answer in client.answers()] == ["output"]
    assert monitor.ran == ["help"]


async def test_the_metric_is_in_the_registry_from_the_start() -> None:
    registry = CollectorRegistry()
    sessions(FakeMonitor(), registry)
    text = generate_latest(registry).decode()
    for result in ("ok", "error", "timeout", "refused"):
        assert f'console_broker_monitor_commands_total{{result="{result}"}} 0.0' in text


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("info status", "info"),
        ("info", "info"),
        ("x/4x 0", "x"),
        ("info/x status", "info"),
        ("infox status", "infox"),
        ("s", "s"),
        ("\u00a0info status", "\u00a0info"),  # not a blank to HMP: an unknown command
    ],
)
def test_the_command_is_the_first_word_as_hmp_reads_it(line: str, name: str) -> None:
    assert command_name(line) == name


def test_command_lines() -> None:
    assert command_line("  info status  ") == "info status"
    assert command_line("") is None
    assert command_line("    ") is None
    assert command_line("x" * MAX_LINE) == "x" * MAX_LINE


def test_the_defaults() -> None:
    assert MonitorSection() == MonitorSection(
        view_only_commands=("info",), timeout=10.0, max_output=65536
    )
