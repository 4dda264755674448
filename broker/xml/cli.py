"""The ``xml``, ``enable``, ``disable`` and ``libvirt-hook`` commands.

Exit status: 0 done (or, with ``--check``, nothing to do); 1 ``--check``
found changes to make; 2 the input, the plugins or libvirt refused.

The commands import the editor (lxml) and libvirt when they run: building their parsers,
which every ``console-broker --help`` does, takes only :mod:`broker.xml._constants` and
the plugins' option declarations, on a client-only install too.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from broker.errors import CommandError
from broker.hookspecs import XMLOption
from broker.xml._constants import DEFAULT_LISTEN, DEFAULT_URI, MODES, POLICY_PATH, STDIN

if TYPE_CHECKING:
    from broker.plugins import PluginManager
    from broker.xml import CapabilitiesSource, EditOptions, Outcome

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

#: Exit status of ``--check`` when the domain needs changes.
EXIT_CHANGES = 1
#: Exit status when the input, a plugin or libvirt refused.
EXIT_ERROR = 2


def _error(message: str) -> Exception:
    return CommandError(message, status=EXIT_ERROR)


def _manager() -> PluginManager:
    """The plugin manager the commands use (tests replace it)."""
    from broker.plugins import PluginManager

    return PluginManager()


def _run(action: Callable[[], int]) -> int:
    """Run a command body, turning the package's errors into one-line command errors."""
    from broker.errors import PluginError
    from broker.xml import XmlError

    try:
        return action()
    except (XmlError, PluginError, ValueError) as exc:
        raise _error(str(exc)) from None


