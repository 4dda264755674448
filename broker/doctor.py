"""``console-broker doctor``: check a hypervisor host for what the broker needs.

The core checks what is the core's (libvirt and its version, the signing key pair, the
TLS files, the listen ports, the clock, each enabled domain's consoles reached as the
broker reaches them: :mod:`broker._doctor_host`, :mod:`broker._doctor_libvirt`); every
loaded protocol checks what it alone knows through
:meth:`broker.hookspecs.Protocol.doctor` (its page's browser client, what its consoles
need of the hypervisor's settings), and its findings are printed under its name. A
plugin whose check raises is reported as a failure naming the plugin.

Each finding is a :class:`broker.checks.Finding`; a warning or a failure carries its
fix. The exit status is 1 when a check failed (with ``--strict``, also when one
warned), else 0. Like every server-side command, the module imports the server's
dependencies inside the checks only: ``console-broker --help`` imports it on a
client-only install too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import attrs

from broker import _doctor_host as host
from broker import _doctor_libvirt as lv
from broker.checks import FAIL, STATUSES, WARN, Finding
from broker.config import Config, ConfigError
from broker.errors import CommandError

if TYPE_CHECKING:
    from broker.plugins import PluginContext, PluginManager
    from broker.service._libvirt import Resolver

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: Seconds a libvirt call, an HTTP request, a tool or reaching a console may take.
DEFAULT_TIMEOUT = lv.DEFAULT_TIMEOUT
#: The core's checks, in the report's order; the loaded protocols' follow, by name.
CORE_CHECKS = ("libvirt", "schema", "keys", "tls", "ports", "clock", "domains")


@attrs.frozen
class Line:
    """One line of the report: the check it belongs to (a core check's name, or the
    protocol's) and its finding."""

    check: str
    finding: Finding

    @property
    def status(self) -> str:
        return self.finding.status

    def as_dict(self) -> dict[str, str]:
        f = self.finding
        return {"check": self.check, "status": f.status, "title": f.title,
                "detail": f.detail, "fix": f.fix}


def _lines(check: str, findings: Iterable[Finding]) -> list[Line]:
    return [Line(check, finding) for finding in findings]


# --- the protocols' own checks ----------------------------------------------------------


def protocol_findings(
    plugins: PluginManager, contexts: dict[str, PluginContext]
) -> list[Line]:
    """Each loaded protocol's :meth:`~broker.hookspecs.Protocol.doctor` findings, under
    its name; a check that raises, or gives something else than findings, is a failure
    naming its plugin."""
    lines: list[Line] = []
    for name, (plugin_name, protocol) in sorted(plugins.protocols.items()):
        where = plugins.describe(plugin_name)
        try:
            findings = list(protocol.doctor(contexts[plugin_name]))
            wrong = [f for f in findings if not isinstance(f, Finding)]
            if wrong:
                raise TypeError(f"doctor() gave {wrong[0]!r}, not a Finding")
        except Exception as exc:
            lines.append(Line(name, Finding(
                FAIL, "the plugin's checks", f"{where}: {type(exc).__name__}: {exc}",
                f"report it to the authors of the plugin {plugin_name!r}, or keep it from "
                f"loading (CONSOLE_BROKER_DISABLE_PLUGINS={plugin_name})")))
            continue
        lines += _lines(name, findings)
    return lines


def _reachers(plugins: PluginManager, contexts: dict[str, PluginContext]) -> list[lv.Reacher]:
    """The loaded protocols with their TLS to consoles, as the broker loads it."""
    from broker.service import ConsoleTLS

    reachers = []
    for _name, (plugin_name, protocol) in sorted(plugins.protocols.items()):
        try:
            tls = protocol.console_tls(contexts[plugin_name])
            if tls is not None and not isinstance(tls, ConsoleTLS):
                raise TypeError(f"console_tls() returned {tls!r}, not a ConsoleTLS")
        except Exception as exc:
            reachers.append(lv.Reacher(protocol, plugin_name, tls_error=str(exc)))
            continue
        reachers.append(lv.Reacher(protocol, plugin_name, tls))
    return reachers


# --- running them -----------------------------------------------------------------------


def run_checks(
    config: Config,
    plugins: PluginManager,
    *,
    opener: Callable[[str], Any] = lv._open_libvirt,
    resolver: Callable[[str], Resolver] = lv._libvirt_resolver,
    health: host.Health = host.fetch_health,
    run: host.Tool = host.run_tool,
    schema: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Line]:
    """Every check, in the order of ``doctor --help``: the core's, then each loaded
    protocol's."""
    contexts = plugins.contexts(config)
    access = lv.connect_libvirt(config.libvirt.uri, opener=opener, timeout=timeout)
    try:
        return [
            *_lines("libvirt", lv.check_libvirt(access, timeout=timeout)),
            *_lines("schema", lv.check_schema(schema)),
            *_lines("keys", host.check_keys(config)),
            *_lines("tls", host.check_tls(config)),
            *_lines("ports", host.check_ports(config, health=health, timeout=timeout)),
            *_lines("clock", host.check_clock(config, run=run, timeout=timeout)),
            *_lines("domains", lv.check_domains(config, access, _reachers(plugins, contexts),
                                                resolver=resolver, timeout=timeout)),
            *protocol_findings(plugins, contexts),
        ]
    finally:
        access.close(timeout)


def exit_status(lines: Sequence[Line], *, strict: bool = False) -> int:
    """1 when a check failed (with *strict*, also when one warned), else 0."""
    failing = {FAIL, WARN} if strict else {FAIL}
    return 1 if any(line.status in failing for line in lines) else 0


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def render_table(lines: Sequence[Line]) -> str:
    """The human report: check, status and message, each fix on the line below."""
    width = max([len("CHECK"), *(len(line.check) for line in lines)]) + 2
    status_width = max(len("STATUS"), *(len(s) for s in STATUSES)) + 2
    indent = " " * (width + status_width)
    out = [f"{'CHECK':<{width}}{'STATUS':<{status_width}}FINDING"]
    for line in lines:
        out.append(f"{line.check:<{width}}{line.status:<{status_width}}{line.finding.message}")
        if line.finding.fix:
            out.append(f"{indent}fix: {line.finding.fix}")
    failures = sum(line.status == FAIL for line in lines)
    warnings = sum(line.status == WARN for line in lines)
    out += ["", f"{_count(failures, 'failure')}, {_count(warnings, 'warning')}"]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """No structlog line on the report's standard output while the checks run."""
    import structlog

    def drop(_logger: object, _name: str, _event: object) -> NoReturn:
        raise structlog.DropEvent

    saved = structlog.get_config()
    structlog.configure(processors=[drop])
    try:
        yield
    finally:
        structlog.configure(**saved)


def _doctor_command(args: argparse.Namespace) -> int:
    from broker.configfile import read_config
    from broker.plugins import PluginManager

    try:
        config = read_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    with _quiet_logs():  # the report says what the resolver and the plugins would log
        lines = run_checks(config, PluginManager(), timeout=args.timeout)
    status = exit_status(lines, strict=args.strict)
    if args.json:
        doc = {"exit_status": status, "strict": args.strict,
               "checks": [line.as_dict() for line in lines]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(lines))
    return status


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"from 0 to 300 seconds, not {value:g}")
    return value


