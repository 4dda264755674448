"""Aggregate throughput of one broker worker against several (``service.workers``).

Processes: a console (pours bytes, ``_kit.console_main``), the broker (as ``serve``
builds it, with the benchmark's resolver: every session's console is a TCP
connection to that console; with N > 1 workers, the supervisor and its N workers,
each listening with SO_REUSEPORT), and the client (this process): *streams*
concurrent WebSocket sessions, each to a domain of its own (so that the sessions
spread over the workers' domains, as a hypervisor's many VMs do), each reading what
the console pours as fast as it can, for *seconds*.

Printed for each worker count: MiB/s over all streams, the broker's CPU seconds (its
processes together) per GiB, how the sessions spread over the workers, and the CPU
of the console and client processes, which share the machine's cores with the broker.
With ``--cpu-quota S`` each broker worker is capped at S of a core (:class:`CpuCaps`): on
a machine whose cores the console and the client share, what more workers buy is then
measured against the broker's own CPU, not the machine's.

    .venv/bin/python benchmarks/workers.py [--workers 1,2] [--streams 8] [--seconds 15] \
        [--cpu-quota 0.4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _kit import (
    RAW_PROTOCOL,
    BenchResolver,
    Children,
    RawPlugin,
    Tokens,
    console_main,
    cpu_seconds,
    free_port,
    raise_nofile,
    wait_listening,
)

READ = 1 << 20


def _tree(pid: int) -> list[int]:
    """*pid* and its descendants (from /proc)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def _tree_cpu(pid: int) -> dict[int, float]:
    cpu = {}
    for one in _tree(pid):
        try:
            cpu[one] = cpu_seconds(one)
        except OSError:
            continue
    return cpu


# --- capping each worker's CPU ---------------------------------------------------------------


