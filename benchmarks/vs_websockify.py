"""The broker's proxy path and websockify, side by side, on loopback.

Processes: a console (one TCP server, a port per proxy: it pours bytes out, takes
them in and acknowledges them, or echoes), the proxies, and the client (this
process, a websockets client; its own CPU time is never counted):

* console-broker: ``Broker`` with a resolver that connects every session to the
  console over TCP (the ``tcp`` mode's path) and a protocol served by
  ``broker.service.raw_proxy``, the core's byte pump, through the plugin hooks;
  a token is issued and checked for every session;
* websockify, as ``python -m websockify 127.0.0.1:PORT 127.0.0.1:CONSOLE``: its
  default server forks a process per connection;
* websockify ``--libserver``: its one-process mode, a thread per connection.

No TLS, binary frames (the client offers the ``binary`` subprotocol, as noVNC
does), no compression, no keepalive pings (websockify's ``--heartbeat`` is off by
default, so the broker's ``proxy.ping_interval`` is 0 here; ``--broker-ping``
changes it), each proxy logging at its default level to a file.

Measured for each proxy: CPU seconds (user + system) of the proxy, its forked
children included, per GiB moved each way; the round trip of 100-byte echoes
through it against straight to the console over TCP; and how many idle sessions
it holds at once (opened one after the other until the target, the open-file limit,
a time budget, the memory guard or repeated failures), with the memory (PSS) and
CPU each one costs. Every process of the benchmark raises its open-file limit as far
as it may, and the output says how far that was.

    .venv/bin/pip install -e '.[server,bench]'
    .venv/bin/python benchmarks/vs_websockify.py [--mib 1024] [--sessions 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _kit import (
    ACK_UNIT,
    CHUNK,
    DOMAIN,
    RAW_PROTOCOL,
    BenchResolver,
    Children,
    RawPlugin,
    Tokens,
    console_main,
    free_port,
    nofile_note,
    raise_nofile,
    role_arguments,
    run_broker,
    tcp_round_trips,
    wait_listening,
    ws_round_trips,
)

MESSAGE = 64 * 1024  # the client's messages toward the console
PROTOCOL = RAW_PROTOCOL


# --- the broker process ------------------------------------------------------------------


def broker_main(port: int, console_port: int, public_key: Path, sessions: int,
                ping: float) -> None:
    from broker.config import LimitsSection, ProxySection

    room = sessions + 100
    run_broker(
        port, public_key, BenchResolver(console_port), [("bench", RawPlugin())],
        replay=sessions + 100_000, log_level=None,  # the defaults: json, info
        limits=LimitsSection(
            max_sessions=room, max_sessions_per_domain=room, max_sessions_per_client=room
        ),
        proxy=ProxySection(ping_interval=ping),
    )


# --- measuring a process and its children --------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds of *pid*, of its reaped children and of its live descendants."""
    import psutil

    proc = psutil.Process(pid)
    own = proc.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def tree_memory(pid: int) -> tuple[float, int]:
    """PSS of *pid* and its descendants in MiB (shared pages counted once), and their count."""
    import psutil

    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    pss = 0
    for each in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                    break
    return pss / 1024, len(pids)


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def total_mib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


async def settle(pid: int, timeout: float = 30.0) -> None:
    """Wait until *pid* has no children left (websockify reaps its handlers lazily)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not psutil.Process(pid).children():
                return
        except psutil.Error:
            return
        await asyncio.sleep(0.1)


class Peak:
    """Samples a process tree's PSS in the background; the highest value seen."""

    def __init__(self, pid: int, limit_mib: float) -> None:
        self.pid, self.limit, self.mib, self.exceeded = pid, limit_mib, 0.0, False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.mib = max(self.mib, tree_memory(self.pid)[0])
            self.exceeded = self.mib > self.limit
            await asyncio.sleep(0.2)

    def __enter__(self) -> Peak:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.mib = max(self.mib, tree_memory(self.pid)[0])


# --- the client (this process) -----------------------------------------------------------


@dataclasses.dataclass
class Proxy:
    """One proxy under test: how to reach it, and the process to measure."""

    key: str
    title: str
    mode: str
    process: subprocess.Popen[bytes]
    url: Callable[[], str]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def plain_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/"


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def last_error(log: Path) -> str:
    """The last exception line a proxy logged (websockify prints tracebacks)."""
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace")
        found = re.findall(r"(?:^\w+(?:Error|Exception)|handler exception): .*$", text, re.M)
        if found:
            return str(found[-1])[:100]
    return ""


