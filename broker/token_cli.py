"""The ``keygen``, ``config`` and ``token`` commands.

``token`` resolves a domain through libvirt (:func:`resolve_domain`), checks
that a loaded plugin serves the protocol (or that it is the core's own purpose
``screenshot``), signs a token with the state directory's key and prints the console
URLs, or a screenshot token's URL (the contract in docs/tokens.md).

A control plane mints tokens for node brokers elsewhere with the same command:
``--node`` (the token's node; the domain is then a UUID and libvirt is never
asked), ``--key-dir`` (its own signing key instead of the state directory's)
and ``--public-url`` (the node's URL behind the front door). With the three,
neither libvirt nor ``broker.state_dir`` is touched, and no configuration file
is needed (``tokens.max_ttl`` and the rest then have their defaults).

The commands import the server dependencies (cryptography through :mod:`broker.keys`,
PyJWT through :mod:`broker.tokens`, libvirt) when they run, not with this module, which
``console-broker --help`` imports on a client-only install too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlencode, urlsplit, urlunsplit

import attrs
import structlog

from broker.config import (
    Config,
    ConfigError,
    find_config,
    render_defaults,
    render_markdown,
)
from broker.configfile import read_config
from broker.errors import EXIT_USAGE, CommandError
from broker.hookspecs import SCREENSHOT
from broker.plugins import PluginContext, PluginManager

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.tokens import IssuedToken

#: What each ``register`` function is given (a string: the class is generic only to mypy).
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@attrs.frozen
class DomainRef:
    """A domain as the token command names it: its UUID, and its name when known."""

    uuid: str
    name: str | None = None


def resolve_domain(uri: str, domain: str) -> DomainRef:
    """Look *domain* (a name or a UUID) up through libvirt at *uri*.

    A UUID is tried as a UUID first, then as a name (libvirt allows names that
    look like UUIDs).
    """
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise CommandError(f"cannot reach libvirt at {uri}: {exc.get_error_message()}") from None
    try:
        lookups = [conn.lookupByName]
        try:
            uuid.UUID(domain)
        except ValueError:
            pass
        else:
            lookups.insert(0, conn.lookupByUUIDString)
        for lookup in lookups:
            try:
                found = lookup(domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise CommandError(
                        f"looking up domain {domain!r} at {uri} failed: {exc.get_error_message()}"
                    ) from None
                continue
            return DomainRef(uuid=found.UUIDString(), name=found.name())
        raise CommandError(f"no domain {domain!r} at {uri}")
    finally:
        conn.close()


def uuid_only(domain: str, *, why: str = "--uuid takes a domain UUID") -> DomainRef:
    """*domain* taken as a UUID without asking libvirt (``--uuid``, ``--node``).

    *why* ends the usage error for a name: the option that asked for a UUID, and why.
    """
    try:
        return DomainRef(uuid=str(uuid.UUID(domain)))
    except ValueError:
        raise CommandError(f"{domain!r} is not a UUID ({why})", EXIT_USAGE) from None


def public_url(value: str) -> str:
    """``--public-url``: an http(s) URL with a host, no query or fragment, no user
    name; returned without a trailing slash (``argparse.ArgumentTypeError`` if not)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http:// or https:// URL with a host"
        )
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the port must be 0 to 65535") from None
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise argparse.ArgumentTypeError(f"{value!r} must not have a query or a fragment")
    if parts.username is not None or parts.password is not None:
        raise argparse.ArgumentTypeError(f"{value!r} must not carry a user name or password")
    return urlunsplit(parts).rstrip("/")  # urlsplit lower-cases the scheme


def node_name(value: str) -> str:
    """``--node``: a node name, neither empty nor with spaces or control characters."""
    if not value or not value.isprintable() or any(ch.isspace() for ch in value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a node name (non-empty, no spaces or control characters)"
        )
    return value


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped, e.g. by tests)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _log_to_stderr() -> None:
    """Send log lines (``token.issued``) to stderr, keeping stdout for the command's output.

    Only when nothing configured structlog before (a service sets its own).
    """
    if not structlog.is_configured():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_Stderr()))  # type: ignore[arg-type]


def _config(args: argparse.Namespace) -> Config:
    try:
        return read_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@attrs.frozen
