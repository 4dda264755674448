"""The fan-out hub on its own: roles, takeover, the slow-client bound, the scrollback ring,
closing on the last leave. No sockets: clients are read through ``next_item``."""

from __future__ import annotations

import json
import tracemalloc

import anyio
import pytest
from broker_serial._hub import CONTROL_KINDS, RESET, Hub, Role, Scrollback, is_report

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.closed = 0

    def output(self, data: bytes) -> None:
        self.events.append(("o", data))

    def input(self, data: bytes) -> None:
        self.events.append(("i", data))

    def resize(self, cols: int, rows: int) -> None:
        self.events.append(("r", (cols, rows)))

    def close(self) -> None:
        self.closed += 1


async def drain(hub: Hub, client: object) -> list[bytes | dict[str, object]]:
    """Everything queued for *client* now: bytes as they are, control messages parsed."""
    out: list[bytes | dict[str, object]] = []
    while client.pending:  # type: ignore[attr-defined]
        with anyio.fail_after(1):
            item = await hub.next_item(client)  # type: ignore[arg-type]
        assert item is not None
        out.append(json.loads(item) if isinstance(item, str) else item)
    return out


def controls(items: list[bytes | dict[str, object]], kind: str) -> list[dict[str, object]]:
    return [i for i in items if isinstance(i, dict) and i["type"] == kind]


def output(items: list[bytes | dict[str, object]]) -> bytes:
    return b"".join(i for i in items if isinstance(i, bytes))


# --- the scrollback ring ------------------------------------------------------------------


def test_the_scrollback_keeps_the_newest_bytes_from_a_line_start() -> None:
    ring = Scrollback(16)
    ring.append(b"line one\r\n")
    assert ring.snapshot() == b"line one\r\n"
    for i in range(20):
        ring.append(f"row {i:02d}\r\n".encode())  # 8 bytes each
    snapshot = ring.snapshot()
    assert len(snapshot) <= 16
    assert snapshot.endswith(b"row 19\r\n") and snapshot.startswith(b"row ")


def test_the_scrollback_memory_stays_within_twice_its_limit() -> None:
    ring = Scrollback(1000)
    for _ in range(10_000):
        ring.append(b"x" * 37)
        assert len(ring._buffer) <= 2 * 1000 + 37
    assert len(ring.snapshot()) <= 1000


def test_a_long_line_is_not_replayed_from_inside_a_character() -> None:
    ring = Scrollback(7)
    ring.append("ééééééééé".encode())  # 2 bytes each, no newline
    ring.append("é".encode() * 4)
    snapshot = ring.snapshot()
    snapshot.decode()  # whole characters only
    assert 0 < len(snapshot) <= 7


def test_no_scrollback_at_all() -> None:
    ring = Scrollback(0)
    ring.append(b"anything\n")
    assert ring.snapshot() == b"" and len(ring) == 0


# --- roles --------------------------------------------------------------------------------


async def test_the_first_full_client_writes_and_a_view_only_one_never_does() -> None:
    hub = Hub(domain_name="web1", domain_uuid="u")
    viewer = hub.attach(full=False, framed=True)
    writer = hub.attach(full=True, framed=True)
    assert hub.writer is writer and writer.role is Role.WRITER and viewer.role is Role.WATCHER
    hello = controls(await drain(hub, viewer), "hello")[0]
    assert hello["rights"] == "view" and hello["role"] == "watcher"
    assert hello["domain"] == {"name": "web1", "uuid": "u"}
    assert hub.may_write(writer)
    assert not hub.may_write(viewer)
    assert not hub.may_write(viewer)  # told once
    errors = controls(await drain(hub, viewer), "error")
    assert [e["error"] for e in errors] == ["view_only"]
    assert not hub.takeover(viewer)
    assert controls(await drain(hub, viewer), "error")[0]["error"] == "view_only"
    assert hub.writer is writer


async def test_a_takeover_moves_the_writer_role_and_tells_the_previous_writer() -> None:
    hub = Hub()
    first = hub.attach(full=True, framed=True)
    second = hub.attach(full=True, framed=True)
    await drain(hub, first)
    await drain(hub, second)
    assert hub.writer is first and not hub.may_write(second)
    assert controls(await drain(hub, second), "error")[0]["error"] == "not_writer"
    assert hub.takeover(second)
    assert hub.writer is second and first.role is Role.WATCHER
    told = controls(await drain(hub, first), "role")
    assert told == [{"type": "role", "role": "watcher", "reason": "taken_over"}]
    assert controls(await drain(hub, second), "role")[0]["role"] == "writer"
    assert hub.may_write(second) and not hub.may_write(first)


