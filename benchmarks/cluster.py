"""A cluster behind the front door on one machine: many concurrent VNC sessions, their
memory, the CPU the front door and the node brokers spend per GiB, and the latency the
front door adds.

The set-up is tests/cluster/clusterkit.py's: network namespaces for three node hosts
(each running ``console-broker serve``), two front hosts (nginx with the configuration
``console-broker front nginx`` writes) and a client host that reaches the fronts only.
Each node gets its own tiny guest on the machine's libvirtd, whose QEMU serves more VNC
clients than its default 32 (``-set vnc.default.connections=N``). Tokens are minted in
this process with the control plane's key, the claims ``console-broker token --node``
makes. docs/benchmarks.md ("A cluster behind the front door") explains the choices and
has figures.

Phases, each bounded in seconds (and bytes where bytes move):

1. open ``--sessions`` VNC sessions from the client host through the fronts (round robin
   over nodes and fronts); each does RFB up to QEMU's ServerInit through nginx and the
   node broker; failures are counted by reason;
2. hold them ``--hold`` seconds, then prove every one is still open: a 1x1
   non-incremental FramebufferUpdateRequest answered by QEMU;
3. memory: each node broker's RSS before its sessions and with them, and nginx's (both
   fronts, master and workers), per session;
4. latency: WebSocket ping/pong (answered by the node broker) through the front door
   against straight to a node from a front host (with the front's client certificate);
5. bulk: ``--bulk-sessions`` of the held sessions ask QEMU for full raw frames, one
   request at a time each, until ``--mib`` MiB arrived or ``--bulk-seconds`` passed; the
   CPU time of the nginx processes and of the node brokers (from /proc) per GiB.

Then every session is closed, the cluster and the guests are removed.

    .venv/bin/python benchmarks/cluster.py [--sessions 1000] [--hold 60] [--mib 1024]

Needs root, the test bed (scripts/setup-host), nginx and iproute2.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from _kit import cpu_seconds, nofile_note, raise_nofile, rss_mib

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from clusterkit import (  # noqa: E402 - after the path above
    CLI,
    NODE_PORT,
    PUBLIC_NAME,
    PUBLIC_ORIGIN,
    Cluster,
    Front,
    Node,
)

PROTOCOL = "vnc"
TOKEN_TTL = 60  # tokens.default_ttl, what ``console-broker token`` issues without --ttl
RFB_VERSION = b"RFB 003.008\n"
MAX_MESSAGE = 16 * 2**20  # the client's bound on one WebSocket message
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


class RFBError(Exception):
    """The server said something the benchmark's RFB client does not expect."""


# --- RFB over a WebSocket ----------------------------------------------------------------


