"""``console-broker sessions``: the running broker's live sessions, and ending them.

The command asks the broker through its admin socket (``service.admin_socket``,
:mod:`broker.service._admin`): root or the broker's own user only. With worker
processes the broker answers for all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.config import ConfigError
from broker.configfile import read_config
from broker.errors import EXIT_FAILURE, CommandError

#: Exit status when no live session matched (``sessions end``), as grep does.
NO_MATCH = 1


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    if size < 1024 ** 3:
        return f"{size / 1024 / 1024:.1f} MiB"
    return f"{size / 1024 ** 3:.1f} GiB"


def _since(started: str) -> str:
    """How long ago *started* (ISO 8601, UTC) was: ``42s``, ``3m``, ``2h05m``, ``1d04h``."""
    try:
        moment = datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "?"
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def table(records: list[dict[str, Any]]) -> str:
    """*records* as the command prints them: one line each, under a header."""
    workers = any(record.get("worker") is not None for record in records)
    header = ["ID", "DOMAIN", "UUID", "PROTOCOL", "RIGHTS", "CLIENT", "STARTED", "FOR",
              "TO CLIENT", "TO CONSOLE", "NAME"]
    if workers:
        header.append("WORKER")
    rows = [header]
    for record in records:
        row = [
            str(record.get("id", "")),
            str(record.get("domain_name") or "-"),
            str(record.get("domain", "")),
            str(record.get("protocol", "")),
            str(record.get("rights", "")),
            str(record.get("client", "")),
            str(record.get("started", "")),
            _since(str(record.get("started", ""))),
            _size(int(record.get("bytes_to_client", 0))),
            _size(int(record.get("bytes_to_console", 0))),
            str(record.get("name") or "-"),
        ]
        if workers:
            row.append(str(record.get("worker")))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ) + "\n"


def _socket(args: argparse.Namespace) -> Path:
    try:
        return read_config(args.config).admin_socket
    except ConfigError as exc:
        raise CommandError(str(exc)) from None


def _ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    from broker.service._admin import BrokerNotReachable, ask

    path = _socket(args)
    try:
        answer = ask(path, request)
    except BrokerNotReachable as exc:
        raise CommandError(str(exc)) from None
    if not answer.get("ok"):
        raise CommandError(f"the broker refused the request: {answer.get('error')}")
    return answer


def _list_command(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "sessions"}
    if args.domain:
        request["domain"] = args.domain
    records = _ask(args, request)["sessions"]
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif records:
        sys.stdout.write(table(records))
    else:
        where = f" on domain {args.domain}" if args.domain else ""
        print(f"no live sessions{where}")
    return 0


def _end_command(args: argparse.Namespace) -> int:
    if args.session is None and args.end_domain is None:
        raise CommandError("name a session (its ID, from console-broker sessions) or "
                           "--domain DOMAIN", status=2)
    request: dict[str, Any] = {"op": "end"}
    if args.session is not None:
        request["session"] = args.session
    if args.end_domain is not None:
        request["domain"] = args.end_domain
    if args.reason:
        request["reason"] = args.reason
    ended = _ask(args, request)["ended"]
    if args.json:
        json.dump(ended, sys.stdout, indent=2)
        sys.stdout.write("\n")
    for record in ended if not args.json else ():
        print(f"ended {record['id']} ({record['protocol']} on "
              f"{record.get('domain_name') or record['domain']}, {record['client']})")
    if not ended:
        what = f"session {args.session}" if args.session else "session"
        where = f" on domain {args.end_domain}" if args.end_domain else ""
        print(f"console-broker: no live {what}{where}", file=sys.stderr)
        return NO_MATCH
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help="the broker's configuration file, for service.admin_socket (default: "
        "$CONSOLE_BROKER_CONFIG, else /etc/console-broker/broker.toml if it exists, else "
        "the built-in defaults)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead (an array)")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "sessions",
        help="list the running broker's live console sessions, or end them",
        description=(
            "List the live console sessions of the broker running on this host (every "
            "worker's): session ID, domain name and UUID, protocol, rights (full or view), "
            "client address, start time (UTC) and how long ago, bytes each way, the "
            "token's name claim, and the worker serving it. 'console-broker sessions end' "
            "ends sessions with close code 4109 (ended by an operator), which the console "
            "pages show with the reason. Talks to the broker's admin socket "
            "(service.admin_socket): run it as root or as the broker's user. Exit status 1 "
            "when the broker cannot be reached."
        ),
    )
    _common(parser)
    parser.add_argument("--domain", "-d", metavar="DOMAIN",
                        help="only the sessions of this domain (name or UUID)")
    parser.set_defaults(func=_list_command, needs_server=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    listing = commands.add_parser(
        "list", help="list the live sessions (what 'sessions' alone does)",
        description="List the live sessions (the same as 'console-broker sessions').",
    )
    _common(listing)
    listing.add_argument("--domain", "-d", metavar="DOMAIN",
                         help="only the sessions of this domain (name or UUID)")
    listing.set_defaults(func=_list_command, needs_server=True)
    end = commands.add_parser(
        "end",
        help="end a live session, or every session of a domain",
        description=(
            "End the session ID (from 'console-broker sessions'), or with --domain every "
            "live session of that domain (both: that session, if it is the domain's). "
            "Its client is closed with WebSocket close code 4109 and the reason 'ended by "
            "an operator', followed by --reason when given (the console pages show it); "
            "the session's audit line records the same. Prints each session ended; exit "
            f"status {NO_MATCH} when none matched."
        ),
    )
    _common(end)
    end.add_argument("session", nargs="?", metavar="ID", help="the session's ID")
    end.add_argument("--domain", "-d", dest="end_domain", metavar="DOMAIN",
                     help="every live session of this domain (name or UUID)")
    end.add_argument("--reason", "-r", metavar="TEXT",
                     help="why, shown to the user (the close frame carries its first 100 "
                     "bytes or so)")
    end.set_defaults(func=_end_command, needs_server=True)


__all__ = ["EXIT_FAILURE", "NO_MATCH", "register", "table"]
