"""``console-broker open``: a native client on the user's machine, over the broker's WebSocket.

Theory of operation. The command runs where the user sits, not on the hypervisor: it
has a console URL (or a base URL and ``--token``), no configuration, no libvirt, no
key. It finds the protocol (the URL's path, else the token's unverified ``proto``
claim), builds a :class:`NativeClient` and runs the protocol's
:meth:`~broker.hookspecs.Protocol.open_client` in an anyio event loop. The core names
no protocol: what a native client of a protocol is (a local port a VNC viewer connects
to, a SPICE session of several channels, a terminal) is the plugin's. The core gives
it the means every one needs:

- :meth:`NativeClient.connect`: the broker's WebSocket endpoint, as a browser page
  would open it (the protocol's subprotocols, the broker's own origin, TLS verified
  with the system's trust store or ``--ca``), with the broker's refusal in one line;
- :meth:`NativeClient.local_listener` and :meth:`NativeClient.bridge`: a local TCP
  port, and bytes both ways between one of its connections and one WebSocket;
- :meth:`NativeClient.run_viewer`: the protocol's viewer (or ``--viewer``), ended
  with the command;
- :meth:`NativeClient.close_text` and :meth:`NativeClient.status`: what happened, in
  words, on stderr.

Nothing on this path imports libvirt, lxml, cryptography, PyJWT or prometheus_client:
a client-only install has none of them. :class:`OpenError` is the one-line error the
command prints (``console-broker: error: LINE``, exit status 1).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import enum
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import anyio.abc
import attrs

from broker.errors import EXIT_USAGE, CommandError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from broker.hookspecs import OpenOption, Protocol

__all__ = [
    "BridgeEnd",
    "LocalListener",
    "NativeClient",
    "OpenError",
    "Target",
    "parse_listen",
    "parse_target",
    "register",
    "token_protocol",
]

#: Largest WebSocket message accepted from the broker (it sends at most
#: ``proxy.read_size``, 256 KiB by default, in one).
MAX_MESSAGE = 16 * 1024 * 1024
#: Largest read from a local connection: one WebSocket message.
READ_SIZE = 65536
#: Seconds the broker has to answer the WebSocket handshake.
OPEN_TIMEOUT = 20.0
#: The close codes of the core's refusals before a session (a broker with
#: ``http.refusals = "close"`` upgrades and closes with one; plugins' codes start at 4100).
REFUSED_BEFORE_A_SESSION = range(4000, 4100)
#: Exit status after Ctrl+C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130

_PROTOCOL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_ROUTES = ("console", "ws", "file")


class OpenError(Exception):
    """What ``console-broker open`` tells the user when it cannot go on: one line,
    printed as ``console-broker: error: LINE`` (exit status 1, no traceback)."""


# --- what the command line names ---------------------------------------------------------


@attrs.frozen
class Target:
    """The console a URL (and ``--token``) names."""

    #: The broker's public URL, ``http(s)://host[:port][/prefix]``, no trailing slash.
    base_url: str
    protocol: str
    token: str = attrs.field(repr=False)


def token_protocol(token: str) -> str:
    """The ``proto`` claim of *token*, read without verifying it (the broker verifies);
    :class:`OpenError` when it is no token or has none."""
    if not _TOKEN.match(token):
        raise OpenError("the token is not a console token (three base64url parts)")
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        raise OpenError("the token's claims cannot be read") from None
    protocol = claims.get("proto") if isinstance(claims, dict) else None
    if not isinstance(protocol, str) or not _PROTOCOL.match(protocol):
        raise OpenError("the token names no protocol (its proto claim)")
    return protocol


def parse_target(url: str, token: str | None = None) -> Target:
    """The console *url* names: a page, WebSocket or file URL as ``console-broker token``
    prints it (``https://host/console/vnc/?token=T``, ``wss://host/ws/vnc?token=T``,
    under any path prefix), or the broker's base URL with *token* (``--token``), whose
    ``proto`` claim then names the protocol. :class:`OpenError` for what cannot be one."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise OpenError(f"the URL is malformed: {exc}") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise OpenError(
            "the URL must be the broker's: https://, http://, wss:// or ws:// and a host"
        )
    if parts.username is not None or parts.password is not None:
        raise OpenError("the URL must not carry a user name or password")
    segments = parts.path.rstrip("/").split("/")
    protocol: str | None = None
    prefix = parts.path.rstrip("/")
    if len(segments) >= 3 and segments[-2] in _ROUTES and _PROTOCOL.match(segments[-1]):
        protocol = segments[-1]
        prefix = "/".join(segments[:-2])
    try:
        query = parse_qs(parts.query, max_num_fields=16)
    except ValueError:
        raise OpenError("the URL's query has too many fields") from None
    in_url = query.get("token", [])
    if len(in_url) > 1:
        raise OpenError("the URL carries more than one token")
    if in_url and token is not None and in_url[0] != token:
        raise OpenError("the URL carries a token already: leave out --token")
    token = token if token is not None else (in_url[0] if in_url else None)
    if not token:
        raise OpenError(
            "no token: give the console URL with its ?token=..., or the broker's URL "
            "and --token TOKEN"
        )
    claimed = None
    if protocol is None:
        claimed = token_protocol(token)
    else:
        try:
            claimed = token_protocol(token)
        except OpenError:
            claimed = None  # the broker will say what is wrong with it
    if protocol is not None and claimed is not None and claimed != protocol:
        raise OpenError(f"the token is for protocol {claimed!r}, the URL for {protocol!r}")
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return Target(f"{scheme}://{netloc}{prefix}", protocol or str(claimed), token)