class RFBStream:
    """RFB bytes over a WebSocket whose messages split them anywhere."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def _message(self) -> bytes:
        message = await self.ws.recv(decode=False)
        if not isinstance(message, bytes):
            raise RFBError("a text message")
        return message

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += await self._message()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def skip(self, size: int) -> None:
        """Read *size* bytes and drop them, without copying whole messages."""
        while size:
            if self.buffer:
                taken = min(size, len(self.buffer))
                del self.buffer[:taken]
                size -= taken
                continue
            message = await self._message()
            if len(message) <= size:
                size -= len(message)
            else:
                self.buffer += memoryview(message)[size:]
                size = 0

    async def handshake(self) -> tuple[int, int, int]:
        """RFB 3.8 with security None and a shared ClientInit, up to ServerInit: the
        framebuffer's width, height and bytes per pixel."""
        if (version := await self.read(12)) != RFB_VERSION:
            raise RFBError(f"ProtocolVersion {version!r}")
        await self.ws.send(RFB_VERSION)
        (count,) = await self.read(1)
        if count == 0:
            (length,) = struct.unpack("!I", await self.read(4))
            raise RFBError(f"refused: {(await self.read(length)).decode(errors='replace')}")
        if 1 not in await self.read(count):
            raise RFBError("security None not offered")
        await self.ws.send(b"\x01")
        if (result := await self.read(4)) != b"\0\0\0\0":
            raise RFBError(f"SecurityResult {result!r}")
        await self.ws.send(b"\x01")  # ClientInit: shared
        init = await self.read(24)
        width, height, bits = struct.unpack("!HHB", init[:5])
        (name_length,) = struct.unpack("!I", init[20:24])
        await self.skip(name_length)
        return width, height, bits // 8

    async def update(self, bpp: int, x: int, y: int, width: int, height: int) -> int:
        """Send a non-incremental FramebufferUpdateRequest and read the update (raw
        rectangles; no SetEncodings was sent, so QEMU sends raw). Bytes read."""
        await self.ws.send(struct.pack("!BBHHHH", 3, 0, x, y, width, height))
        total = 0
        while True:
            kind = (await self.read(1))[0]
            total += 1
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack("!3xI", await self.read(7))
                await self.skip(length)
                total += 7 + length
                continue
            if kind != 0:
                raise RFBError(f"server message type {kind}")
            (rects,) = struct.unpack("!xH", await self.read(3))
            total += 3
            for _ in range(rects):
                _x, _y, w, h, encoding = struct.unpack("!HHHHi", await self.read(12))
                if encoding != 0:
                    raise RFBError(f"encoding {encoding}")
                await self.skip(w * h * bpp)
                total += 12 + w * h * bpp
            return total


# --- sessions ----------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    index: int
    node: Node
    front: Front | None  # None: straight to the node from a front host
    ws: Any
    rfb: RFBStream
    width: int
    height: int
    bpp: int


def reason_of(exc: BaseException) -> str:
    """A failure's reason, short enough to count by."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        return f"closed {frame.code} {frame.reason}".strip() if frame else "closed (no close frame)"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, RFBError):
        return f"RFB: {exc}"
    if isinstance(exc, OSError) and exc.errno:
        return f"{type(exc).__name__} {os.strerror(exc.errno)}"
    return f"{type(exc).__name__}: {exc}"[:80]


class Opener:
    """Opens VNC sessions: mints the token, connects from the right host, completes RFB."""

    def __init__(self, cluster: Cluster, domains: dict[str, str]) -> None:
        from broker.keys import load_private_key, private_key_path
        from broker.tokens import TokenIssuer

        self.cluster = cluster
        self.domains = domains
        key = load_private_key(private_key_path(cluster.control_plane_keys))
        # what ``console-broker token UUID --node NAME --key-dir DIR`` signs
        self.issuers = {node.name: TokenIssuer(key, node.name) for node in cluster.nodes}
        self.public = cluster.client_context()
        self.direct: dict[str, ssl.SSLContext] = {}
        for node in cluster.nodes:
            context = ssl.create_default_context(cafile=str(node.certs["ca"]))
            context.load_cert_chain(cluster.front_certs["client"],
                                    cluster.front_certs["client-key"])
            self.direct[node.name] = context

    def token(self, node: Node) -> str:
        issued = self.issuers[node.name].issue(self.domains[node.name], PROTOCOL, ttl=TOKEN_TTL)
        return urlencode({"token": issued.token})

    async def open(self, index: int, node: Node, front: Front | None,
                   timeout: float = 30.0) -> Session:
        """A session on *node* through *front* from the client host, or with *front*
        None straight to the node from the first front's host."""
        from websockets.asyncio.client import connect

        if front is not None:
            host, address, port = self.cluster.client, front.address, 443
            url = f"wss://{PUBLIC_NAME}/n/{node.name}/ws/{PROTOCOL}?{self.token(node)}"
            context, server_name = self.public, PUBLIC_NAME
        else:
            host, address, port = self.cluster.fronts[0].host, node.host.address(), NODE_PORT
            url = f"wss://{node.name}:{NODE_PORT}/ws/{PROTOCOL}?{self.token(node)}"
            context, server_name = self.direct[node.name], node.name
        sock = host.socket()
        ws = None
        try:
            async with asyncio.timeout(timeout):
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (address, port))
                ws = await connect(
                    url, sock=sock, ssl=context, server_hostname=server_name,
                    origin=PUBLIC_ORIGIN, subprotocols=["binary"], compression=None,
                    max_size=MAX_MESSAGE, ping_interval=None, open_timeout=None,
                    close_timeout=5,
                )
                rfb = RFBStream(ws)
                width, height, bpp = await rfb.handshake()
        except BaseException:
            if ws is not None:
                ws.transport.abort()
            sock.close()
            raise
        return Session(index, node, front, ws, rfb, width, height, bpp)