async def test_a_raw_writer_is_told_in_the_terminal() -> None:
    hub = Hub()
    raw = hub.attach(full=True, framed=False)
    framed = hub.attach(full=True, framed=True)
    hub.takeover(framed)
    text = output(await drain(hub, raw))
    assert b"another client took over the keyboard" in text
    assert not hub.may_write(raw)
    assert b"your keys are ignored" in output(await drain(hub, raw))


async def test_a_vacant_role_goes_to_the_next_full_client_that_types() -> None:
    hub = Hub()
    writer = hub.attach(full=True, framed=True)
    other = hub.attach(full=True, framed=True)
    viewer = hub.attach(full=False, framed=True)
    hub.detach(writer)
    assert hub.writer is None
    assert controls(await drain(hub, other), "clients")[-1] == {
        "type": "clients", "count": 2, "writer": False
    }
    assert not hub.may_write(viewer)
    assert hub.may_write(other) and hub.writer is other
    assert controls(await drain(hub, other), "role")[-1]["reason"] == "claimed"


async def test_release_gives_the_role_up() -> None:
    hub = Hub()
    writer = hub.attach(full=True, framed=True)
    hub.release(writer)
    assert hub.writer is None
    assert controls(await drain(hub, writer), "role")[-1] == {
        "type": "role", "role": "watcher", "reason": "released"
    }


async def test_the_writers_size_and_input_are_recorded() -> None:
    recorder = FakeRecorder()
    hub = Hub(recorder=recorder)
    writer = hub.attach(full=True, framed=True)
    watcher = hub.attach(full=True, framed=True)
    hub.resize(watcher, 100, 40)  # not the writer's: ignored
    hub.resize(writer, 120, 50)
    hub.publish(b"out")
    hub.wrote(writer, b"in")
    assert recorder.events == [("r", (120, 50)), ("o", b"out"), ("i", b"in")]


# --- output -------------------------------------------------------------------------------


async def test_every_client_gets_the_output_and_a_late_one_the_scrollback_first() -> None:
    hub = Hub(scrollback=1024)
    early = hub.attach(full=True, framed=True)
    hub.publish(b"guest# echo hi\r\nhi\r\n")
    late = hub.attach(full=False, framed=True)
    hub.publish(b"guest# ")
    assert output(await drain(hub, early)) == b"guest# echo hi\r\nhi\r\nguest# "
    items = await drain(hub, late)
    hello = items[0]
    assert isinstance(hello, dict) and hello["type"] == "hello"
    assert hello["scrollback"] == len(b"guest# echo hi\r\nhi\r\n")
    # The scrollback's bytes come first, then live output (queued output is coalesced).
    assert output(items) == b"guest# echo hi\r\nhi\r\nguest# "


async def test_a_raw_client_gets_terminal_bytes_only() -> None:
    hub = Hub()
    hub.publish(b"before\r\n")
    raw = hub.attach(full=True, framed=False)
    hub.publish(b"after")
    items = await drain(hub, raw)
    assert all(isinstance(i, bytes) for i in items)
    assert output(items) == b"before\r\nafter"


async def test_a_slow_client_skips_to_the_scrollback_without_holding_the_others() -> None:
    hub = Hub(scrollback=4096, client_queue=8192)
    slow = hub.attach(full=False, framed=True)
    fast = hub.attach(full=True, framed=True)
    await drain(hub, slow)
    received = bytearray()
    for i in range(1000):
        hub.publish(f"line {i:04d}\r\n".encode())
        assert slow.queued <= hub.client_queue  # memory stays bounded
        received += output(await drain(hub, fast))
    assert received.endswith(b"line 0999\r\n") and len(received) == 1000 * 11
    assert slow.resyncs >= 1 and slow.skipped > 0
    items = await drain(hub, slow)
    skipped = items[0]
    assert isinstance(skipped, dict) and skipped["type"] == "skipped"
    assert skipped["role"] == "watcher" and skipped["clients"] == 2
    screen = items[1]
    assert isinstance(screen, bytes) and screen.endswith(b"line 0999\r\n")
    assert len(screen) == skipped["scrollback"] <= 4096


async def test_a_slow_raw_client_is_reset_and_given_the_screen() -> None:
    hub = Hub(scrollback=100, client_queue=4096)
    raw = hub.attach(full=False, framed=False)
    for i in range(1000):
        hub.publish(f"{i:05d}\r\n".encode())
    items = await drain(hub, raw)
    assert len(items) == 1 and isinstance(items[0], bytes)
    assert items[0].startswith(RESET + b"\r\n[console-broker: output skipped")
    assert items[0].endswith(b"00999\r\n")


async def test_the_console_ending_drains_then_ends_each_client() -> None:
    hub = Hub()
    client = hub.attach(full=True, framed=False)
    hub.publish(b"last words")
    hub.end()
    assert await hub.next_item(client) == b"last words"
    assert await hub.next_item(client) is None


