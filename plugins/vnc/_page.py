"""The VNC console page: noVNC, served by the broker at ``/console/vnc/``.

* ``""``: the page (``web/console.html``); it reads the token from its own URL;
* ``app/console.js``, ``app/console.css``: the page's script and style (``web/``);
* ``novnc/core/...``, ``novnc/vendor/...``: noVNC's ES modules, from
  ``@novnc/novnc`` in the assets directory.

The assets directory is ``vnc.assets_dir``, by default the source tree's
``node_modules`` when the broker runs from one (``scripts/setup-host`` installs
noVNC there with ``npm ci``), else :data:`INSTALLED_ASSETS`. Without noVNC the
page is an error page (503) saying what to install; the path is only logged.
Files are read per request (noVNC's modules are small and the page cache
holds them); nothing outside ``core/`` and ``vendor/`` of noVNC is served.
"""

from __future__ import annotations

import html
import importlib.resources
from pathlib import Path

import structlog

from broker.hookspecs import Page

#: Where noVNC is looked for when the broker does not run from a source tree.
INSTALLED_ASSETS = Path("/usr/share/console-broker/node_modules")
#: noVNC's package inside the assets directory.
NOVNC = Path("@novnc/novnc")

_log = structlog.get_logger("broker.vnc")
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
_APP = {"app/console.js": "console.js", "app/console.css": "console.css"}
#: The page loads nothing but its own origin's scripts and styles, talks to its
#: own origin only (the console's WebSocket), and may not be framed.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = (("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"))


def assets_dir(configured: str) -> Path:
    """The directory holding ``@novnc/novnc``: *configured*, else the default."""
    if configured:
        return Path(configured)
    tree = Path(__file__).resolve().parents[2]
    if (tree / "pyproject.toml").is_file() and (tree / "plugins" / "vnc").is_dir():
        return tree / "node_modules"
    return INSTALLED_ASSETS


def _web(name: str) -> bytes:
    return (importlib.resources.files("broker_vnc") / "web" / name).read_bytes()


def _type(name: str) -> str:
    return _TYPES.get(Path(name).suffix, "application/octet-stream")


def missing_page(why: str) -> Page:
    """The error page when noVNC cannot be served."""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>VNC console unavailable</title></head>
<body><h1>VNC console unavailable</h1>
<p>{html.escape(why)}</p>
<p>An administrator must install noVNC (<code>@novnc/novnc</code>): in a source tree,
<code>scripts/setup-host</code> (or <code>npm ci</code>) does it; elsewhere, install it and
point the broker's <code>vnc.assets_dir</code> setting at the <code>node_modules</code>
directory holding it (see docs/vnc.md).</p>
</body></html>
"""
    return Page(body.encode(), status=503, headers=_HEADERS)


def page(path: str, configured_assets: str) -> Page | None:
    """The page or asset at *path* (below ``/console/vnc/``), or None (404)."""
    novnc = assets_dir(configured_assets) / NOVNC
    if path == "":
        if not (novnc / "core" / "rfb.js").is_file():
            _log.warning("vnc.assets_missing", looked_in=str(novnc), key="vnc.assets_dir")
            return missing_page("The broker cannot find noVNC, which this page is built on.")
        return Page(_web("console.html"), headers=_HEADERS)
    if path in _APP:
        return Page(_web(_APP[path]), _type(path), headers=_HEADERS)
    if path.startswith("novnc/"):
        return _novnc_file(novnc, path.removeprefix("novnc/"))
    return None


def _novnc_file(novnc: Path, relative: str) -> Page | None:
    parts = relative.split("/")
    if parts[0] not in ("core", "vendor") or Path(relative).suffix != ".js":
        return None
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    try:
        root = novnc.resolve(strict=True)
        target = (novnc / relative).resolve(strict=True)
    except OSError:
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    try:
        body = target.read_bytes()
    except OSError:
        return None
    return Page(body, _type(relative), headers=_HEADERS)
