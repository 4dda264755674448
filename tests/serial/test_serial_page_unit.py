"""The page hook without a browser: what is served, from where, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from broker_serial import PROTOCOL
from broker_serial._page import ASSETS, CSP

from broker.config import Config, HTTPSection
from broker.hookspecs import Page
from broker.plugins import PluginContext


def config(assets: Path | str = "") -> Config:
    return Config(http=HTTPSection(assets_dir=str(assets)))


def console_broker_page(path: str, config: Config) -> Page | None:
    """The serial protocol's page, as the broker asks for it."""
    return PROTOCOL.page(path, PluginContext("serial", config))


def test_the_page_carries_a_content_security_policy() -> None:
    page = console_broker_page(path="", config=config())
    assert page is not None and page.status == 200
    assert page.content_type.startswith("text/html")
    assert ("Content-Security-Policy", CSP) in page.headers
    assert b'<script src="xterm/xterm.js">' in page.body


@pytest.mark.parametrize("path", ["console.js", "console.css"])
def test_the_pages_own_files(path: str) -> None:
    page = console_broker_page(path=path, config=config())
    assert page is not None and page.status == 200 and page.body


def xterm(assets: Path) -> None:
    """A stand-in xterm.js and fit addon in *assets*."""
    for package, name in ASSETS.values():
        target = assets / package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"/* " + name.encode() + b" */")


def test_xterm_comes_from_the_assets_directory(tmp_path: Path) -> None:
    xterm(tmp_path)
    types = {
        "xterm/xterm.js": "text/javascript; charset=utf-8",
        "xterm/xterm.css": "text/css; charset=utf-8",
        "xterm/addon-fit.js": "text/javascript; charset=utf-8",
    }
    for path, (_, name) in ASSETS.items():
        page = console_broker_page(path=path, config=config(tmp_path))
        assert page is not None and page.body == b"/* " + name.encode() + b" */"
        assert page.content_type == types[path]


def test_a_link_out_of_the_package_is_not_served(tmp_path: Path) -> None:
    xterm(tmp_path / "node_modules")
    (tmp_path / "secret.js").write_text("// outside xterm\n")
    linked = tmp_path / "node_modules" / "@xterm" / "xterm" / "lib" / "xterm.js"
    linked.unlink()
    linked.symlink_to(tmp_path / "secret.js")
    assets = config(tmp_path / "node_modules")
    page = console_broker_page(path="xterm/xterm.js", config=assets)
    assert page is not None and page.status == 503 and b"outside" not in page.body


def test_a_missing_asset_says_what_to_do_and_logs_where_it_was_looked_for(
    tmp_path: Path,
) -> None:
    with structlog.testing.capture_logs() as logs:
        page = console_broker_page(path="xterm/xterm.js", config=config(tmp_path)
        )
    assert page is not None and page.status == 503
    assert b"http.assets_dir" in page.body and b"npm ci" in page.body
    assert str(tmp_path).encode() not in page.body  # no server path in an answer
    assert [(e["event"], e["looked_in"]) for e in logs] == [
        ("serial.assets_missing", str(tmp_path / "@xterm/xterm"))
    ]


@pytest.mark.parametrize(
    "path", ["index.html", "xterm/xterm.js.map", "@xterm/xterm/package.json", "static/console.js"]
)
def test_nothing_else_is_served(path: str) -> None:
    assert console_broker_page(path=path, config=config()) is None
