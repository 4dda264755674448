"""The built-in SPICE plugin: spice-html5 in the browser, remote-viewer natively."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.api import Protocol, hookimpl

from ._config import TABLE
from ._config import console_broker_config_tables as console_broker_config_tables
from ._options import OPTIONS as SPICE_XML_OPTIONS
from ._refusals import CHANNEL_REFUSED

if TYPE_CHECKING:
    from broker.api import (
        ClientFile,
        ConsoleEdit,
        ConsoleTLS,
        EditOptions,
        Finding,
        NativeClient,
        Page,
        PluginContext,
        Refusal,
        Session,
        SessionHandler,
    )

class Spice(Protocol):
    """The ``spice`` protocol and what it does."""

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        """The SPICE display, agent channel, USB redirection and video (broker_spice._xml)."""
        from ._xml import xml_edit

        return xml_edit(options)

    def session_handler(self, context: PluginContext) -> SessionHandler:
        """One SPICE channel connection per session of the group (broker_spice._session)."""
        from ._session import policy_for, run_channel

        deny = tuple(context.config.table(TABLE).deny_channels)

        async def spice_channel(session: Session) -> None:
            await run_channel(session, policy_for(session, deny))

        return spice_channel

    def input_mode(self, context: PluginContext) -> str:
        """``spice.input``: ``shared`` or ``single`` (one session holds the input)."""
        return context.config.table(TABLE).input

    def console_tls(self, context: PluginContext) -> ConsoleTLS | None:
        """TLS to QEMU's SPICE ``tlsPort`` when ``spice.tls_ca`` is set."""
        section = context.config.table(TABLE)
        if not section.tls_ca:
            return None
        import ssl

        from broker.api import ConsoleTLS, PluginError

        try:
            return ConsoleTLS.from_files(
                section.tls_ca, section.tls_cert, section.tls_key, section.tls_server_name
            )
        except (OSError, ssl.SSLError) as exc:
            raise PluginError(
                f"spice.tls_ca, spice.tls_cert, spice.tls_key: cannot load the TLS files: {exc}"
            ) from None

    def page(self, path: str, context: PluginContext) -> Page | None:
        """The spice-html5 console page and its assets (see broker_spice._page)."""
        from ._page import page

        return page(path, context.config.http.assets_dir)  # the key the pages share

    def client_file(self, token: str, title: str, context: PluginContext) -> ClientFile | None:
        """A virt-viewer ``.vv`` file for remote-viewer (see broker_spice._vv)."""
        from ._vv import vv_file

        return vv_file(token, title, context.config)

    def doctor(self, context: PluginContext) -> list[Finding]:
        """spice-html5, TLS to QEMU and qemu.conf's spice_tls (see broker_spice._doctor)."""
        from ._doctor import findings

        return findings(self, context)

    async def open_client(self, client: NativeClient) -> int:
        """``console-broker open``: remote-viewer on a local port, every channel a
        WebSocket of the session (see broker_spice._open)."""
        from ._open import open_spice

        return await open_spice(client)


PROTOCOL = Spice(
    name="spice",
    title="SPICE",
    description=(
        "The VM's display, input, clipboard, audio and USB over SPICE: spice-html5 in the "
        "browser, or remote-viewer (console-broker open, or a .vv file)."
    ),
    view_only=True,
    presence=True,  # inputs dropped while another session holds them (spice.input)
    multi_connection=True,
    native_clients=True,
    screenshots=True,  # a SPICE token may also take the display's screenshot (the core's)
    xml_options=SPICE_XML_OPTIONS,
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_refusals() -> list[Refusal]:
    return [CHANNEL_REFUSED]
