"""The broker's proxy path against socat, websockify and the direct path, on loopback.

Processes: a console (one TCP server, a port per path: it pours bytes out, takes
them in and acknowledges them, or echoes), the proxies, and the client (this
process, a websockets client, or a raw TCP client for socat and the direct path;
its own CPU time is never counted):

* direct: the client straight to the console over TCP, no proxy (the baseline of
  the round trips);
* socat, as ``socat -b 262144 TCP-LISTEN:PORT,fork,... TCP:127.0.0.1:CONSOLE``: a
  raw TCP relay, no WebSocket, no token: the floor for a userland relay. It forks a
  process per connection;
* console-broker: ``Broker`` with a resolver that connects every session to the
  console over TCP (the ``tcp`` mode's path) and a protocol served by
  ``broker.service.raw_proxy``, the core's byte pump, through the plugin hooks;
  a token is issued and checked for every session. Its process runs on the event
  loop chosen (``--broker-loop``, or the ``broker-asyncio`` and ``broker-uvloop``
  columns side by side) and says which;
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
CPU each one costs (socat's: per forked child). Every figure is printed with its
ratio to socat's, and issue 16's targets beside them. Every process of the
benchmark raises its open-file limit as far as it may, and the output says how far
that was.

    .venv/bin/pip install -e '.[server,bench]'   # and uvloop for the broker-uvloop column
    .venv/bin/python benchmarks/vs_websockify.py [--mib 1024] [--sessions 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _kit import (
    ACK_UNIT,
    CHUNK,
    DOMAIN,
    EVENT_LOOPS,
    RAW_PROTOCOL,
    BenchResolver,
    Children,
    RawPlugin,
    Tokens,
    chosen_loop,
    console_main,
    free_port,
    nofile_note,
    raise_nofile,
    ran_on,
    role_arguments,
    run_broker,
    tcp_round_trips,
    wait_listening,
    ws_round_trips,
)

MESSAGE = 64 * 1024  # the client's messages toward the console
RAW = "/raw-frames"  # the key suffix of a path's round trips with the raw-frame client
PROTOCOL = RAW_PROTOCOL


# --- the broker process ------------------------------------------------------------------


def broker_main(port: int, console_port: int, public_key: Path, sessions: int,
                ping: float, event_loop: str) -> None:
    from broker.config import LimitsSection, ProxySection

    room = sessions + 100
    run_broker(
        port, public_key, BenchResolver(console_port), [("bench", RawPlugin())],
        replay=sessions + 100_000, log_level=None,  # the defaults: json, info
        event_loop=event_loop,
        limits=LimitsSection(
            max_sessions=room, max_sessions_per_domain=room, max_sessions_per_client=room
        ),
        proxy=ProxySection(ping_interval=ping),
    )


# --- measuring a process and its children --------------------------------------------------


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of *pid*, of its reaped children and of its live descendants
    (0 for None: the direct path has no proxy)."""
    import psutil

    if pid is None:
        return 0.0
    proc = psutil.Process(pid)
    own = proc.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def tree_memory(pid: int | None) -> tuple[float, int]:
    """PSS of *pid* and its descendants in MiB (shared pages counted once), and their count."""
    import psutil

    if pid is None:
        return 0.0, 0
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


async def settle(pid: int | None, timeout: float = 30.0) -> None:
    """Wait until *pid* has no children left (websockify reaps its handlers lazily)."""
    import psutil

    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not psutil.Process(pid).children():
                return
        except psutil.Error:
            return
        await asyncio.sleep(0.1)


async def quiesce(pid: int | None, timeout: float = 15.0) -> None:
    """Wait until *pid*'s tree has no children left and spends no CPU (under one clock
    tick in 0.2 s): the last transfer's wind-down (a proxy still draining what the
    console poured) is not counted in the next one's CPU."""
    await settle(pid, timeout)
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        before = tree_cpu(pid)
        await asyncio.sleep(0.2)
        if tree_cpu(pid) - before < 0.01:
            return


class Peak:
    """Samples a process tree's PSS in the background; the highest value seen."""

    def __init__(self, pid: int | None, limit_mib: float) -> None:
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