def parse_listen(text: str) -> tuple[str, int]:
    """``--listen [HOST:]PORT`` (``5900``, ``127.0.0.1:5900``, ``[::1]:5900``): the
    host (default 127.0.0.1) and port; ValueError saying what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:PORT")
    if not host:
        raise ValueError(f"{text!r}: no host before the ':'")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _listen_argument(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _where(url: str) -> str:
    """``host:port`` of *url*, the default port filled in."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- what open_client gets ------------------------------------------------------------------


class BridgeEnd(enum.StrEnum):
    """How :meth:`NativeClient.bridge` ended."""

    #: The local side ended (the viewer disconnected); the WebSocket was closed.
    LOCAL = "local"
    #: The broker closed the WebSocket (or the link to it was lost); the local
    #: connection was closed. :meth:`NativeClient.close_text` says why.
    BROKER = "broker"


@attrs.frozen
class LocalListener:
    """A TCP listener on the user's machine (``--listen``, else a free port on
    127.0.0.1) for a viewer to connect to; an async context manager that closes it."""

    listener: anyio.abc.SocketListener
    #: Where a viewer on this machine connects: the address listened on (loopback for
    #: a wildcard address).
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def accept(self) -> anyio.abc.SocketStream:
        """The next connection."""
        return await self.listener.accept()

    async def serve(
        self,
        handler: Callable[[anyio.abc.SocketStream], Awaitable[Any]],
        task_group: anyio.abc.TaskGroup | None = None,
    ) -> None:
        """Call *handler* in a task of its own for every connection, until cancelled."""
        await self.listener.serve(handler, task_group)

    async def aclose(self) -> None:
        await self.listener.aclose()

    async def __aenter__(self) -> LocalListener:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()


def _ends_local(exc: BaseException) -> bool:
    return isinstance(
        exc, anyio.EndOfStream | anyio.BrokenResourceError | anyio.ClosedResourceError | OSError
    )


