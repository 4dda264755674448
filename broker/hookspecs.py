"""The hooks a console-broker plugin implements.

A plugin is any importable object (usually a module) whose functions carry the
:data:`hookimpl` marker and are named after the hooks below. It is found
through the ``console_broker`` entry-point group::

    [project.entry-points.console_broker]
    myproto = "my_package.plugin"

The built-in ``vnc``, ``spice`` and ``serial`` plugins are registered exactly
this way. Every hook is called with keyword arguments; an implementation may
accept any subset of the arguments a hook documents. ``docs/plugins.md`` has
a section per hook with a worked example.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

if TYPE_CHECKING:
    import argparse

    from broker.config import Config, ConfigTable
    from broker.service import ConsoleTLS, SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

#: The pluggy project name and the entry-point group plugins register under.
PROJECT_NAME = "console_broker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function as an implementation of one of the hooks below.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


_PROTOCOL_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


def _check_protocol_name(_instance: object, _attribute: object, value: str) -> None:
    if not _PROTOCOL_NAME.fullmatch(value):
        raise ValueError(
            f"protocol name {value!r} must be lower-case ASCII letters, digits and '-'"
        )


def _names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


@attrs.frozen
class Protocol:
    """A console protocol a plugin serves.

    ``name`` is what operators type (``--consoles vnc,serial``) and what a
    token's protocol claim holds; it is unique across all loaded plugins.
    """

    name: str = attrs.field(validator=_check_protocol_name)
    #: A short human name, e.g. ``"VNC (RFB)"``.
    title: str
    #: One sentence on what a user gets: the clients it serves.
    description: str = ""
    #: The console of the domain a session attaches to: the name of the console
    #: record ``console-broker xml enable`` writes (``vnc`` and ``spice`` graphics,
    #: ``serial``). Empty: the protocol's own name. A ``raw-vnc`` protocol that
    #: serves a domain's VNC display says ``console="vnc"``.
    console: str = attrs.field(default="", converter=str)
    #: WebSocket subprotocols the protocol speaks, in preference order: the first
    #: one a client offers is selected; a client offering none is accepted too.
    subprotocols: tuple[str, ...] = attrs.field(default=("binary",), converter=_names)
    #: Sessions of this protocol on the same console (domain and device) share one
    #: endpoint: the broker opens it for the first session, hands the same
    #: :class:`broker.service.Endpoint` to each later one, and closes it when the
    #: last of them ends. For consoles that allow one connection at a time (a
    #: libvirt console stream); the plugin then decides who reads and writes.
    shared_console: bool = False
    #: Whether the plugin enforces view-only tokens (drops the client's input).
    #: Sessions of view-only tokens for a protocol that does not are refused
    #: (``view_only_unsupported``) rather than given full control.
    view_only: bool = False
    #: A session of this protocol is several connections with one token (SPICE opens a
    #: WebSocket per channel, each with the same URL). The first connection uses the
    #: token up and opens the session; further connections with the same token are
    #: admitted, while that first connection lives and the token has not expired, as
    #: sessions of their own that share its :class:`broker.service.SessionGroup`
    #: (``session.group``, ``session.joined``); the plugin decides what each may do.
    multi_connection: bool = False
    #: Native clients may reach sessions of this protocol through the broker's HTTP
    #: CONNECT listener (``listen.connect_port``): the CONNECT target's host is the
    #: token's session handle, and the tunnel is the session's client
    #: (a :class:`broker.service.TunnelChannel`).
    native_clients: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.console:
            object.__setattr__(self, "console", self.name)
        else:
            _check_protocol_name(None, None, self.console)


def _headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(headers)


@attrs.frozen
class Page:
    """A page or asset a plugin serves at ``/console/{protocol}/{path}``."""

    body: bytes
    #: The ``Content-Type`` header.
    content_type: str = "text/html; charset=utf-8"
    #: Further response headers (a ``Content-Security-Policy``, say).
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers)
    #: The HTTP status: 200, or an error page's (503 when what the page needs is missing).
    status: int = 200


@hookspec
def console_broker_protocols() -> list[Protocol]:  # type: ignore[empty-body]
    """Declare the console protocols this plugin serves.

    Called once when the plugins are loaded. Return a list of
    :class:`Protocol` (an empty list is allowed). All results are collected;
    two plugins declaring the same protocol name is a load error.
    """


@hookspec
def console_broker_config_tables() -> list[ConfigTable[Any]]:  # type: ignore[empty-body]
    """Declare the configuration tables this plugin reads (``[vnc]``, ``[monitor]``).

    Called once when the plugins are loaded. Return a list of
    :class:`broker.config.ConfigTable`: each names a TOML table and a frozen attrs
    class whose fields are its keys, declared with :func:`broker.config.setting`
    (default, documentation, value check, path), with optional cross-checks. All
    results are collected; a table name declared by two plugins, or by a plugin and
    the core (``broker``, ``listen``, ...), is a load error naming both.

    The core parses a plugin's table as it parses its own (unknown keys, wrong types
    and failed checks are errors naming the key and the file; relative paths are
    taken relative to the file's directory), shows it in ``console-broker config
    --defaults``, and hands it back parsed: ``config.table(TABLE)`` in any hook that
    gets the :class:`broker.config.Config` returns the class's instance, its defaults
    when the file has no such table.
    """


@hookspec(firstresult=True)
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """Say how to provision *protocol* in a libvirt domain XML.

    Called by ``console-broker xml enable`` (and ``enable DOMAIN``, the
    libvirt hook) once per protocol asked for, and by ``disable`` to find
    what to undo. Return None for protocols the plugin does not serve; the
    first non-None result wins.

    :param protocol: the protocol name, as declared by ``console_broker_protocols``.
    :param options: a :class:`broker.xml.EditOptions`: the mode (``fd``,
        ``tcp``, ``websocket``), listen address, TLS, USB redirection count
        and free-form ``--param NAME=VALUE`` settings.
    :return: a :class:`broker.xml.ConsoleEdit`: the mode actually provisioned,
        the :class:`broker.xml.Slot` list (each owns some children of
        ``<devices>`` and builds what they should become), the device the
        broker will open, settings to record, notes for the operator.
    """


@hookspec(firstresult=True)
def console_broker_session_handler(protocol: str, config: Config) -> SessionHandler | None:
    """Return the coroutine function that runs a session of *protocol*.

    Called once per declared protocol when the broker starts (``console-broker
    serve``); return None for protocols the plugin does not serve; the first
    non-None result wins. A protocol without a handler is refused
    (``unknown_protocol``).

    The handler is awaited with one :class:`broker.service.Session`: the
    client's WebSocket (``session.client``), the console endpoint already
    connected (``session.endpoint.stream``, an anyio byte stream), the token's
    claims (``session.claims``; ``session.view_only``), a structlog logger
    bound to the session (``session.log``) and ``session.open_endpoint()`` for
    further connections to the same console. The session lasts until the
    handler returns. The core owns both ends: it closes the WebSocket with the
    reason's close code and every endpoint it opened, whether the handler
    returned, raised, or was cancelled because the VM stopped, the session was
    idle too long or the broker is shutting down. Run any tasks of the session
    in a task group inside the handler.

    :func:`broker.service.pump` proxies bytes both ways with backpressure;
    :func:`broker.service.raw_proxy` is a complete handler that does just that.

    A handler ends its session with a reason of the core's table (a close code,
    docs/service.md) by raising :class:`broker.service.Refused`. An error of the
    console's stream that escapes (``anyio.EndOfStream``, ``BrokenResourceError``,
    ``ClosedResourceError``, a ``ConnectionError``, alone or in a task group) ends it as
    if the handler had returned: the console closed, or the VM stopped. Any other
    exception ends it as ``internal_error``.

    :param protocol: a protocol name declared by ``console_broker_protocols``.
    :param config: the broker's :class:`broker.config.Config` (a plugin's own table
        included: ``config.table(TABLE)``, see ``console_broker_config_tables``).
    :return: ``async def handler(session: Session) -> None``, or None.
    """


@hookspec(firstresult=True)
def console_broker_console_tls(protocol: str, config: Config) -> ConsoleTLS | None:
    """Return how the broker verifies consoles of *protocol* that listen for TLS on a
    port of their own (QEMU's SPICE ``tlsPort``), or None.

    Called once per declared protocol when the broker starts; the first non-None
    result wins. With one, the core prefers a console's TLS port (the live graphics
    element's ``tlsPort``, tcp mode): it connects there and completes the TLS
    handshake, verifying the certificate, before the session handler runs; the
    endpoint's ``kind`` is then ``tls``. Without one, a console listening for TLS
    only is refused (``console_unreachable``) with a message naming
    ``{protocol}.tls_ca``. Protocols that start TLS inside their own protocol (VNC's
    VeNCrypt) wrap ``session.endpoint.stream`` themselves instead and return None here.

    Raise :class:`broker.plugins.PluginError` when the configured files cannot be
    loaded: the broker refuses to start and says why.

    :param protocol: a protocol name declared by ``console_broker_protocols``.
    :param config: the broker's :class:`broker.config.Config`.
    :return: a :class:`broker.service.ConsoleTLS` (see ``ConsoleTLS.from_files``), or None.
    """


@hookspec(firstresult=True)
def console_broker_page(protocol: str, path: str, config: Config) -> Page | None:
    """Serve the console page of *protocol*, or one of its assets.

    Called for ``GET /console/{protocol}/{path}``: *path* is ``""`` for the
    page itself (``/console/vnc/?token=...``: the page reads the token from
    its own URL and opens ``/ws/{protocol}?token=...``) and the rest of the
    path for assets (``app.js``, ``vendor/novnc/rfb.js``; never with ``..``).
    Return None for anything the plugin does not serve: the broker answers
    404. Responses carry ``Cache-Control: no-store`` and
    ``Referrer-Policy: no-referrer`` (the page's URL holds a token).
    Called on the broker's event loop: keep it quick (read small files, no
    network).

    :param config: the broker's :class:`broker.config.Config`.
    :return: a :class:`Page`, or None.
    """


@attrs.frozen
class ClientFile:
    """A connection file for a native client (a virt-viewer ``.vv`` file, say)."""

    #: A short name: the ``--json`` key of ``console-broker token`` (``vv``).
    name: str
    #: The file's text; it holds the token (or what stands for it): treat it as secret.
    body: str
    #: The ``Content-Type`` the broker serves it with.
    content_type: str = "text/plain; charset=utf-8"
    #: The file name suffix (``.vv``).
    suffix: str = ""


@hookspec(firstresult=True)
def console_broker_client_file(
    protocol: str, token: str, title: str, config: Config
) -> ClientFile | None:
    """Build a native client's connection file for a session of *protocol* with *token*.

    Called by ``console-broker token`` (the ``--json`` output gets the file under its
    ``name``; ``--client-file FILE`` writes it) and by the broker for
    ``GET /file/{protocol}?token=TOKEN``, once it has checked the token (without using
    it up) and that its console can be reached. Return None for protocols the plugin
    does not serve, or when the broker's configuration offers native clients no way
    in; the first non-None result wins.

    :param token: the token, as issued.
    :param title: a human title for the client's window (the domain's name).
    :param config: the broker's :class:`broker.config.Config`.
    :return: a :class:`ClientFile`, or None.
    """


@hookspec
def console_broker_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add sub-commands to the ``console-broker`` command line.

    Called for every plugin when the command line is built (all
    implementations run; nothing is returned). Add a parser with
    ``subparsers.add_parser(name, help=..., description=...)`` and set its
    handler with ``parser.set_defaults(func=run)``: ``run(args)`` returns the
    exit status and may raise :class:`broker.cli.CommandError` for a one-line
    error. A name the core or another plugin took already is argparse's error.
    """