class ConsoleLinks:
    """The URLs a client opens with a token (the contract in docs/tokens.md)."""

    page: str = attrs.field(repr=False)
    websocket: str = attrs.field(repr=False)
    #: Where the broker serves a native client's connection file for the token (only
    #: useful for protocols whose plugin makes one).
    file: str = attrs.field(repr=False)
    #: Where the broker answers the screen of the token's domain as PNG (a ``screenshot``
    #: token's, or one of a protocol that grants screenshots).
    screenshot: str = attrs.field(repr=False)


def console_links(config: Config, issued: IssuedToken) -> ConsoleLinks:
    protocol = issued.claims.protocol
    query = urlencode({"token": issued.token})
    return ConsoleLinks(
        page=f"{config.public_url}/console/{protocol}/?{query}",
        websocket=f"{config.ws_url}/ws/{protocol}?{query}",
        file=f"{config.public_url}/file/{protocol}?{query}",
        screenshot=f"{config.public_url}/screenshot?{query}",
    )


@attrs.frozen
class OperatorLinks:
    """The URLs of an operator token: the operator page, and the WebSocket it opens."""

    page: str = attrs.field(repr=False)
    websocket: str = attrs.field(repr=False)


def operator_links(config: Config, token: str) -> OperatorLinks:
    """``{public_url}/operator/?token=...`` and ``{ws_url}/operator/ws?token=...``."""
    query = urlencode({"token": token})
    return OperatorLinks(
        page=f"{config.public_url}/operator/?{query}",
        websocket=f"{config.ws_url}/operator/ws?{query}",
    )


# --- token ------------------------------------------------------------------------------


def _check_name(args: argparse.Namespace) -> None:
    """``--name``, when given, is a valid ``name`` claim (:func:`valid_name`)."""
    from broker.tokens import MAX_NAME_LENGTH, valid_name

    if args.name is not None and not valid_name(args.name):
        raise CommandError(
            f"--name: 1 to {MAX_NAME_LENGTH} printable characters (no control characters), "
            "not only spaces",
            EXIT_USAGE,
        )


def _in_effect(config: Config, args: argparse.Namespace) -> Config:
    """*config* with ``--node`` and ``--public-url`` in place of ``broker.node`` and
    ``broker.public_url``: what the links and a client file are made from."""
    changes: dict[str, str] = {}
    if args.node is not None:
        changes["node"] = args.node
    if args.public_url is not None:
        changes["public_url"] = args.public_url
    if not changes:
        return config
    return attrs.evolve(config, broker=attrs.evolve(config.broker, **changes))


def _signing_key(config: Config, key_dir: Path | None) -> Ed25519PrivateKey:
    """The private key of ``--key-dir``, else of the state directory."""
    from broker.keys import KeyFileError, load_private_key, private_key_path

    path = private_key_path(key_dir) if key_dir is not None else config.private_key_path
    try:
        return load_private_key(path)
    except KeyFileError as exc:
        hint = ""
        if not path.exists():
            keygen = "console-broker keygen"
            if key_dir is not None:
                keygen += f" --state-dir {key_dir}"
            hint = f"; run '{keygen}' first"
        raise CommandError(f"{exc}{hint}") from None


