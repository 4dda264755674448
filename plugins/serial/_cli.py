"""``console-broker recordings``: the serial console recordings on this host."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from broker.cli import CommandError
from broker.config import ConfigError, find_config, load_config

from ._recording import list_recordings


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


def _recordings_command(args: argparse.Namespace) -> int:
    if args.dir is not None:
        directory = args.dir
    else:
        try:
            directory = load_config(find_config(args.config)).recordings_dir
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
    found = list_recordings(directory, args.domain)
    if args.json:
        json.dump([r.to_json() for r in found], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not found:
        where = f" of {args.domain}" if args.domain else ""
        print(f"no recordings{where} in {directory}")
        return 0
    for info in found:
        doc = info.to_json()
        name = info.domain_name or info.domain_uuid
        device = f" {info.device}" if info.device else ""
        extra = ", input" if info.input else ""
        print(
            f"{doc['started']}  {name}{device}  part {info.part}  {info.duration:.1f} s  "
            f"{_size(info.size)}{extra}  {info.path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "recordings",
        help="list the serial console recordings (asciicast v2 files)",
        description=(
            "List the serial console recordings in serial.recordings_dir, oldest first: "
            "start time, domain, device, part, duration, size and file. Play one with "
            "'asciinema play FILE' (see docs/serial.md)."
        ),
    )
    parser.add_argument("--domain", "-d", metavar="DOMAIN", help="only this domain (name or UUID)")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead")
    parser.add_argument(
        "--dir", type=Path, metavar="DIR", help="look in DIR (default: serial.recordings_dir)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.set_defaults(func=_recordings_command)
