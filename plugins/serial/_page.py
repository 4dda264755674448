"""The serial console page: xterm.js in the browser, served by the broker.

``/console/serial/`` is the page (``static/console.html``), its script and
style sheet come from this package, and xterm.js and its fit addon from the
browser clients' ``node_modules``, the assets directory the console pages share:
``http.assets_dir`` (:func:`broker.api.assets_dir`). Only the files listed
here are served, and only from within their package's directory
(:func:`broker.api.package_file`): a request for anything else is a 404,
whatever lies in the directory. The page runs under a Content-Security-Policy
that allows scripts and connections to this broker only. A missing asset is a 503
saying what to install; where it was looked for is only logged.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import structlog

from broker.api import HTML, Page, assets_dir, content_type, package_file

_log = structlog.get_logger("broker.serial")
#: Served from this package: path -> file in static/.
STATIC = {"": "console.html", "console.js": "console.js", "console.css": "console.css"}
#: Served from the assets directory: path -> (package directory under it, file in that).
ASSETS = {
    "xterm/xterm.js": ("@xterm/xterm", "lib/xterm.js"),
    "xterm/xterm.css": ("@xterm/xterm", "css/xterm.css"),
    "xterm/addon-fit.js": ("@xterm/addon-fit", "lib/addon-fit.js"),
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "base-uri 'none'; form-action 'none'"
)


def _missing(path: str, where: Path) -> Page:
    _log.warning("serial.assets_missing", asset=path, looked_in=str(where), key="http.assets_dir")
    text = (
        f"{path}: not found in the broker's assets directory (an administrator must install "
        "the browser clients there with 'npm ci', or set http.assets_dir; the broker's log "
        "says where it looked)\n"
    )
    return Page(text.encode(), "text/plain; charset=utf-8", status=503)


def page(path: str, configured_assets: str) -> Page | None:
    """The page or asset at *path*, or None (a 404) for anything not listed;
    *configured_assets* is ``http.assets_dir``."""
    if path in STATIC:
        name = STATIC[path]
        body = importlib.resources.files("broker_serial").joinpath("static", name).read_bytes()
        kind = content_type(name)
        return Page(body, kind, [("Content-Security-Policy", CSP)] if kind == HTML else [])
    if path in ASSETS:
        package, name = ASSETS[path]
        where = assets_dir(configured_assets)
        served = package_file(where / package, name, suffixes=(".js", ".css"))
        return _missing(path, where / package) if served is None else served
    return None
