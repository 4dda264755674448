"""docs/config.md and docs/tokens.md stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from broker.config import key_specs, render_markdown
from broker.plugins import PluginManager

DOCS = Path(__file__).resolve().parents[2] / "docs"
BEGIN = "<!-- BEGIN GENERATED: console-broker config --defaults --format markdown -->\n"
END = "<!-- END GENERATED -->"
#: The built-in plugins' tables: docs/config.md documents them too.
BUILTIN = PluginManager(disabled=()).config_tables


def test_the_builtin_plugins_tables_follow_the_core_ones() -> None:
    assert [table.name for table in BUILTIN if table.name in ("vnc", "spice", "serial")] == [
        "vnc", "spice", "serial",
    ]


def test_every_config_key_is_in_docs() -> None:
    text = (DOCS / "config.md").read_text()
    missing = [spec.dotted for spec in key_specs(BUILTIN) if f"`{spec.dotted}`" not in text]
    assert not missing, (
        f"docs/config.md lacks {missing}: run `console-broker config --defaults --format markdown`"
    )


def test_config_table_is_current() -> None:
    text = (DOCS / "config.md").read_text()
    assert BEGIN in text and END in text
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == render_markdown(BUILTIN), (
        "docs/config.md is out of date: paste `console-broker config --defaults --format markdown` "
        "between its GENERATED markers"
    )


def test_tokens_doc_states_the_url_contract_and_refusals() -> None:
    text = (DOCS / "tokens.md").read_text()
    assert "`{public_url}/console/{protocol}/?token={token}`" in text
    assert "`{ws_url}/ws/{protocol}?token={token}`" in text
    from broker import tokens

    reasons = {
        cls.reason
        for cls in vars(tokens).values()
        if isinstance(cls, type)
        and issubclass(cls, tokens.TokenRefused)
        and cls is not tokens.TokenRefused
    }
    documented = set(re.findall(r"`([a-z_]+)`", text))
    assert reasons <= documented, reasons - documented