def _token_command(args: argparse.Namespace) -> int:
    from broker.tokens import TokenIssuer

    _log_to_stderr()
    if args.operator:  # the operator page's token: no domain, no console
        return _operator_token(args)
    if args.recording is not None:  # a token that plays a recording back, no console
        from broker.recordings_cli import recording_token

        return recording_token(args)
    if args.domain is None or args.protocol is None:
        raise CommandError("DOMAIN and --protocol are required (but with --recording)",
                           EXIT_USAGE)
    _check_name(args)
    config = _in_effect(_config(args), args)
    screenshot = args.protocol == SCREENSHOT  # the core's own purpose, no plugin's
    if not screenshot:
        PluginManager().plugin_for(args.protocol)  # PluginError names the loaded protocols
    elif args.device is not None or args.client_file:
        raise CommandError(
            "--device and --client-file are for consoles, not for a screenshot token",
            EXIT_USAGE,
        )
    ttl = config.tokens.default_ttl if args.ttl is None else args.ttl
    if not 1 <= ttl <= config.tokens.max_ttl:
        raise CommandError(
            f"--ttl must be between 1 and tokens.max_ttl ({config.tokens.max_ttl}) seconds",
            EXIT_USAGE,
        )
    domain: DomainRef | None = None
    if args.node is not None:
        domain = uuid_only(
            args.domain,
            why="with --node, DOMAIN must be the domain's UUID: a token for a node elsewhere "
            "is made without asking libvirt, so a name cannot be looked up",
        )
    elif args.uuid:
        domain = uuid_only(args.domain)
    private_key = _signing_key(config, args.key_dir)
    if domain is None:
        domain = resolve_domain(args.connect or config.libvirt.uri, args.domain)
    issuer = TokenIssuer(private_key, config.node_name)
    try:
        issued = issuer.issue(
            domain.uuid, args.protocol, ttl=ttl, view_only=args.view_only, device=args.device,
            name=args.name,
        )
    except ValueError as exc:
        raise CommandError(f"--device: {exc}", EXIT_USAGE) from None
    links = console_links(config, issued)
    if screenshot:
        return _print_screenshot_token(args, issued, domain, links, ttl)
    plugin_name, protocol = PluginManager().protocols[args.protocol]
    client_file = protocol.client_file(
        issued.token, domain.name or domain.uuid, PluginContext(plugin_name, config)
    )
    if args.client_file and client_file is None:
        raise CommandError(
            f"--client-file: no connection file for {args.protocol} with this "
            "configuration (a native client's listener, listen.connect_port, must be set)",
            EXIT_USAGE,
        )
    if args.client_file and client_file is not None:
        path = Path(args.client_file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(client_file.body)
    if args.json:
        doc = {
            "page": links.page,
            "websocket": links.websocket,
            "token": issued.token,
            "expires_at": _iso(issued.expires_at),
            "protocol": issued.claims.protocol,
            "domain": {"name": domain.name, "uuid": domain.uuid},
            "node": issued.claims.node,
            "view_only": issued.claims.view_only,
            "device": issued.claims.device,
            "name": issued.claims.name,
            "jti": issued.claims.jti,
        }
        if client_file is not None:
            doc[client_file.name] = client_file.body
        if protocol.native_clients:
            doc["file"] = links.file
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    label = f"{domain.name} ({domain.uuid})" if domain.name else domain.uuid
    rights = "view only" if issued.claims.view_only else "full control"
    print(f"domain:    {label}")
    print(f"protocol:  {issued.claims.protocol} ({rights}), node {issued.claims.node}")
    if issued.claims.device is not None:
        print(f"device:    {issued.claims.device}")
    if issued.claims.name is not None:
        print(f"name:      {issued.claims.name}")
    print(f"expires:   {_iso(issued.expires_at)} (in {ttl} s, single use)")
    print(f"page:      {links.page}")
    print(f"websocket: {links.websocket}")
    if client_file is not None:
        print(f"file:      {links.file} ({client_file.suffix or client_file.name} file)")
    elif protocol.native_clients:
        print(f"file:      {links.file} (the node makes the file)")
    return 0


def _operator_token(args: argparse.Namespace) -> int:
    """``token --operator``: a token for the node's operator page (docs/tokens.md)."""
    from broker.tokens import TokenIssuer

    given = [
        flag for flag, value in (
            ("DOMAIN", args.domain), ("--protocol", args.protocol),
            ("--view-only", args.view_only), ("--device", args.device),
            ("--recording", args.recording), ("--client-file", args.client_file),
            ("--uuid", args.uuid), ("--connect", args.connect),
        ) if value
    ]
    if given:
        raise CommandError(
            f"--operator takes no {', '.join(given)}: an operator token names no domain "
            "or console (the page lists them, and has the broker mint their tokens)",
            EXIT_USAGE,
        )
    _check_name(args)
    config = _in_effect(_config(args), args)
    ttl = config.tokens.default_ttl if args.ttl is None else args.ttl
    if not 1 <= ttl <= config.tokens.max_ttl:
        raise CommandError(
            f"--ttl must be between 1 and tokens.max_ttl ({config.tokens.max_ttl}) seconds",
            EXIT_USAGE,
        )
    issuer = TokenIssuer(_signing_key(config, args.key_dir), config.node_name)
    issued = issuer.issue_operator(ttl=ttl, name=args.name)
    links = operator_links(config, issued.token)
    if args.json:
        doc = {
            "page": links.page,
            "websocket": links.websocket,
            "token": issued.token,
            "expires_at": _iso(issued.expires_at),
            "protocol": issued.claims.protocol,
            "node": issued.claims.node,
            "name": issued.claims.name,
            "jti": issued.claims.jti,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"purpose:   operator page, node {issued.claims.node}")
    if issued.claims.name is not None:
        print(f"name:      {issued.claims.name}")
    print(f"expires:   {_iso(issued.expires_at)} (in {ttl} s, single use: open it once)")
    print(f"page:      {links.page}")
    return 0


def _print_screenshot_token(
    args: argparse.Namespace, issued: IssuedToken, domain: DomainRef, links: ConsoleLinks,
    ttl: int,
) -> int:
    """A ``screenshot`` token: its URL (no page, no WebSocket)."""
    if args.json:
        doc = {
            "screenshot": links.screenshot,
            "token": issued.token,
            "expires_at": _iso(issued.expires_at),
            "protocol": issued.claims.protocol,
            "domain": {"name": domain.name, "uuid": domain.uuid},
            "node": issued.claims.node,
            "view_only": issued.claims.view_only,
            "device": None,
            "jti": issued.claims.jti,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    label = f"{domain.name} ({domain.uuid})" if domain.name else domain.uuid
    print(f"domain:     {label}")
    print(f"purpose:    screenshot, node {issued.claims.node}")
    print(f"expires:    {_iso(issued.expires_at)} (in {ttl} s, single use)")
    print(f"screenshot: {links.screenshot}")
    return 0


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )


def register_token(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "token",
        help="issue a console token for a domain and print its URLs",
        description=(
            "Sign a short-lived, single-use token for one domain and protocol with the "
            "state directory's key, and print the console page URL and the WebSocket URL "
            "(see docs/tokens.md). A control plane minting tokens for node brokers "
            "elsewhere gives --node, --key-dir and --public-url: then neither libvirt nor "
            "the state directory is used, and no configuration file is needed."
        ),
    )
    parser.add_argument("domain", metavar="DOMAIN", nargs="?",
                        help="domain name or UUID (a UUID with --uuid or --node); with "
                        "--recording, optional (the recording's domain); none with --operator")
    parser.add_argument(
        "--protocol", "-p",
        help="protocol, e.g. vnc, spice, serial; or screenshot: a token for one screenshot "
        "of the domain's screen (GET /screenshot), no console",
    )
    parser.add_argument("--ttl", type=int, metavar="S", help="lifetime in seconds "
                        "(default: tokens.default_ttl)")
    parser.add_argument("--view-only", action="store_true", help="grant view-only rights")
    parser.add_argument(
        "--device",
        metavar="DEV",
        help="the console device, for console streams (serial): an alias such as serial1, "
        "or an index (0: the first serial port); default: the device the domain's console "
        "record names",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="who the token is for (a name claim: 1 to 64 printable characters), shown to "
        "the console's other viewers on the VNC and SPICE pages (see docs/tokens.md)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead")
    parser.add_argument(
        "--operator", action="store_true",
        help="a token for the node's operator page (GET /operator/), single use: the page "
        "lists the domains with their state, consoles and live sessions, and opens any "
        "console in one click (the broker mints its token); no DOMAIN, --protocol or "
        "--view-only; --name says who the operator is",
    )
    parser.add_argument(
        "--recording", metavar="ID",
        help="a token that plays the recording ID back ('console-broker recordings' lists "
        "the ids), view only: its playback page's URL (a VNC recording) and the URL that "
        "serves its parts; DOMAIN and --protocol are then looked up in recordings.dir "
        "(with --node, give both: DOMAIN's UUID and the recording's protocol)",
    )
    parser.add_argument(
        "--client-file", "--vv", metavar="FILE",
        help="write the native client's connection file (SPICE: a virt-viewer .vv file for "
        "remote-viewer) to FILE, mode 0600; needs this configuration's CONNECT listener "
        "(listen.connect_port). A control plane fetches {public_url}/file/{protocol}"
        "?token=... from the node instead",
    )
    _add_config_option(parser)
    parser.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (default: libvirt.uri)")
    parser.add_argument(
        "--uuid",
        action="store_true",
        help="DOMAIN is a UUID: issue without asking libvirt (for issuers off the hypervisor)",
    )
    elsewhere = parser.add_argument_group(
        "minting for a node elsewhere (a control plane)",
        "With all three, neither libvirt nor the state directory is used, and no "
        "configuration file is needed: --ttl is bounded by the tokens.max_ttl of the "
        "configuration read, if any, else by its default (300 s).",
    )
    elsewhere.add_argument(
        "--node", type=node_name, metavar="NODE",
        help="the token's node claim: the broker.node of the node broker that is to accept "
        "it (default: this configuration's broker.node, else the host name). DOMAIN must "
        "then be a UUID, a name is a usage error: libvirt is not asked (as with --uuid; "
        "--connect is unused)",
    )
    elsewhere.add_argument(
        "--key-dir", type=Path, metavar="DIR",
        help="directory holding the issuer's signing-key.pem, as 'console-broker keygen "
        "--state-dir DIR' makes it (default: broker.state_dir)",
    )
    elsewhere.add_argument(
        "--public-url", type=public_url, metavar="URL",
        help="base URL of the node as clients reach it, e.g. https://console.example/n/node1: "
        "the printed page, websocket and file links start with it (default: "
        "broker.public_url, else derived from listen)",
    )
    parser.set_defaults(func=_token_command, needs_server=True)


# --- keygen -----------------------------------------------------------------------------


def _keygen_command(args: argparse.Namespace) -> int:
    from broker.keys import KeyFileError, generate_keypair

    state_dir = args.state_dir if args.state_dir is not None else _config(args).state_dir
    try:
        files = generate_keypair(state_dir, force=args.force)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{state_dir}: cannot write the key pair: {exc.strerror}") from None
    print(f"public key:  {files.public_key}")
    print(f"fingerprint: {files.fingerprint}")
    if files.previous_public_key is not None:
        print(
            f"previous public key kept in {files.previous_public_key}: list it in "
            "tokens.public_keys while tokens it signed may live (see docs/tokens.md)"
        )
    return 0


def register_keygen(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "keygen",
        help="create the token signing key pair",
        description=(
            "Create an Ed25519 key pair in the state directory: the private key (0600) signs "
            "tokens, the public key verifies them. An existing key is kept unless --force."
        ),
    )
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="directory for the key pair (default: broker.state_dir)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing key (its public key is kept as the previous)")
    _add_config_option(parser)
    parser.set_defaults(func=_keygen_command, needs_server=True)


