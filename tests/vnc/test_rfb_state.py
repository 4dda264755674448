"""The transition tables: well formed, and every state reachable."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import pytest
from broker_vnc.rfb._state import (
    DOWNSTREAM_TRANSITIONS,
    FILTER_TRANSITIONS,
    UPSTREAM_TRANSITIONS,
    DownstreamState,
    FilterState,
    Machine,
    UpstreamState,
)

TABLES: list[tuple[Any, Any, Any]] = [
    (UPSTREAM_TRANSITIONS, UpstreamState, UpstreamState.PROTOCOL_VERSION),
    (DOWNSTREAM_TRANSITIONS, DownstreamState, DownstreamState.PROTOCOL_VERSION),
    (FILTER_TRANSITIONS, FilterState, FilterState.MESSAGES),
]


@pytest.mark.parametrize(("table", "states", "initial"), TABLES)
def test_every_state_has_a_row_and_is_reachable(
    table: Mapping[enum.Enum, Mapping[str, enum.Enum]], states: type[enum.Enum], initial: enum.Enum
) -> None:
    assert set(table) == set(states)
    reachable, todo = {initial}, [initial]
    while todo:
        for target in table[todo.pop()].values():
            assert target in set(states)
            if target not in reachable:
                reachable.add(target)
                todo.append(target)
    # FAILED is entered from anywhere by an error, not by a table step.
    assert set(states) - reachable <= {states["FAILED"]}


def test_a_step_the_table_does_not_know_is_a_bug() -> None:
    machine = Machine(FILTER_TRANSITIONS, FilterState.MESSAGES, FilterState.FAILED)
    assert machine.advance("message") is FilterState.MESSAGES
    with pytest.raises(AssertionError, match="no transition"):
        machine.advance("tls")
