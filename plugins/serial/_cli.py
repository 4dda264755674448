"""``console-broker recordings``: the serial console recordings on this host, and
``--prune``: retention applied by hand (see :mod:`broker_serial._retention`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.api import CommandError, Config, ConfigError, read_config

from ._config import TABLE, recordings_directory
from ._recording import list_recordings
from ._retention import Policy, PruneResult, prune

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024 / 1024:.1f} MiB"


def _bytes(text: str) -> int:
    """``1048576``, ``512K``, ``10M``, ``2G``, ``1T`` (also ``10MiB``, ``10MB``: 1024-based)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (say 500M or 20G)")
    return int(match[1]) * _UNITS[match[2]]


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}")
    return days


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(args: argparse.Namespace) -> Config | None:
    """The configuration, when the command needs it."""
    if args.dir is not None and not args.prune:
        return None
    try:
        return read_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _prune_command(args: argparse.Namespace, config: Config | None, directory: Path) -> int:
    if args.domain:
        raise CommandError(
            "--prune applies to all the recordings in the directory (serial.recordings_max_total "
            "counts them all): it takes no --domain"
        )
    serial = config.table(TABLE) if config is not None else None
    policy = Policy(
        keep_days=args.keep_days if args.keep_days is not None
        else serial.recordings_keep_days if serial else 0,
        max_total=args.max_total if args.max_total is not None
        else serial.recordings_max_total if serial else 0,
    )
    if not policy.active:
        raise CommandError(
            "no retention to apply: serial.recordings_keep_days and serial.recordings_max_total "
            "are 0 (keep everything); set them, or pass --keep-days or --max-total"
        )
    result = prune(directory, policy, dry_run=args.dry_run)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_pruned(result)
    for path, error in result.errors:
        print(f"console-broker recordings: cannot prune {path}: {error}", file=sys.stderr)
    return 1 if result.errors else 0


def _print_pruned(result: PruneResult) -> None:
    verb = "would delete" if result.dry_run else "deleted"
    for item in result.deleted:
        why = "age" if item.reason == "age" else "total"
        print(f"{verb}  {_stamp(item.mtime)}  {why:<5}  {_size(item.size):>9}  {item.path}")
    summary = (
        f"{verb} {_files(len(result.deleted))} ({_size(result.freed)}) in {result.directory} "
        f"({result.policy.describe()}); kept {_files(result.kept)} ({_size(result.kept_bytes)})"
    )
    if result.in_use:
        summary += f"; {len(result.in_use)} being written, kept"
    if result.over_limit:
        summary += "; still over the limit"
    print(summary)


def _recordings_command(args: argparse.Namespace) -> int:
    config = _load(args)
    directory = (
        args.dir if args.dir is not None else recordings_directory(config) if config else None
    )
    assert directory is not None
    if args.prune:
        return _prune_command(args, config, directory)
    if args.dry_run or args.keep_days is not None or args.max_total is not None:
        raise CommandError("--dry-run, --keep-days and --max-total go with --prune")
    try:
        found = list_recordings(directory, args.domain)
    except OSError as exc:
        raise CommandError(f"cannot read {directory}: {exc.strerror or exc}") from None
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
        extra = (", input" if info.input else "") + (", being written" if info.live else "")
        print(
            f"{doc['started']}  {name}{device}  part {info.part}  {info.duration:.1f} s  "
            f"{_size(info.size)}{extra}  {info.path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "recordings",
        help="list or prune the serial console recordings (asciicast v2 files)",
        description=(
            "List the serial console recordings in serial.recordings_dir, oldest first: "
            "start time, domain, device, part, duration, size and file. Play one with "
            "'asciinema play FILE' (see docs/serial.md). "
            "With --prune, apply the retention policy now, as the broker does on start and "
            "every serial.recordings_prune_interval seconds: delete the files last written "
            "more than serial.recordings_keep_days days ago, then the oldest files while all "
            "of them take more than serial.recordings_max_total bytes. A part being written "
            "(by a running broker) is never deleted; symbolic links are not followed. Each "
            "deleted file is printed; --dry-run only prints what would be deleted."
        ),
    )
    parser.add_argument("--domain", "-d", metavar="DOMAIN", help="only this domain (name or UUID)")
    parser.add_argument(
        "--json", action="store_true",
        help="print JSON instead (an array; with --prune, an object with what was deleted)",
    )
    parser.add_argument(
        "--prune", action="store_true",
        help="delete the recordings the retention policy does not keep (exit status 1 if a "
        "file could not be deleted)",
    )
    parser.add_argument(
        "--dry-run", "-n", action="store_true",
        help="with --prune: print what would be deleted, delete nothing",
    )
    parser.add_argument(
        "--keep-days", type=_days, metavar="DAYS",
        help="with --prune: keep files last written in the last DAYS days, instead of "
        "serial.recordings_keep_days (0: no age limit)",
    )
    parser.add_argument(
        "--max-total", type=_bytes, metavar="SIZE",
        help="with --prune: keep at most SIZE bytes in all (K, M, G, T: powers of 1024), "
        "instead of serial.recordings_max_total (0: no limit)",
    )
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
