"""The state the worker processes share (broker/service/_sharedstate.py): the replay store
and the session counts, in SQLite files, within one process and across real processes
(forked, some killed with SIGKILL)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from conftest import DOMAIN, FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli import main
from broker.service._limits import Limits
from broker.service._refusals import LIMIT_REACHED, Refused
from broker.service._sharedstate import (
    REPLAY_FILE,
    SESSIONS_FILE,
    SharedReplayCache,
    SharedSessionCounts,
    StateFileError,
)
from broker.tokens import (
    ReplayCacheFull,
    ReplayedToken,
    ReplayStoreUnavailable,
    TokenIssuer,
    TokenVerifier,
)

FORK = multiprocessing.get_context("fork")
#: Seconds a test waits for a child process at most (never a timing assertion).
WAIT = 60


@pytest.fixture
def replay_file(tmp_path: Path) -> Path:
    return tmp_path / REPLAY_FILE


@pytest.fixture
def store(replay_file: Path) -> Iterator[SharedReplayCache]:
    cache = SharedReplayCache(replay_file, 10)
    yield cache
    cache.close()


@pytest.fixture
def sessions_file(tmp_path: Path) -> Path:
    return tmp_path / SESSIONS_FILE


LIMITS = Limits(total=3, per_domain=2, per_client=2)


@pytest.fixture
def supervisor(sessions_file: Path) -> SharedSessionCounts:
    counts = SharedSessionCounts(LIMITS, sessions_file, None)
    counts.reset()
    return counts


@pytest.fixture
def workers(
    supervisor: SharedSessionCounts, sessions_file: Path
) -> Iterator[list[SharedSessionCounts]]:
    both = [SharedSessionCounts(LIMITS, sessions_file, index) for index in (0, 1)]
    yield both
    for counts in both:
        counts.close()


def child(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = FORK.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def finish(process: multiprocessing.process.BaseProcess) -> None:
    process.join(WAIT)
    assert process.exitcode == 0


# --- the replay store, in one process --------------------------------------------------------


def test_consume_once_and_the_file_is_the_owners_alone(
    store: SharedReplayCache, replay_file: Path
) -> None:
    store.open()
    store.consume("a", 100.0, now=0.0)
    assert "a" in store and "b" not in store and len(store) == 1
    with pytest.raises(ReplayedToken):
        store.consume("a", 100.0, now=50.0)
    assert stat.S_IMODE(replay_file.stat().st_mode) == 0o600


def test_full_of_live_entries_refuses_and_forgets_nothing(replay_file: Path) -> None:
    store = SharedReplayCache(replay_file, 3)
    for jti in "abc":
        store.consume(jti, 100.0, now=0.0)
    with pytest.raises(ReplayCacheFull) as info:
        store.consume("d", 100.0, now=1.0)
    assert info.value.reason == "limit_reached" and "d" not in store
    for jti in "abc":
        with pytest.raises(ReplayedToken):
            store.consume(jti, 100.0, now=1.0)
    store.consume("d", 200.0, now=100.0)  # all three expired: deleted, room made
    assert len(store) == 1 and "a" not in store
    store.close()


def test_a_used_token_expired_may_be_recorded_again(store: SharedReplayCache) -> None:
    store.consume("a", 10.0, now=0.0)
    store.consume("a", 30.0, now=20.0)
    with pytest.raises(ReplayedToken):
        store.consume("a", 30.0, now=25.0)
    assert len(store) == 1


def test_expired_entries_go_a_bounded_number_at_a_time(replay_file: Path) -> None:
    store = SharedReplayCache(replay_file, 1000)
    for number in range(100):
        store.consume(f"old-{number}", 10.0, now=0.0)
    store.consume("new", 100.0, now=50.0)
    assert 1 < len(store) < 101  # some deleted, not all in one call
    for number in range(10):
        store.consume(f"newer-{number}", 100.0, now=50.0)
    assert len(store) == 11  # the rest on the next calls
    store.close()


def test_every_object_on_the_file_and_a_restart_see_the_tokens_used(
    replay_file: Path,
) -> None:
    first, second = SharedReplayCache(replay_file, 10), SharedReplayCache(replay_file, 10)
    first.consume("a", 100.0, now=0.0)
    with pytest.raises(ReplayedToken):
        second.consume("a", 100.0, now=1.0)
    first.close()
    second.close()
    again = SharedReplayCache(replay_file, 10)  # a broker started anew
    again.open()
    assert "a" in again
    with pytest.raises(ReplayedToken):
        again.consume("a", 100.0, now=2.0)
    again.close()


def test_a_verifier_refuses_a_token_used_before_a_restart(
    issuer: TokenIssuer, private_key: Any, clock: FakeClock, replay_file: Path
) -> None:
    def verifier() -> TokenVerifier:
        return TokenVerifier([private_key.public_key()],
                             replay_cache=SharedReplayCache(replay_file, 10), now=clock)

    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    assert verifier().verify(token).domain_uuid == DOMAIN
    restarted = verifier()
    assert restarted.used(issuer.issue(DOMAIN, "vnc", ttl=60).claims) is False
    with pytest.raises(ReplayedToken):
        restarted.verify(token)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 50), st.integers(0, 5)),
             max_size=40),
    st.integers(1, 5),
)
def test_matches_the_in_memory_rules(ops: list[tuple[str, int, int]], maxsize: int) -> None:
    """Against a model that keeps everything: the same answers as ReplayCache's."""
    with tempfile.TemporaryDirectory() as directory:
        store = SharedReplayCache(Path(directory) / REPLAY_FILE, maxsize)
        model: dict[str, float] = {}
        now = 0.0
        for jti, lifetime, step in ops:
            now += step
            live = {j: until for j, until in model.items() if until > now}
            until = now + lifetime
            if jti in live:
                with pytest.raises(ReplayedToken):
                    store.consume(jti, until, now=now)
            elif len(live) >= maxsize:
                with pytest.raises(ReplayCacheFull):
                    store.consume(jti, until, now=now)
            else:
                store.consume(jti, until, now=now)
                live[jti] = until
            model = live
            assert len(live) <= len(store) <= maxsize
        store.close()


