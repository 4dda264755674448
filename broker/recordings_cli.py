"""``console-broker recordings``: the session recordings on this host, every plugin's
(a protocol column), and ``--prune``: retention applied by hand (see
:mod:`broker.retention`).

Light on purpose: the command lists and prunes files, and loads nothing of the server
side (it runs wherever the recordings are, a client-only install included)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from broker.config import Config, ConfigError
from broker.configfile import read_config
from broker.errors import EXIT_USAGE, CommandError
from broker.plugins import PluginManager
from broker.recordings import RecordingInfo, RecordingKind, list_recordings
from broker.retention import Policy, PruneResult, prune

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


def _prune_command(
    args: argparse.Namespace, config: Config | None, directory: Path,
    kinds: list[RecordingKind],
) -> int:
    if args.domain or args.protocol:
        raise CommandError(
            "--prune applies to all the recordings in the directory (recordings.max_total "
            "counts them all, every protocol's): it takes no --domain or --protocol"
        )
    configured = config.recordings if config is not None else None
    policy = Policy(
        keep_days=args.keep_days if args.keep_days is not None
        else configured.keep_days if configured else 0,
        max_total=args.max_total if args.max_total is not None
        else configured.max_total if configured else 0,
    )
    if not policy.active:
        raise CommandError(
            "no retention to apply: recordings.keep_days and recordings.max_total are 0 "
            "(keep everything); set them, or pass --keep-days or --max-total"
        )
    result = prune(directory, policy, suffixes=[k.suffix for k in kinds], dry_run=args.dry_run)
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
    directory = args.dir if args.dir is not None else config.recordings_dir if config else None
    assert directory is not None
    kinds = list(PluginManager().recording_kinds.values())
    if args.prune:
        return _prune_command(args, config, directory, kinds)
    if args.dry_run or args.keep_days is not None or args.max_total is not None:
        raise CommandError("--dry-run, --keep-days and --max-total go with --prune")
    if args.protocol is not None:
        wanted = [k for k in kinds if k.protocol == args.protocol]
        if not wanted:
            known = ", ".join(sorted(k.protocol for k in kinds)) or "none"
            raise CommandError(f"no recordings of the protocol {args.protocol!r} "
                               f"(the loaded plugins record: {known})")
        kinds = wanted
    try:
        found = list_recordings(directory, kinds, args.domain)
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
            f"{doc['started']}  {info.protocol:<6}  {name}{device}  {info.recording}  "
            f"part {info.part}  {info.duration:.1f} s  {_size(info.size)}{extra}  {info.path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "recordings",
        help="list or prune the session recordings (serial, VNC)",
        description=(
            "List the session recordings in recordings.dir, every protocol's, oldest first: "
            "start time, protocol, domain, device, recording id, part, duration, size and "
            "file. 'console-broker token --recording ID' issues a token that plays one back "
            "in the browser (a VNC recording) or fetches it (see docs/recordings.md); "
            "'asciinema play FILE' plays a serial part. "
            "With --prune, apply the retention policy now, as the broker does on start and "
            "every recordings.prune_interval seconds: delete the files last written "
            "more than recordings.keep_days days ago, then the oldest files while all "
            "of them take more than recordings.max_total bytes. A part being written "
            "(by a running broker) is never deleted; symbolic links are not followed. Each "
            "deleted file is printed; --dry-run only prints what would be deleted."
        ),
    )
    parser.add_argument("--domain", "-d", metavar="DOMAIN", help="only this domain (name or UUID)")
    parser.add_argument("--protocol", "-p", metavar="PROTOCOL",
                        help="only this protocol's recordings (serial, vnc)")
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
        "recordings.keep_days (0: no age limit)",
    )
    parser.add_argument(
        "--max-total", type=_bytes, metavar="SIZE",
        help="with --prune: keep at most SIZE bytes in all (K, M, G, T: powers of 1024), "
        "instead of recordings.max_total (0: no limit)",
    )
    parser.add_argument(
        "--dir", type=Path, metavar="DIR", help="look in DIR (default: recordings.dir)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.set_defaults(func=_recordings_command)


# --- console-broker token --recording ID ------------------------------------------------------


def recording_links(config: Config, token: str, kind: RecordingKind | None) -> dict[str, str]:
    """The URLs of a recording token: ``page`` (the page that plays it, when its kind has
    one) and ``index`` (the recording's index; ``&part=N`` a part), under the public URL."""
    query = urlencode({"token": token})
    links = {"index": f"{config.public_url}/recording?{query}"}
    if kind is not None and kind.page:
        links["page"] = f"{config.public_url}/console/{kind.protocol}/{kind.page}?{query}"
    return links


def recording_token(args: argparse.Namespace) -> int:
    """``console-broker token --recording ID [DOMAIN]``: a token that plays one recording
    back (``proto`` ``recording``, a ``rec`` claim, view rights), and its URLs.

    Here (no ``--node``) the recording is looked up in ``recordings.dir``: its domain
    and protocol come from its files (DOMAIN, if given, must be its domain's name or
    UUID; a domain that no longer exists is no matter). A control plane (``--node``)
    has no recordings: it names the domain's UUID and ``--protocol`` (whose page plays
    it), and the node looks the recording up when the token comes.
    """
    from broker import token_cli
    from broker.recordings import RECORDING, RECORDING_ID, find_recording_anywhere
    from broker.tokens import TokenIssuer

    token_cli._log_to_stderr()
    if not RECORDING_ID.fullmatch(args.recording):
        raise CommandError(
            f"--recording: {args.recording!r} is not a recording id (the hex id "
            "'console-broker recordings' lists)", EXIT_USAGE,
        )
    if args.device is not None or args.client_file:
        raise CommandError("--device and --client-file are for consoles, not for a "
                           "recording token", EXIT_USAGE)
    config = token_cli._in_effect(token_cli._config(args), args)
    kinds = PluginManager().recording_kinds
    ttl = config.tokens.default_ttl if args.ttl is None else args.ttl
    if not 1 <= ttl <= config.tokens.max_ttl:
        raise CommandError(
            f"--ttl must be between 1 and tokens.max_ttl ({config.tokens.max_ttl}) seconds",
            EXIT_USAGE,
        )
    parts: list[RecordingInfo] = []
    if args.node is not None:
        if args.domain is None or args.protocol is None:
            raise CommandError(
                "with --node, name the recording's DOMAIN (its UUID) and --protocol (whose "
                "page plays it): a control plane has no recordings to look them up in",
                EXIT_USAGE,
            )
        domain = token_cli.uuid_only(args.domain, why="with --node, DOMAIN is the UUID")
        protocol = args.protocol
    else:
        parts = find_recording_anywhere(config.recordings_dir, list(kinds.values()),
                                        args.recording)
        if not parts:
            raise CommandError(f"no recording {args.recording} in {config.recordings_dir}")
        first = parts[0]
        if args.domain is not None and args.domain.lower() not in (
            first.domain_uuid.lower(), first.domain_name.lower()
        ):
            raise CommandError(
                f"recording {args.recording} is of the domain "
                f"{first.domain_name or first.domain_uuid}, not {args.domain}"
            )
        if args.protocol is not None and args.protocol != first.protocol:
            raise CommandError(
                f"recording {args.recording} is a {first.protocol} recording, not {args.protocol}"
            )
        domain = token_cli.DomainRef(uuid=first.domain_uuid, name=first.domain_name or None)
        protocol = first.protocol
    kind = kinds.get(protocol)
    if kind is None:
        known = ", ".join(sorted(kinds)) or "none"
        raise CommandError(f"no plugin plays {protocol} recordings here (recordings: {known})")
    issuer = TokenIssuer(token_cli._signing_key(config, args.key_dir), config.node_name)
    issued = issuer.issue(
        domain.uuid, RECORDING, ttl=ttl, view_only=True, recording=args.recording,
        name=args.name,
    )
    links = recording_links(config, issued.token, kind)
    if args.json:
        doc: dict[str, Any] = {
            **links,
            "token": issued.token,
            "expires_at": token_cli._iso(issued.expires_at),
            "protocol": RECORDING,
            "recording": args.recording,
            "plays": protocol,
            "parts": len(parts) if parts else None,
            "domain": {"name": domain.name, "uuid": domain.uuid},
            "node": issued.claims.node,
            "view_only": True,
            "jti": issued.claims.jti,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    label = f"{domain.name} ({domain.uuid})" if domain.name else domain.uuid
    about = f"{protocol}, {kind.title}"
    if parts:
        started = parts[0].started - int(parts[0].offset)
        about += f", {_files(len(parts)).replace('file', 'part')}, started {_stamp(started)}"
    print(f"recording: {args.recording} ({about})")
    print(f"domain:    {label}")
    print(f"purpose:   {RECORDING} (view only), node {issued.claims.node}")
    print(f"expires:   {token_cli._iso(issued.expires_at)} (in {ttl} s; not used up: it "
          "fetches the recording until then)")
    if "page" in links:
        print(f"page:      {links['page']}")
    print(f"index:     {links['index']} (&part=N: a part's file)")
    return 0
