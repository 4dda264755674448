"""``console-broker install-service``: the systemd unit shipped with the package, written
where systemd reads units, with the installed script's absolute path in ``ExecStart``.

The unit is package data (``broker/data/console-broker.service``); its ``ExecStart`` has
a placeholder this command fills in. Writing is idempotent: the same unit again is left
as it is; a unit that differs (edited by hand, or from another version or environment)
is replaced only with ``--force``. Nothing else is touched: the command prints the
``systemctl`` commands that load and start it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TypeAlias

from broker.errors import CommandError

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: The unit's file name, and the name systemctl knows it by.
UNIT_NAME = "console-broker.service"
#: Where ``install-service`` writes it by default: the administrator's units.
UNIT_DIR = Path("/etc/systemd/system")
#: What the template's ``ExecStart=`` holds until it is filled in.
PLACEHOLDER = "@EXEC_START@"


def unit_template() -> str:
    """The unit as shipped, with its placeholder."""
    return (resources.files("broker") / "data" / UNIT_NAME).read_text(encoding="utf-8")


def installed_script() -> list[str]:
    """How the unit starts this installation's broker: the ``console-broker`` script of
    this environment (absolute), else this interpreter running ``broker.cli``."""
    script = Path(sysconfig.get_path("scripts")) / "console-broker"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "broker.cli"]


def _exec_word(arg: str) -> str:
    """*arg* as one word of ``ExecStart=`` (systemd.service(5), Command lines): a percent
    sign doubled (a specifier otherwise), double quotes around spaces."""
    if any(ch in arg for ch in "\"'\\$") or not arg.isprintable():
        raise CommandError(f"{arg!r}: a path with quotes, a backslash, $ or control "
                           "characters cannot go into the unit's ExecStart")
    arg = arg.replace("%", "%%")
    return f'"{arg}"' if " " in arg else arg


def render_unit(command: list[str], config: Path | None = None) -> str:
    """The unit starting ``COMMAND serve`` (with ``--config CONFIG``)."""
    argv = [*command, "serve"]
    if config is not None:
        argv += ["--config", str(config)]
    line = " ".join(_exec_word(arg) for arg in argv)
    template = unit_template()
    if PLACEHOLDER not in template:  # pragma: no cover - the shipped file has it
        raise CommandError(f"{UNIT_NAME} in the package has no {PLACEHOLDER}")
    return template.replace(PLACEHOLDER, line)


def _write(path: Path, text: str) -> None:
    """Write *path* whole or not at all, mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def install_unit(
    unit_dir: Path, text: str, *, force: bool = False
) -> str:
    """Write *text* as the unit in *unit_dir*: ``"written"``, ``"replaced"`` (with
    *force*) or ``"unchanged"``; CommandError when a different unit is there."""
    path = unit_dir / UNIT_NAME
    try:
        current: str | None = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise CommandError(f"{path}: cannot read it: {exc.strerror}") from None
    if current == text:
        return "unchanged"
    if current is not None and not force:
        raise CommandError(
            f"{path} exists and differs from the unit this installation writes (changed by "
            "hand, or another version's); not replacing it. Compare with --dry-run, keep "
            "local changes in a drop-in (systemctl edit console-broker), and replace it "
            "with --force"
        )
    if not unit_dir.is_dir():
        raise CommandError(f"{unit_dir}: no such directory (is systemd installed?)")
    try:
        _write(path, text)
    except OSError as exc:
        raise CommandError(f"{path}: cannot write it: {exc.strerror}") from None
    return "written" if current is None else "replaced"


def _hidden_by_protect_home(command: list[str]) -> list[Path]:
    """What the unit's ExecStart needs from a home directory: the script, the Python
    installation it runs on."""
    homes = [Path("/home"), Path("/root")]
    needed = {Path(command[0]).resolve(), Path(sys.base_prefix).resolve(),
              Path(sys.prefix).resolve()}
    return sorted(path for path in needed if any(path.is_relative_to(h) for h in homes))


def _install_service_command(args: argparse.Namespace) -> int:
    config: Path | None = args.config
    if config is not None:
        config = config.absolute()
    text = render_unit(installed_script(), config)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    unit_dir: Path = args.unit_dir
    result = install_unit(unit_dir, text, force=args.force)
    path = unit_dir / UNIT_NAME
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    print(f"{result}: {path}")
    print(f"  {exec_start}")
    for place in _hidden_by_protect_home(installed_script()):
        print(f"  warning: {place} is in a home directory, which the unit hides "
              "(ProtectHome=yes): the service cannot start from there. Install "
              "console-broker elsewhere (a virtual environment in /opt), or relax it in a "
              "drop-in (ProtectHome=tmpfs and BindReadOnlyPaths=)")
    if config is not None and not config.exists():
        print(f"  note: {config} does not exist yet; the broker will not start without it")
    print("next:")
    if result != "unchanged":
        print("  systemctl daemon-reload")
    print("  systemctl enable --now console-broker")
    print("then: systemctl reload console-broker (keys, certificates), "
          "journalctl -u console-broker -o cat (logs)")
    return 0


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "install-service",
        help="install the systemd unit that runs console-broker serve",
        description=(
            f"Write the systemd unit shipped with console-broker ({UNIT_NAME}) into "
            f"the unit directory (default {UNIT_DIR}), with this installation's "
            "console-broker script as ExecStart, and print the systemctl commands that "
            "load and start it. The unit runs the broker hardened (a read-only system, "
            "its state in /var/lib/console-broker, no capability but binding a low port), "
            "reloads keys and certificates with 'systemctl reload' (SIGHUP) and logs to "
            "the journal. Running it again writes nothing when the unit is the same; a "
            "unit that differs is replaced only with --force. See docs/operations.md, "
            "The systemd unit."
        ),
    )
    parser.add_argument(
        "--unit-dir",
        type=Path,
        default=UNIT_DIR,
        metavar="DIR",
        help=f"where to write {UNIT_NAME} (default: {UNIT_DIR})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the configuration file the service reads (serve --config FILE; default: "
        "none given, so /etc/console-broker/broker.toml if it exists, else the built-in "
        "defaults)",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="replace a unit that differs from the one this installation writes",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the unit instead of writing it",
    )
    parser.set_defaults(func=_install_service_command, needs_server=True)


REGISTRARS: list[Callable[[Subparsers], None]] = [register]