# --- what runs where ----------------------------------------------------------------------


def namespace_pids(hosts: Iterable[Any]) -> list[int]:
    return [pid for host in hosts for pid in host.pids()]


def cpu_of(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def rss_of(pids: Iterable[int]) -> float:
    """RSS in MiB, summed."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_mib(pid)
    return total


def qemu_pid(domain_name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text().strip())


def available_fraction() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemAvailable"].split()[0]) / int(fields["MemTotal"].split()[0])


def guest_xml(testbed: Any, connections: int) -> str:
    """The tiny guest with a VNC display (``console-broker xml enable --consoles vnc``),
    whose QEMU serves up to *connections* VNC clients (QEMU's default is 32)."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", PROTOCOL],
        input=testbed.guest_xml(), check=True, capture_output=True, text=True,
    ).stdout
    enabled = enabled.replace("<domain type='qemu'>",
                              f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'>", 1)
    extra = ("  <qemu:commandline><qemu:arg value='-set'/>"
             f"<qemu:arg value='vnc.default.connections={connections}'/></qemu:commandline>\n")
    return enabled.replace("</domain>", extra + "</domain>")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the phases ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Cluster, domains: dict[str, str],
                 qemu_pids: list[int]) -> None:
        self.args = args
        self.cluster = cluster
        self.opener = Opener(cluster, domains)
        self.qemu_pids = qemu_pids
        self.results: dict[str, Any] = {}
        self.sessions: list[Session] = []

    def node_pids(self) -> dict[str, list[int]]:
        return {node.name: node.host.pids() for node in self.cluster.nodes}

    def nginx_pids(self) -> list[int]:
        return namespace_pids(front.host for front in self.cluster.fronts)

    def memory(self) -> dict[str, float]:
        figures = {name: rss_of(pids) for name, pids in self.node_pids().items()}
        figures["nginx"] = rss_of(self.nginx_pids())
        figures["qemu"] = rss_of(self.qemu_pids)
        return figures

    def cpu(self) -> dict[str, float]:
        nodes = self.node_pids()
        return {
            "brokers": cpu_of(pid for pids in nodes.values() for pid in pids),
            "nginx": cpu_of(self.nginx_pids()),
            "qemu": cpu_of(self.qemu_pids),
            "client": time.process_time(),
        }

    async def warm_up(self) -> None:
        """One session per node through each front, opened and closed, so that what a
        broker and nginx set up once is not counted per session."""
        for node in self.cluster.nodes:
            for front in self.cluster.fronts:
                session = await self.opener.open(-1, node, front)
                await session.ws.close()
        await asyncio.sleep(2)

    async def open_all(self) -> None:
        args, nodes, fronts = self.args, self.cluster.nodes, self.cluster.fronts
        failures: collections.Counter[str] = collections.Counter()
        examples: dict[str, str] = {}
        gate = asyncio.Semaphore(args.concurrency)
        deadline = time.monotonic() + args.open_seconds
        stopped: list[str] = []

        async def one(index: int) -> None:
            async with gate:
                if stopped:
                    failures[f"not tried ({stopped[0]})"] += 1
                    return
                if time.monotonic() > deadline:
                    stopped.append(f"the {args.open_seconds:g} s budget ran out")
                    failures[f"not tried ({stopped[0]})"] += 1
                    return
                if available_fraction() < 0.10:
                    stopped.append("memory available fell under 10 %")
                    failures[f"not tried ({stopped[0]})"] += 1
                    return
                node, front = nodes[index % len(nodes)], fronts[index % len(fronts)]
                try:
                    session = await self.opener.open(index, node, front)
                except Exception as exc:
                    reason = reason_of(exc)
                    failures[reason] += 1
                    examples.setdefault(reason, f"{type(exc).__name__}: {exc}"[:200])
                    return
                self.sessions.append(session)
                if len(self.sessions) % 100 == 0:
                    progress(f"{len(self.sessions)} sessions open")

        before = self.cpu()
        start = time.monotonic()
        await asyncio.gather(*(one(index) for index in range(args.sessions)))
        wall = time.monotonic() - start
        after = self.cpu()
        self.sessions.sort(key=lambda session: session.index)
        self.results["open"] = {
            "target": args.sessions,
            "opened": len(self.sessions),
            "seconds": wall,
            "failures": dict(failures),
            "failure_examples": examples,
            "per_node": dict(collections.Counter(s.node.name for s in self.sessions)),
            "per_front": dict(collections.Counter(s.front.name for s in self.sessions
                                                  if s.front is not None)),
            "cpu": {key: after[key] - before[key] for key in before},
        }
        progress(f"opened {len(self.sessions)} of {args.sessions} in {wall:.1f} s; "
                 f"failures: {dict(failures) or 'none'}")

    async def check_all(self) -> None:
        """Every session still open answers a 1x1 non-incremental update request."""
        outcomes: collections.Counter[str] = collections.Counter()

        async def one(session: Session) -> bool:
            try:
                async with asyncio.timeout(self.args.check_seconds):
                    await session.rfb.update(session.bpp, 0, 0, 1, 1)
            except Exception as exc:
                outcomes[reason_of(exc)] += 1
                return False
            outcomes["answered"] += 1
            return True

        start = time.monotonic()
        alive = await asyncio.gather(*(one(session) for session in self.sessions))
        wall = time.monotonic() - start
        lost = [s for s, ok in zip(self.sessions, alive, strict=True) if not ok]
        for session in lost:
            session.ws.transport.abort()
        self.sessions = [s for s, ok in zip(self.sessions, alive, strict=True) if ok]
        self.results["hold"] = {
            "seconds": self.args.hold,
            "still_open": len(self.sessions),
            "outcomes": dict(outcomes),
            "check_seconds": wall,
            "per_node": dict(collections.Counter(s.node.name for s in self.sessions)),
        }
        progress(f"after {self.args.hold:g} s: {len(self.sessions)} answered "
                 f"({dict(outcomes)}) in {wall:.1f} s")

    async def latency(self) -> None:
        """WebSocket ping/pong through the front door and straight to the node, one at a
        time, in alternating rounds over the nodes (answered by the node broker)."""
        count, rounds = self.args.round_trips, 100
        paths: dict[str, list[Session]] = {"front door": [], "direct": []}
        for node in self.cluster.nodes:
            paths["front door"].append(await self.opener.open(-1, node, self.cluster.fronts[0]))
            paths["direct"].append(await self.opener.open(-1, node, None))
        samples: dict[str, list[float]] = {key: [] for key in paths}

        async def trips(session: Session, number: int) -> list[float]:
            times = []
            for _ in range(number):
                start = time.perf_counter()
                waiter = await session.ws.ping()
                await waiter
                times.append(time.perf_counter() - start)
            return times

        async with asyncio.timeout(self.args.latency_seconds):
            for sessions in paths.values():
                for session in sessions:
                    await trips(session, 20)  # warm-up
            turn = 0
            while min(len(values) for values in samples.values()) < count:
                for key, sessions in paths.items():
                    session = sessions[turn % len(sessions)]
                    samples[key] += await trips(session, min(rounds, count - len(samples[key])))
                turn += 1
        for sessions in paths.values():
            for session in sessions:
                await session.ws.close()
        self.results["latency"] = {
            key: {"count": len(values), "median_us": statistics.median(values) * 1e6,
                  "p99_us": percentile(values, 0.99) * 1e6}
            for key, values in samples.items()
        }
        front, direct = (self.results["latency"][k] for k in ("front door", "direct"))
        progress(f"ping round trip median: front door {front['median_us']:.0f} us, "
                 f"direct {direct['median_us']:.0f} us")

    async def bulk(self) -> None:
        """Full raw frames from QEMU over some of the held sessions, one request at a time
        each, until --mib MiB arrived or --bulk-seconds passed."""
        limit, cap = self.args.mib * 2**20, self.args.bulk_seconds
        chosen = self.sessions[: self.args.bulk_sessions]
        got = [0]
        errors: collections.Counter[str] = collections.Counter()
        start = time.monotonic()

        async def pull(session: Session) -> None:
            try:
                while got[0] < limit and time.monotonic() - start < cap:
                    async with asyncio.timeout(max(5.0, cap)):
                        size = await session.rfb.update(
                            session.bpp, 0, 0, session.width, session.height)
                    got[0] += size  # not ``got[0] += await ...``: that reads got[0] first
            except Exception as exc:
                errors[reason_of(exc)] += 1

        before = self.cpu()
        await asyncio.gather(*(pull(session) for session in chosen))
        wall = time.monotonic() - start
        after = self.cpu()
        cpu = {key: after[key] - before[key] for key in before}
        gib = got[0] / 2**30
        self.results["bulk"] = {
            "sessions": len(chosen),
            "per_node": dict(collections.Counter(s.node.name for s in chosen)),
            "bytes": got[0],
            "seconds": wall,
            "mib_per_s": got[0] / 2**20 / wall,
            "cpu": cpu,
            "cpu_s_per_gib": {key: value / gib for key, value in cpu.items()} if gib else {},
            "errors": dict(errors),
            "frame": [chosen[0].width, chosen[0].height, chosen[0].bpp] if chosen else None,
        }
        progress(f"bulk: {got[0] / 2**20:.0f} MiB in {wall:.1f} s over {len(chosen)} sessions; "
                 f"CPU s: {', '.join(f'{k} {v:.2f}' for k, v in cpu.items())}")

    async def close_all(self) -> None:
        async def one(session: Session) -> None:
            with contextlib.suppress(Exception):
                await session.ws.close()

        await asyncio.gather(*(one(session) for session in self.sessions))
        self.sessions = []

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for session in self.sessions:  # interrupted: the brokers see the end at once
                session.ws.transport.abort()

    async def _run(self) -> None:
        args = self.args
        progress("warming up (a session per node and front, opened and closed)")
        await self.warm_up()
        memory = {"before": self.memory()}
        await self.open_all()
        memory["opened"] = self.memory()
        if args.hold:
            progress(f"holding {len(self.sessions)} sessions {args.hold:g} s")
            await asyncio.sleep(args.hold)
        await self.check_all()
        memory["held"] = self.memory()
        per_node = self.results["hold"]["per_node"]
        self.results["memory"] = {
            "rss_mib": memory,
            "per_session_kib": {
                name: (memory["held"][name] - memory["before"][name]) * 1024 / per_node[name]
                for name in per_node
            },
        }
        for key in ("nginx", "qemu") if self.sessions else ():
            self.results["memory"]["per_session_kib"][key] = (
                (memory["held"][key] - memory["before"][key]) * 1024 / len(self.sessions))
        await self.latency()
        if args.mib and args.bulk_sessions:
            await self.bulk()
        progress("closing every session")
        await self.close_all()
        await asyncio.sleep(3)
        memory["closed"] = self.memory()


# --- the report ---------------------------------------------------------------------------


def facts(nofile: str) -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    os_name = platform.system()
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": f"{os.cpu_count()} ({model})",
        "memory": f"{pages / 2**30:.0f} GiB",
        "os": f"{os_name}, Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": ", ".join(
            [f"{name} {importlib.metadata.version(name)}" for name in ("console-broker",
                                                                        "websockets")]
            + [nginx.split(": ", 1)[-1], qemu]),
        "open-file limit": nofile,
        "load average at the start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def render(results: dict[str, Any], machine: dict[str, str], args: argparse.Namespace) -> str:
    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{key} {value}" for key, value in sorted(mapping.items())) or "none"

    opened, hold, memory = results["open"], results["hold"], results["memory"]
    rss, per = memory["rss_mib"], memory["per_session_kib"]
    nodes = sorted(hold["per_node"])
    rows: list[tuple[str, str]] = [
        (f"sessions opened (target {opened['target']})",
         f"{opened['opened']} in {opened['seconds']:.1f} s ({counts(opened['per_node'])}; "
         f"{counts(opened['per_front'])})"),
        ("failures opening", counts(opened["failures"])),
        (f"still open after {hold['seconds']:g} s (answered a 1x1 update request)",
         f"{hold['still_open']} (checked in {hold['check_seconds']:.1f} s)"),
        ("failures after the hold",
         counts({k: v for k, v in hold["outcomes"].items() if k != "answered"})),
        ("CPU to open one session, ms: node broker / nginx",
         f"{opened['cpu']['brokers'] / max(1, opened['opened']) * 1e3:.1f} / "
         f"{opened['cpu']['nginx'] / max(1, opened['opened']) * 1e3:.1f}"),
    ]
    for name in nodes:
        rows.append((f"{name} broker RSS, MiB: before -> with {hold['per_node'][name]} "
                     "sessions -> closed",
                     f"{rss['before'][name]:.1f} -> {rss['held'][name]:.1f} -> "
                     f"{rss['closed'][name]:.1f}"))
    broker_per = [per[name] for name in nodes]
    if broker_per:
        rows.append(("memory per session, node broker (RSS), KiB",
                     f"{statistics.mean(broker_per):.0f} "
                     f"({', '.join(f'{name} {per[name]:.0f}' for name in nodes)})"))
    if "nginx" in per:
        rows.append(("nginx RSS (2 fronts, master + workers), MiB: before -> with -> closed",
                     f"{rss['before']['nginx']:.1f} -> {rss['held']['nginx']:.1f} -> "
                     f"{rss['closed']['nginx']:.1f}"))
        rows.append(("memory per session, nginx (RSS), KiB", f"{per['nginx']:.0f}"))
        rows.append(("for comparison: QEMU's RSS per VNC client (3 guests), KiB",
                     f"{per['qemu']:.0f}"))
    if "bulk" in results:
        bulk = results["bulk"]
        rows.append(("bulk: moved through the front door",
                     f"{bulk['bytes'] / 2**20:.0f} MiB in {bulk['seconds']:.1f} s = "
                     f"{bulk['mib_per_s']:.0f} MiB/s over {bulk['sessions']} sessions"
                     + (f" (errors: {counts(bulk['errors'])})" if bulk["errors"] else "")))
        per_gib = bulk["cpu_s_per_gib"]
        if per_gib:
            rows += [
                ("nginx CPU s per GiB (both fronts)", f"{per_gib['nginx']:.2f}"),
                ("node brokers CPU s per GiB", f"{per_gib['brokers']:.2f}"),
                ("for comparison: QEMU / this client, CPU s per GiB",
                 f"{per_gib['qemu']:.2f} / {per_gib['client']:.2f}"),
            ]
    lat = results["latency"]
    for key, label in (("median_us", "median"), ("p99_us", "p99")):
        front, direct = lat["front door"][key], lat["direct"][key]
        rows.append((f"WebSocket ping round trip, {label}, us: front door / direct (added)",
                     f"{front:.0f} / {direct:.0f} (+{front - direct:.0f})"))
    width = max(len(label) for label, _ in rows)
    lines = [f"| {'':{width}} | figure |", f"| {'-' * width} | --- |"]
    lines += [f"| {label:{width}} | {value} |" for label, value in rows]
    notes = [
        "",
        *(f"{key}: {value}" for key, value in machine.items()),
        f"Sessions: VNC, round robin over {len(nodes)} nodes and the fronts, "
        f"{args.concurrency} opening at a time; each one RFB up to QEMU's ServerInit.",
        f"Latency: {lat['direct']['count']} pings per path in alternating rounds over the "
        "nodes, with the sessions held; direct is from a front host to the node's "
        "listener with the front's client certificate.",
    ]
    if "bulk" in results and results["bulk"]["frame"]:
        bulk = results["bulk"]
        notes.append(
            f"Bulk: full raw {bulk['frame'][0]}x{bulk['frame'][1]} frames "
            f"({bulk['frame'][2]} bytes per pixel), one non-incremental request at a time per "
            f"session, until {args.mib} MiB arrived or {args.bulk_seconds:g} s passed (the "
            "frames in flight then finish); CPU is user + system "
            "time from /proc of every process in the front and node hosts.")
    return "\n".join(lines + notes)


# --- main ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import logging

    import structlog
    from console_broker_testbed import Testbed

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    limits = raise_nofile()
    progress(nofile_note(limits))
    machine = facts(nofile_note(limits).split(": ", 1)[1])
    room = args.sessions + 100
    node_config = (f"[limits]\nmax_sessions_per_domain = {room}\n"
                   f"max_sessions_per_client = {room}\n")
    testbed = Testbed(prefix="cbbench")
    guests: list[Any] = []
    with contextlib.ExitStack() as stack:
        stack.callback(testbed.close)
        if args.logs:
            directory = Path(args.logs)
            directory.mkdir(parents=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        progress("booting a guest per node")
        for _ in range(3):
            dom = testbed.define(guest_xml(testbed, room))
            guests.append(dom)
            stack.callback(testbed.remove, dom)
        for dom in guests:
            serial = testbed.boot(dom)
            if serial is not None:
                serial.close()
        progress("building the cluster")
        cluster = stack.enter_context(Cluster(directory / "cluster", node_config=node_config))
        domains = {node.name: dom.UUIDString() for node, dom in zip(cluster.nodes, guests,
                                                                     strict=True)}
        bench = Bench(args, cluster, domains, [qemu_pid(dom.name()) for dom in guests])
        try:
            asyncio.run(bench.run())
        finally:
            progress("removing the cluster and the guests")
    machine["load average at the end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(render(bench.results, machine, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "options": vars(args),
                                               "results": bench.results}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000,
                        help="concurrent VNC sessions to open (default 1000)")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="seconds to hold them before checking each (default 60)")
    parser.add_argument("--mib", type=int, default=1024,
                        help="MiB to move in the bulk phase; 0: skip it (default 1024)")
    parser.add_argument("--bulk-sessions", type=int, default=30,
                        help="held sessions that pull full frames in the bulk phase (default 30)")
    parser.add_argument("--bulk-seconds", type=float, default=60.0,
                        help="at most this long for the bulk phase (default 60)")
    parser.add_argument("--round-trips", type=int, default=2000,
                        help="ping round trips per path (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="sessions being opened at once (default 16)")
    parser.add_argument("--open-seconds", type=float, default=240.0,
                        help="time budget for opening the sessions (default 240)")
    parser.add_argument("--check-seconds", type=float, default=30.0,
                        help="time each held session has to answer after the hold (default 30)")
    parser.add_argument("--latency-seconds", type=float, default=120.0,
                        help="time budget for the round trips (default 120)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--logs", metavar="DIR",
                        help="build the cluster in DIR (new) and keep it: the node brokers' "
                        "and nginx's logs, the configurations")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces, libvirt's system instance)")

    def terminated(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the clean-up

    signal.signal(signal.SIGTERM, terminated)
    try:
        return run(args)
    except KeyboardInterrupt:
        progress("interrupted; everything it made is removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
