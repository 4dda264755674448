"""The page hook without a browser: what is served, from where, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from broker_serial import console_broker_page
from broker_serial._page import ASSETS, CSP, assets_dir

from broker.config import Config, VNCSection

REPO = Path(__file__).resolve().parents[2]


def config(assets: Path | str = "") -> Config:
    return Config(vnc=VNCSection(assets_dir=str(assets)))


def test_the_page_carries_a_content_security_policy() -> None:
    page = console_broker_page(protocol="serial", path="", config=config())
    assert page is not None and page.status == 200
    assert page.content_type.startswith("text/html")
    assert ("Content-Security-Policy", CSP) in page.headers
    assert b'<script src="xterm/xterm.js">' in page.body


@pytest.mark.parametrize("path", ["console.js", "console.css"])
def test_the_pages_own_files(path: str) -> None:
    page = console_broker_page(protocol="serial", path=path, config=config())
    assert page is not None and page.status == 200 and page.body


def test_xterm_comes_from_the_assets_directory(tmp_path: Path) -> None:
    for name, _ in ASSETS.values():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"/* " + name.encode() + b" */")
    for path, (name, content_type) in ASSETS.items():
        page = console_broker_page(protocol="serial", path=path, config=config(tmp_path))
        assert page is not None and page.body == b"/* " + name.encode() + b" */"
        assert page.content_type == content_type


def test_a_missing_asset_says_where_it_was_looked_for(tmp_path: Path) -> None:
    page = console_broker_page(protocol="serial", path="xterm/xterm.js", config=config(tmp_path))
    assert page is not None and page.status == 503
    assert str(tmp_path).encode() in page.body and b"vnc.assets_dir" in page.body


@pytest.mark.parametrize(
    "path", ["index.html", "xterm/xterm.js.map", "@xterm/xterm/package.json", "static/console.js"]
)
def test_nothing_else_is_served(path: str) -> None:
    assert console_broker_page(protocol="serial", path=path, config=config()) is None


def test_other_protocols_are_not_ours() -> None:
    assert console_broker_page(protocol="vnc", path="", config=config()) is None


def test_the_default_assets_directory_is_the_source_trees() -> None:
    assert assets_dir(config()) == REPO / "node_modules"
    assert assets_dir(config("/srv/web")) == Path("/srv/web")
