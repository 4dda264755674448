"""The control messages (sans-I/O): every documented message parses, anything else is a
ControlError (never another exception), and the broker's messages are one JSON object."""

from __future__ import annotations

import contextlib
import json

import pytest
from broker_serial import _control as control
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "event"),
    [
        ('{"type": "takeover"}', control.Takeover()),
        ('{"type": "release"}', control.Release()),
        ('{"type": "resize", "cols": 120, "rows": 40}', control.Resize(120, 40)),
        ('{"type": "ping"}', control.Ping()),
        ('{"type": "ping", "data": "t1"}', control.Ping("t1")),
        ('{"type": "takeover", "extra": 1}', control.Takeover()),  # unknown fields: ignored
    ],
)
def test_documented_messages_parse(text: str, event: control.Event) -> None:
    assert control.parse(text) == event


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("ls -l\r", "bad_message"),
        ("[1, 2]", "bad_message"),
        ('{"kind": "takeover"}', "bad_message"),
        ('{"type": 7}', "bad_message"),
        ('{"type": "resize", "cols": 0, "rows": 10}', "bad_message"),
        ('{"type": "resize", "cols": "80", "rows": 10}', "bad_message"),
        ('{"type": "resize", "cols": true, "rows": 10}', "bad_message"),
        ('{"type": "resize", "cols": 80}', "bad_message"),
        ('{"type": "resize", "cols": 80, "rows": 100000}', "bad_message"),
        ('{"type": "ping", "data": 5}', "bad_message"),
        ('{"type": "reboot"}', "unknown_type"),
        ('{"type": "takeover", "pad": "' + "x" * 5000 + '"}', "bad_message"),
        ("[" * 100_000, "bad_message"),
    ],
)
def test_anything_else_is_a_control_error(text: str, code: str) -> None:
    with pytest.raises(control.ControlError) as info:
        control.parse(text)
    assert info.value.code == code and info.value.message


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_is_a_control_error(text: str) -> None:
    with contextlib.suppress(control.ControlError):
        control.parse(text)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=20,
    ),
    st.sampled_from(["takeover", "release", "resize", "ping", "other"]),
)
def test_arbitrary_json_with_a_type_parses_or_is_a_control_error(
    value: object, kind: str
) -> None:
    doc = value if isinstance(value, dict) else {"value": value}
    with contextlib.suppress(control.ControlError):
        control.parse(json.dumps({**doc, "type": kind}))


def test_the_brokers_messages() -> None:
    hello = json.loads(
        control.hello(
            domain_name="web1", domain_uuid="u", device="serial0", rights="full",
            role="writer", clients=2, scrollback=10, recording=False,
        )
    )
    assert hello == {
        "type": "hello", "version": 1, "domain": {"name": "web1", "uuid": "u"},
        "device": "serial0", "rights": "full", "role": "writer", "clients": 2,
        "scrollback": 10, "recording": False,
    }
    assert json.loads(control.role("watcher", "taken_over")) == {
        "type": "role", "role": "watcher", "reason": "taken_over"
    }
    assert json.loads(control.clients(3, True)) == {"type": "clients", "count": 3, "writer": True}
    assert json.loads(control.pong(None)) == {"type": "pong", "data": None}
    assert json.loads(control.error("view_only", "no")) == {
        "type": "error", "error": "view_only", "message": "no"
    }
    assert json.loads(
        control.skipped(5, role="watcher", clients=1, writer=False, scrollback=0)
    )["type"] == "skipped"