DESCRIPTION = f"""\
Check this hypervisor host for what the broker needs, and print each problem with its
fix. The core's checks, in order:

  libvirt    libvirt answers at libvirt.uri; its version and the hypervisor's
             (a failure when it does not: start libvirtd, check the URI, permissions)
  schema     libvirt's RelaxNG domain schema (domain.rng), which xml enable checks
             every edit against, installed and loading (a warning when missing)
  keys       the signing key pair in broker.state_dir: the private key 0600, owned by
             the user running doctor, the directory 0700; every trusted public key
             (the local one, tokens.public_keys) readable
  tls        tls.cert, tls.key, tls.ca, tls.client_ca readable, the certificate and key
             match, dates valid (a warning under {host.CERT_WARN_DAYS} days left, a failure \
when expired)
  ports      listen.port and listen.connect_port free, or held by the console-broker
             running here (it answers /healthz on listen.port)
  clock      the time is not before the signing key was made nor before this package
             was built or installed; timedatectl or chronyc, if installed, say it is
             synchronised (a warning when they say it is not)
  domains    each domain whose consoles console-broker enabled: for a running one,
             each console a loaded plugin serves is reached as the broker reaches it
             (planned from the live XML and opened: a graphics fd, a port, a socket,
             a console stream), then closed at once

Then every loaded protocol's own checks, under its name (console-broker plugins lists
them): the built-in ones look for their page's browser client in the assets directory
(http.assets_dir) and compare what their consoles need of libvirt's qemu.conf (TLS to
QEMU) with their own settings.

Statuses: ok, skip (does not apply here), warn (works, but look at it), fail. Exit
status: 0 when no check failed (warnings allowed), 1 when one did (or warned, with
--strict) or the configuration cannot be read, 2 on a usage error. Nothing waits longer
than --timeout seconds a step. Run it as the user the broker runs as. See
docs/operations.md."""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this host for what the broker needs, with the fix for each problem",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object: exit_status, strict, checks (check, "
                        "status, title, detail, fix)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="how long a libvirt call, HTTP request, tool or console may take "
                        f"(default: {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=_doctor_command, needs_server=True)
