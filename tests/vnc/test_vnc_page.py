"""The VNC console page and its assets, the plugin's configuration, and the page's
close messages (one for every close code of the broker's table)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import anyio
import broker_vnc
import pytest
from broker_vnc import _page
from broker_vnc._config import TABLE, VNCSection
from vnckit import FakeQEMU, in_process_broker

import broker.assets
from broker.config import Config, ConfigError, HTTPSection, config_from_dict
from broker.hookspecs import Page
from broker.plugins import PluginContext, PluginError
from broker.service import ENDINGS, REFUSALS

REPO = Path(__file__).resolve().parents[2]
CONSOLE_JS = (REPO / "plugins" / "vnc" / "web" / "console.js").read_text()


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A node_modules with a stand-in noVNC."""
    core = tmp_path / "node_modules" / "@novnc" / "novnc" / "core"
    (core / "input").mkdir(parents=True)
    (core / "rfb.js").write_text("export default class RFB {}\n")
    (core / "input" / "keysym.js").write_text("export default {};\n")
    (core.parent / "package.json").write_text("{}\n")
    (tmp_path / "secret.js").write_text("// outside noVNC\n")
    return tmp_path / "node_modules"


def page(path: str, assets: Path) -> Page | None:
    config = Config(http=HTTPSection(assets_dir=str(assets)))
    return broker_vnc.PROTOCOL.page(path, PluginContext("vnc", config))


def test_the_page(assets: Path) -> None:
    served = page("", assets)
    assert served is not None and served.status == 200
    assert served.content_type.startswith("text/html")
    headers = dict(served.headers)
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert b'<script type="module" src="app/console.js">' in served.body
    for name in ("app/console.js", "app/console.css"):
        asset = page(name, assets)
        assert asset is not None and asset.status == 200 and asset.body
    assert page("app/console.js", assets).content_type.startswith("text/javascript")  # type: ignore[union-attr]


def test_novnc_modules_are_served_and_nothing_else(assets: Path) -> None:
    rfb = page("novnc/core/rfb.js", assets)
    assert rfb is not None and rfb.body == b"export default class RFB {}\n"
    assert rfb.content_type == "text/javascript; charset=utf-8"
    assert page("novnc/core/input/keysym.js", assets) is not None
    (assets / "@novnc" / "novnc" / "core" / "escape.js").symlink_to(assets.parent / "secret.js")
    for path in (
        "novnc/package.json",  # not a module
        "novnc/core/missing.js",
        "novnc/core/../../secret.js",
        "novnc/core/escape.js",  # a link out of noVNC
        "novnc/docs/API.js",
        "novnc//core/rfb.js",
        "novnc/core/.hidden.js",
        "novnc/core/rfb.js\0.js",
        "novnc/vendor/../core/rfb.js",
        "novnc/core/rfb.css",
        "elsewhere.js",
    ):
        assert page(path, assets) is None, path


def test_without_novnc_the_page_says_what_to_install(tmp_path: Path) -> None:
    served = page("", tmp_path / "nothing-here")
    assert served is not None and served.status == 503
    text = served.body.decode()
    assert "noVNC" in text and "http.assets_dir" in text
    assert str(tmp_path) not in text  # the path is logged, not shown


def test_every_close_code_has_a_message_on_the_page() -> None:
    messages = dict(re.findall(r"^\s+(\d{4}): '([^']+)", CONSOLE_JS, re.MULTILINE))
    codes = {reason.close_code for reason in (*REFUSALS, *ENDINGS)} | {1006}
    assert sorted(code for code in codes if str(code) not in messages) == []


def test_the_page_through_the_broker(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # http.assets_dir is left empty: the broker runs from a "source tree" whose
    # node_modules is the stand-in.
    monkeypatch.setattr(broker.assets, "source_tree", lambda: assets.parent)

    async def main() -> None:
        async with in_process_broker(FakeQEMU()) as b:
            def get(path: str) -> tuple[int, dict[str, str], bytes]:
                url = f"http://127.0.0.1:{b.port}{path}"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return reply.status, dict(reply.headers), reply.read()

            status, headers, body = await anyio.to_thread.run_sync(get, "/console/vnc/?token=x")
            assert status == 200 and b"app/console.js" in body
            assert headers["Content-Security-Policy"] == _page.CSP
            assert headers["Referrer-Policy"] == "no-referrer"
            status, headers, body = await anyio.to_thread.run_sync(
                get, "/console/vnc/novnc/core/rfb.js"
            )
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")

    anyio.run(main)


def test_tls_files_are_checked_when_the_broker_starts(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(PluginError, match=r"vnc\.tls_ca"):
        broker_vnc.PROTOCOL.session_handler(
            PluginContext("vnc", Config(plugin_tables={"vnc": VNCSection(tls_ca=str(bad))}))
        )
    with pytest.raises(PluginError, match=r"vnc\.tls_ca"):
        broker_vnc.PROTOCOL.session_handler(
            PluginContext("vnc", Config(plugin_tables={
                "vnc": VNCSection(tls_ca=str(tmp_path / "missing.pem"))
            }))
        )


def test_vnc_configuration_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vnc.tls_cert, vnc.tls_key: set both"):
        config_from_dict({"vnc": {"tls_ca": "ca.pem", "tls_cert": "c.pem"}}, tables=[TABLE])
    with pytest.raises(ConfigError, match=r"needs vnc.tls_ca"):
        config_from_dict({"vnc": {"tls_cert": "c.pem", "tls_key": "k.pem"}}, tables=[TABLE])
    config = config_from_dict(
        {"vnc": {"tls_ca": "ca.pem", "shared": False}, "http": {"assets_dir": "web"}},
        source=tmp_path / "broker.toml",
        tables=[TABLE],
    )
    vnc = config.table(TABLE)
    assert vnc is config.table("vnc") and isinstance(vnc, VNCSection)
    assert vnc.tls_ca == str(tmp_path / "ca.pem")  # relative to the file
    assert config.http.assets_dir == str(tmp_path / "web") and vnc.shared is False
    assert config_from_dict({}, tables=[TABLE]).table(TABLE) == VNCSection()  # the defaults