def _consoles(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as vnc,serial")
    return names


def _dest(option: XMLOption) -> str:
    return "option_" + option.name.replace(".", "_").replace("-", "_")


def _parsed(option: XMLOption) -> Callable[[str], bool | int | str]:
    """argparse's type for *option*'s own flag."""

    def parse(value: str) -> bool | int | str:
        try:
            return option.parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _param(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, setting


def _plugin_options() -> list[XMLOption]:
    """The options the loaded plugins' edits declare (none when they cannot be loaded:
    the command then reports why)."""
    from broker.errors import PluginError

    try:
        return _manager().xml_options()
    except PluginError:
        return []


def _options(args: argparse.Namespace) -> EditOptions:
    """The edit options: ``--option``/``--param`` and the plugins' own flags, each
    declared option's value checked before any edit."""
    from broker.xml import EditOptions

    params = dict(args.param)
    for option in _plugin_options():
        flagged = getattr(args, _dest(option), None)
        if flagged is not None:
            params[option.name] = option.text(flagged)
        if option.name in params:
            try:
                option.parse(params[option.name])
            except ValueError as exc:
                raise _error(str(exc)) from None
    try:
        options = EditOptions(mode=args.mode, listen=args.listen, params=params)
    except ValueError as exc:
        raise _error(str(exc)) from None
    if options.listen is not None and ipaddress.ip_address(options.listen).is_unspecified:
        _notes([f"listening on {options.listen} exposes the console ports to every network"])
    return options


def _notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"console-broker: note: {note}", file=sys.stderr)


# -- xml enable / disable / show ---------------------------------------------


def _emit(args: argparse.Namespace, outcome: Outcome) -> int:
    from broker.xml import _io

    _notes(outcome.notes)
    name = "<stdin>" if args.file == STDIN else args.file
    if args.check:
        if outcome.changed:
            print(f"{name}: needs changes", file=sys.stderr)
            return EXIT_CHANGES
        return 0
    if args.diff:
        sys.stdout.write(_io.unified_diff(outcome.before, outcome.after, outcome.encoding, name))
        return 0
    if args.in_place:
        if outcome.changed:
            _io.write_atomic(args.file, outcome.after)
            print(f"{name}: updated", file=sys.stderr)
        else:
            print(f"{name}: already up to date", file=sys.stderr)
        return 0
    sys.stdout.buffer.write(outcome.after)
    sys.stdout.flush()
    return 0


def _check_in_place(args: argparse.Namespace) -> None:
    if args.in_place and args.file == STDIN:
        raise _error("--in-place needs a FILE, not standard input")


def _domcaps(path: str | None) -> CapabilitiesSource | None:
    """``--domcaps FILE``: libvirt's domain capabilities read from a file, for the edit."""
    if path is None:
        return None
    from broker.xml import DomainCapabilities, InputError

    try:
        with open(path, "rb") as handle:
            caps = DomainCapabilities.from_xml(handle.read())
    except OSError as exc:
        raise InputError(f"--domcaps {path}: {exc.strerror or exc}") from None
    except InputError as exc:
        raise InputError(f"--domcaps {path}: {exc}") from None
    return lambda _platform: caps


def _xml_enable(args: argparse.Namespace) -> int:
    from broker.xml import _io, enable_xml, plugin_edits

    _check_in_place(args)
    options = _options(args)

    def body() -> int:
        data = _io.read_input(args.file)
        outcome = enable_xml(
            data,
            args.consoles,
            options,
            edits=plugin_edits(_manager()),
            validate=not args.no_validate,
            capabilities=_domcaps(args.domcaps),
        )
        return _emit(args, outcome)

    return _run(body)


def _xml_disable(args: argparse.Namespace) -> int:
    from broker.xml import _io, plugin_edits
    from broker.xml._additions import disable_recorded

    _check_in_place(args)

    def body() -> int:
        data = _io.read_input(args.file)
        outcome = disable_recorded(
            data, args.consoles, edits=plugin_edits(_manager()), validate=not args.no_validate
        )
        return _emit(args, outcome)

    return _run(body)


def _xml_show(args: argparse.Namespace) -> int:
    from broker.xml import _io, parse_document, read_consoles

    def body() -> int:
        from broker.xml._additions import describe
        from broker.xml._metadata import find_added, read_added

        doc = parse_document(_io.read_input(args.file))
        records = read_consoles(doc)
        added = [describe(el) for el in read_added(find_added(doc.root))]
        if args.json:
            json.dump({p: r.to_json() for p, r in records.items()}, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        if not records:
            print("no consoles recorded")
        for protocol, record in records.items():
            if record.device is None:
                device = "no device"
            elif record.index is None:
                device = f"device {record.device} (not present)"
            else:
                device = f"device {record.device.tag}[{record.index}] (type {record.device.type})"
            settings = "".join(f", {k}={v}" for k, v in record.settings.items())
            restores = ", ".join(record.slots) or "nothing"
            print(
                f"{protocol}: mode {record.mode}, {device}{settings}; disable restores: {restores}"
            )
        if added:
            print(
                "libvirt added for the consoles (disable removes what nothing else uses): "
                + ", ".join(added)
            )
        return 0

    return _run(body)


def _add_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        nargs="?",
        default=STDIN,
        metavar="FILE",
        help="the domain XML to read; '-' or nothing reads standard input",
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--diff", action="store_true", help="print a unified diff instead of the edited XML"
    )
    group.add_argument(
        "--check",
        action="store_true",
        help="print nothing; exit 1 if the XML needs changes, 0 if it already is as asked",
    )
    group.add_argument(
        "-i",
        "--in-place",
        action="store_true",
        help="rewrite FILE (atomically, keeping its permissions) instead of printing",
    )
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the check against libvirt's RelaxNG schema (domain.rng)",
    )


def _add_edit_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--consoles",
        type=_consoles,
        required=required,
        metavar="LIST",
        help="comma-separated console protocols, e.g. vnc,spice,serial "
        "('console-broker plugins' lists them)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="fd",
        help="how graphical consoles are reached: fd (default: no listening port at all, "
        "the broker asks libvirt for a socket), tcp (an automatic port on --listen), "
        "websocket (tcp plus QEMU's VNC WebSocket; SPICE has none and uses tcp)",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR",
        help=f"the IP address tcp/websocket listen on (default {DEFAULT_LISTEN}; "
        "0.0.0.0 or :: expose the console to the network)",
    )
    parser.add_argument(
        "--option",
        "--param",
        dest="param",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of a plugin's edit, such as spice.tls=yes (repeatable); the "
        "loaded plugins' options follow",
    )
    for option in _plugin_options():
        if not option.flag:
            continue
        if isinstance(option.default, bool):
            parser.add_argument(option.flag, dest=_dest(option), action="store_true",
                                default=None, help=f"{option.help} ({option.name}=yes)")
        else:
            parser.add_argument(
                option.flag, dest=_dest(option), type=_parsed(option), default=None,
                metavar="VALUE", help=f"{option.help} ({option.name}; default {option.default})",
            )


