"""The ``console-broker`` command.

Each command lives with the code it drives and adds its own sub-parser here
through a ``register(subparsers)`` function; the handler it sets as ``func``
takes the parsed arguments and returns the exit status.

The client side (``console-broker open``, ``plugins``, every ``--help``) runs on a
workstation where only the base distribution is installed: building the parser loads the
command modules and the plugins, so none of them imports a server dependency
(:data:`SERVER_MODULES`) at import time; their handlers do. A command that needs them
sets ``needs_server=True`` among its parser's defaults: without them it stops before its
handler runs, with one line naming what to install. A server module missing where a
command meets it anyway (a plugin's command) ends it with the same line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence

import broker
from broker.errors import EXIT_FAILURE, EXIT_USAGE, CommandError
from broker.plugins import PluginError, PluginManager

__all__ = [
    "EXIT_USAGE",
    "SERVER_INSTALL",
    "SERVER_MODULES",
    "CommandError",
    "build_parser",
    "main",
    "missing_server_modules",
]

#: The server side's dependencies (pyproject.toml's ``server`` extra), by the top-level
#: module each provides: what a hypervisor, a provisioning system (``xml enable``) and a
#: control plane (``token``) need, and a workstation (``open``) does not.
SERVER_MODULES: dict[str, str] = {
    "libvirt": "libvirt-python",
    "lxml": "lxml",
    "cryptography": "cryptography",
    "jwt": "PyJWT",
    "prometheus_client": "prometheus-client",
    "PIL": "pillow",
}
#: How to install them.
SERVER_INSTALL = "pip install 'console-broker[server]'"


def missing_server_modules() -> list[str]:
    """The distributions of :data:`SERVER_MODULES` whose module is not installed."""
    return [
        distribution
        for module, distribution in SERVER_MODULES.items()
        if importlib.util.find_spec(module) is None
    ]


def _needs_server(command: str, missing: Sequence[str]) -> str:
    """The line a command that needs the server side ends with: which of them are missing
    when not all are (an install that went wrong half way)."""
    line = f"console-broker {command} needs the server dependencies: {SERVER_INSTALL}"
    if len(missing) < len(SERVER_MODULES):
        line += f" (missing: {', '.join(missing)})"
    return line


def _plugins_command(args: argparse.Namespace) -> int:
    manager = PluginManager()
    infos = manager.plugin_infos()
    if args.json:
        doc = [
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "protocols": [
                    {"name": p.name, "title": p.title, "description": p.description}
                    for p in info.protocols
                ],
            }
            for info in infos
        ]
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not infos:
        print("no plugins loaded")
    for info in infos:
        protocols = ", ".join(p.name for p in info.protocols) or "(none)"
        print(f"{info.name:<12} {info.distribution} {info.version:<10} protocols: {protocols}")
    if manager.disabled:
        print(f"disabled by environment: {', '.join(sorted(manager.disabled))}")
    return 0


def _register_plugins(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list the loaded plugins and the protocols they serve",
        description=(
            "List every plugin loaded from the 'console_broker' entry-point group, with its "
            "distribution, version and protocols. Set CONSOLE_BROKER_DISABLE_PLUGINS to a "
            "comma-separated list of plugin names to keep them from loading."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array instead")
    parser.set_defaults(func=_plugins_command)


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    from broker import doctor, front, native, recordings_cli, screenshots, sessions_cli, token_cli
    from broker.service import cli as service_cli
    from broker.xml import cli as xml_cli

    return [
        _register_plugins,
        *xml_cli.REGISTRARS,
        *token_cli.REGISTRARS,
        screenshots.register,
        recordings_cli.register,
        *service_cli.REGISTRARS,
        sessions_cli.register,
        doctor.register,
        *front.REGISTRARS,
        native.register,
        _register_plugin_commands,
    ]


def _register_plugin_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The commands plugins add (``console_broker_commands``). Plugins that fail to
    load add none here: the commands that need them report the error."""
    try:
        manager = PluginManager()
    except PluginError:
        return
    manager.hook.console_broker_commands(subparsers=subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="console-broker",
        description=(
            "Make libvirt/QEMU VMs console-ready (VNC, SPICE, serial) and broker their "
            "consoles to browsers and native clients."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {broker.__version__}")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", required=True
    )
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "needs_server", False) and (missing := missing_server_modules()):
        print(_needs_server(args.command, missing), file=sys.stderr)
        return EXIT_FAILURE
    try:
        status: int = args.func(args)
    except (CommandError, PluginError) as exc:
        print(f"console-broker: error: {exc}", file=sys.stderr)
        return exc.status if isinstance(exc, CommandError) else 1
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        if module not in SERVER_MODULES:
            raise
        print(_needs_server(args.command, [SERVER_MODULES[module]]), file=sys.stderr)
        return EXIT_FAILURE
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
