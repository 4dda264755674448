"""``console-broker doctor``'s serial checks (``Serial.doctor``): the page's browser client,
xterm.js and its fit addon, where the page reads them: every file of
:data:`broker_serial._page.ASSETS` in the assets directory. The serial console goes
through libvirt's console streams, so nothing in qemu.conf concerns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api import Finding, assets_dir

if TYPE_CHECKING:
    from broker.api import PluginContext


def xterm(configured_assets: str) -> Finding:
    """Each asset of the page in the assets directory (``http.assets_dir``)."""
    from ._page import ASSETS

    root = assets_dir(configured_assets)
    packages = sorted({package for package, _name in ASSETS.values()})
    missing = [root / package / name for package, name in ASSETS.values()
               if not (root / package / name).is_file()]
    if not missing:
        return Finding("ok", "xterm.js", f"{', '.join(packages)} found in {root}")
    return Finding(
        "fail", "xterm.js", f"{', '.join(map(str, missing))} missing: the serial page's "
        "scripts answer 503",
        f"install the browser clients under {root} ('npm ci' in a source tree), or set "
        f"http.assets_dir to the node_modules directory holding {' and '.join(packages)}")


def findings(context: PluginContext) -> list[Finding]:
    """Every serial check."""
    return [xterm(context.config.http.assets_dir)]
