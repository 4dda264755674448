"""The SPICE console page: spice-html5 from the broker's assets directory.

``/console/spice/`` is the page (``web/console.html``); ``app/console.js``,
``app/handoff.js`` ("Open in native client"), ``app/presence.js`` (who else is on the
console, "Take control") and ``app/console.css`` are its own;
``spice-html5/src/...`` are spice-html5's ES modules, read from
``@spice-project/spice-html5`` in the assets directory the console pages share:
``http.assets_dir`` (:func:`broker.api.assets_dir`: by default the source tree's
``node_modules`` when the broker runs from one, where ``scripts/setup-host`` installs
it with ``npm ci``). Without spice-html5 the page is an error page (503)
saying what to install. Nothing outside spice-html5's ``src/`` is served, and only
``.js`` (:func:`broker.api.package_file`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import structlog

from broker.api import Page, assets_dir, content_type, package_file

#: spice-html5's package inside the assets directory.
SPICE_HTML5 = Path("@spice-project/spice-html5")
#: The file of spice-html5 whose presence says it is installed (the page and the plugin's
#: doctor check look for it).
SPICE_HTML5_FILE = "src/main.js"

_log = structlog.get_logger("broker.spice")
_APP = {
    "app/console.js": "console.js",
    "app/handoff.js": "handoff.js",
    "app/presence.js": "presence.js",
    "app/console.css": "console.css",
}
#: Own-origin scripts, styles and WebSockets only; spice-html5 draws images from blobs
#: and data URLs and sets styles on its canvases; the page may not be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = (("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"))


def _web(name: str) -> bytes:
    return (importlib.resources.files("broker_spice") / "web" / name).read_bytes()


def missing_page() -> Page:
    body = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SPICE console unavailable</title></head>
<body><h1>SPICE console unavailable</h1>
<p>The broker cannot find spice-html5, which this page is built on.</p>
<p>An administrator must install spice-html5 (<code>@spice-project/spice-html5</code>): in a
source tree, <code>scripts/setup-host</code> (or <code>npm ci</code>) does it; elsewhere,
install it and point the broker's <code>http.assets_dir</code> setting at the
<code>node_modules</code> directory holding it (see docs/spice.md).</p>
</body></html>
"""
    return Page(body.encode(), status=503, headers=_HEADERS)


def page(path: str, configured_assets: str) -> Page | None:
    """The page or asset at *path* (below ``/console/spice/``), or None (404);
    *configured_assets* is ``http.assets_dir``."""
    spice = assets_dir(configured_assets) / SPICE_HTML5
    if path == "":
        if not (spice / SPICE_HTML5_FILE).is_file():
            _log.warning("spice.assets_missing", looked_in=str(spice), key="http.assets_dir")
            return missing_page()
        return Page(_web("console.html"), headers=_HEADERS)
    if path in _APP:
        return Page(_web(_APP[path]), content_type(path), headers=_HEADERS)
    if path.startswith("spice-html5/src/"):
        return package_file(spice / "src", path.removeprefix("spice-html5/src/"), headers=_HEADERS)
    return None
