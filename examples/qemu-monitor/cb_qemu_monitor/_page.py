"""The monitor page: ``/console/monitor/`` and its script and style sheet.

The three files are package data (``static/``); nothing else is served (a 404). The
page needs no JavaScript library, so nothing comes from the broker's assets directory.
It runs under a Content-Security-Policy that allows its own script, style sheet and
connections to this broker only.
"""

from __future__ import annotations

import importlib.resources

from broker.api import HTML, Page, content_type

#: Served from static/: path -> file.
STATIC = {"": "console.html", "console.js": "console.js", "console.css": "console.css"}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)


def page(path: str) -> Page | None:
    """The page or one of its files at *path*, or None (a 404)."""
    name = STATIC.get(path)
    if name is None:
        return None
    body = importlib.resources.files("cb_qemu_monitor").joinpath("static", name).read_bytes()
    kind = content_type(name)
    return Page(body, kind, [("Content-Security-Policy", CSP)] if kind == HTML else [])
