"""The plugin API: everything a console-broker plugin may import from the core.

A plugin, the built-in ``broker_vnc``, ``broker_spice`` and ``broker_serial`` as much
as a third-party one, imports ``broker.api`` and no other module of ``broker``: the
rest is the core's own and changes without notice. import-linter holds the built-in
plugins, the QEMU monitor example (``examples/qemu-monitor``) and the test plugin of
``tests/plugin_example`` to that
(``[tool.importlinter]`` in ``pyproject.toml``, run by ``tox -e type``).

The names, by group (each is documented where it is defined; docs/plugins.md tells
how the hooks use them):

Hooks, protocols and plugins
    :data:`hookimpl` marks a hook implementation; :data:`PROJECT_NAME` is the
    entry-point group a plugin registers under. :class:`Protocol` declares a protocol
    (``console_broker_protocols``) and, subclassed, does what it serves, with the
    owning plugin's :class:`PluginContext`: :class:`Page` is a console page or asset
    (``Protocol.page``), :class:`ClientFile` a native client's connection file
    (``Protocol.client_file``). :class:`XMLEdit` is an XML edit that is no protocol
    (``console_broker_xml_edits``). :class:`PluginError` is what a plugin raises for a
    configuration it cannot use: the command or the broker stops with its message.
    :class:`PluginManager` loads plugins and checks their declarations (a plugin's
    tests load it alone with ``PluginManager(load_entrypoints=False, plugins=[...])``).

Domain XML (``Protocol.xml_edit``, ``XMLEdit.xml_edit``)
    :class:`EditOptions` (what was asked for, the edit's own :class:`XMLOption` values
    included; its ``platform``, a :class:`Platform`, is the guest's architecture and
    machine type, with libvirt's :class:`DomainCapabilities` when a live connection gave
    them) in; :class:`ConsoleEdit` made of :class:`Slot` (with :class:`Compare`)
    and :class:`DeviceRef` out, or :class:`EditError` for options it cannot serve.
    :func:`load_fragment` reads an XML fragment shipped as package data with the safe
    parser; :func:`graphics_for_mode` changes how a ``<graphics>`` listens and keeps
    the rest; :func:`input_slot` is the shared slot that gives a graphical console a
    keyboard and a pointer where the machine has none. :func:`read_consoles` reads what
    a domain's metadata records (:class:`ConsoleRecord` per protocol), e.g. to find a
    device in the secure XML libvirt gives for ``session.domain_handle``.

Console pages and their assets (``Protocol.page``)
    :func:`assets_dir` resolves ``http.assets_dir``; :func:`package_file` serves a
    file below a package's directory and nothing outside it; :func:`content_type`
    names a file's type; :data:`HTML` is the type of a page.

Sessions (``Protocol.session_handler``, ``Protocol.open_endpoint``)
    :class:`Session` is what a handler gets, :data:`SessionHandler` what
    ``session_handler`` returns; :class:`EndpointRequest` is what ``open_endpoint``
    gets, for a protocol that connects its console itself. A session's ``client`` is
    a :class:`WebSocketChannel`, or a :class:`TunnelChannel` through the CONNECT
    listener (:class:`MessageChannel` is the interface both offer); its console an
    :class:`Endpoint`; its ``group`` a :class:`SessionGroup` (``multi_connection``);
    its ``claims`` the token's :class:`Claims`; its ``traffic`` a :class:`Traffic`;
    its ``seat`` a :class:`Seat` among the live sessions of its console (each a
    :class:`Viewer`; :class:`PresenceState` is the whole as one seat sees it), whose
    ``may_input`` says whether its input goes to the console now.
    :class:`ClientClosed` is raised once the client has gone. :func:`pump` moves bytes
    both ways until a side ends (:class:`PumpEnd`; :data:`DEFAULT_READ_SIZE`);
    :func:`raw_proxy` is a handler doing only that.

Refusals (``console_broker_refusals``)
    A handler ends its session by raising :class:`Refused` with a :class:`Refusal`:
    one of the core's table, :data:`CLIENT_PROTOCOL_ERROR`,
    :data:`CONSOLE_PROTOCOL_ERROR`, :data:`CONSOLE_AUTH_FAILED`,
    :data:`CONSOLE_UNREACHABLE`, :data:`VIEW_ONLY_UNSUPPORTED`, or one the plugin
    declares itself with a close code in :data:`PLUGIN_CODES`.

TLS to a console (``Protocol.console_tls``)
    :class:`ConsoleTLS` holds how the broker verifies a console's certificate;
    :func:`tls_error` says what went wrong in a handshake.

Native clients through the CONNECT listener
    :func:`handle_for_token` is the session handle a client file names as the
    CONNECT target's host (:func:`token_for_handle` undoes it); :data:`TLS_PORT` is
    the target port for TLS inside the tunnel, :data:`PLAIN_PORT` the one a broker
    without TLS names.

Native clients on the user's machine (``Protocol.open_client``, ``console-broker open``)
    A protocol declares the flags it adds to the command with :class:`OpenOption`
    (``Protocol.open_options``); its ``open_client`` gets a :class:`NativeClient`: the
    token, the broker's URLs, the options, and ``connect()`` (the broker's WebSocket),
    ``local_listener()`` (a :class:`LocalListener`), ``bridge()`` (bytes both ways; a
    :class:`BridgeEnd` says which side ended), ``run_viewer()``, ``close_text()`` and
    ``status()``. :class:`OpenError` is the one line the command prints when it cannot
    go on.

Recordings (``console_broker_recording_kinds``)
    A plugin that records its sessions declares a :class:`RecordingKind` (its protocol,
    its files' suffix and format, the page that plays them) and writes each part with
    :class:`PartFile` (created in the shared layout, held while written so that
    retention never deletes it), naming the recording with :func:`new_recording_id`;
    the directory is :attr:`Config.recordings_dir`. The core lists, prunes and serves
    them (``broker.recordings``).

Host checks (``Protocol.doctor``, ``console-broker doctor``)
    A protocol checks what it alone knows on the host and returns :class:`Finding`
    values (``ok``, ``warn``, ``fail`` or ``skip``; a title, a detail, and a fix for a
    warning or a failure); :class:`QemuConf` reads the settings of libvirt's QEMU driver
    on this host (``QemuConf.read(config.libvirt.uri)``), whose keys the protocol knows.

Configuration (``console_broker_config_tables``) and commands (``console_broker_commands``)
    A plugin declares its tables with :class:`ConfigTable` (a frozen attrs class whose
    fields are declared with :func:`setting`, checked with :func:`at_least`,
    :func:`one_of`, :func:`tcp_port`, :func:`not_empty` or a :data:`Check` of its
    own) and reads them back parsed from the broker's :class:`Config` with
    :meth:`Config.table` (:func:`load_config` reads a file with given tables, in
    tests). A plugin's command reads the configuration as the broker's own commands do
    with :func:`read_config` (a :class:`ConfigError` when it is wrong), and raises
    :class:`CommandError` for a one-line error with an exit status (:data:`EXIT_USAGE`
    for a usage error).

Each name is imported from the core when it is first used, so that importing
``broker.api`` costs nothing: a plugin that declares its protocols loads no more of
the core than that takes, as ``console-broker xml`` and the libvirt hook load every
plugin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.assets import HTML, assets_dir, content_type, package_file
    from broker.checks import Finding, QemuConf
    from broker.config import (
        Check,
        Config,
        ConfigError,
        ConfigTable,
        at_least,
        load_config,
        not_empty,
        one_of,
        setting,
        tcp_port,
    )
    from broker.configfile import read_config
    from broker.errors import EXIT_USAGE, CommandError, PluginError
    from broker.hookspecs import (
        PROJECT_NAME,
        ClientFile,
        OpenOption,
        Page,
        Protocol,
        XMLEdit,
        XMLOption,
        hookimpl,
    )
    from broker.native import BridgeEnd, LocalListener, NativeClient, OpenError
    from broker.plugins import PluginContext, PluginManager
    from broker.recordings import PartFile, RecordingKind, new_recording_id
    from broker.service import (
        DEFAULT_READ_SIZE,
        PLUGIN_CODES,
        ClientChannel,
        ClientClosed,
        ConsoleTLS,
        Endpoint,
        EndpointRequest,
        MessageChannel,
        PresenceState,
        PumpEnd,
        Refusal,
        Refused,
        Seat,
        Session,
        SessionGroup,
        SessionHandler,
        Traffic,
        TunnelChannel,
        Viewer,
        WebSocketChannel,
        pump,
        raw_proxy,
    )
    from broker.service._connect import PLAIN_PORT, TLS_PORT, handle_for_token, token_for_handle
    from broker.service._refusals import (
        CLIENT_PROTOCOL_ERROR,
        CONSOLE_AUTH_FAILED,
        CONSOLE_PROTOCOL_ERROR,
        CONSOLE_UNREACHABLE,
        VIEW_ONLY_UNSUPPORTED,
    )
    from broker.service._tls import tls_error
    from broker.tokens import Claims
    from broker.xml import (
        Compare,
        ConsoleEdit,
        ConsoleRecord,
        DeviceRef,
        DomainCapabilities,
        EditError,
        EditOptions,
        Platform,
        Slot,
        graphics_for_mode,
        input_slot,
        load_fragment,
        read_consoles,
    )

#: The module of the core each name comes from (tests/test_api.py keeps this table and
#: the imports above in step).
_SOURCES: dict[str, str] = {
    # hooks and plugins
    "PROJECT_NAME": "broker.hookspecs",
    "hookimpl": "broker.hookspecs",
    "Protocol": "broker.hookspecs",
    "Page": "broker.hookspecs",
    "ClientFile": "broker.hookspecs",
    "XMLEdit": "broker.hookspecs",
    "XMLOption": "broker.hookspecs",
    "OpenOption": "broker.hookspecs",
    "PluginContext": "broker.plugins",
    "PluginError": "broker.errors",
    "PluginManager": "broker.plugins",
    # domain XML
    "EditOptions": "broker.xml",
    "EditError": "broker.xml",
    "ConsoleEdit": "broker.xml",
    "Slot": "broker.xml",
    "Compare": "broker.xml",
    "DeviceRef": "broker.xml",
    "Platform": "broker.xml",
    "DomainCapabilities": "broker.xml",
    "ConsoleRecord": "broker.xml",
    "load_fragment": "broker.xml",
    "graphics_for_mode": "broker.xml",
    "input_slot": "broker.xml",
    "read_consoles": "broker.xml",
    # console pages and their assets
    "HTML": "broker.assets",
    "assets_dir": "broker.assets",
    "content_type": "broker.assets",
    "package_file": "broker.assets",
    # sessions
    "Session": "broker.service",
    "SessionHandler": "broker.service",
    "SessionGroup": "broker.service",
    "Endpoint": "broker.service",
    "EndpointRequest": "broker.service",
    "MessageChannel": "broker.service",
    "ClientChannel": "broker.service",
    "WebSocketChannel": "broker.service",
    "TunnelChannel": "broker.service",
    "Claims": "broker.tokens",
    "Traffic": "broker.service",
    "Seat": "broker.service",
    "Viewer": "broker.service",
    "PresenceState": "broker.service",
    "ClientClosed": "broker.service",
    "pump": "broker.service",
    "PumpEnd": "broker.service",
    "DEFAULT_READ_SIZE": "broker.service",
    "raw_proxy": "broker.service",
    # refusals
    "Refused": "broker.service",
    "Refusal": "broker.service",
    "PLUGIN_CODES": "broker.service",
    "CLIENT_PROTOCOL_ERROR": "broker.service._refusals",
    "CONSOLE_PROTOCOL_ERROR": "broker.service._refusals",
    "CONSOLE_AUTH_FAILED": "broker.service._refusals",
    "CONSOLE_UNREACHABLE": "broker.service._refusals",
    "VIEW_ONLY_UNSUPPORTED": "broker.service._refusals",
    # TLS to a console
    "ConsoleTLS": "broker.service",
    "tls_error": "broker.service._tls",
    # native clients through the CONNECT listener
    "handle_for_token": "broker.service._connect",
    "token_for_handle": "broker.service._connect",
    "TLS_PORT": "broker.service._connect",
    "PLAIN_PORT": "broker.service._connect",
    # native clients: console-broker open
    "NativeClient": "broker.native",
    "OpenError": "broker.native",
    "LocalListener": "broker.native",
    "BridgeEnd": "broker.native",
    # recordings
    "RecordingKind": "broker.recordings",
    "PartFile": "broker.recordings",
    "new_recording_id": "broker.recordings",
    # host checks
    "Finding": "broker.checks",
    "QemuConf": "broker.checks",
    # configuration and commands
    "Config": "broker.config",
    "ConfigError": "broker.config",
    "ConfigTable": "broker.config",
    "setting": "broker.config",
    "Check": "broker.config",
    "at_least": "broker.config",
    "one_of": "broker.config",
    "tcp_port": "broker.config",
    "not_empty": "broker.config",
    "read_config": "broker.configfile",
    "load_config": "broker.config",
    "CommandError": "broker.errors",
    "EXIT_USAGE": "broker.errors",
}

__all__ = [
    "CLIENT_PROTOCOL_ERROR",
    "CONSOLE_AUTH_FAILED",
    "CONSOLE_PROTOCOL_ERROR",
    "CONSOLE_UNREACHABLE",
    "DEFAULT_READ_SIZE",
    "EXIT_USAGE",
    "HTML",
    "PLAIN_PORT",
    "PLUGIN_CODES",
    "PROJECT_NAME",
    "TLS_PORT",
    "VIEW_ONLY_UNSUPPORTED",
    "BridgeEnd",
    "Check",
    "Claims",
    "ClientChannel",
    "ClientClosed",
    "ClientFile",
    "CommandError",
    "Compare",
    "Config",
    "ConfigError",
    "ConfigTable",
    "ConsoleEdit",
    "ConsoleRecord",
    "ConsoleTLS",
    "DeviceRef",
    "DomainCapabilities",
    "EditError",
    "EditOptions",
    "Endpoint",
    "EndpointRequest",
    "Finding",
    "LocalListener",
    "MessageChannel",
    "NativeClient",
    "OpenError",
    "OpenOption",
    "Page",
    "PartFile",
    "Platform",
    "PluginContext",
    "PluginError",
    "PluginManager",
    "PresenceState",
    "Protocol",
    "PumpEnd",
    "QemuConf",
    "RecordingKind",
    "Refusal",
    "Refused",
    "Seat",
    "Session",
    "SessionGroup",
    "SessionHandler",
    "Slot",
    "Traffic",
    "TunnelChannel",
    "Viewer",
    "WebSocketChannel",
    "XMLEdit",
    "XMLOption",
    "assets_dir",
    "at_least",
    "content_type",
    "graphics_for_mode",
    "handle_for_token",
    "hookimpl",
    "input_slot",
    "load_config",
    "load_fragment",
    "new_recording_id",
    "not_empty",
    "one_of",
    "package_file",
    "pump",
    "raw_proxy",
    "read_config",
    "read_consoles",
    "setting",
    "tcp_port",
    "tls_error",
    "token_for_handle",
]

if not TYPE_CHECKING:  # type checkers see the imports above, and no other name

    def __getattr__(name: str) -> Any:
        """Import *name* from its module of the core, once (PEP 562)."""
        try:
            source = _SOURCES[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(source), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