def _register_xml(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "xml",
        help="edit domain XML files or pipes: enable/disable consoles, show what is enabled",
        description=(
            "Edit libvirt domain XML without libvirt: from a file or standard input to "
            "standard output, e.g. virt-install --print-xml ... | console-broker xml enable "
            "--consoles vnc,serial | virsh define /dev/stdin. Everything the edit does not "
            "concern is kept byte for byte; the result validates against libvirt's schema."
        ),
    )
    parser.set_defaults(needs_server=True)
    commands = parser.add_subparsers(title="xml commands", metavar="COMMAND", required=True)

    enable = commands.add_parser(
        "enable",
        help="add the consoles asked for (idempotent)",
        description=(
            "Make a domain console-ready: each protocol's plugin edits its devices, what "
            "they replace is kept in <metadata> so 'disable' can restore it exactly. "
            "Running it again changes nothing. A filter cannot know what libvirt adds when "
            "it defines the result (a virtio-serial controller for the SPICE agent channel, "
            "a video card, PCI controllers): 'console-broker enable DOMAIN' records those "
            "so that 'disable' removes them too; this command does not."
        ),
    )
    _add_edit_options(enable)
    enable.add_argument(
        "--domcaps",
        metavar="FILE",
        help="libvirt's domain capabilities for the domain's emulator, architecture and "
        "machine ('virsh domcapabilities --arch ARCH --machine MACHINE' saved to FILE): "
        "the devices are chosen from what they list (without it, from the architecture "
        "and machine type alone)",
    )
    _add_output(enable)
    _add_file(enable)
    enable.set_defaults(func=_xml_enable)

    disable = commands.add_parser(
        "disable",
        help="undo 'enable', restoring the devices as they were",
        description=(
            "Remove what 'enable' added and put back what it replaced, as recorded in the "
            "domain's <metadata>. Without --consoles, every recorded console is disabled. "
            "Devices libvirt added that 'console-broker enable DOMAIN' recorded (in the XML "
            "of a domain libvirt defined) go too, unless another device still uses them."
        ),
    )
    disable.add_argument(
        "--consoles",
        type=_consoles,
        metavar="LIST",
        help="only these protocols (default: everything the metadata records)",
    )
    _add_output(disable)
    _add_file(disable)
    disable.set_defaults(func=_xml_disable)

    show = commands.add_parser(
        "show",
        help="print the consoles a domain XML records (protocol, mode, device)",
        description="Print what console-broker recorded in a domain's <metadata>.",
    )
    show.add_argument("--json", action="store_true", help="print a JSON object instead")
    _add_file(show)
    show.set_defaults(func=_xml_show)


# -- enable / disable DOMAIN -------------------------------------------------


def _report(args: argparse.Namespace, result: Any, verb: str) -> int:
    from broker.xml import _io

    outcome: Outcome = result.outcome
    _notes(outcome.notes)
    if args.dry_run:
        sys.stdout.write(_io.unified_diff(outcome.before, outcome.after, "UTF-8", result.name))
    elif result.defined:
        print(f"{result.name}: {verb}; the definition was updated")
        if result.libvirt_added:
            print(
                f"{result.name}: recorded what libvirt added for the consoles, which disable "
                f"removes too: {', '.join(result.libvirt_added)}"
            )
    else:
        print(f"{result.name}: nothing to change")
    if result.restart_pending:
        print(
            f"{result.name} is running: it needs a restart for the change to take effect "
            "(shut it down, then start it; a reboot inside the guest is not enough)"
        )
    return 0


def _domain_enable(args: argparse.Namespace) -> int:
    from broker.xml import connection_capabilities, enable_xml, plugin_edits
    from broker.xml._libvirt import edit_domain

    options = _options(args)

    def body() -> int:
        edits = plugin_edits(_manager())
        caps = connection_capabilities(args.connect)  # what libvirt offers there

        def edit(data: bytes) -> Outcome:
            return enable_xml(data, args.consoles, options, edits=edits, capabilities=caps)

        result = edit_domain(args.connect, args.domain, edit, dry_run=args.dry_run)
        return _report(args, result, f"enabled {','.join(args.consoles)} ({options.mode})")

    return _run(body)


