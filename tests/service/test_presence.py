"""Presence (broker/service/_presence.py): the live sessions of each console, and in
``single`` input mode the one that holds its input. The registry alone, without sockets."""

from __future__ import annotations

import anyio
import pytest
import structlog

from broker.service._presence import Presence, Seat

DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER = "0b0a0e2c-1111-4222-8333-444455556666"


def _join(presence: Presence, id: str, *, full: bool = True, mode: str | None = "single",
          domain: str = DOMAIN, console: str = "vnc", name: str | None = None) -> Seat:
    return presence.join(domain=domain, console=console, id=id, protocol="vnc", full=full,
                         address=f"10.0.0.{len(presence) + 1}", name=name, mode=mode)


def test_the_first_full_session_holds_the_input_and_the_others_watch() -> None:
    presence = Presence(clock=lambda: 1_893_456_000.0)
    viewer = _join(presence, "v", full=False)
    assert not viewer.may_input and viewer.room.holder is None  # view-only never holds
    first = _join(presence, "a", name="Alice")
    second = _join(presence, "b")
    assert first.may_input and first.holds_input
    assert not second.may_input and not viewer.may_input
    state = second.state()
    assert (state.you, state.mode, state.holder, state.reason) == ("b", "single", "a", "joined")
    assert [(v.id, v.rights, v.input, v.name) for v in state.viewers] == [
        ("v", "view", False, None), ("a", "full", True, "Alice"), ("b", "full", False, None),
    ]
    assert state.viewers[1].address == "10.0.0.2"
    assert state.viewers[1].since == 1_893_456_000.0
    assert second.peers() == state.viewers


def test_take_over_release_and_claim() -> None:
    presence = Presence()
    a, b, view = _join(presence, "a"), _join(presence, "b"), _join(presence, "v", full=False)
    assert b.take() and b.may_input and not a.may_input
    assert (a.state().holder, a.state().reason) == ("b", "taken")
    assert not view.take() and not view.claim()  # view-only: never
    assert not a.release()  # not the holder: nothing happens
    assert b.release() and b.state().holder is None and b.state().reason == "released"
    assert not a.may_input and not b.may_input  # nobody holds it now
    assert a.claim() and a.holds_input and a.state().reason == "claimed"
    assert not b.claim() and not b.may_input  # a holds it: no claim
    assert a.claim()  # the holder's claim is a no-op that answers yes
    assert a.take() and a.holds_input  # taking what one holds changes nothing


def test_a_holder_that_leaves_leaves_the_input_to_nobody() -> None:
    presence = Presence()
    a, b = _join(presence, "a"), _join(presence, "b")
    version = b.state().version
    a.leave()
    state = b.state()
    assert state.version > version
    assert (state.holder, state.reason) == (None, "left")
    assert [v.id for v in state.viewers] == ["b"]
    assert not b.may_input and not a.may_input
    a.leave()  # twice: nothing more
    assert b.claim()


def test_shared_mode_and_protocols_without_presence() -> None:
    presence = Presence()
    shared = _join(presence, "s", mode="shared")
    other = _join(presence, "o", mode="shared")
    plain = _join(presence, "p", mode=None)  # its plugin gates nothing: the core cannot say
    view = _join(presence, "v", mode="shared", full=False)
    assert shared.may_input and other.may_input and plain.may_input and not view.may_input
    assert shared.room.holder is None  # nobody holds anything in shared mode
    assert not shared.take() and not shared.claim() and not shared.release()
    assert [v.input for v in view.peers()] == [True, True, None, False]
    # a single-mode session joining the same console holds among the single ones
    single = _join(presence, "x")
    assert single.holds_input and shared.may_input


def test_rooms_are_per_domain_and_console_and_go_when_empty() -> None:
    presence = Presence()
    vnc, spice, elsewhere = (_join(presence, "a"), _join(presence, "b", console="spice"),
                             _join(presence, "c", domain=OTHER))
    assert vnc.holds_input and spice.holds_input and elsewhere.holds_input  # three rooms
    assert [v.id for v in presence.viewers(DOMAIN, "vnc")] == ["a"]
    assert len(presence.rooms) == 3 and len(presence) == 3
    for seat in (vnc, spice, elsewhere):
        seat.leave()
    assert presence.rooms == {} and presence.viewers(DOMAIN, "vnc") == ()
    again = _join(presence, "d")
    assert again.holds_input and again.state().reason == "joined"


def test_an_unknown_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="input mode 'exclusive'"):
        _join(Presence(), "a", mode="exclusive")


def test_the_holder_changes_are_logged() -> None:
    presence = Presence()
    with structlog.testing.capture_logs() as logs:
        a = _join(presence, "a")
        b = _join(presence, "b")
        b.take()
        b.leave()
    changes = [(e["session"], e["previous"], e["reason"]) for e in logs
               if e["event"] == "input.holder"]
    assert changes == [("a", None, "joined"), ("b", "a", "taken"), (None, "b", "left")]
    assert all(e["domain"] == DOMAIN and e["console"] == "vnc" for e in logs)
    assert a.room.holder is None


@pytest.mark.anyio
async def test_waiters_wake_at_each_change_and_changes_coalesce() -> None:
    presence = Presence()
    a = _join(presence, "a")
    seen: list[tuple[str | None, int]] = []

    async def watch() -> None:
        version = a.state().version
        while not a.left:
            version = await a.changed(version)
            seen.append((a.state().holder, len(a.peers())))

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        await anyio.sleep(0.01)
        b = _join(presence, "b")
        await anyio.sleep(0.01)
        b.take()
        b.release()  # two changes before the watcher runs: it sees the last
        await anyio.sleep(0.01)
        a.leave()  # the seat's own end wakes it too
    assert seen == [("a", 2), (None, 2), (None, 1)]
    assert await b.changed(0) == b.room.version  # a version already past: at once


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
