"""docs/rfb.md must not drift from the RFB layer."""

from __future__ import annotations

import re
from pathlib import Path

import broker_vnc.rfb as rfb
import pytest

DOC = (Path(__file__).parent.parent.parent / "docs" / "rfb.md").read_text()


def _public_classes(base: type) -> list[str]:
    return sorted(
        name
        for name in rfb.__all__
        if isinstance(getattr(rfb, name), type)
        and issubclass(getattr(rfb, name), base)
        and getattr(rfb, name) is not base
    )


@pytest.mark.parametrize("name", _public_classes(rfb.Event))
def test_every_event_is_documented(name: str) -> None:
    assert f"`{name}" in DOC


@pytest.mark.parametrize("name", ["RFBProtocolError", "RFBSecurityError", "RFBUsageError"])
def test_every_error_is_documented(name: str) -> None:
    assert f"| `{name}`" in DOC


@pytest.mark.parametrize("kind", list(rfb.ClientMessageType))
def test_every_message_type_has_a_row(kind: rfb.ClientMessageType) -> None:
    assert re.search(rf"^\| {int(kind)}(/\d)? \|", DOC, re.MULTILINE), kind.name
