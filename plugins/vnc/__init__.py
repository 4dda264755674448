"""The built-in VNC plugin: noVNC in the browser, an RFB security proxy to QEMU.

Hooks: the ``vnc`` protocol, its domain XML edit (:mod:`broker_vnc._xml`),
its session handler (:mod:`broker_vnc._session`: VNC authentication or
VeNCrypt toward QEMU, security None toward the browser, view-only enforced by
the broker, QEMU's WebSocket port passed through) and its console page
(:mod:`broker_vnc._page`, built on noVNC). docs/vnc.md tells the whole story.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

from ._config import console_broker_config_tables as console_broker_config_tables

if TYPE_CHECKING:
    from broker.config import Config
    from broker.hookspecs import Page
    from broker.service import SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="vnc",
    title="VNC (RFB)",
    description="The VM's display over RFB: noVNC in the browser, or a native VNC viewer.",
    view_only=True,
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """The VNC display, listening as the mode asks (see broker_vnc._xml)."""
    if protocol != PROTOCOL.name:
        return None
    from ._xml import xml_edit

    return xml_edit(options)


@hookimpl
def console_broker_session_handler(protocol: str, config: Config) -> SessionHandler | None:
    """The RFB security proxy (:class:`broker_vnc._session.VNCSessionHandler`)."""
    if protocol != PROTOCOL.name:
        return None
    from broker.plugins import PluginError

    from ._config import TABLE
    from ._session import VNCSessionHandler, VNCSettings

    try:
        settings = VNCSettings.from_config(config.table(TABLE))
    except (OSError, ssl.SSLError) as exc:
        raise PluginError(
            f"vnc.tls_ca, vnc.tls_cert, vnc.tls_key: cannot load the TLS files: {exc}"
        ) from None
    return VNCSessionHandler(settings)


@hookimpl
def console_broker_page(protocol: str, path: str, config: Config) -> Page | None:
    """The noVNC console page and its assets (see broker_vnc._page)."""
    if protocol != PROTOCOL.name:
        return None
    from ._page import page

    return page(path, config.http.assets_dir)
