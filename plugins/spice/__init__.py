"""The built-in SPICE plugin: spice-html5 in the browser, remote-viewer natively."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

if TYPE_CHECKING:
    from broker.config import Config
    from broker.hookspecs import ClientFile, Page
    from broker.service import Session, SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

PROTOCOL = Protocol(
    name="spice",
    title="SPICE",
    description=(
        "The VM's display, input, clipboard, audio and USB over SPICE: spice-html5 in the "
        "browser, or remote-viewer with a .vv file."
    ),
    view_only=True,
    multi_connection=True,
    native_clients=True,
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """The SPICE display, agent channel, USB redirection and video (see broker_spice._xml)."""
    if protocol != PROTOCOL.name:
        return None
    from ._xml import xml_edit

    return xml_edit(options)


@hookimpl
def console_broker_session_handler(protocol: str, config: Config) -> SessionHandler | None:
    """One SPICE channel connection per session of the group (see broker_spice._session)."""
    if protocol != PROTOCOL.name:
        return None
    from ._session import policy_for, run_channel

    deny = tuple(config.spice.deny_channels)

    async def spice_channel(session: Session) -> None:
        await run_channel(session, policy_for(session, deny))

    return spice_channel




@hookimpl
def console_broker_page(protocol: str, path: str, config: Config) -> Page | None:
    """The spice-html5 console page and its assets (see broker_spice._page)."""
    if protocol != PROTOCOL.name:
        return None
    if path.startswith("vv/"):  # /console/spice/vv/TOKEN: the .vv file for remote-viewer
        return _vv_page(path.removeprefix("vv/"), config)
    from ._page import page

    return page(path, config.http.assets_dir)  # the key the console pages share


def _vv_page(token: str, config: Config) -> Page | None:
    from broker.hookspecs import Page

    from ._vv import vv_file

    if not token or len(token) > 4096 or not token.isascii() or "/" in token:
        return None
    made = vv_file(token, "SPICE console", config)
    if made is None:
        return Page(b"this broker has no CONNECT listener (listen.connect_port)\n",
                    "text/plain; charset=utf-8", status=404)
    return Page(
        made.body.encode(), made.content_type,
        headers=[("Content-Disposition", 'attachment; filename="console.vv"')],
    )


@hookimpl
def console_broker_client_file(
    protocol: str, token: str, title: str, config: Config
) -> ClientFile | None:
    """A virt-viewer ``.vv`` file for remote-viewer (see broker_spice._vv)."""
    if protocol != PROTOCOL.name:
        return None
    from ._vv import vv_file

    return vv_file(token, title, config)
