"""The VNC console page: noVNC, served by the broker at ``/console/vnc/``.

* ``""``: the page (``web/console.html``); it reads the token from its own URL;
* ``app/console.js``, ``app/handoff.js``, ``app/presence.js``, ``app/console.css``:
  the page's scripts (``handoff.js``: "Open in native client"; ``presence.js``: who
  else is on the console and "Take control") and style (``web/``);
* ``novnc/core/...``, ``novnc/vendor/...``: noVNC's ES modules, from
  ``@novnc/novnc`` in the assets directory.

The assets directory is ``http.assets_dir``, the one all console pages share
(:func:`broker.api.assets_dir`: by default the source tree's ``node_modules``
when the broker runs from one, where ``scripts/setup-host`` installs noVNC with
``npm ci``). Without noVNC the page is an error page (503) saying what to install;
the path is only logged. Files are read per request (noVNC's modules are small and
the page cache holds them); nothing but ``.js`` files below ``core/`` and
``vendor/`` of noVNC is served (:func:`broker.api.package_file`).
"""

from __future__ import annotations

import html
import importlib.resources
from pathlib import Path

import structlog

from broker.api import Page, assets_dir, content_type, package_file

from ._playback import ASSETS as PLAYBACK_ASSETS
from ._playback import PAGE as PLAYBACK_PAGE
from ._playback import playback_page

#: noVNC's package inside the assets directory.
NOVNC = Path("@novnc/novnc")
#: The file of noVNC whose presence says it is installed (the page, the player and the
#: plugin's doctor check look for it).
NOVNC_FILE = "core/rfb.js"

_log = structlog.get_logger("broker.vnc")
_APP = {
    "app/console.js": "console.js",
    "app/handoff.js": "handoff.js",
    "app/presence.js": "presence.js",
    "app/console.css": "console.css",
}
#: The page loads nothing but its own origin's scripts and styles, talks to its
#: own origin only (the console's WebSocket), and may not be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = (("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"))


def _web(name: str) -> bytes:
    return (importlib.resources.files("broker_vnc") / "web" / name).read_bytes()


def missing_page(why: str) -> Page:
    """The error page when noVNC cannot be served."""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>VNC console unavailable</title></head>
<body><h1>VNC console unavailable</h1>
<p>{html.escape(why)}</p>
<p>An administrator must install noVNC (<code>@novnc/novnc</code>): in a source tree,
<code>scripts/setup-host</code> (or <code>npm ci</code>) does it; elsewhere, install it and
point the broker's <code>http.assets_dir</code> setting at the <code>node_modules</code>
directory holding it (see docs/vnc.md).</p>
</body></html>
"""
    return Page(body.encode(), status=503, headers=_HEADERS)


def page(path: str, configured_assets: str) -> Page | None:
    """The page or asset at *path* (below ``/console/vnc/``), or None (404);
    *configured_assets* is ``http.assets_dir``. The recording player and its assets are
    :mod:`broker_vnc._playback`'s."""
    if path == PLAYBACK_PAGE or path in PLAYBACK_ASSETS:
        return playback_page(path, configured_assets)
    novnc = assets_dir(configured_assets) / NOVNC
    if path == "":
        if not (novnc / NOVNC_FILE).is_file():
            _log.warning("vnc.assets_missing", looked_in=str(novnc), key="http.assets_dir")
            return missing_page("The broker cannot find noVNC, which this page is built on.")
        return Page(_web("console.html"), headers=_HEADERS)
    if path in _APP:
        return Page(_web(_APP[path]), content_type(path), headers=_HEADERS)
    relative = path.removeprefix("novnc/")
    if relative != path and relative.split("/", 1)[0] in ("core", "vendor"):
        return package_file(novnc, relative, headers=_HEADERS)
    return None
