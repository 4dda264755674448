"""The SPICE console page and its assets without a browser: what is served, from
where, and nothing else."""

from __future__ import annotations

from pathlib import Path

import broker_spice
import pytest
from broker_spice import _page

from broker.config import Config, HTTPSection
from broker.hookspecs import Page
from broker.plugins import PluginContext


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A node_modules with a stand-in spice-html5."""
    src = tmp_path / "node_modules" / "@spice-project" / "spice-html5" / "src"
    (src / "thirdparty").mkdir(parents=True)
    (src / "main.js").write_text("export class SpiceMainConn {}\n")
    (src / "thirdparty" / "jsbn.js").write_text("export {};\n")
    (src.parent / "package.json").write_text("{}\n")
    (src.parent / "spice.css").write_text("body {}\n")
    (tmp_path / "secret.js").write_text("// outside spice-html5\n")
    return tmp_path / "node_modules"


def page(path: str, assets: Path) -> Page | None:
    config = Config(http=HTTPSection(assets_dir=str(assets)))
    return broker_spice.PROTOCOL.page(path, PluginContext("spice", config))


def test_the_page(assets: Path) -> None:
    served = page("", assets)
    assert served is not None and served.status == 200
    assert served.content_type.startswith("text/html")
    assert dict(served.headers)["Content-Security-Policy"] == _page.CSP
    for name, kind in (("app/console.js", "text/javascript"), ("app/console.css", "text/css")):
        asset = page(name, assets)
        assert asset is not None and asset.status == 200 and asset.body
        assert asset.content_type.startswith(kind)


def test_spice_html5_modules_are_served_and_nothing_else(assets: Path) -> None:
    main = page("spice-html5/src/main.js", assets)
    assert main is not None and main.body == b"export class SpiceMainConn {}\n"
    assert main.content_type == "text/javascript; charset=utf-8"
    assert ("X-Frame-Options", "DENY") in main.headers
    assert page("spice-html5/src/thirdparty/jsbn.js", assets) is not None
    src = assets / "@spice-project" / "spice-html5" / "src"
    (src / "escape.js").symlink_to(assets.parent / "secret.js")
    for path in (
        "spice-html5/package.json",
        "spice-html5/spice.css",
        "spice-html5/src/../package.json",
        "spice-html5/src/../../../secret.js",
        "spice-html5/src/escape.js",  # a link out of spice-html5
        "spice-html5/src/missing.js",
        "spice-html5/src//main.js",
        "spice-html5/src/.main.js",
        "spice-html5/src/main.js\0.js",
        "spice-html5/src/",
        "elsewhere.js",
    ):
        assert page(path, assets) is None, path


def test_without_spice_html5_the_page_says_what_to_install(tmp_path: Path) -> None:
    served = page("", tmp_path / "nothing-here")
    assert served is not None and served.status == 503
    text = served.body.decode()
    assert "spice-html5" in text and "http.assets_dir" in text
    assert str(tmp_path) not in text  # the path is logged, not shown