@attrs.define(kw_only=True)
class NativeClient:
    """What ``console-broker open`` hands a protocol's ``open_client``: the console it
    names, the command's options, and the means to bridge a native client to it.

    Built by the command (a test builds one with the same keywords)."""

    #: The protocol's name (the token's ``proto`` claim).
    protocol: str
    #: The token (a secret: never print or log it).
    token: str = attrs.field(repr=False)
    #: The broker's public URL, ``http(s)://host[:port][/prefix]``, no trailing slash.
    base_url: str
    #: The values of the protocol's ``open_options``, keyed by flag without its dashes
    #: (``-`` as ``_``): True/False for a switch, the value or None for the others.
    options: Mapping[str, object] = attrs.field(factory=dict)
    #: ``--viewer CMD``: a command template with ``{host}``, ``{port}``, ``{file}``.
    viewer: str | None = None
    #: False with ``--no-viewer``: the user connects a viewer of their own.
    start_viewer: bool = True
    #: ``--listen [HOST:]PORT``, or None (a free port on 127.0.0.1).
    listen: tuple[str, int] | None = None
    #: ``--ca FILE``: the CA the broker's certificate is verified with (else the
    #: system's trust store).
    ca: str | None = None
    #: The WebSocket subprotocols :meth:`connect` offers (the protocol's).
    subprotocols: tuple[str, ...] = ("binary",)
    #: close code -> (reason, text) of the core's and the loaded plugins' refusals.
    refusals: Mapping[int, Sequence[tuple[str, str]]] = attrs.field(factory=dict)
    _viewers: list[anyio.abc.Process] = attrs.field(factory=list, init=False)
    _ssl: ssl.SSLContext | None = attrs.field(default=None, init=False)

    @property
    def websocket_url(self) -> str:
        """``ws(s)://host[:port][/prefix]/ws/{protocol}?token=T``."""
        scheme, rest = self.base_url.split("://", 1)
        ws = "wss" if scheme == "https" else "ws"
        return f"{ws}://{rest}/ws/{self.protocol}?token={quote(self.token, safe='')}"

    @property
    def origin(self) -> str:
        """The origin of :attr:`base_url`, which the broker allows by default."""
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def broker_address(self) -> str:
        """``host:port`` of the broker (as the URL names it)."""
        return _where(self.base_url)

    # --- the broker's WebSocket -------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(cafile=self.ca)
            except (OSError, ssl.SSLError) as exc:
                why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
                raise OpenError(f"--ca {self.ca}: cannot load it: {why}") from None
        return self._ssl

    async def connect(self) -> ClientConnection:
        """A new WebSocket to the broker's endpoint for the token: the protocol's
        subprotocols offered, ``Origin`` the broker's own, TLS verified (``--ca`` or the
        system's trust store). :class:`OpenError` with the broker's answer when it
        refuses (``the broker refused the token: token already used (401)``), when it
        cannot be reached, or when its certificate does not verify."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
        from websockets.typing import Origin, Subprotocol

        import broker

        secure = self.base_url.startswith("https://")
        where = self.broker_address
        try:
            return await connect(
                self.websocket_url,
                subprotocols=[Subprotocol(p) for p in self.subprotocols],
                origin=Origin(self.origin),
                ssl=self._tls() if secure else None,
                max_size=MAX_MESSAGE,
                compression=None,
                open_timeout=OPEN_TIMEOUT,
                user_agent_header=f"console-broker/{broker.__version__} open",
            )
        except InvalidStatus as exc:
            body = bytes(exc.response.body or b"")
            raise OpenError(_refused(exc.response.status_code, body)) from None
        except ssl.SSLCertVerificationError as exc:
            trust = f"the CA in --ca {self.ca}" if self.ca else "the system's trust store"
            raise OpenError(
                f"the broker's certificate at {where} does not verify against {trust}: "
                f"{exc.verify_message or exc.reason}; pass --ca FILE with the CA that "
                "signed it"
            ) from None
        except ssl.SSLError as exc:
            raise OpenError(f"TLS with the broker at {where} failed: {exc.reason or exc}") from None
        except TimeoutError:
            raise OpenError(
                f"cannot reach the broker at {where}: no answer within {OPEN_TIMEOUT:g} s"
            ) from None
        except OSError as exc:
            raise OpenError(f"cannot reach the broker at {where}: {_why(exc)}") from None
        except InvalidURI:  # its text quotes the URL, and so the token
            raise OpenError("the WebSocket URL is malformed") from None
        except InvalidHandshake as exc:
            raise OpenError(
                f"the server at {where} did not answer as a console broker: {exc}"
            ) from None

    def close_text(self, ws: ClientConnection) -> str:
        """How the broker ended *ws*, in words: ``the console closed: vm_stopped (4100):
        VM stopped``; a refusal before the session (``http.refusals = "close"``) as
        :meth:`connect` says one: ``the broker refused the token: token already used
        (4004)``."""
        code, reason = ws.close_code, ws.close_reason or ""
        if code is None or code == 1006:
            return "the connection to the broker was lost (no close frame)"
        known = self.refusals.get(code, ())
        match = next((r for r in known if r[1] == reason), known[0] if known else None)
        if REFUSED_BEFORE_A_SESSION.start <= code < REFUSED_BEFORE_A_SESSION.stop:
            # the broker upgraded only to say why it refuses (http.refusals = "close")
            return _refused_words(reason or (match[1] if match else ""), code)
        if match is None:
            return f"the console closed with code {code}: {reason or 'no reason given'}"
        return f"the console closed: {match[0]} ({code}): {reason or match[1]}"

    # --- the local side -----------------------------------------------------------------

    async def local_listener(self) -> LocalListener:
        """A TCP listener on ``--listen``, else on a free port of 127.0.0.1."""
        host, port = self.listen or ("127.0.0.1", 0)
        try:
            multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise OpenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        first, *others = multi.listeners
        for other in others:  # a name with several addresses: keep one, the one printed
            await other.aclose()
        assert isinstance(first, anyio.abc.SocketListener)
        bound = first.extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
        ip = ipaddress.ip_address(str(bound[0]).partition("%")[0])
        address = str(ip)
        if not ip.is_loopback:
            self.status(
                f"listening on {host}:{bound[1]}, beyond this machine: whoever reaches it "
                "gets the console"
            )
        if ip.is_unspecified:  # a viewer here connects to loopback
            address = "::1" if ip.version == 6 else "127.0.0.1"
        return LocalListener(first, address, int(bound[1]))

    async def bridge(self, stream: anyio.abc.ByteStream, ws: ClientConnection) -> BridgeEnd:
        """Bytes both ways between a local *stream* and *ws*'s binary messages, until
        either side ends; then the other is closed. Backpressure both ways: a slow
        viewer stops the reads from the broker (websockets' bounded queue), a slow
        broker the reads from the viewer."""
        from websockets.exceptions import ConnectionClosed

        ended: list[BridgeEnd] = []

        async def to_broker() -> None:
            try:
                while True:
                    await ws.send(await stream.receive(READ_SIZE))
            except ConnectionClosed:
                ended.append(BridgeEnd.BROKER)
            except Exception as exc:
                if not _ends_local(exc):
                    raise
                ended.append(BridgeEnd.LOCAL)
            group.cancel_scope.cancel()

        async def to_client() -> None:
            try:
                async for message in ws:
                    await stream.send(message if isinstance(message, bytes) else message.encode())
                ended.append(BridgeEnd.BROKER)
            except ConnectionClosed:
                ended.append(BridgeEnd.BROKER)
            except Exception as exc:
                if not _ends_local(exc):
                    raise
                ended.append(BridgeEnd.LOCAL)
            group.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(to_broker)
                group.start_soon(to_client)
        finally:
            with anyio.CancelScope(shield=True):
                if not ended or ended[0] is BridgeEnd.LOCAL:
                    with anyio.move_on_after(2):
                        await ws.close()
                await stream.aclose()
        return ended[0]

    # --- the viewer ------------------------------------------------------------------------

    async def run_viewer(
        self, default: Sequence[str], package: str, **fields: object
    ) -> anyio.abc.Process | None:
        """Start the viewer: ``--viewer``'s template, else *default* (the protocol's
        argv), every argument formatted with *fields* (``host``, ``port``, ``file``).
        With ``--no-viewer``, say what to connect a viewer to and return None. The
        viewer is terminated when the command ends. :class:`OpenError` when it is not
        installed (*package*: the Debian package of the default viewer)."""
        template = self._viewer_template(default)
        try:
            argv = [part.format_map(fields) for part in template]
        except (KeyError, IndexError, ValueError) as exc:
            names = ", ".join(f"{{{name}}}" for name in fields)
            raise OpenError(f"--viewer: cannot fill in {exc}: it may use {names}") from None
        if not self.start_viewer:
            shown = shlex.join([part.format_map(fields) for part in default])
            self.status(f"no viewer started: connect one yourself, e.g. {shown}")
            return None
        program = self.check_viewer(default, package)
        try:
            process = await anyio.open_process(
                [program or argv[0], *argv[1:]], stdin=subprocess.DEVNULL, stdout=None,
                stderr=None,
            )
        except OSError as exc:
            raise OpenError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        self._viewers.append(process)
        return process

    def _viewer_template(self, default: Sequence[str]) -> list[str]:
        try:
            template = shlex.split(self.viewer) if self.viewer is not None else list(default)
        except ValueError as exc:
            raise OpenError(f"--viewer: {exc}") from None
        if not template:
            raise OpenError("--viewer is empty")
        return template

    def check_viewer(self, default: Sequence[str], package: str) -> str | None:
        """The program :meth:`run_viewer` would start (``--viewer``'s, else *default*'s),
        found on ``PATH``; None with ``--no-viewer``. :class:`OpenError` when it is not
        installed: call it before :meth:`connect` uses the token up."""
        if not self.start_viewer:
            return None
        name = self._viewer_template(default)[0]
        program = shutil.which(name)
        if program is not None:
            return program
        if self.viewer is not None:
            raise OpenError(f"--viewer: {name} not found (not installed, or not on PATH)")
        raise OpenError(f"{name} not found: install the Debian package {package}, or pass --viewer")

    async def end_viewers(self) -> None:
        """Terminate the viewers :meth:`run_viewer` started that still run (SIGTERM,
        SIGKILL after 5 s); the command calls it when ``open_client`` returns."""
        with anyio.CancelScope(shield=True):
            for process in self._viewers:
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(5):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            self._viewers.clear()

    def status(self, text: str) -> None:
        """One line on stderr: ``console-broker: TEXT``."""
        line = " ".join(str(text).split())
        print(f"console-broker: {line}", file=sys.stderr, flush=True)


def _why(exc: OSError) -> str:
    """An OSError's reason in words (asyncio's connect error says only which address)."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return exc.strerror or str(exc) or type(exc).__name__
    return os.strerror(exc.errno)