class TcpConn:
    """A raw TCP client with the calls the measurements make on a WebSocket: ``send``,
    ``recv`` (some bytes; ``ConnectionError`` at the end), ``async for``, ``close``,
    ``async with``. For socat and the direct path."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, timeout: float) -> TcpConn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), timeout)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        data = await self.reader.read(CHUNK)
        if not data:
            raise ConnectionError("closed by the far end")
        return data

    def __aiter__(self) -> TcpConn:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionError:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> TcpConn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class RawFrames:
    """A WebSocket client that does no more per message than the raw TCP client: the
    handshake by hand (RFC 6455 4.1, the ``binary`` subprotocol), then each message
    written as one frame masked once in advance, and the answer read as frame headers
    and payloads with ``readexactly``. What a round trip through a proxy adds over the
    direct path is then the proxy's, not the websockets library's framing in the client
    (websockets parses, queues and wakes a task per message)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, timeout: float = 20) -> RawFrames:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"no upgrade: {head.splitlines()[0]!r}")
        return cls(reader, writer)

    @staticmethod
    def frame(payload: bytes) -> bytes:
        """One masked binary frame (payloads under 126 bytes)."""
        mask = os.urandom(4)
        return bytes([0x82, 0x80 | len(payload)]) + mask + bytes(
            b ^ mask[i % 4] for i, b in enumerate(payload))

    async def send(self, data: bytes) -> None:
        self.writer.write(self.frame(data))
        await self.writer.drain()

    async def round_trips(self, count: int, payload: bytes) -> list[float]:
        """*count* echoes of *payload*, one at a time: seconds each."""
        frame, read = self.frame(payload), self.reader.readexactly
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.writer.write(frame)
            got = 0
            while got < len(payload):
                first, second = await read(2)
                size = second & 0x7F
                if size == 126:
                    size = int.from_bytes(await read(2), "big")
                elif size == 127:
                    size = int.from_bytes(await read(8), "big")
                await read(size)
                if first & 0x0F == 2:  # the echo; a control frame is not part of it
                    got += size
            times.append(time.perf_counter() - start)
        return times

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclasses.dataclass
class Proxy:
    """One path under test: how to reach it, and the process to measure (None for the
    direct path). *kind*: ``ws`` (a WebSocket client) or ``tcp`` (raw TCP)."""

    key: str
    title: str
    mode: str
    process: subprocess.Popen[bytes] | None
    port: int
    url: Callable[[], str]
    log: Path | None
    kind: str = "ws"
    loop: str = ""  # the broker's: the event loop its process ran on
    session_cap: int | None = None  # socat: at most this many sessions (a process each)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def is_broker(self) -> bool:
        return self.key.startswith("broker")

    async def open(self, timeout: float = 20) -> Any:
        if self.kind == "tcp":
            return await TcpConn.open(self.port, timeout)
        return await connect(self.url(), open_timeout=timeout)


def plain_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/"


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def last_error(log: Path | None) -> str:
    """The last exception line a proxy logged (websockify prints tracebacks)."""
    with contextlib.suppress(OSError, AttributeError):
        text = log.read_text(errors="replace")  # type: ignore[union-attr]
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