async def test_a_waiting_client_wakes_for_output() -> None:
    hub = Hub()
    client = hub.attach(full=True, framed=False)
    got: list[bytes | str | None] = []

    async def wait() -> None:
        got.append(await hub.next_item(client))

    async with anyio.create_task_group() as group:
        group.start_soon(wait)
        await anyio.sleep(0.01)
        hub.publish(b"x")
    assert got == [b"x"]


async def test_the_last_client_leaving_closes_the_hub_and_its_recording() -> None:
    recorder = FakeRecorder()
    closed: list[Hub] = []
    hub = Hub(recorder=recorder, on_close=closed.append)
    a = hub.attach(full=True, framed=True)
    b = hub.attach(full=False, framed=True)
    hub.detach(a)
    assert not hub.closed and recorder.closed == 0
    hub.detach(b)
    hub.detach(b)  # twice is harmless
    assert hub.closed and recorder.closed == 1 and closed == [hub]
    hub.publish(b"after the end")
    assert recorder.events == []
    with pytest.raises(RuntimeError):
        hub.attach(full=True, framed=True)


async def test_terminal_answers_pass_from_the_writer_only_and_claim_nothing() -> None:
    hub = Hub()
    writer = hub.attach(full=True, framed=True)
    watcher = hub.attach(full=True, framed=False)
    viewer = hub.attach(full=False, framed=True)
    for client in (writer, watcher, viewer):
        await drain(hub, client)
    answers = [b"\x1b[24;8R", b"\x1b[?1;2c", b"\x1b[>0;276;0c", b"\x1b]11;rgb:0/0/0\x07"]
    for answer in answers:
        assert is_report(answer)
        assert hub.may_write(writer, answer)
        assert not hub.may_write(watcher, answer) and not hub.may_write(viewer, answer)
    # Dropped without a word: nobody typed.
    assert await drain(hub, watcher) == [] and await drain(hub, viewer) == []
    hub.detach(writer)
    assert not hub.may_write(watcher, b"\x1b[1;1R") and hub.writer is None
    assert not is_report(b"\x1b[A") and not is_report(b"ls\r")
    assert hub.may_write(watcher, b"ls\r") and hub.writer is watcher


async def test_the_console_is_read_as_fast_as_the_fastest_client_takes_it() -> None:
    hub = Hub(scrollback=0, client_queue=8192)
    fast = hub.attach(full=True, framed=False)
    slow = hub.attach(full=False, framed=False)
    assert hub.room() == 8192
    hub.publish(b"x" * 6000)
    assert hub.room() == 8192 - 6000
    with anyio.move_on_after(0.05) as waited:
        await hub.wait_for_room()
    assert waited.cancelled_caught  # both are behind: the console waits
    assert await hub.next_item(fast) == b"x" * 6000
    with anyio.fail_after(1):
        assert await hub.wait_for_room() == 8192  # the fastest has room again
    hub.publish(b"y" * 6000)  # too much for the slow one: it skips, and is left out
    assert slow.resyncs == 1 and hub.room() == 8192 - 6000
    hub.detach(fast)
    assert hub.room() == 8192  # only a client waiting for the screen is left
    hub.end()
    assert await hub.wait_for_room() == 8192


# --- control messages to a client that does not read ----------------------------------------

#: What the control messages waiting for one client may take at most: one of each kind, a
#: pong echoing the largest ping's data (4096 characters, each escaped to at most 12).
CONTROL_ROOM = 65536


async def test_a_client_that_never_reads_holds_one_pong_however_many_pings() -> None:
    hub = Hub(scrollback=1024, client_queue=8192)
    client = hub.attach(full=False, framed=True)
    for i in range(1_000_000):
        hub.pong(client, f"ping {i}")
        if i % 997 == 0:
            assert client.queued <= hub.client_queue + CONTROL_ROOM
    assert client.queued <= hub.client_queue + CONTROL_ROOM
    items = await drain(hub, client)
    # It reads at last: the hello first, then the answer to its last ping, once.
    assert [i["type"] for i in items if isinstance(i, dict)] == ["hello", "pong"]
    assert controls(items, "pong") == [{"type": "pong", "data": "ping 999999"}]


async def test_pings_among_output_keep_the_queue_within_its_bound() -> None:
    hub = Hub(scrollback=256, client_queue=8192)
    stalled = hub.attach(full=False, framed=True)
    for i in range(200_000):
        hub.publish(b"%d\r\n" % i)
        hub.pong(stalled, str(i))
        assert stalled.queued_output <= hub.client_queue
        assert stalled.queued_controls <= CONTROL_KINDS
    assert stalled.queued <= hub.client_queue + CONTROL_ROOM
    items = await drain(hub, stalled)
    kinds = [i["type"] if isinstance(i, dict) else "output" for i in items]
    # hello, then where it fell behind the notice and the screen; the latest pong last.
    assert kinds[0] == "hello" and kinds[-1] == "pong" and kinds.count("pong") == 1
    skipped = controls(items, "skipped")[-1]
    assert items[items.index(skipped) + 1] == hub.scrollback.snapshot()
    assert controls(items, "pong") == [{"type": "pong", "data": "199999"}]
    assert output(items).endswith(b"199999\r\n")