# --- config -----------------------------------------------------------------------------


def _config_command(args: argparse.Namespace) -> int:
    if args.defaults:
        tables = PluginManager().config_tables
        render = render_markdown if args.format == "markdown" else render_defaults
        sys.stdout.write(render(tables))
        return 0
    from broker.keys import KeyFileError, load_public_keys

    path = find_config(args.check)
    config = _config(argparse.Namespace(config=path))
    try:
        load_public_keys(Path(p) for p in config.tokens.public_keys)
    except KeyFileError as exc:
        raise CommandError(f"tokens.public_keys: {exc}") from None
    for name in ("cert", "key", "client_ca"):
        value = getattr(config.tls, name)
        if value and not Path(value).is_file():
            raise CommandError(f"tls.{name}: {value}: no such file")
    print(f"{path if path is not None else 'built-in defaults'}: ok")
    return 0


def register_config(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the documented defaults, or check a configuration file",
        description=(
            "--defaults prints every configuration key with its default and meaning, as "
            "TOML to start a file from. --check reads a file (default: as the broker would "
            "find it) and reports every unknown key, wrong type or bad value."
        ),
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--defaults", action="store_true", help="print the default configuration")
    action.add_argument("--check", nargs="?", const=None, default=False, type=Path,
                        metavar="FILE", help="check FILE (default: the file the broker reads)")
    parser.add_argument("--format", choices=("toml", "markdown"), default="toml",
                        help="with --defaults: TOML, or the reference table of docs/config.md")
    parser.set_defaults(func=_config_command, needs_server=True)


REGISTRARS: list[Callable[[Subparsers], None]] = [register_keygen, register_config, register_token]