def _domain_disable(args: argparse.Namespace) -> int:
    from broker.xml import plugin_edits
    from broker.xml._additions import disable_recorded
    from broker.xml._libvirt import edit_domain

    def body() -> int:
        edits = plugin_edits(_manager())

        def edit(data: bytes) -> Outcome:
            return disable_recorded(data, args.consoles, edits=edits)

        result = edit_domain(args.connect, args.domain, edit, dry_run=args.dry_run)
        return _report(args, result, "disabled")

    return _run(body)


def _add_domain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", metavar="DOMAIN", help="the domain's name or UUID")
    parser.add_argument(
        "-c",
        "--connect",
        default=DEFAULT_URI,
        metavar="URI",
        help=f"the libvirt connection URI (default {DEFAULT_URI})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the diff of the definition and do not change it",
    )


def _register_domain(subparsers: Subparsers) -> None:
    enable = subparsers.add_parser(
        "enable",
        help="make a libvirt domain console-ready (edits its persistent definition)",
        description=(
            "Read the persistent definition of DOMAIN from libvirt (with its passwords), "
            "enable the consoles asked for, and define it again. What libvirt adds on its own "
            "when it defines the result (a virtio-serial controller for the SPICE agent "
            "channel, a video card, PCI controllers) is recorded in the metadata, so that "
            "'disable' removes it too. A running domain gets the change when it is next "
            "started; the command says so."
        ),
    )
    _add_domain(enable)
    _add_edit_options(enable)
    enable.set_defaults(func=_domain_enable, needs_server=True)

    disable = subparsers.add_parser(
        "disable",
        help="undo 'enable' on a libvirt domain",
        description=(
            "Restore the devices 'enable' replaced in the persistent definition of DOMAIN, "
            "as recorded in its <metadata>, remove the devices libvirt added for the "
            "consoles that no other device uses (a controller another channel uses stays), "
            "and define it again."
        ),
    )
    _add_domain(disable)
    disable.add_argument(
        "--consoles",
        type=_consoles,
        metavar="LIST",
        help="only these protocols (default: everything the metadata records)",
    )
    disable.set_defaults(func=_domain_disable, needs_server=True)


# -- libvirt-hook --------------------------------------------------------------


def _hook(args: argparse.Namespace) -> int:
    from broker.xml import plugin_edits
    from broker.xml._hook import run_hook

    def body() -> int:
        rewrite = args.operation in ("migrate", "restore")
        manager = _manager() if rewrite else None
        notes = run_hook(
            args.operation,
            sys.stdin.buffer,
            sys.stdout.buffer,
            policy_path=args.policy,
            edits=plugin_edits(manager) if manager is not None else None,
            xml_options=manager.xml_options() if manager is not None else (),
        )
        for note in notes:
            print(f"console-broker libvirt-hook: {args.domain}: {note}", file=sys.stderr)
        return 0

    return _run(body)


def _register_hook(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "libvirt-hook",
        help="run as libvirt's QEMU hook: apply this host's console policy to incoming domains",
        description=(
            "Called by libvirt as /etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OP EXTRA with "
            "the domain XML on standard input. For 'migrate' (incoming migration) and "
            "'restore', prints the XML rewritten to this host's policy (only how existing "
            "displays listen: devices the guest sees never change); for every other operation, "
            "and without a policy file, prints nothing (libvirt keeps the XML as it is). "
            "Install: a script /etc/libvirt/hooks/qemu containing "
            "'#!/bin/sh' and 'exec console-broker libvirt-hook \"$@\"'; then restart libvirtd."
        ),
    )
    parser.add_argument("domain", metavar="DOMAIN", help="the domain's name (from libvirt)")
    parser.add_argument(
        "operation", metavar="OPERATION", help="e.g. prepare, start, migrate, restore"
    )
    parser.add_argument(
        "sub_operation", metavar="SUB-OP", nargs="?", default="-", help="e.g. begin"
    )
    parser.add_argument("extra", metavar="EXTRA", nargs="?", default="-", help="usually '-'")
    parser.add_argument(
        "--policy",
        default=POLICY_PATH,
        metavar="FILE",
        help=f"the TOML policy (default {POLICY_PATH}; keys: consoles, mode, listen, and "
        "the plugins' XML options, such as spice-tls and usbredir); without it the hook "
        "changes nothing",
    )
    parser.set_defaults(func=_hook, needs_server=True)


REGISTRARS: list[Callable[[Subparsers], None]] = [_register_xml, _register_domain, _register_hook]