def connect(url: str, **kwargs: Any) -> Any:
    from websockets.asyncio.client import connect as ws_connect

    options: dict[str, Any] = {
        "subprotocols": ["binary"], "compression": None, "max_size": None,
        "ping_interval": None, "open_timeout": 20, "close_timeout": 5,
    }
    options.update(kwargs)
    return ws_connect(url, **options)


async def console_to_client(proxy: Proxy, total: int, cap: float) -> dict[str, float]:
    async with connect(proxy.url()) as ws:
        await ws.send(b"P")
        await ws.recv()  # the stream runs: measure from here
        with Peak(proxy.pid, 4096) as peak:
            cpu, start, got = tree_cpu(proxy.pid), time.perf_counter(), 0
            while got < total and not peak.exceeded and time.perf_counter() - start < cap:
                got += len(await ws.recv())
            wall, cpu = time.perf_counter() - start, tree_cpu(proxy.pid) - cpu
    return {"bytes": got, "wall": wall, "cpu": cpu, "peak_mib": peak.mib}


async def client_to_console(proxy: Proxy, total: int, cap: float) -> dict[str, float]:
    block = b"\xaa" * MESSAGE
    async with connect(proxy.url()) as ws:
        await ws.send(b"S")
        acked, goal, done = 0, -1, asyncio.Event()

        async def count_acks() -> None:
            nonlocal acked
            async for message in ws:
                acked += len(message)
                if acked >= goal >= 0:
                    done.set()

        reader = asyncio.get_running_loop().create_task(count_acks())
        with Peak(proxy.pid, 4096) as peak:
            cpu, start, sent = tree_cpu(proxy.pid), time.perf_counter(), 0
            while sent < total and not peak.exceeded and time.perf_counter() - start < cap:
                for _ in range(ACK_UNIT // MESSAGE):
                    await ws.send(block)
                sent += ACK_UNIT
            goal = sent // ACK_UNIT
            if acked >= goal:
                done.set()
            await asyncio.wait_for(done.wait(), 120)  # the console has taken in every byte
            wall, cpu = time.perf_counter() - start, tree_cpu(proxy.pid) - cpu
        reader.cancel()
    return {"bytes": sent, "wall": wall, "cpu": cpu, "peak_mib": peak.mib}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def latency(proxies: list[Proxy], console_port: int, count: int) -> dict[str, list[float]]:
    """100-byte echoes, direct and through each proxy, in alternating rounds of 200."""
    payload = b"m" * 100
    reader, writer = await asyncio.open_connection("127.0.0.1", console_port)
    writer.write(b"E")
    sockets = {}
    for proxy in proxies:
        sockets[proxy.key] = await connect(proxy.url())
        await sockets[proxy.key].send(b"E")
    samples: dict[str, list[float]] = {"direct": [], **{p.key: [] for p in proxies}}
    await tcp_round_trips(reader, writer, 200, payload)  # warm up
    for ws in sockets.values():
        await ws_round_trips(ws, 200, payload)
    for _ in range(max(1, count // 200)):
        samples["direct"] += await tcp_round_trips(reader, writer, 200, payload)
        for key, ws in sockets.items():
            samples[key] += await ws_round_trips(ws, 200, payload)
    writer.close()
    for ws in sockets.values():
        await ws.close()
    return samples


async def hold_sessions(proxy: Proxy, wanted: int, budget: float) -> dict[str, Any]:
    """Open up to *wanted* echo sessions one after the other, each checked by one echo.

    Every session holds two descriptors in the proxy (client and console), so the
    count is capped by the proxy's open-file limit.
    """
    await settle(proxy.pid)
    nofile = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)[0]
    count = min(wanted, (nofile - open_files(proxy.pid) - 16) // 2)
    memory_before, _ = tree_memory(proxy.pid)
    cpu = tree_cpu(proxy.pid)
    floor = max(3072.0, total_mib() * 0.15)
    sockets: list[Any] = []
    failures: list[str] = []
    stopped = "target reached"
    start = time.perf_counter()
    if count < wanted:
        stopped = f"open-file limit ({nofile}: 2 per session)"
    while len(sockets) < count:
        if time.perf_counter() - start > budget:
            stopped = f"time budget ({budget:.0f} s)"
            break
        if len(sockets) % 100 == 0 and available_mib() < floor:
            stopped = f"memory guard (< {floor / 1024:.1f} GiB available)"
            break
        try:
            ws = await connect(proxy.url(), open_timeout=10)
            await ws.send(b"Ehi")
            if await asyncio.wait_for(ws.recv(), 10) != b"hi":
                raise RuntimeError("wrong echo")
            sockets.append(ws)
        except Exception as exc:  # any failure counts, and is reported
            failures.append(f"{type(exc).__name__}: {exc}"[:120])
            if len(failures) >= 5:
                logged = last_error(proxy.log)
                stopped = f"failures ({f'proxy: {logged}' if logged else failures[0]})"
                break
    opened = len(sockets)
    open_wall, open_cpu = time.perf_counter() - start, tree_cpu(proxy.pid) - cpu
    memory_after, processes = tree_memory(proxy.pid)

    async def echo(ws: Any) -> bool:
        try:
            await ws.send(b"ok")
            return bool(await ws.recv() == b"ok")
        except Exception:  # counted as not answering
            return False

    start = time.perf_counter()
    answered = 0
    if sockets:
        with contextlib.suppress(TimeoutError):
            results = await asyncio.wait_for(asyncio.gather(*(echo(ws) for ws in sockets)), 120)
            answered = sum(results)
    all_wall = time.perf_counter() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True), 120
        )
    return {
        "wanted": wanted, "opened": opened, "stopped": stopped, "failures": len(failures),
        "open_wall": open_wall, "open_cpu": open_cpu,
        "mib_before": memory_before, "mib_after": memory_after, "processes": processes,
        "answered": answered, "all_wall": all_wall,
    }


TRANSFERS = (("to_client", console_to_client), ("to_console", client_to_console))

#: websockify's --libserver engine in 0.13.0 lacks an attribute its handler reads.
LIBSERVER_SHIM = (
    "import websockify.websocketproxy as w\n"
    "w.LibProxyServer.unix_listen = getattr(w.LibProxyServer, 'unix_listen', None)\n"
    "w.websockify_init()\n"
)


def libserver_needs_patch() -> bool:
    import inspect

    from websockify.websocketproxy import LibProxyServer

    return "unix_listen" not in inspect.getsource(LibProxyServer)


def token_check_cost(issuer: Any, public_key: Any, count: int = 2000) -> float:
    """CPU seconds of one token check (signature, claims, replay cache), in this process."""
    from broker.tokens import ReplayCache, TokenVerifier

    verifier = TokenVerifier([public_key], replay_cache=ReplayCache(count + 1))
    tokens = [issuer.issue(DOMAIN, PROTOCOL, ttl=60).token for _ in range(count)]
    start = time.process_time()
    for token in tokens:
        verifier.verify(token, protocol=PROTOCOL, node="bench")
    return (time.process_time() - start) / count


def facts(nofile: str) -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    os_name = platform.system()
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    versions = {name: importlib.metadata.version(name)
                for name in ("console-broker", "websockets", "websockify", "numpy", "anyio")}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cores": f"{os.cpu_count()} ({model})",
        "memory": f"{total_mib() / 1024:.0f} GiB",
        "os": f"{os_name}, Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": ", ".join(f"{name} {version}" for name, version in versions.items()),
        "open-file limit": nofile,
        "load average at the start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


async def client_main(args: argparse.Namespace) -> None:
    limits = raise_nofile()
    print(nofile_note(limits), file=sys.stderr)
    if limits[1] < 2 * args.sessions + 64:
        print(f"the open-file limit caps every proxy below {args.sessions} sessions (two "
              f"descriptors each): it is {limits[1]} and may not be raised here", file=sys.stderr)
    total = args.mib * 2**20
    wanted = [name.strip() for name in args.proxies.split(",")]
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        tokens = Tokens(Path(tmp))
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        ports = {key: free_port() for key in ("broker", "websockify", "websockify-libserver")}
        consoles = {key: free_port() for key in ports}
        console_log = logs / "console.log"
        console = children.start([__file__, "--role", "console", "--ports",
                                  ",".join(map(str, consoles.values()))], console_log)
        for port in consoles.values():
            wait_listening(port, console, console_log)
        proxies: list[Proxy] = []
        for key in wanted:
            log = logs / f"{key}.log"
            port, target = ports[key], f"127.0.0.1:{consoles[key]}"
            if key == "broker":
                argv = [__file__, "--role", "broker", "--port", str(port),
                        "--console-port", str(consoles[key]),
                        "--public-key", str(tokens.public_key),
                        "--sessions", str(args.sessions),
                        "--broker-ping", str(args.broker_ping)]
                title, mode = "console-broker", (
                    "one process, asyncio; a token checked per session; "
                    f"proxy.ping_interval={args.broker_ping:g}")
                url = functools.partial(tokens.url, port)
            elif key == "websockify":
                argv = [sys.executable, "-m", "websockify", f"127.0.0.1:{port}", target]
                title = "websockify"
                mode = "its default server: a process forked per connection (multiprocessing)"
                url = functools.partial(plain_url, port)
            else:
                patched = libserver_needs_patch()
                start_argv = ["-c", LIBSERVER_SHIM] if patched else ["-m", "websockify"]
                argv = [sys.executable, *start_argv, "--libserver", f"127.0.0.1:{port}", target]
                title = "websockify --libserver"
                mode = "one process, a thread per connection (SocketServer engine)" + (
                    "; run with LibProxyServer.unix_listen = None set first: without it this "
                    "version fails every connection (AttributeError)" if patched else "")
                url = functools.partial(plain_url, port)
            process = children.start(argv, log)
            wait_listening(port, process, log)
            proxies.append(Proxy(key, title, mode, process, url, log))
            print(f"{title}: {mode}", file=sys.stderr)
        for proxy in proxies:
            await settle(proxy.pid)

        machine = facts(nofile_note(limits).split(": ", 1)[1])
        results: dict[str, dict[str, Any]] = {proxy.key: {} for proxy in proxies}
        for _ in range(args.repeat):  # rounds over the proxies, so a busy moment hits all
            for proxy in proxies:
                for name, move in TRANSFERS:
                    figures = await move(proxy, total, args.seconds)
                    results[proxy.key].setdefault(name, []).append(figures)
                    print(f"{proxy.title}: {name}: {figures['bytes'] / 2**20:.0f} MiB in "
                          f"{figures['wall']:.1f} s, CPU {figures['cpu']:.2f} s",
                          file=sys.stderr)
        samples = await latency(proxies, consoles["broker"], args.round_trips)
        for key, values in samples.items():
            print(f"{key}: round trip median {statistics.median(values) * 1e6:.0f} us",
                  file=sys.stderr)
        if args.sessions:
            for proxy in proxies:
                held = await hold_sessions(proxy, args.sessions, args.session_seconds)
                results[proxy.key]["sessions"] = held
                print(f"{proxy.title}: sessions {held}", file=sys.stderr)
                await settle(proxy.pid, 60)
        check = token_check_cost(tokens.issuer, tokens.private_key.public_key())
        machine = {**machine, "load average at the end":
                   " ".join(f"{x:.1f}" for x in os.getloadavg())}
        table = render(proxies, results, samples, machine, args, check)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"machine": machine, "results": results,
                 "round_trips": {k: [statistics.median(v), percentile(v, 0.99)]
                                 for k, v in samples.items()},
                 "token_check_s": check}, indent=2))