def _refused_words(text: str, code: int) -> str:
    words = " ".join(text.split())[:200] or "no reason given"
    what = "the token" if "token" in words.lower() else "the console"
    return f"the broker refused {what}: {words} ({code})"


def _refused(status: int, body: bytes) -> str:
    """The broker's answer to a refused handshake, in one line."""
    text = body.decode("utf-8", "replace")
    return _refused_words(re.sub(r"<[^>]*>", " ", text), status)  # a front's HTML page


# --- the command ---------------------------------------------------------------------------

_DESCRIPTION = """\
Open a console on this machine with a native client, over the broker's WebSocket:
the URL is the console page or WebSocket URL that `console-broker token` (or a control
plane) prints, https://host[:port][/prefix]/console/PROTOCOL/?token=T or
wss://host[:port][/prefix]/ws/PROTOCOL?token=T, also under a front door's
/n/NODE/ prefix; or the broker's base URL with --token T (the protocol is then the
token's). What happens is the protocol's: a VNC or SPICE console starts remote-viewer on
a local port bridged to the broker, a serial console runs in this terminal.

The token is single use: each run needs a fresh one. Nothing but the broker's URL is
needed here (no configuration, no libvirt)."""

_EPILOG = """\
examples:
  console-broker open 'https://consoles.example.com/console/vnc/?token=eyJ...'
  console-broker open 'wss://consoles.example.com/ws/spice?token=eyJ...'
  console-broker open --token eyJ... https://console.example/n/node1
  console-broker open URL --viewer 'xtigervncviewer {host}::{port}'
  console-broker open URL --no-viewer --listen 5901

exit status: 0 when the viewer or the console ended normally, 1 on an error (one line on
stderr), 130 after Ctrl+C. docs/native.md tells more."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``console-broker open``, with every loaded protocol's open options."""
    parser = subparsers.add_parser(
        "open",
        help="open a console with a native client (remote-viewer, a terminal) over its URL",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url", metavar="URL",
        help="the console's page or WebSocket URL (with ?token=), or the broker's URL and --token",
    )
    parser.add_argument(
        "--token", metavar="T",
        help="the token, for a URL without one (the protocol is read from it)",
    )
    parser.add_argument(
        "--viewer", metavar="CMD",
        help="the viewer command instead of the protocol's, a template with {host}, {port} "
        "and {file} (the connection file, where the protocol writes one); e.g. "
        "'xtigervncviewer {host}::{port}'",
    )
    parser.add_argument(
        "--no-viewer", action="store_true",
        help="start no viewer: print where to connect one, and wait for it",
    )
    parser.add_argument(
        "--listen", metavar="[HOST:]PORT", type=_listen_argument,
        help="the local address viewers connect to (default: a free port on 127.0.0.1); "
        "an address beyond loopback gives the console to whoever reaches it",
    )
    parser.add_argument(
        "--ca", metavar="FILE",
        help="verify the broker's certificate with this CA (PEM) instead of the system's "
        "trust store",
    )
    owners = _add_protocol_options(parser)
    parser.set_defaults(func=_open_command, open_option_owners=owners)


