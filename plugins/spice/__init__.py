"""The built-in SPICE plugin: spice-html5 in the browser, remote-viewer natively."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import Protocol, hookimpl

from ._config import TABLE
from ._config import console_broker_config_tables as console_broker_config_tables

if TYPE_CHECKING:
    from broker.config import Config
    from broker.hookspecs import ClientFile, Page
    from broker.service import ConsoleTLS, Session, SessionHandler
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

    deny = tuple(config.table(TABLE).deny_channels)

    async def spice_channel(session: Session) -> None:
        await run_channel(session, policy_for(session, deny))

    return spice_channel


@hookimpl
def console_broker_console_tls(protocol: str, config: Config) -> ConsoleTLS | None:
    """TLS to QEMU's SPICE ``tlsPort`` when ``spice.tls_ca`` is set."""
    if protocol != PROTOCOL.name or not config.table(TABLE).tls_ca:
        return None
    import ssl

    from broker.plugins import PluginError
    from broker.service import ConsoleTLS

    section = config.table(TABLE)
    try:
        return ConsoleTLS.from_files(
            section.tls_ca, section.tls_cert, section.tls_key, section.tls_server_name
        )
    except (OSError, ssl.SSLError) as exc:
        raise PluginError(
            f"spice.tls_ca, spice.tls_cert, spice.tls_key: cannot load the TLS files: {exc}"
        ) from None


@hookimpl
def console_broker_page(protocol: str, path: str, config: Config) -> Page | None:
    """The spice-html5 console page and its assets (see broker_spice._page)."""
    if protocol != PROTOCOL.name:
        return None
    from ._page import page

    return page(path, config.http.assets_dir)  # the key the console pages share


@hookimpl
def console_broker_client_file(
    protocol: str, token: str, title: str, config: Config
) -> ClientFile | None:
    """A virt-viewer ``.vv`` file for remote-viewer (see broker_spice._vv)."""
    if protocol != PROTOCOL.name:
        return None
    from ._vv import vv_file

    return vv_file(token, title, config)
