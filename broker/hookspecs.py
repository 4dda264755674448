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

Hooks are for discovery: what a plugin serves (:class:`Protocol` objects, XML
edits, refusal reasons, configuration tables, a service, commands). What a
protocol *does* is its :class:`Protocol` object's: the core asks only the object
the owning plugin declared, with that plugin's
:class:`~broker.plugins.PluginContext`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

if TYPE_CHECKING:
    import argparse
    from contextlib import AbstractAsyncContextManager

    from broker.checks import Finding
    from broker.config import ConfigTable
    from broker.native import NativeClient
    from broker.plugins import PluginContext
    from broker.recordings import RecordingKind
    from broker.service import ConsoleTLS, Endpoint, EndpointRequest, Refusal, SessionHandler
    from broker.xml import ConsoleEdit, EditOptions

#: The pluggy project name and the entry-point group plugins register under.
PROJECT_NAME = "console_broker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function as an implementation of one of the hooks below.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


_PROTOCOL_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
#: The ways a protocol's console endpoint is reached (:attr:`Protocol.endpoint`).
ENDPOINTS = ("console", "plugin", "none")
#: The core's own token purpose that is no console protocol: a token whose protocol claim
#: is ``screenshot`` grants one screenshot of its domain's screen (``GET /screenshot``,
#: docs/service.md), and nothing else. No plugin may declare a protocol of this name.
SCREENSHOT = "screenshot"
#: The core's own token purpose of the operator page (``GET /operator/``, docs/tokens.md):
#: a token whose protocol claim is ``operator`` opens the page's session, lists the
#: node's domains and has the broker mint console tokens; it opens no console itself.
#: No plugin may declare a protocol of this name.
OPERATOR = "operator"


def _check_protocol_name(_instance: object, _attribute: object, value: str) -> None:
    if not _PROTOCOL_NAME.fullmatch(value):
        raise ValueError(
            f"protocol name {value!r} must be lower-case ASCII letters, digits and '-'"
        )


def _names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


def _xml_options(options: Iterable[XMLOption]) -> tuple[XMLOption, ...]:
    return tuple(options)


def _open_options(options: Iterable[OpenOption]) -> tuple[OpenOption, ...]:
    return tuple(options)


#: The flags ``console-broker open`` has of its own: no protocol's
#: :attr:`Protocol.open_options` may take one.
OPEN_FLAGS = ("--token", "--viewer", "--no-viewer", "--listen", "--ca", "--help")
_OPEN_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*\Z")