def render(
    proxies: list[Proxy], results: dict[str, dict[str, Any]], samples: dict[str, list[float]],
    machine: dict[str, str], args: argparse.Namespace, token_check: float,
) -> str:
    def spread(values: list[float], digits: int) -> str:
        """The median, and the range when there are several runs."""
        text = f"{statistics.median(values):.{digits}f}"
        if len(values) > 1:
            text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
        return text

    def transfer(key: str, name: str) -> tuple[str, str]:
        runs = results[key][name]
        return (spread([run["cpu"] / (run["bytes"] / 2**30) for run in runs], 2),
                spread([run["bytes"] / 2**20 / run["wall"] for run in runs], 0))

    direct_median = statistics.median(samples["direct"]) * 1e6
    direct_p99 = percentile(samples["direct"], 0.99) * 1e6
    rows: list[tuple[str, list[str]]] = []
    for name, label in (("to_client", "console -> client"), ("to_console", "client -> console")):
        cells = [transfer(p.key, name) for p in proxies]
        rows.append((f"{label}: CPU s per GiB", [c[0] for c in cells]))
        rows.append((f"{label}: MiB/s", [c[1] for c in cells]))
    peaks = [max(run["peak_mib"] for name, _ in TRANSFERS for run in results[p.key][name])
             for p in proxies]
    rows.append(("peak memory while moving data, MiB (PSS)", [f"{peak:.0f}" for peak in peaks]))
    for share, label in ((0.5, "median"), (0.99, "p99")):
        base = direct_median if share == 0.5 else direct_p99
        cells = []
        for proxy in proxies:
            value = percentile(samples[proxy.key], share) * 1e6
            cells.append(f"{value:.0f} (+{value - base:.0f})")
        rows.append((f"100-byte round trip, {label}, us (added)", cells))
    if args.sessions:
        held = [results[p.key]["sessions"] for p in proxies]
        rows += [
            (f"sessions held at once (target {args.sessions})", [str(h["opened"]) for h in held]),
            ("stopped by", [h["stopped"] for h in held]),
            ("opening them took, s", [f"{h['open_wall']:.1f}" for h in held]),
            ("proxy CPU to open one, ms",
             [f"{h['open_cpu'] / h['opened'] * 1e3:.2f}" if h["opened"] else "-" for h in held]),
            ("memory per session, KiB (PSS)",
             [f"{(h['mib_after'] - h['mib_before']) * 1024 / h['opened']:.0f}"
              if h["opened"] else "-" for h in held]),
            ("memory idle -> holding them, MiB (PSS)",
             [f"{h['mib_before']:.0f} -> {h['mib_after']:.0f}" for h in held]),
            ("processes holding them", [str(h["processes"]) for h in held]),
            ("one echo on every session at once, s",
             [f"{h['all_wall']:.2f} ({h['answered']} answered)" for h in held]),
        ]
    header = ["", *(p.title for p in proxies)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    notes = [
        "",
        *(f"{key}: {value}" for key, value in machine.items()),
        *(f"{p.title}: {p.mode}" for p in proxies),
        f"Moved: up to {args.mib} MiB each way, at most {args.seconds:g} s each, {args.repeat} "
        "times (median, and range); the console "
        f"writes {CHUNK // 1024} KiB at a time, the client sends {MESSAGE // 1024} KiB messages. "
        "CPU: user + system of the proxy process, its forked children included.",
        f"Round trips: {len(samples['direct'])} each, alternating; straight to the console "
        f"over TCP: median {direct_median:.0f} us, p99 {direct_p99:.0f} us. Added time includes "
        "the client's own WebSocket framing, the same for every proxy.",
    ]
    if args.sessions:
        notes.append(
            f"Sessions: opened one after the other, each checked by one echo, within "
            f"{args.session_seconds:g} s; the broker's cost to open includes its token check, "
            f"{token_check * 1e3:.2f} ms of CPU measured apart."
        )
    return "\n".join(lines + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB to move each way (default 1024)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfers per direction and proxy; the median is shown (default 3)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="at most this long per direction and proxy (default 20)")
    parser.add_argument("--round-trips", type=int, default=2000,
                        help="100-byte round trips per path (default 2000)")
    parser.add_argument("--sessions", type=int, default=10_000,
                        help="idle sessions to open on each proxy; 0: skip (default 10000)")
    parser.add_argument("--session-seconds", type=float, default=90.0,
                        help="time budget for opening them, per proxy (default 90)")
    parser.add_argument("--proxies", default="broker,websockify,websockify-libserver",
                        help="comma-separated: broker, websockify, websockify-libserver")
    parser.add_argument("--broker-ping", type=float, default=0.0,
                        help="the broker's proxy.ping_interval (default 0, like websockify's)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--logs", help="keep the proxies' logs in this directory")
    role_arguments(parser)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "console":
        asyncio.run(console_main([int(port) for port in args.ports.split(",")]))
    elif args.role == "broker":
        broker_main(args.port, args.console_port, args.public_key, args.sessions,
                    args.broker_ping)
    else:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