class CpuCaps:
    """Each broker process in a cgroup of its own whose CPU time is capped at *share* of
    one core (the CFS quota: cgroup v2's ``cpu.max``, or v1's ``cpu.cfs_quota_us``), so
    that on a machine the load generators share, the broker's CPU and not the machine's
    is what limits: 1 worker gets *share* of a core, N workers N times that. Needs root
    and the cpu controller; the groups are removed at the end."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.groups: list[Path] = []
        v2 = Path("/sys/fs/cgroup")
        if "cpu" in _read(v2 / "cgroup.controllers").split():
            self.root, self.version = v2, 2
            (v2 / "cgroup.subtree_control").write_text("+cpu")
        elif (Path("/sys/fs/cgroup/cpu") / "cpu.cfs_quota_us").exists():
            self.root, self.version = Path("/sys/fs/cgroup/cpu"), 1
        else:
            raise SystemExit("--cpu-quota: no cgroup cpu controller here (v2 cpu.max or v1 "
                             "cpu.cfs_quota_us)")

    def cap(self, pid: int) -> None:
        group = self.root / f"cb-bench-{os.getpid()}-{pid}"
        group.mkdir()
        self.groups.append(group)
        period = 100_000
        quota = max(1000, int(self.share * period))
        if self.version == 2:
            (group / "cpu.max").write_text(f"{quota} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        for group in self.groups:
            for pid in _read(group / "cgroup.procs").split():
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# --- the broker's process ---------------------------------------------------------------------


def broker_main(args: argparse.Namespace) -> None:
    raise_nofile()
    from broker.config import (
        BrokerSection,
        Config,
        HTTPSection,
        LimitsSection,
        ListenSection,
        ServiceSection,
    )
    from broker.keys import load_public_keys
    from broker.plugins import PluginManager
    from broker.service._app import Broker
    from broker.service._limits import session_limits
    from broker.service._logging import configure_logging
    from broker.service._sharedstate import SESSIONS_FILE, SharedSessionCounts
    from broker.service._workers import Supervisor, WorkerLink
    from broker.tokens import ReplayCache, TokenVerifier

    config = Config(
        broker=BrokerSection(node="bench", state_dir=str(args.public_key.parent)),
        listen=ListenSection(host="127.0.0.1", port=args.port),
        http=HTTPSection(allow_missing_origin=True),
        limits=LimitsSection(max_sessions_per_domain=100_000, max_sessions_per_client=100_000),
        service=ServiceSection(event_loop=args.event_loop, workers=args.workers),
    )
    configure_logging("console", "warning")
    loop = {"use_uvloop": args.event_loop == "uvloop"}

    def run(link: WorkerLink | None, counts: Any = None) -> int:
        import anyio

        verifier = TokenVerifier(load_public_keys([args.public_key]),
                                 replay_cache=ReplayCache(100_000))
        manager = PluginManager(disabled=(), load_entrypoints=False,
                                plugins=[("bench", RawPlugin())])
        broker = Broker(config, verifier=verifier, resolver=BenchResolver(args.console_port),
                        plugins=manager, link=link, counts=counts)
        anyio.run(broker.serve, backend="asyncio", backend_options=loop)
        return 0

    if args.workers == 1:
        run(None)
        return
    path = args.public_key.parent / SESSIONS_FILE
    supervisor_counts = SharedSessionCounts(session_limits(config), path, None)
    supervisor_counts.reset()

    def worker(link: WorkerLink) -> int:
        return run(link, SharedSessionCounts(session_limits(config), path, link.index))

    sys.exit(Supervisor(args.workers, worker, forget=supervisor_counts.forget_worker).run())


# --- the client (this process) ------------------------------------------------------------------


async def _stream(url: str, until: float, counted: list[int], index: int) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, subprotocols=["binary"], max_size=None,  # type: ignore[list-item]
                       compression=None, ping_interval=None) as ws:
        await ws.send(b"P")  # the console pours
        while time.monotonic() < until:
            counted[index] += len(await ws.recv(decode=False))


async def _measure(port: int, tokens: Tokens, streams: int, seconds: float,
                   broker_pid: int) -> dict[str, Any]:
    urls = []
    for _ in range(streams):
        token = tokens.issuer.issue(str(uuid.uuid4()), RAW_PROTOCOL, ttl=300).token
        urls.append(f"ws://127.0.0.1:{port}/ws/{RAW_PROTOCOL}?token={token}")
    counted = [0] * streams
    warm = 2.0
    until = time.monotonic() + warm + seconds
    tasks = [asyncio.create_task(_stream(url, until, counted, i)) for i, url in enumerate(urls)]
    await asyncio.sleep(warm)
    start_bytes, start = sum(counted), time.monotonic()
    cpu_before = _tree_cpu(broker_pid)
    own_before = time.process_time()
    await asyncio.sleep(seconds)
    cpu_after = _tree_cpu(broker_pid)
    moved, wall = sum(counted) - start_bytes, time.monotonic() - start
    own = time.process_time() - own_before
    await asyncio.gather(*tasks, return_exceptions=True)
    per_process = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
    return {"bytes": moved, "wall": wall, "broker_cpu": sum(per_process.values()),
            "per_process": per_process, "client_cpu": own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to measure (1,2)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent sessions (8)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds measured (15)")
    parser.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--cpu-quota", type=float, default=0.0,
                        help="cap each broker worker at this share of one core (cgroup CPU "
                        "quota), so the broker's CPU and not the machine's limits; 0: no cap")
    parser.add_argument("--role", choices=("client", "console", "broker"), default="client",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--console-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--public-key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "console":
        asyncio.run(console_main([args.port]))
        return
    if args.role == "broker":
        args.workers = int(args.workers)
        broker_main(args)
        return

    caps = CpuCaps(args.cpu_quota) if args.cpu_quota > 0 else None
    print(f"{os.cpu_count()} cores; {args.streams} streams, console to client, "
          f"{args.seconds:.0f} s each; broker on {args.event_loop}"
          + (f"; each worker capped at {args.cpu_quota:g} of a core (cgroup v{caps.version} "
             "CPU quota)" if caps is not None else ""))
    results = {}
    with (tempfile.TemporaryDirectory() as tmp, Children() as children,
          contextlib.ExitStack() as on_exit):
        if caps is not None:
            on_exit.callback(caps.close)
        tokens = Tokens(Path(tmp))
        console_port = free_port()
        console = children.start([__file__, "--role", "console", "--port", str(console_port)])
        for count in (int(n) for n in args.workers.split(",")):
            port = free_port()
            broker = children.start([
                __file__, "--role", "broker", "--port", str(port), "--workers", str(count),
                "--console-port", str(console_port), "--public-key", str(tokens.public_key),
                "--event-loop", args.event_loop,
            ])
            wait_listening(port, broker)
            time.sleep(1.0 if count > 1 else 0.2)  # every worker listening
            if caps is not None:
                workers = _tree(broker.pid)
                for pid in workers[1:] if count > 1 else workers:  # not the supervisor
                    caps.cap(pid)
            console_before = cpu_seconds(console.pid)
            found = asyncio.run(_measure(port, tokens, args.streams, args.seconds, broker.pid))
            found["console_cpu"] = cpu_seconds(console.pid) - console_before
            results[count] = found
            children.processes.remove(broker)
            from _kit import stop

            stop(broker)
            if caps is not None:
                caps.close()
            mib = found["bytes"] / 2**20 / found["wall"]
            gib = found["bytes"] / 2**30
            busy = sorted((round(c / found["wall"], 2) for c in found["per_process"].values()),
                          reverse=True)
            print(f"workers {count}: {mib:,.0f} MiB/s; broker {found['broker_cpu'] / gib:.2f} "
                  f"CPU s/GiB, its processes busy {busy} of a core each; "
                  f"console {found['console_cpu'] / found['wall']:.2f} and client "
                  f"{found['client_cpu'] / found['wall']:.2f} of a core")
    if 1 in results and len(results) > 1:
        base = results[1]["bytes"] / results[1]["wall"]
        for count, found in results.items():
            if count != 1:
                ratio = found["bytes"] / found["wall"] / base
                print(f"workers {count} / workers 1: {ratio:.2f}x the throughput "
                      f"(issue 16's target: >= 1.7x with 2 workers)")


if __name__ == "__main__":
    main()