def test_a_store_locked_too_long_refuses_the_token(replay_file: Path) -> None:
    store = SharedReplayCache(replay_file, 10, busy_timeout=0.05)
    store.open()
    other = sqlite3.connect(replay_file, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing, and never done
    try:
        with pytest.raises(ReplayStoreUnavailable) as info:
            store.consume("a", 100.0, now=0.0)
        assert info.value.reason == "limit_reached"
        assert "a" not in store  # the early check answers; consume() decides
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.consume("a", 100.0, now=0.0)
    store.close()


# --- damaged and foreign files ----------------------------------------------------------------


def test_a_damaged_file_is_an_error_naming_it_and_what_to_do(replay_file: Path) -> None:
    replay_file.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StateFileError) as info:
        SharedReplayCache(replay_file, 10).open()
    message = str(info.value)
    assert str(replay_file) in message and "move the file aside" in message
    assert info.value.damaged
    assert replay_file.read_bytes() == b"\x00garbage" * 1000  # left for the operator


def test_a_damaged_page_is_found_on_opening(replay_file: Path) -> None:
    store = SharedReplayCache(replay_file, 100_000)
    for number in range(2000):
        store.consume(f"token-{number:05}", 100.0, now=0.0)
    store.close()
    SharedReplayCache(replay_file, 10).open()  # checkpointed and clean
    data = bytearray(replay_file.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page : 4 * page] = b"\xff" * (2 * page)  # two pages of the table overwritten
    replay_file.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="damaged"):
        SharedReplayCache(replay_file, 10).open()


def test_another_programs_database_is_refused(replay_file: Path) -> None:
    other = sqlite3.connect(replay_file)
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    with pytest.raises(StateFileError, match="another program's database"):
        SharedReplayCache(replay_file, 10).open()
    with pytest.raises(StateFileError, match="another program's database"):
        SharedSessionCounts(LIMITS, replay_file, 0).total  # noqa: B018
    # the replay store and the session counts do not take each other's file either
    sessions = replay_file.with_name(SESSIONS_FILE)
    SharedSessionCounts(LIMITS, sessions, None).reset()
    with pytest.raises(StateFileError, match="another program's database"):
        SharedReplayCache(sessions, 10).open()


def test_a_file_that_cannot_be_opened_says_so(tmp_path: Path) -> None:
    where = tmp_path / "a-directory"
    where.mkdir()
    with pytest.raises(StateFileError, match="cannot open the replay store") as info:
        SharedReplayCache(where, 10).open()
    assert str(where) in str(info.value) and not info.value.damaged


