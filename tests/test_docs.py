"""Documentation that must not drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from broker import hookspecs

DOCS = Path(__file__).parent.parent / "docs"


def test_every_hook_has_a_section_in_the_plugin_guide() -> None:
    hooks = sorted(name for name in dir(hookspecs) if name.startswith("console_broker_"))
    assert hooks, "no hooks found in broker.hookspecs"
    sections = set(re.findall(r"^### (\w+)$", (DOCS / "plugins.md").read_text(), re.MULTILINE))
    assert [hook for hook in hooks if hook not in sections] == []


def test_every_hook_is_documented_in_its_spec() -> None:
    for name in dir(hookspecs):
        if name.startswith("console_broker_"):
            doc = getattr(hookspecs, name).__doc__ or ""
            assert len(doc.strip()) > 40, (
                f"{name} needs a docstring saying args, return, firstresult"
            )
