"""The serial plugin's check for ``console-broker doctor`` (broker_serial._doctor, through
``Serial.doctor``): every asset the page serves from the assets directory is there."""

from __future__ import annotations

from pathlib import Path

import broker_serial
from broker_serial._page import ASSETS, page

from broker.api import Finding, PluginContext, load_config
from broker.plugins import PluginManager

NODE_MODULES = Path(__file__).resolve().parents[2] / "node_modules"


def context(tmp_path: Path, assets: Path) -> PluginContext:
    path = tmp_path / "broker.toml"
    path.write_text(f'[http]\nassets_dir = "{assets}"\n')
    return PluginContext("serial", load_config(path, PluginManager().config_tables))


def test_the_checkouts_xterm_is_found(tmp_path: Path) -> None:
    assert list(broker_serial.PROTOCOL.doctor(context(tmp_path, NODE_MODULES))) == [
        Finding("ok", "xterm.js", f"@xterm/addon-fit, @xterm/xterm found in {NODE_MODULES}"),
    ]


def test_each_missing_asset_is_named_and_the_page_agrees(tmp_path: Path) -> None:
    """Only the fit addon is missing: the check names it alone, and the page answers 503
    for it and serves the rest."""
    assets = tmp_path / "node_modules"
    for package, name in ASSETS.values():
        if package != "@xterm/addon-fit":
            (assets / package / name).parent.mkdir(parents=True, exist_ok=True)
            (assets / package / name).write_text("/* */")
    [finding] = broker_serial.PROTOCOL.doctor(context(tmp_path, assets))
    missing = assets / "@xterm/addon-fit/lib/addon-fit.js"
    assert finding.status == "fail"
    assert finding.detail == f"{missing} missing: the serial page's scripts answer 503"
    assert finding.fix.startswith(f"install the browser clients under {assets}")
    assert "@xterm/addon-fit and @xterm/xterm" in finding.fix
    statuses = {path: getattr(page(path, str(assets)), "status", None) for path in ASSETS}
    assert statuses == {"xterm/xterm.js": 200, "xterm/xterm.css": 200,
                        "xterm/addon-fit.js": 503}