async def recv_exactly(conn: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await conn.recv()
    return data


async def console_to_client(proxy: Proxy, total: int, cap: float) -> dict[str, float]:
    async with await proxy.open() as ws:
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
    async with await proxy.open() as ws:
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


async def round_trips(proxy: Proxy, conn: Any, count: int, payload: bytes) -> list[float]:
    if proxy.kind == "tcp":  # the same client code for socat as for the direct path
        return await tcp_round_trips(conn.reader, conn.writer, count, payload)
    return await ws_round_trips(conn, count, payload)


async def latency(paths: list[Proxy], count: int) -> dict[str, list[float]]:
    """100-byte echoes through every path (the direct one included), one at a time, in
    alternating rounds of 200 after 200 each to warm up; through a WebSocket proxy with
    the websockets library's client and with :class:`RawFrames` (samples under the
    path's key + :data:`RAW`)."""
    payload = b"m" * 100
    conns = {}
    raws: dict[str, RawFrames] = {}  # a WebSocket proxy's raw-frame client, beside
    for path in paths:
        conns[path.key] = await path.open()
        await conns[path.key].send(b"E")
        if path.kind == "ws":
            raws[path.key] = await RawFrames.open(path.url())
            await raws[path.key].send(b"E")
    samples: dict[str, list[float]] = {path.key: [] for path in paths}
    samples |= {f"{key}{RAW}": [] for key in raws}
    for path in paths:
        await round_trips(path, conns[path.key], 200, payload)
        if path.key in raws:
            await raws[path.key].round_trips(200, payload)
    for _ in range(max(1, count // 200)):
        for path in paths:
            samples[path.key] += await round_trips(path, conns[path.key], 200, payload)
            if path.key in raws:
                samples[f"{path.key}{RAW}"] += await raws[path.key].round_trips(200, payload)
    for conn in [*conns.values(), *raws.values()]:
        await conn.close()
    return samples


async def hold_sessions(proxy: Proxy, wanted: int, budget: float) -> dict[str, Any]:
    """Open up to *wanted* echo sessions one after the other, each checked by one echo.

    Every session holds two descriptors in the proxy (client and console), so the
    count is capped by the proxy's open-file limit; socat's by ``--socat-sessions``
    (a process each).
    """
    assert proxy.pid is not None
    await settle(proxy.pid)
    nofile = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)[0]
    count = min(wanted, (nofile - open_files(proxy.pid) - 16) // 2)
    stopped = "target reached"
    if count < wanted:
        stopped = f"open-file limit ({nofile}: 2 per session)"
    if proxy.session_cap is not None and proxy.session_cap < count:
        count = proxy.session_cap
        stopped = f"the benchmark's cap for a process per session (--socat-sessions {count})"
    memory_before, _ = tree_memory(proxy.pid)
    cpu = tree_cpu(proxy.pid)
    floor = max(3072.0, total_mib() * 0.15)
    sockets: list[Any] = []
    failures: list[str] = []
    start = time.perf_counter()
    while len(sockets) < count:
        if time.perf_counter() - start > budget:
            stopped = f"time budget ({budget:.0f} s)"
            break
        if len(sockets) % 100 == 0 and available_mib() < floor:
            stopped = f"memory guard (< {floor / 1024:.1f} GiB available)"
            break
        try:
            ws = await proxy.open(timeout=10)
            await ws.send(b"Ehi")
            if await asyncio.wait_for(recv_exactly(ws, 2), 10) != b"hi":
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
            return bool(await recv_exactly(ws, 2) == b"ok")
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

#: The proxies --proxies may name; ``direct`` is always measured.
PROXIES = ("socat", "broker", "broker-asyncio", "broker-uvloop", "websockify",
           "websockify-libserver")
SOCAT_BUFFER = 262_144


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


def socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not installed"
    found = re.search(r"socat version (\S+)", out)
    return found.group(1) if found else "?"


def facts(nofile: str) -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    os_name = platform.system()
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    versions = {}
    for name in ("console-broker", "websockets", "websockify", "numpy", "anyio", "uvloop"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["socat"] = socat_version()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": f"{os.cpu_count()} ({model})",
        "memory": f"{total_mib() / 1024:.0f} GiB",
        "os": f"{os_name}, Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": ", ".join(f"{name} {version}" for name, version in versions.items()),
        "open-file limit": nofile,
        "load average at the start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def start_proxy(key: str, args: argparse.Namespace, children: Children, tokens: Tokens,
                port: int, console_port: int, log: Path) -> Proxy:
    target = f"127.0.0.1:{console_port}"
    kind, loop, cap = "ws", "", None
    url: Callable[[], str] = functools.partial(plain_url, port)
    if key == "socat":
        argv = ["socat", "-b", str(SOCAT_BUFFER),
                f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024,nodelay",
                f"TCP:{target},nodelay"]
        title, kind, cap = "socat", "tcp", args.socat_sessions
        mode = (f"socat -b {SOCAT_BUFFER}, raw TCP (no WebSocket, no token), TCP_NODELAY "
                "both sides: a process forked per connection")
    elif key.startswith("broker"):
        wanted_loop = key.split("-", 1)[1] if "-" in key else args.broker_loop
        loop = chosen_loop(wanted_loop)  # stops here if uvloop is wanted and missing
        argv = [__file__, "--role", "broker", "--port", str(port),
                "--console-port", str(console_port),
                "--public-key", str(tokens.public_key),
                "--sessions", str(args.sessions),
                "--broker-ping", str(args.broker_ping), "--broker-loop", loop]
        title = f"console-broker ({loop})"
        mode = (f"one process, {loop}; a token checked per session; "
                f"proxy.ping_interval={args.broker_ping:g}")
        url = functools.partial(tokens.url, port)
    elif key == "websockify":
        argv = [sys.executable, "-m", "websockify", f"127.0.0.1:{port}", target]
        title = "websockify"
        mode = "its default server: a process forked per connection (multiprocessing)"
    else:
        patched = libserver_needs_patch()
        start_argv = ["-c", LIBSERVER_SHIM] if patched else ["-m", "websockify"]
        argv = [sys.executable, *start_argv, "--libserver", f"127.0.0.1:{port}", target]
        title = "websockify --libserver"
        mode = "one process, a thread per connection (SocketServer engine)" + (
            "; run with LibProxyServer.unix_listen = None set first: without it this "
            "version fails every connection (AttributeError)" if patched else "")
    process = children.start(argv, log)
    wait_listening(port, process, log)
    if loop:
        ran = ran_on(log)
        if ran != loop:
            raise SystemExit(f"{title}: its process says it runs on {ran}, not {loop}")
        mode += f" (its process printed: event loop {ran})"
    return Proxy(key, title, mode, process, port, url, log, kind, loop, cap)


async def client_main(args: argparse.Namespace) -> None:
    limits = raise_nofile()
    print(nofile_note(limits), file=sys.stderr)
    if limits[1] < 2 * args.sessions + 64:
        print(f"the open-file limit caps every proxy below {args.sessions} sessions (two "
              f"descriptors each): it is {limits[1]} and may not be raised here", file=sys.stderr)
    total = args.mib * 2**20
    wanted = [name.strip() for name in args.proxies.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in PROXIES]
    if unknown or len(set(wanted)) != len(wanted):
        raise SystemExit(f"--proxies: each once, of {', '.join(PROXIES)}")
    for key in wanted:  # fail before starting anything
        if key.startswith("broker"):
            chosen_loop(key.split("-", 1)[1] if "-" in key else args.broker_loop)
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        tokens = Tokens(Path(tmp))
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        ports = {key: free_port() for key in wanted}
        consoles = {key: free_port() for key in ["direct", *wanted]}
        console_log = logs / "console.log"
        console = children.start([__file__, "--role", "console", "--ports",
                                  ",".join(map(str, consoles.values()))], console_log)
        for port in consoles.values():
            wait_listening(port, console, console_log)
        direct = Proxy("direct", "direct (no proxy)", "the client straight to the console "
                       "over TCP", None, consoles["direct"], str, None, "tcp")
        proxies: list[Proxy] = []
        for key in wanted:
            proxy = start_proxy(key, args, children, tokens, ports[key], consoles[key],
                                logs / f"{key}.log")
            proxies.append(proxy)
            print(f"{proxy.title}: {proxy.mode}", file=sys.stderr)
        for proxy in proxies:
            await settle(proxy.pid)
        paths = [direct, *proxies]

        machine = facts(nofile_note(limits).split(": ", 1)[1])
        results: dict[str, dict[str, Any]] = {path.key: {} for path in paths}
        for _ in range(args.repeat):  # rounds over the paths, so a busy moment hits all
            for path in paths:
                for name, move in TRANSFERS:
                    await quiesce(path.pid)  # the last transfer has wound down
                    try:  # a proxy that stops moving bytes stops the benchmark
                        figures = await asyncio.wait_for(move(path, total, args.seconds),
                                                         args.seconds + 150)
                    except (TimeoutError, ConnectionError, OSError) as exc:
                        raise SystemExit(f"{path.title}: {name} failed ({exc!r}); "
                                         f"{last_error(path.log) or 'see its log'}") from exc
                    results[path.key].setdefault(name, []).append(figures)
                    print(f"{path.title}: {name}: {figures['bytes'] / 2**20:.0f} MiB in "
                          f"{figures['wall']:.1f} s, CPU {figures['cpu']:.2f} s",
                          file=sys.stderr)
        samples = await asyncio.wait_for(latency(paths, args.round_trips), 900)
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
        figures = summarize(paths, results, samples)
        verdicts = targets(proxies, figures)
        print(render(paths, results, figures, verdicts, machine, args, check))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"machine": machine, "args": vars(args),
                 "paths": {p.key: {"title": p.title, "mode": p.mode, "event_loop": p.loop}
                           for p in paths},
                 "figures": figures, "targets": verdicts, "results": results,
                 "round_trips": {k: [statistics.median(v), percentile(v, 0.99)]
                                 for k, v in samples.items()},
                 "token_check_s": check}, indent=2))


