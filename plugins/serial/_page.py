"""The serial console page: xterm.js in the browser, served by the broker.

``/console/serial/`` is the page (``static/console.html``), its script and
style sheet come from this package, and xterm.js and its fit addon from the
browser clients' ``node_modules`` (the assets directory). Only the files
listed here are served: a request for anything else is a 404, whatever lies
in the directory. The page runs under a Content-Security-Policy that allows
scripts and connections to this broker only.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import broker
from broker.config import Config
from broker.hookspecs import Page

#: The default assets directory of an installed broker (the source tree's own
#: ``node_modules`` is used when the broker runs from one).
SYSTEM_ASSETS = Path("/usr/share/console-broker/node_modules")

_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_HTML = "text/html; charset=utf-8"

#: Served from this package: path -> (file in static/, content type).
STATIC = {
    "": ("console.html", _HTML),
    "console.js": ("console.js", _JS),
    "console.css": ("console.css", _CSS),
}
#: Served from the assets directory: path -> (file under it, content type).
ASSETS = {
    "xterm/xterm.js": ("@xterm/xterm/lib/xterm.js", _JS),
    "xterm/xterm.css": ("@xterm/xterm/css/xterm.css", _CSS),
    "xterm/addon-fit.js": ("@xterm/addon-fit/lib/addon-fit.js", _JS),
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "base-uri 'none'; form-action 'none'"
)


def assets_dir(config: Config) -> Path:
    """Where the browser clients' packages are: the configured directory, else the
    source tree's ``node_modules`` when the broker runs from one, else
    :data:`SYSTEM_ASSETS`."""
    if config.vnc.assets_dir:  # the key the console pages share
        return Path(config.vnc.assets_dir)
    source = Path(broker.__file__).resolve().parent.parent / "node_modules"
    return source if source.is_dir() else SYSTEM_ASSETS


def _missing(path: str, where: Path) -> Page:
    text = (
        f"{path}: not found in the assets directory {where} (install the browser "
        "clients there with 'npm ci', or set vnc.assets_dir)\n"
    )
    return Page(text.encode(), "text/plain; charset=utf-8", status=503)


def page(path: str, config: Config) -> Page | None:
    """The page or asset at *path*, or None (a 404) for anything not listed."""
    if path in STATIC:
        name, content_type = STATIC[path]
        body = importlib.resources.files("broker_serial").joinpath("static", name).read_bytes()
        headers = [("Content-Security-Policy", CSP)] if content_type == _HTML else []
        return Page(body, content_type, headers)
    if path in ASSETS:
        name, content_type = ASSETS[path]
        where = assets_dir(config)
        try:
            body = (where / name).read_bytes()
        except OSError:
            return _missing(path, where)
        return Page(body, content_type)
    return None
