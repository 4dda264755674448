"""The built-in VNC plugin: noVNC in the browser, an RFB security proxy to QEMU.

The ``vnc`` protocol object carries it all: its domain XML edit (:mod:`broker_vnc._xml`),
its session handler (:mod:`broker_vnc._session`: VNC authentication or
VeNCrypt toward QEMU, security None toward the browser, view-only enforced by
the broker, QEMU's WebSocket port passed through) and its console page
(:mod:`broker_vnc._page`, built on noVNC). docs/vnc.md tells the whole story.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from broker.api import Protocol, hookimpl

from ._config import console_broker_config_tables as console_broker_config_tables

if TYPE_CHECKING:
    from broker.api import (
        ConsoleEdit,
        EditOptions,
        Finding,
        NativeClient,
        Page,
        PluginContext,
        RecordingKind,
        SessionHandler,
    )


class VNC(Protocol):
    """The ``vnc`` protocol and what it does."""

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        """The VNC display, listening as the mode asks (see broker_vnc._xml)."""
        from ._xml import xml_edit

        return xml_edit(options)

    def session_handler(self, context: PluginContext) -> SessionHandler:
        """The RFB security proxy (:class:`broker_vnc._session.VNCSessionHandler`)."""
        from broker.api import PluginError

        from ._config import TABLE
        from ._recording import RecordingSettings
        from ._session import VNCSessionHandler, VNCSettings

        try:
            settings = VNCSettings.from_config(context.config.table(TABLE))
        except (OSError, ssl.SSLError) as exc:
            raise PluginError(
                f"vnc.tls_ca, vnc.tls_cert, vnc.tls_key: cannot load the TLS files: {exc}"
            ) from None
        recording = RecordingSettings.from_config(context.config)
        return VNCSessionHandler(settings, recording=recording if recording.active else None)

    def input_mode(self, context: PluginContext) -> str:
        """``vnc.input``: ``shared`` or ``single`` (one session holds the input)."""
        from ._config import TABLE

        return context.config.table(TABLE).input

    def page(self, path: str, context: PluginContext) -> Page | None:
        """The noVNC console page and its assets (see broker_vnc._page)."""
        from ._page import page

        return page(path, context.config.http.assets_dir)

    def doctor(self, context: PluginContext) -> list[Finding]:
        """noVNC, the TLS files to QEMU and qemu.conf's vnc_tls (see broker_vnc._doctor)."""
        from ._doctor import findings

        return findings(context)

    async def open_client(self, client: NativeClient) -> int:
        """``console-broker open``: a native VNC viewer on a local port, bridged to the
        broker (see broker_vnc._open)."""
        from ._open import open_vnc

        return await open_vnc(client)


PROTOCOL = VNC(
    name="vnc",
    title="VNC (RFB)",
    description="The VM's display over RFB: noVNC in the browser, or a native VNC viewer.",
    view_only=True,
    presence=True,  # input dropped while another session holds it (vnc.input = "single")
    screenshots=True,  # a VNC token may also take the display's screenshot (the core's)
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_recording_kinds() -> list[RecordingKind]:
    """VNC sessions recorded as RFB in JSON lines, played back by the playback page
    (see broker_vnc._recording); the core lists, prunes and serves them."""
    from ._recording import KIND

    return [KIND]