async def test_output_read_in_tiny_pieces_costs_the_queue_about_its_bytes() -> None:
    hub = Hub(scrollback=0, client_queue=1 << 20)
    stalled = hub.attach(full=False, framed=True)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(400_000):  # an emulated UART is read a byte or two at a time
            hub.publish(b"ab")
            if i % 1000 == 0:
                hub.pong(stalled, str(i))  # a control message now and then splits the runs
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert stalled.queued_output == 800_000 and stalled.resyncs == 0
    assert held < 2 * 800_000  # not 400,000 objects of ~50 bytes each
    items = await drain(hub, stalled)
    assert output(items) == b"ab" * 400_000
    assert controls(items, "pong") == [{"type": "pong", "data": "399000"}]


async def test_presence_and_role_churn_leaves_a_stalled_client_the_latest_state() -> None:
    hub = Hub()
    stalled = hub.attach(full=True, framed=True)
    a = hub.attach(full=True, framed=True)
    b = hub.attach(full=True, framed=True)
    for _ in range(5_000):
        hub.takeover(a)
        hub.takeover(b)
        hub.takeover(stalled)  # its own role changes too
        hub.release(stalled)
        hub.may_write(stalled, b"x")  # claims the vacant role
        hub.release(stalled)
        assert stalled.queued_controls <= CONTROL_KINDS
        await drain(hub, a)
        await drain(hub, b)
    hub.takeover(a)
    assert stalled.queued <= hub.client_queue + CONTROL_ROOM
    items = await drain(hub, stalled)
    hello = items[0]
    assert isinstance(hello, dict) and hello["type"] == "hello"
    # The last word on each: the role it holds now, and who is attached.
    assert controls(items, "role")[-1] == {"type": "role", "role": "watcher", "reason": "released"}
    assert controls(items, "clients")[-1] == {"type": "clients", "count": 3, "writer": True}
    assert len(controls(items, "role")) == 1 and len(controls(items, "clients")) == 1


async def test_errors_wait_once_per_code() -> None:
    hub = Hub()
    stalled = hub.attach(full=False, framed=True)
    for _ in range(100_000):
        hub.error(stalled, "bad_message", "a text frame must hold a JSON object")
        hub.error(stalled, "unknown_type", "unknown control message type 'x'")
        hub.takeover(stalled)  # view-only: refused
    assert stalled.queued_controls <= CONTROL_KINDS
    items = await drain(hub, stalled)
    assert [e["error"] for e in controls(items, "error")] == [
        "bad_message", "unknown_type", "view_only"
    ]


async def test_the_hello_comes_first_even_when_the_client_falls_behind_before_reading() -> None:
    hub = Hub(scrollback=1024, client_queue=8192)
    hub.publish(b"screen\r\n")
    late = hub.attach(full=False, framed=True)
    hub.pong(late, "early")
    for i in range(2000):
        hub.publish(f"line {i:04d}\r\n".encode())
    items = await drain(hub, late)
    kinds = [i["type"] if isinstance(i, dict) else "output" for i in items]
    # Queued before it fell behind: hello, pong; then the skip and the screen.
    assert kinds == ["hello", "pong", "skipped", "output"]
    assert isinstance(items[3], bytes) and items[3].endswith(b"line 1999\r\n")


async def test_a_client_is_sent_no_output_the_recorder_has_not_had() -> None:
    recorder = FakeRecorder()
    hub = Hub(scrollback=256, client_queue=4096, recorder=recorder)
    keeping_up = hub.attach(full=True, framed=True)
    behind = hub.attach(full=False, framed=False)

    def recorded() -> bytes:
        return b"".join(d for kind, d in recorder.events if kind == "o" and isinstance(d, bytes))

    got = bytearray()
    for i in range(3000):
        hub.publish(b"%d," % i)
        if i % 7 == 0:
            got += output(await drain(hub, keeping_up))
            assert recorded().startswith(got)
        if i % 500 == 0:  # the slow one skips; whatever it is sent was recorded before
            for chunk in await drain(hub, behind):
                assert isinstance(chunk, bytes)
                assert chunk.removeprefix(RESET).split(b"]\r\n")[-1] in recorded()
    hub.detach(keeping_up)
    hub.detach(behind)
    assert recorder.closed == 1
    hub.publish(b"after the end")
    assert recorded().endswith(b"2999,")
