"""docs/serial.md and the page stay in step with the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from broker_serial import _control as control
from broker_serial._config import TABLE

from broker.config import key_specs
from broker.service import ENDINGS, REFUSALS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "serial.md").read_text()
PLUGIN = ROOT / "plugins" / "serial"


def test_the_subprotocol_and_every_control_message_are_documented() -> None:
    assert f"`{control.SUBPROTOCOL}`" in DOC
    source = (PLUGIN / "_control.py").read_text()
    sent = set(re.findall(r'_message\(\s*"(\w+)"', source))
    received = set(re.findall(r'kind == "(\w+)"', source))
    assert sent == {"hello", "role", "clients", "skipped", "pong", "error"}
    assert received == {"takeover", "release", "resize", "ping"}
    for kind in sent | received:
        assert f"| `{kind}` |" in DOC, kind


def test_every_error_and_role_reason_is_documented() -> None:
    hub = (PLUGIN / "_hub.py").read_text() + (PLUGIN / "_control.py").read_text()
    codes = set(re.findall(r'(?:error|ControlError)\(\s*"(\w+)"', hub))
    reasons = set(re.findall(r'control\.role\([^,]+,\s*"(\w+)"\)', hub))
    assert codes >= {"view_only", "not_writer", "bad_message", "unknown_type"}
    assert reasons == {"takeover", "taken_over", "claimed", "released"}
    for name in codes | reasons:
        assert f"`{name}`" in DOC, name


def test_every_log_event_and_config_key_is_documented() -> None:
    events = set()
    for path in PLUGIN.glob("*.py"):
        events |= set(re.findall(r'"(serial\.[a-z_]+)"', path.read_text()))
    assert events
    for event in events:
        assert f"`{event}`" in DOC, event
    specs = [spec for spec in key_specs([TABLE]) if spec.table == "serial"]
    assert specs
    for spec in specs:
        assert f"`{spec.dotted}`" in DOC, spec.dotted


def test_the_pages_close_texts_are_the_brokers() -> None:
    script = (PLUGIN / "static" / "console.js").read_text()
    table = script.split("var CLOSE_TEXT = {", 1)[1].split("};", 1)[0]
    texts = {int(code): ast.literal_eval(text)
             for code, text in re.findall(r"(\d+): (\"[^\"]*\")", table)}
    brokers: dict[int, set[str]] = {}
    for refusal in (*REFUSALS, *ENDINGS):
        brokers.setdefault(refusal.close_code, set()).add(refusal.text)
    for code, text in texts.items():
        if code in brokers:
            assert text in brokers[code], (code, text)
    assert {c for c in brokers if c >= 4000} <= set(texts), "a close code the page lacks"
