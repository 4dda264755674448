"""The VNC recording player, served by the broker at ``/console/vnc/playback/``.

* ``playback/``: the page (``web/playback.html``); it reads a recording token from
  its own URL (``console-broker token --recording ID`` prints the link), fetches the
  recording from ``GET /recording`` and plays it with noVNC's RFB client fed from the
  recording (docs/vnc.md, "Playback");
* ``app/playback.js``, ``app/playback.css``: its script and style (``web/``).

noVNC's modules are the console page's (``novnc/core/...``, :mod:`broker_vnc._page`);
so are the page's headers (its Content-Security-Policy allows its own origin's scripts
and requests only) and the error page when noVNC is missing.
"""

from __future__ import annotations

import importlib.resources

import structlog

from broker.api import Page, assets_dir, content_type

#: The player's page, below ``/console/vnc/``.
PAGE = "playback/"
#: Its own script and style, served beside the console page's.
ASSETS = {"app/playback.js": "playback.js", "app/playback.css": "playback.css"}

_log = structlog.get_logger("broker.vnc")


def _web(name: str) -> bytes:
    return (importlib.resources.files("broker_vnc") / "web" / name).read_bytes()


def playback_page(path: str, configured_assets: str) -> Page | None:
    """The player (*path* :data:`PAGE`) or one of its :data:`ASSETS`, else None."""
    from ._page import _HEADERS, NOVNC, NOVNC_FILE, missing_page

    if path == PAGE:
        novnc = assets_dir(configured_assets) / NOVNC
        if not (novnc / NOVNC_FILE).is_file():
            _log.warning("vnc.assets_missing", looked_in=str(novnc), key="http.assets_dir")
            return missing_page("The broker cannot find noVNC, which the player is built on.")
        return Page(_web("playback.html"), headers=_HEADERS)
    if path in ASSETS:
        return Page(_web(ASSETS[path]), content_type(path), headers=_HEADERS)
    return None