def test_serve_stops_with_one_line_on_a_damaged_replay_store(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = config_file.parent / "state"
    state.mkdir(mode=0o700)
    (state / REPLAY_FILE).write_bytes(b"not a database" * 500)
    status = main(["serve", "--config", str(config_file)])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{state / REPLAY_FILE}: the replay store is damaged" in err
    assert "Traceback" not in err


# --- the replay store across processes --------------------------------------------------------


def _consume_all(path: Path, jtis: list[str], start: Any, results: Connection) -> None:
    store = SharedReplayCache(path, 100_000)
    start.wait(WAIT)
    won = []
    for jti in jtis:
        try:
            store.consume(jti, 1e12, now=0.0)
        except ReplayedToken:
            continue
        won.append(jti)
    results.send(won)


def test_two_processes_consuming_the_same_tokens_each_win_once(replay_file: Path) -> None:
    jtis = [f"shared-{number}" for number in range(300)]
    SharedReplayCache(replay_file, 10).open()
    start = FORK.Event()
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    processes = [
        child(_consume_all, replay_file, jtis if n == 0 else jtis[::-1], start, sender)
        for n, (_, sender) in enumerate(pipes)
    ]
    start.set()
    won = [receiver.recv() for receiver, _ in pipes]
    for process in processes:
        finish(process)
    assert sorted(won[0] + won[1]) == sorted(jtis)  # each token exactly once


def _consume_until_killed(path: Path, progress: Connection) -> None:
    store = SharedReplayCache(path, 1_000_000)
    number = 0
    while True:
        store.consume(f"killed-{number}", 1e12, now=0.0)
        progress.send(number)  # after the commit: this token is used
        number += 1


def test_a_process_killed_mid_way_leaves_its_tokens_used_and_the_store_usable(
    replay_file: Path,
) -> None:
    receiver, sender = FORK.Pipe(duplex=False)
    process = child(_consume_until_killed, replay_file, sender)
    reported = -1
    while reported < 500:
        assert receiver.poll(WAIT)
        reported = receiver.recv()
    os.kill(process.pid or 0, signal.SIGKILL)
    process.join(WAIT)
    assert process.exitcode == -signal.SIGKILL
    while receiver.poll(0.1):
        reported = receiver.recv()
    store = SharedReplayCache(replay_file, 1_000_000)
    store.open()  # checked: not damaged
    for number in range(reported + 1):
        assert f"killed-{number}" in store
    with pytest.raises(ReplayedToken):
        store.consume(f"killed-{reported}", 1e12, now=0.0)
    store.consume("after", 1e12, now=0.0)
    assert len(store) >= reported + 2
    store.close()


def _use_after_fork(path: Path, results: Connection) -> None:
    store = _FORKED[0]
    try:
        store.consume("child", 100.0, now=0.0)
        results.send(("ok", "parent" in store))
    except Exception as exc:  # reported to the parent
        results.send(("error", repr(exc)))


_FORKED: list[SharedReplayCache] = []


def test_an_object_in_use_before_a_fork_works_in_both_processes(
    store: SharedReplayCache, replay_file: Path
) -> None:
    store.consume("parent", 100.0, now=0.0)
    _FORKED[:] = [store]
    receiver, sender = FORK.Pipe(duplex=False)
    process = child(_use_after_fork, replay_file, sender)
    assert receiver.recv() == ("ok", True)
    finish(process)
    with pytest.raises(ReplayedToken):
        store.consume("child", 100.0, now=1.0)
    store.consume("parent-again", 100.0, now=1.0)


# --- session counts ---------------------------------------------------------------------------


def test_the_counts_of_one_worker_follow_the_limits(
    workers: list[SharedSessionCounts],
) -> None:
    counts = workers[0]
    counts.acquire("d1", "c1")
    counts.acquire("d1", "c2")
    with pytest.raises(Refused, match=r"limits\.max_sessions_per_domain") as info:
        counts.check("d1", "c3")
    assert info.value.refusal is LIMIT_REACHED
    counts.acquire("d2", "c1")
    with pytest.raises(Refused, match=r"limits\.max_sessions\)"):
        counts.acquire("d3", "c3")
    counts.release("d1", "c2")
    with pytest.raises(Refused, match=r"limits\.max_sessions_per_client"):
        counts.check("d3", "c1")
    counts.acquire("d3", "c2")
    assert (counts.total, counts.domain("d1"), counts.client("c1")) == (3, 1, 2)
    for domain, client in (("d1", "c1"), ("d2", "c1"), ("d3", "c2")):
        counts.release(domain, client)
    assert (counts.total, counts.domain("d1"), counts.client("c1")) == (0, 0, 0)
    with pytest.raises(RuntimeError):
        counts.release("d1", "c1")


def test_the_limits_hold_across_workers(workers: list[SharedSessionCounts]) -> None:
    first, second = workers
    first.acquire("d1", "c1")
    second.acquire("d1", "c1")
    with pytest.raises(Refused, match="per_domain"):
        first.acquire("d1", "c3")
    with pytest.raises(Refused, match="per_client"):
        first.acquire("d2", "c1")
    second.acquire("d2", "c2")
    with pytest.raises(Refused, match=r"max_sessions\)"):
        first.check("d3", "c3")
    assert (first.total, second.total, first.held, second.held) == (3, 3, 1, 2)
    with pytest.raises(RuntimeError):
        first.release("d2", "c2")  # the second's session, not the first's
    second.release("d2", "c2")
    first.acquire("d3", "c3")


def test_forget_worker_releases_what_a_worker_held(
    supervisor: SharedSessionCounts, workers: list[SharedSessionCounts]
) -> None:
    first, second = workers
    first.acquire("d1", "c1")
    second.acquire("d1", "c2")
    second.acquire("d2", "c2")
    supervisor.forget_worker(1)
    assert (first.total, first.domain("d1"), first.client("c2")) == (1, 1, 0)
    supervisor.reset()
    assert first.total == 0


def test_the_supervisors_counts_acquire_nothing(supervisor: SharedSessionCounts) -> None:
    with pytest.raises(RuntimeError):
        supervisor.acquire("d1", "c1")


def test_reset_replaces_a_damaged_file(sessions_file: Path) -> None:
    sessions_file.write_bytes(b"junk" * 2000)
    counts = SharedSessionCounts(LIMITS, sessions_file, None)
    counts.reset()
    worker = SharedSessionCounts(LIMITS, sessions_file, 0)
    worker.acquire("d1", "c1")
    assert counts.total == 1
    worker.close()


def test_a_release_the_file_cannot_take_is_applied_later(
    sessions_file: Path, supervisor: SharedSessionCounts
) -> None:
    counts = SharedSessionCounts(LIMITS, sessions_file, 0, busy_timeout=0.05)
    counts.acquire("d1", "c1")
    counts.acquire("d1", "c2")
    other = sqlite3.connect(sessions_file, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        counts.release("d1", "c1")  # kept: no error, no traceback
        with pytest.raises(Refused) as info:
            counts.acquire("d2", "c3")
        assert info.value.refusal is LIMIT_REACHED
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert counts.total == 2  # not recorded yet
    counts.acquire("d2", "c3")  # records the release first
    assert (counts.total, counts.domain("d1"), counts.client("c1")) == (2, 1, 0)
    counts.close()


def _hold_then_report(path: Path, index: int, sessions: int, done: Connection) -> None:
    counts = SharedSessionCounts(Limits(100, 100, 100), path, index)
    for number in range(sessions):
        counts.acquire(f"d{number % 3}", f"c{number}")
    done.send(counts.held)
    done.recv()  # waits until killed


def test_a_killed_workers_sessions_go_with_forget_worker_or_its_successor(
    sessions_file: Path, supervisor: SharedSessionCounts
) -> None:
    pipes = [FORK.Pipe() for _ in range(2)]
    processes = [
        child(_hold_then_report, sessions_file, index, 5, theirs)
        for index, (_, theirs) in enumerate(pipes)
    ]
    assert [ours.recv() for ours, _ in pipes] == [5, 5]
    for process in processes:
        os.kill(process.pid or 0, signal.SIGKILL)
        process.join(WAIT)
    assert supervisor.total == 10
    supervisor.forget_worker(0)
    assert supervisor.total == 5 and supervisor.domain("d0") == 2
    successor = SharedSessionCounts(Limits(100, 100, 100), sessions_file, 1)
    successor.acquire("d9", "c9")  # its first write forgets what index 1 held before
    assert (supervisor.total, supervisor.domain("d0"), successor.held) == (1, 0, 1)
    successor.close()


def _take_slots(path: Path, index: int, start: Any, results: Connection) -> None:
    counts = SharedSessionCounts(Limits(total=50, per_domain=7, per_client=1000), path, index)
    start.wait(WAIT)
    taken = 0
    for number in range(40):
        try:
            counts.acquire(f"domain-{number % 4}", f"client-{index}")
        except Refused:
            continue
        taken += 1
    results.send(taken)


def test_two_processes_racing_never_exceed_the_caps(
    sessions_file: Path, supervisor: SharedSessionCounts
) -> None:
    start = FORK.Event()
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    processes = [
        child(_take_slots, sessions_file, index, start, sender)
        for index, (_, sender) in enumerate(pipes)
    ]
    start.set()
    taken = [receiver.recv() for receiver, _ in pipes]
    for process in processes:
        finish(process)
    assert sum(taken) == 4 * 7  # every domain's cap exactly, never more
    assert supervisor.total == 28
    assert [supervisor.domain(f"domain-{n}") for n in range(4)] == [7, 7, 7, 7]