def _dest(protocol: str, option: OpenOption) -> str:
    return f"open_option__{protocol}__{option.key}"


def _add_protocol_options(parser: argparse.ArgumentParser) -> dict[str, tuple[str, OpenOption]]:
    """Every loaded protocol's open options, in a group per protocol; dest -> owner.
    With plugins that cannot be loaded, none: running the command reports why."""
    from broker.plugins import PluginError, PluginManager

    try:
        manager = PluginManager()
    except PluginError:
        return {}
    owners: dict[str, tuple[str, OpenOption]] = {}
    for name, (_plugin, protocol) in sorted(manager.protocols.items()):
        if not protocol.open_options:
            continue
        group = parser.add_argument_group(f"{name} options")
        for option in protocol.open_options:
            dest = _dest(name, option)
            text = f"{option.help} ({name})"
            if option.metavar:
                group.add_argument(option.flag, dest=dest, metavar=option.metavar, help=text)
            else:
                group.add_argument(
                    option.flag, dest=dest, action="store_const", const=True, help=text
                )
            owners[dest] = (name, option)
    return owners


def _options(
    args: argparse.Namespace, protocol: Protocol, owners: Mapping[str, tuple[str, OpenOption]]
) -> dict[str, object]:
    """The protocol's open options' values; a flag of another protocol is a usage error."""
    values: dict[str, object] = {}
    for dest, (owner, option) in owners.items():
        value = getattr(args, dest, None)
        if owner != protocol.name:
            if value is not None:
                raise CommandError(
                    f"{option.flag} is an option of {owner} consoles, and this is a "
                    f"{protocol.name} console",
                    EXIT_USAGE,
                )
            continue
        values[option.key] = bool(value) if not option.metavar else value
    return values