# --- the figures, their ratios to socat's, and the targets ----------------------------------


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def summarize(paths: list[Proxy], results: dict[str, dict[str, Any]],
              samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per path: the medians of its figures, and each one's ratio to socat's (when socat
    ran). Times in µs, CPU in s per GiB, memory in KiB per session."""
    direct = {"median": statistics.median(samples["direct"]) * 1e6,
              "p99": percentile(samples["direct"], 0.99) * 1e6}
    figures: dict[str, dict[str, Any]] = {}
    for path in paths:
        own: dict[str, Any] = {}
        for name, _ in TRANSFERS:
            runs = results[path.key][name]
            own[f"mib_s_{name}"] = statistics.median(
                run["bytes"] / 2**20 / run["wall"] for run in runs)
            own[f"cpu_per_gib_{name}"] = None if path.pid is None else statistics.median(
                run["cpu"] / (run["bytes"] / 2**30) for run in runs)
        own["peak_mib"] = None if path.pid is None else max(
            run["peak_mib"] for name, _ in TRANSFERS for run in results[path.key][name])
        own["round_trip_median_us"] = statistics.median(samples[path.key]) * 1e6
        own["round_trip_p99_us"] = percentile(samples[path.key], 0.99) * 1e6
        own["round_trips"] = len(samples[path.key])
        raw = samples.get(f"{path.key}{RAW}", samples[path.key])  # a TCP client is raw
        own["raw_round_trip_median_us"] = statistics.median(raw) * 1e6
        own["raw_round_trip_p99_us"] = percentile(raw, 0.99) * 1e6
        if path.pid is not None:
            own["added_median_us"] = own["round_trip_median_us"] - direct["median"]
            own["added_p99_us"] = own["round_trip_p99_us"] - direct["p99"]
            own["raw_added_median_us"] = own["raw_round_trip_median_us"] - direct["median"]
            own["raw_added_p99_us"] = own["raw_round_trip_p99_us"] - direct["p99"]
        held = results[path.key].get("sessions")
        if held and held["opened"]:
            grown = held["mib_after"] - held["mib_before"]
            own["kib_per_session"] = grown * 1024 / held["opened"]
            own["sessions_per_process"] = held["opened"] / max(1, held["processes"])
            own["open_cpu_ms"] = held["open_cpu"] / held["opened"] * 1e3
        figures[path.key] = own
    if "socat" in figures:
        base = figures["socat"]
        for own in figures.values():
            own["ratio_to_socat"] = {
                key: ratio(value, base.get(key)) for key, value in own.items()
                if isinstance(value, float) and key in base}
    return figures


#: Issue 16's targets for the broker: (figure, what, how the limit is made).
TARGETS = (
    ("added_median_us", "added round trip, median <= 2x socat's added", "socat", 2.0),
    ("added_p99_us", "added round trip, p99 <= 300 us over direct", "absolute", 300.0),
    ("raw_added_median_us", "added round trip with the raw-frame client, median <= 2x "
     "socat's added", "socat", 2.0),
    ("raw_added_p99_us", "added round trip with the raw-frame client, p99 <= 300 us over "
     "direct", "absolute", 300.0),
    ("cpu_per_gib_to_client", "console -> client: CPU per GiB <= 1.2x socat's", "socat", 1.2),
    ("cpu_per_gib_to_console", "client -> console: CPU per GiB <= 1.2x socat's", "socat", 1.2),
    ("kib_per_session", "idle sessions in one process at <= 40 KiB each", "absolute", 40.0),
)
TARGET_NOTES = {
    "cpu_per_gib_to_client": "<= 1.2x socat",
    "cpu_per_gib_to_console": "<= 1.2x socat",
    "added_median_us": "added <= 2x socat's added",
    "added_p99_us": "added <= 300 us",
    "raw_added_median_us": "added <= 2x socat's added",
    "raw_added_p99_us": "added <= 300 us",
    "kib_per_session": "<= 40 KiB, in one process",
}


def targets(
    proxies: list[Proxy], figures: dict[str, dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """For each broker column, each target: the figure, the limit, met or by how much missed."""
    verdicts: dict[str, list[dict[str, Any]]] = {}
    socat = figures.get("socat", {})
    for proxy in proxies:
        if not proxy.is_broker:
            continue
        rows = []
        for key, what, kind, factor in TARGETS:
            value = figures[proxy.key].get(key)
            limit = factor if kind == "absolute" else (
                None if socat.get(key) is None else socat[key] * factor)
            row: dict[str, Any] = {"target": what, "figure": value, "limit": limit}
            if value is None or limit is None:
                row["verdict"] = "not measured" if value is None else "no socat figure to compare"
            elif key == "kib_per_session" and figures[proxy.key].get("sessions_per_process", 0) < 2:
                row["verdict"] = "not in one process"
            elif value <= limit:
                row["verdict"] = "met"
            else:
                row["verdict"] = "missed"
                row["over_by"] = value - limit
                row["over_by_share"] = (value - limit) / limit if limit > 0 else None
            rows.append(row)
        verdicts[proxy.key] = rows
    return verdicts


def render(
    paths: list[Proxy], results: dict[str, dict[str, Any]], figures: dict[str, dict[str, Any]],
    verdicts: dict[str, list[dict[str, Any]]], machine: dict[str, str],
    args: argparse.Namespace, token_check: float,
) -> str:
    has_socat = "socat" in figures

    def spread(values: list[float], digits: int) -> str:
        """The median, and the range when there are several runs."""
        text = f"{statistics.median(values):.{digits}f}"
        if len(values) > 1:
            text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
        return text

    def to_socat(path: Proxy, key: str) -> str:
        """'; 1.23x socat' after a figure, when there is one to compare with."""
        if not has_socat or path.key == "socat":
            return ""
        value = figures[path.key].get("ratio_to_socat", {}).get(key)
        return "" if value is None else f"; {value:.2f}x"

    rows: list[tuple[str, list[str], str]] = []
    for name, label in (("to_client", "console -> client"), ("to_console", "client -> console")):
        cells = []
        for path in paths:
            runs = results[path.key][name]
            if path.pid is None:
                cells.append("- (no proxy)")
            else:
                cells.append(spread([run["cpu"] / (run["bytes"] / 2**30) for run in runs], 2)
                             + to_socat(path, f"cpu_per_gib_{name}"))
        rows.append((f"{label}: CPU s per GiB", cells, TARGET_NOTES[f"cpu_per_gib_{name}"]))
        speeds = [spread([run["bytes"] / 2**20 / run["wall"] for run in results[p.key][name]], 0)
                  + to_socat(p, f"mib_s_{name}") for p in paths]
        rows.append((f"{label}: MiB/s", speeds, ""))
    rows.append(("peak memory while moving data, MiB (PSS)",
                 ["-" if figures[p.key]["peak_mib"] is None else f"{figures[p.key]['peak_mib']:.0f}"
                  for p in paths], ""))
    for prefix, client in (("", ""), ("raw_", ", raw-frame client")):
        for share in ("median", "p99"):
            cells = []
            for path in paths:
                own = figures[path.key]
                text = f"{own[f'{prefix}round_trip_{share}_us']:.0f}"
                if path.pid is not None:
                    text += (f" (+{own[f'{prefix}added_{share}_us']:.0f}"
                             f"{to_socat(path, f'{prefix}added_{share}_us')})")
                if prefix and path.kind != "ws":
                    text += ": raw TCP, as above"
                cells.append(text)
            rows.append((f"100-byte round trip{client}, {share}, us (added over direct)",
                         cells, TARGET_NOTES[f"{prefix}added_{share}_us"]))
    if args.sessions:
        proxies = [p for p in paths if p.pid is not None]
        held = {p.key: results[p.key]["sessions"] for p in proxies}

        def per(fn: Callable[[Proxy], str]) -> list[str]:
            return ["-" if p.pid is None else fn(p) for p in paths]

        def kib(p: Proxy) -> str:
            if not held[p.key]["opened"]:
                return "-"
            text = f"{figures[p.key]['kib_per_session']:.0f}" + to_socat(p, "kib_per_session")
            return text + (" (PSS per forked child)" if p.key == "socat" else "")

        rows += [
            (f"sessions held at once (target {args.sessions})",
             per(lambda p: str(held[p.key]["opened"])), ""),
            ("stopped by", per(lambda p: held[p.key]["stopped"]), ""),
            ("sessions per process",
             per(lambda p: f"{figures[p.key].get('sessions_per_process', 0):.0f}"), ""),
            ("opening them took, s", per(lambda p: f"{held[p.key]['open_wall']:.1f}"), ""),
            ("proxy CPU to open one, ms",
             per(lambda p: f"{figures[p.key]['open_cpu_ms']:.2f}" + to_socat(p, "open_cpu_ms")
                 if held[p.key]["opened"] else "-"), ""),
            ("memory per session, KiB (PSS)", per(kib), TARGET_NOTES["kib_per_session"]),
            ("memory idle -> holding them, MiB (PSS)",
             per(lambda p: f"{held[p.key]['mib_before']:.0f} -> {held[p.key]['mib_after']:.0f}"),
             ""),
            ("processes holding them", per(lambda p: str(held[p.key]["processes"])), ""),
            ("one echo on every session at once, s",
             per(lambda p: f"{held[p.key]['all_wall']:.2f} ({held[p.key]['answered']} answered)"),
             ""),
        ]
    header = ["", *(p.title for p in paths), "target (issue 16)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([label, *cells, note]) + " |" for label, cells, note in rows]
    lines += ["", "Against issue 16's targets:", ""]
    units = {"added_median_us": "us", "added_p99_us": "us", "raw_added_median_us": "us",
             "raw_added_p99_us": "us", "kib_per_session": "KiB"}
    for key, rows_of in verdicts.items():
        title = next(p.title for p in paths if p.key == key)
        for row, (figure, *_rest) in zip(rows_of, TARGETS, strict=True):
            unit = units.get(figure, "CPU s/GiB")
            digits = 2 if unit == "CPU s/GiB" else 0
            text = f"- {title}: {row['target']}: {row['verdict']}"
            if row["figure"] is not None and row["limit"] is not None:
                text += f" ({row['figure']:.{digits}f} {unit} against {row['limit']:.{digits}f}"
                if row["verdict"] == "missed":
                    text += f": over by {row['over_by']:.{digits}f} {unit}"
                    if row["over_by_share"] is not None:
                        text += f", {row['over_by_share']:.0%} of the limit"
                text += ")"
            lines.append(text)
    direct = figures["direct"]
    notes = [
        "",
        *(f"{key}: {value}" for key, value in machine.items()),
        *(f"{p.title}: {p.mode}" for p in paths),
        f"Moved: up to {args.mib} MiB each way, at most {args.seconds:g} s each, {args.repeat} "
        "times (median, and range); the console "
        f"writes {CHUNK // 1024} KiB at a time, the client sends {MESSAGE // 1024} KiB messages. "
        "CPU: user + system of the proxy process, its forked children included.",
        f"Round trips: {direct['round_trips']} each, "
        f"alternating; straight to the console over TCP: median "
        f"{direct['round_trip_median_us']:.0f} us, p99 {direct['round_trip_p99_us']:.0f} us. "
        "Added time through a WebSocket proxy includes the client's own WebSocket framing, "
        "the same for each of them; socat's client is raw TCP, as the direct path's. The "
        "raw-frame client (measured in the same rounds) writes each message as a frame "
        "masked in advance and reads the answer with readexactly: no more per message than "
        "the raw TCP client, so what it adds over direct is the proxy's alone.",
    ]
    if has_socat:
        notes.append("Nx after a figure: its ratio to socat's (the floor for a userland relay).")
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
    parser.add_argument("--socat-sessions", type=int, default=1000,
                        help="at most this many on socat, a process each (default 1000)")
    parser.add_argument("--session-seconds", type=float, default=90.0,
                        help="time budget for opening them, per proxy (default 90)")
    parser.add_argument("--proxies", default="socat,broker,websockify,websockify-libserver",
                        help=f"comma-separated, of: {', '.join(PROXIES)} (the direct path is "
                        "always measured; default socat,broker,websockify,websockify-libserver)")
    parser.add_argument("--broker-loop", choices=EVENT_LOOPS, default="auto",
                        help="the event loop of the 'broker' column's process (auto: uvloop "
                        "when installed, as service.event_loop; broker-asyncio and "
                        "broker-uvloop name theirs)")
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
                    args.broker_ping, args.broker_loop)
    else:
        # SIGTERM ends the client as Ctrl-C does: its processes are ended on the way out
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