@attrs.frozen
class OpenOption:
    """A flag a protocol adds to ``console-broker open`` (serial's ``--take``, say),
    declared with the protocol (:attr:`Protocol.open_options`).

    The command offers the flags of every loaded protocol, their help suffixed with the
    protocol's name; the protocol's :meth:`Protocol.open_client` reads the values in
    ``client.options``, keyed by the flag without its dashes and with ``_`` for ``-``
    (``--read-only`` is ``options["read_only"]``). Two protocols declaring one flag,
    or a flag of the command's own (:data:`OPEN_FLAGS`), is a load error.
    """

    #: ``--lower-case-words``.
    flag: str = attrs.field()
    #: One sentence for ``--help``.
    help: str
    #: Empty: a switch (its value is True or False). Else the flag takes a value (a
    #: ``str``, None when not given), shown as this name in ``--help``.
    metavar: str = ""

    @flag.validator
    def _check_flag(self, _attribute: object, value: str) -> None:
        if not _OPEN_FLAG.match(value):
            raise ValueError(f"open option flag {value!r} must be --lower-case-words")

    @property
    def key(self) -> str:
        """Its key in ``NativeClient.options``: ``--read-only`` is ``read_only``."""
        return self.flag[2:].replace("-", "_")


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
    #: The plugin gates its sessions' input by their presence: it drops a session's
    #: input while ``session.may_input`` is false (``session.seat``, read as each
    #: message is filtered), as it drops a view-only session's. Then the console's
    #: input may be ``single`` (:meth:`input_mode`: one session at a time, which takes
    #: it over or releases it), and its pages may open the control channel
    #: ``/ws/{protocol}/control`` (presence and "Take control"; docs/service.md).
    presence: bool = False
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
    #: A token of this protocol also grants a screenshot of its domain's screen
    #: (``GET /screenshot?token=``), view rights being enough: for protocols that show
    #: the VM's display (VNC, SPICE). The screenshot is the core's, through libvirt,
    #: whatever the protocol; the token is used up by it as by a session.
    screenshots: bool = False

    #: How a session's console endpoint is reached: ``console`` (the core opens the
    #: domain's console that ``xml enable`` recorded under :attr:`console`: a graphics
    #: socket or a serial stream), ``plugin`` (the core calls :meth:`open_endpoint`),
    #: or ``none`` (no endpoint: ``session.endpoint`` is None; the plugin talks to the
    #: VM some other way, through ``session.domain_handle`` say). Whichever it is, the
    #: core's admission, limits and lifecycle are the same: a session closes with
    #: ``vm_stopped`` (4100) when its VM stops.
    endpoint: str = attrs.field(default="console", validator=attrs.validators.in_(ENDPOINTS))
    #: The session handler, for a protocol that needs nothing else from its plugin's
    #: context; :meth:`session_handler` returns it (or :func:`broker.service.raw_proxy`).
    handler: SessionHandler | None = attrs.field(default=None, eq=False, repr=False)
    #: Options of its XML edit (:class:`XMLOption`), which ``xml enable``
    #: offers as ``--option NAME=VALUE`` (and their own flags) and the libvirt hook's
    #: policy takes: SPICE's ``spice.tls`` and ``spice.usbredir``.
    xml_options: tuple[XMLOption, ...] = attrs.field(default=(), converter=_xml_options)
    #: Flags the protocol adds to ``console-broker open`` (:class:`OpenOption`), which
    #: its :meth:`open_client` reads in ``client.options``.
    open_options: tuple[OpenOption, ...] = attrs.field(default=(), converter=_open_options)

    def __attrs_post_init__(self) -> None:
        if not self.console:
            object.__setattr__(self, "console", self.name)
        else:
            _check_protocol_name(None, None, self.console)

    # --- behaviour: a plugin subclasses Protocol and overrides what it serves ---------
    # The core asks only the protocol's own object; each method gets the owning plugin's
    # :class:`broker.plugins.PluginContext` (its configuration table, logger, metrics).

    def session_handler(self, context: PluginContext) -> SessionHandler:
        """The coroutine function that runs one session; called once when a broker starts.

        The handler is awaited with a :class:`broker.service.Session` and the session
        lasts until it returns (see docs/plugins.md). Default: :attr:`handler`, else
        :func:`broker.service.raw_proxy`, bytes both ways unchanged. Raise
        :class:`broker.plugins.PluginError` when the configuration cannot be used: the
        broker refuses to start and says why."""
        from broker.service._session import raw_proxy

        return self.handler if self.handler is not None else raw_proxy

    def console_tls(self, context: PluginContext) -> ConsoleTLS | None:
        """How the core verifies consoles that listen for TLS on a port of their own
        (QEMU's SPICE ``tlsPort``), or None (the default). Called once when a broker
        starts. With one, the core prefers a console's TLS port in tcp mode; without
        one, a console listening for TLS only is refused (``console_unreachable``)."""
        return None

    def doctor(self, context: PluginContext) -> Iterable[Finding]:
        """``console-broker doctor``: check on this host what only this protocol knows
        (its page's browser client in the assets directory, what its consoles need of the
        hypervisor's settings), as :class:`broker.checks.Finding` values; none by default.

        Called once per run of the command, outside any event loop; keep it quick and
        bounded (no console is to be connected here: the core reaches every enabled
        domain's consoles itself). Each finding is printed under the protocol's name, a
        warning or a failure with its fix. An exception is reported as a failure naming
        the plugin, and the other checks go on."""
        return ()

    def input_mode(self, context: PluginContext) -> str:
        """How the sessions of one console share its input, for a protocol with
        :attr:`presence`: ``shared`` (the default: every full-rights session sends
        input) or ``single`` (one at a time: the holder; the others watch). Called once
        when a broker starts (the VNC and SPICE plugins read their ``input`` key)."""
        return "shared"

    def page(self, path: str, context: PluginContext) -> Page | None:
        """``GET /console/{protocol}/{path}``: the page (*path* ``""``) or one of its assets
        (never with ``..``); None: 404 (the default). Called on the broker's event loop:
        keep it quick."""
        return None

    def client_file(self, token: str, title: str, context: PluginContext) -> ClientFile | None:
        """A native client's connection file for *token* (``console-broker token``,
        ``GET /file/{protocol}``), or None (the default: no native clients)."""
        return None

    def xml_edit(self, options: EditOptions) -> ConsoleEdit | None:
        """How ``console-broker xml enable --consoles NAME`` provisions this protocol's
        console in a domain XML, or None (the default: nothing to provision)."""
        return None

    async def open_endpoint(self, request: EndpointRequest) -> Endpoint:
        """Connect the session's console, for a protocol whose :attr:`endpoint` is
        ``plugin``: a libvirt call through ``request.domain_handle``, a UNIX socket, a
        TCP address. Raise :class:`broker.service.Refused` with a reason (say
        ``console_unreachable``) when it cannot; the core closes what it returns."""
        raise NotImplementedError(f"protocol {self.name!r} opens no endpoint of its own")

    async def open_client(self, client: NativeClient) -> int:
        """``console-broker open``: bridge a native client on the user's machine to a
        console of this protocol, and return the command's exit status.

        Called on the user's machine (no broker, no configuration, no libvirt there),
        in an anyio event loop, with a :class:`broker.native.NativeClient`: the token,
        the broker's URLs, the command's options (this protocol's
        :attr:`open_options` in ``client.options``), and the means to connect the
        broker's WebSocket (``client.connect()``), listen locally, bridge bytes, start
        a viewer and say what happened. Raise :class:`broker.native.OpenError` with
        one line for the user. Default: the protocol has no native client."""
        from broker.native import OpenError

        raise OpenError(f"{self.name} has no native client")


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

    Called once when the plugins are loaded. Return a list of :class:`Protocol`
    objects (an empty list is allowed): each carries its declaration and its
    behaviour (a subclass overriding :meth:`Protocol.session_handler`,
    :meth:`Protocol.page`, ...), and the core asks only that object about its
    protocol. All results are collected; two plugins declaring the same protocol
    name is a load error naming both distributions.
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
    --defaults``, and hands it back parsed: ``context.config.table(TABLE)`` (the
    plugin's :class:`broker.plugins.PluginContext`) returns the class's instance, its
    defaults when the file has no such table.
    """


@hookspec
def console_broker_xml_edits() -> list[XMLEdit]:  # type: ignore[empty-body]
    """Declare XML console edits that are not protocols (a guest-agent channel, say).

    Called once when the plugins are loaded; all results are collected. Each
    :class:`XMLEdit` is a name ``console-broker xml enable --consoles NAME`` accepts
    beside the protocols, with no session behind it (no token is issued for it).
    A name that is a protocol's, or another plugin's edit, is a load error.
    """


@hookspec
def console_broker_refusals() -> list[Refusal]:  # type: ignore[empty-body]
    """Declare the refusal reasons this plugin's sessions may end with.

    Called once when the plugins are loaded; all results are collected. Each
    :class:`broker.service.Refusal` has a reason (a name for logs and metrics),
    a close code in the plugins' range (:data:`broker.service.PLUGIN_CODES`,
    4100-4999, minus the core's own codes) and a short text. A handler ends its
    session with one by raising :class:`broker.service.Refused`. A reason or code
    the core or another plugin declared is a load error; docs/service.md's table
    lists every loaded plugin's reasons.
    """


@hookspec
def console_broker_recording_kinds() -> list[RecordingKind]:  # type: ignore[empty-body]
    """Declare the recordings this plugin writes of its protocols' sessions.

    Called once when the plugins are loaded; all results are collected. Each
    :class:`broker.recordings.RecordingKind` names a protocol of this plugin, the
    suffix of its files, their format and content type, and the page that plays them
    back. The plugin writes the files (:class:`broker.recordings.PartFile`, in the
    layout and with the header :mod:`broker.recordings` describes); the core lists them
    (``console-broker recordings``, with a protocol column), prunes them under one
    policy (``[recordings]``), and serves them to a recording token
    (``console-broker token --recording ID``, ``GET /recording``). A protocol or a
    suffix two kinds declare, or a protocol another plugin serves, is a load error.
    """


@hookspec
def console_broker_service(context: PluginContext) -> AbstractAsyncContextManager[None] | None:
    """A service of the plugin that lives as long as the broker serves.

    Called once per plugin when ``console-broker serve`` starts, with the plugin's
    :class:`broker.plugins.PluginContext`. Return an async context manager (or
    None): the broker enters it inside its task group before it listens and exits
    it when it shuts down (a background task, a pool, a periodic job). Metrics the
    plugin registers with ``context.metric(...)`` are in ``/metrics``.
    """


_OPTION_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\.[a-z0-9][a-z0-9-]*\Z")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


@attrs.frozen
class XMLOption:
    """An option of one plugin's XML edit (SPICE's secure channels, say), declared with
    the edit (``Protocol.xml_options``, ``XMLEdit.xml_options``).

    The operator sets it with ``--option NAME=VALUE`` on ``xml enable`` and
    ``enable DOMAIN`` (or with its own :attr:`flag`), and as :attr:`policy_key` in the
    libvirt hook's policy; the core checks the value before any edit, and the edit reads
    it with ``options.value(OPTION)``. Its type is its default's: ``bool`` (``yes``,
    ``no``, ``true``, ``false``, ``on``, ``off``, ``1``, ``0``), ``int`` (within
    :attr:`minimum` and :attr:`maximum`) or ``str``.
    """

    #: ``PLUGIN.KEY`` (``spice.tls``): lower-case, one dot.
    name: str = attrs.field()
    #: One sentence for ``--help``.
    help: str
    default: bool | int | str
    #: A command-line flag of its own (``--spice-tls``): a switch for a ``bool``, else
    #: it takes the value. Empty: ``--option NAME=VALUE`` only.
    flag: str = ""
    minimum: int | None = None
    maximum: int | None = None
    #: Its key in the libvirt hook's policy; empty: :attr:`name`.
    policy_key: str = ""

    @name.validator
    def _check_name(self, _attribute: object, value: str) -> None:
        if not _OPTION_NAME.match(value):
            raise ValueError(f"XML option name {value!r} must be PLUGIN.KEY, lower-case")

    def __attrs_post_init__(self) -> None:
        if self.flag and not re.fullmatch(r"--[a-z0-9][a-z0-9-]*", self.flag):
            raise ValueError(f"XML option flag {self.flag!r} must be --lower-case-words")
        if not isinstance(self.default, bool | int | str):
            raise ValueError(f"XML option {self.name}: a default of bool, int or str")

    @property
    def key(self) -> str:
        """Its key in the libvirt hook's policy."""
        return self.policy_key or self.name

    def parse(self, raw: object) -> bool | int | str:
        """The value of *raw* (a string from the command line, or a TOML value), or
        ValueError naming the option."""
        if isinstance(self.default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError(f"{self.name}: expected yes or no, got {raw!r}")
        if isinstance(self.default, int):
            try:
                number = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(
                    str(raw).strip()
                )
            except ValueError:
                raise ValueError(f"{self.name}: expected a whole number, got {raw!r}") from None
            if (self.minimum is not None and number < self.minimum) or (
                self.maximum is not None and number > self.maximum
            ):
                raise ValueError(
                    f"{self.name}: must be between {self.minimum} and {self.maximum}"
                )
            return number
        if not isinstance(raw, str):
            raise ValueError(f"{self.name}: expected a string, got {raw!r}")
        return raw

    def text(self, value: bool | int | str) -> str:
        """*value* as ``--option`` takes it (the form ``params`` holds)."""
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)


@attrs.frozen
class XMLEdit:
    """An XML console edit that is no protocol, such as a guest-agent channel.

    ``name`` is what ``console-broker xml enable --consoles NAME`` takes, beside the
    protocols' names; no token is issued for it. Subclass it and override
    :meth:`xml_edit`.
    """

    name: str = attrs.field(validator=_check_protocol_name)
    #: A short human name.
    title: str
    #: One sentence on what it adds to a domain.
    description: str = ""
    #: Options of the edit (see :attr:`Protocol.xml_options`).
    xml_options: tuple[XMLOption, ...] = attrs.field(default=(), converter=_xml_options)

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        """How to provision it (see :meth:`Protocol.xml_edit`)."""
        raise NotImplementedError(f"XML edit {self.name!r} has no xml_edit()")


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


@hookspec
def console_broker_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add sub-commands to the ``console-broker`` command line.

    Called for every plugin when the command line is built (all
    implementations run; nothing is returned). Add a parser with
    ``subparsers.add_parser(name, help=..., description=...)`` and set its
    handler with ``parser.set_defaults(func=run)``: ``run(args)`` returns the
    exit status and may raise :class:`broker.api.CommandError` for a one-line
    error. A name the core or another plugin took already is argparse's error.
    """