def _refusal_table(refusals: Sequence[Any]) -> dict[int, list[tuple[str, str]]]:
    table: dict[int, list[tuple[str, str]]] = {}
    for refusal in refusals:
        table.setdefault(refusal.close_code, []).append((refusal.reason, refusal.text))
    return table


def prepare(args: argparse.Namespace) -> tuple[Protocol, NativeClient]:
    """The protocol and the :class:`NativeClient` the parsed command line asks for."""
    from broker.plugins import PluginManager
    from broker.service._refusals import CORE_REFUSALS

    target = parse_target(args.url, args.token)
    manager = PluginManager()
    if target.protocol not in manager.protocols:
        known = ", ".join(sorted(manager.protocols)) or "none"
        raise OpenError(
            f"no loaded plugin serves protocol {target.protocol!r} (loaded: {known})"
        )
    protocol = manager.protocols[target.protocol][1]
    owners = getattr(args, "open_option_owners", {})
    if args.viewer is not None and args.no_viewer:
        raise CommandError("--viewer and --no-viewer exclude each other", EXIT_USAGE)
    refusals = [*CORE_REFUSALS, *(r for _plugin, r in manager.refusals.values())]
    client = NativeClient(
        protocol=target.protocol,
        token=target.token,
        base_url=target.base_url,
        options=_options(args, protocol, owners),
        viewer=args.viewer,
        start_viewer=not args.no_viewer,
        listen=args.listen,
        ca=args.ca,
        subprotocols=protocol.subprotocols,
        refusals=_refusal_table(refusals),
    )
    return protocol, client


#: Signals that end the command as Ctrl+C does (exit status 128 + the signal's number).
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def run_client(protocol: Protocol, client: NativeClient) -> int:
    """``protocol.open_client(client)``; its viewers end with it. SIGTERM or SIGHUP
    cancel it (its ``finally`` blocks run) and make the status 128 + the signal's number;
    a protocol watching these signals itself has them while it does."""
    status: list[int] = []

    async def main(group: anyio.abc.TaskGroup) -> None:
        status.append(int(await protocol.open_client(client)))
        group.cancel_scope.cancel()

    async def watch(
        group: anyio.abc.TaskGroup, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with anyio.open_signal_receiver(*ENDING_SIGNALS) as signals:
            task_status.started()
            async for number in signals:
                client.status(f"ended by {signal.Signals(number).name}")
                status.append(128 + number)
                group.cancel_scope.cancel()
                return

    try:
        async with anyio.create_task_group() as group:
            if sys.platform != "win32":
                await group.start(watch, group)
            group.start_soon(main, group)
    finally:
        await client.end_viewers()
    return status[0]


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _open_command(args: argparse.Namespace) -> int:
    try:
        protocol, client = prepare(args)
        try:
            return anyio.run(run_client, protocol, client)
        except BaseExceptionGroup as group:  # an OpenError from a task of open_client's
            leaves = _leaves(group)
            if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
                raise KeyboardInterrupt from None
            first = next((leaf for leaf in leaves if isinstance(leaf, OpenError)), None)
            if first is None:
                raise
            raise first from None
    except OpenError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # a new line after the terminal's ^C
        return EXIT_INTERRUPTED
