"""Throughput and CPU cost of the broker's proxy path, each direction, on loopback.

Three processes: a console (a TCP server that pours bytes out, or takes them
in), the broker (``Broker`` with a resolver that connects every session to
that console over TCP, the ``tcp`` mode's path) and the client (this
process, a websockets client). Reported: wall time, MiB/s, and the broker
process's CPU seconds per GiB (user + system, from /proc), which is the
number to compare with websockify. Also the added round-trip latency of a
small message through the broker versus straight to the console.

    .venv/bin/python benchmarks/proxy_throughput.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 256 * 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the console process -----------------------------------------------------------------


async def console_main(port: int) -> None:
    block = b"\x55" * CHUNK

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = await reader.readexactly(1)
        try:
            if mode == b"P":  # pour
                while True:
                    writer.write(block)
                    await writer.drain()
            elif mode == b"S":  # sink
                while await reader.read(1 << 20):
                    pass
            else:  # echo
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# --- the broker process ------------------------------------------------------------------


def broker_main(port: int, console_port: int, key_dir: str) -> None:
    import anyio

    from broker.config import BrokerSection, Config, HTTPSection, LimitsSection, ListenSection
    from broker.keys import load_public_key
    from broker.plugins import PluginManager
    from broker.service._app import Broker
    from broker.service._libvirt import Target
    from broker.service._plan import EndpointPlan
    from broker.service._session import Endpoint
    from broker.tokens import ReplayCache, TokenVerifier

    class StaticResolver:
        available = True

        def health(self) -> dict[str, object]:
            return {"connected": True}

        async def run(self, events: object, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            await anyio.sleep_forever()

        async def target(self, claims: object, console: str) -> Target:
            plan = EndpointPlan("tcp", console, host="127.0.0.1", port=console_port)
            return Target("x", "bench", plan)

        async def open(self, target: Target) -> Endpoint:
            stream = await anyio.connect_tcp("127.0.0.1", console_port)
            return Endpoint(stream, "tcp", "bench")

        async def ending_for(self, domain_uuid: str) -> None:
            return None

    from broker import Protocol, hookimpl
    from broker.service import raw_proxy
    from broker.service._logging import configure_logging

    class RawPlugin:
        """The bytes through the core's pump unchanged (the vnc handler speaks RFB)."""

        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            return [Protocol(name="bench", title="Raw bytes (benchmark)")]

        @hookimpl
        def console_broker_session_handler(self, protocol: str) -> object:
            return raw_proxy if protocol == "bench" else None

    configure_logging("console", "warning")
    config = Config(
        broker=BrokerSection(node="bench", state_dir=key_dir),
        listen=ListenSection(host="127.0.0.1", port=port),
        http=HTTPSection(allow_missing_origin=True),
        limits=LimitsSection(max_sessions_per_domain=100_000, max_sessions_per_client=100_000),
    )
    verifier = TokenVerifier(
        [load_public_key(Path(key_dir) / "signing-key.pub.pem")], replay_cache=ReplayCache(10_000)
    )
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("bench", RawPlugin())])
    broker = Broker(config, verifier=verifier, resolver=StaticResolver(), plugins=plugins)  # type: ignore[arg-type]
    anyio.run(broker.serve, backend="asyncio")


# --- the client (this process) -----------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    import structlog
    from websockets.asyncio.client import connect

    from broker.keys import generate_keypair, load_private_key
    from broker.tokens import TokenIssuer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    total = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as key_dir:
        generate_keypair(Path(key_dir) / "state")
        issuer = TokenIssuer(load_private_key(Path(key_dir) / "state" / "signing-key.pem"), "bench")
        console_port, broker_port = free_port(), free_port()
        me = [sys.executable, __file__]
        console = subprocess.Popen([*me, "--role", "console", "--port", str(console_port)])
        broker = subprocess.Popen(
            [*me, "--role", "broker", "--port", str(broker_port),
             "--console-port", str(console_port), "--key-dir", f"{key_dir}/state"]
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", broker_port), timeout=1).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)

            def url() -> str:
                token = issuer.issue("6695eb01-f6a4-8304-79aa-97f2502e193f", "bench", ttl=60).token
                return f"ws://127.0.0.1:{broker_port}/ws/bench?token={token}"

            # console -> client
            async with connect(url(), max_size=None, compression=None) as ws:
                await ws.send(b"P")
                cpu, start, got = cpu_seconds(broker.pid), time.perf_counter(), 0
                while got < total:
                    got += len(await ws.recv())
                report("console -> client", got, time.perf_counter() - start,
                       cpu_seconds(broker.pid) - cpu)
            # client -> console
            async with connect(url(), max_size=None, compression=None) as ws:
                await ws.send(b"S")
                block = b"\xaa" * (64 * 1024)
                cpu, start, sent = cpu_seconds(broker.pid), time.perf_counter(), 0
                while sent < total:
                    await ws.send(block)
                    sent += len(block)
                await (await ws.ping())  # the broker has read everything before the pong
                report("client -> console", sent, time.perf_counter() - start,
                       cpu_seconds(broker.pid) - cpu)
            if args.sessions:
                await many_sessions(args.sessions, url, broker.pid)
            # round trip of 100-byte messages: through the broker, and straight to the console
            async with connect(url(), compression=None) as ws:
                await ws.send(b"E")
                through = []
                for _ in range(2000):
                    start = time.perf_counter()
                    await ws.send(b"m" * 100)
                    got = 0
                    while got < 100:
                        got += len(await ws.recv())
                    through.append(time.perf_counter() - start)
            reader, writer = await asyncio.open_connection("127.0.0.1", console_port)
            writer.write(b"E")
            direct = []
            for _ in range(2000):
                start = time.perf_counter()
                writer.write(b"m" * 100)
                await reader.readexactly(100)
                direct.append(time.perf_counter() - start)
            writer.close()
            via, straight = statistics.median(through) * 1e6, statistics.median(direct) * 1e6
            print(f"round trip, 100 bytes: {via:.0f} us through the broker, {straight:.0f} us "
                  f"direct: {via - straight:.0f} us added (median of 2000; client-side WebSocket "
                  "framing included)")
        finally:
            for process in (broker, console):
                process.terminate()
                process.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def many_sessions(count: int, url: object, pid: int) -> None:
    """Open *count* sessions at once (echo consoles), then one message on each."""
    from websockets.asyncio.client import connect

    before, cpu = rss_mib(pid), cpu_seconds(pid)
    start = time.perf_counter()
    sockets = []
    for _ in range(count):
        ws = await connect(url(), compression=None)  # type: ignore[operator]
        await ws.send(b"E")
        sockets.append(ws)
    opened = time.perf_counter() - start
    opened_cpu = cpu_seconds(pid) - cpu

    async def echo(ws: object) -> None:
        await ws.send(b"ping")  # type: ignore[attr-defined]
        await ws.recv()  # type: ignore[attr-defined]

    start = time.perf_counter()
    await asyncio.gather(*(echo(ws) for ws in sockets))
    round_trip = time.perf_counter() - start
    after = rss_mib(pid)
    each_ms, each_kib = opened_cpu / count * 1e3, (after - before) * 1024 / count
    print(f"{count} sessions: opened in {opened:.1f} s ({each_ms:.2f} ms broker CPU each); "
          f"broker RSS {before:.0f} -> {after:.0f} MiB ({each_kib:.0f} KiB per session); "
          f"one message on every session: {round_trip:.2f} s")
    await asyncio.gather(*(ws.close() for ws in sockets))


def report(what: str, size: int, wall: float, cpu: float) -> None:
    gib = size / 2**30
    print(f"{what}: {size / 2**20:.0f} MiB in {wall:.2f} s = {size / 2**20 / wall:.0f} MiB/s; "
          f"broker CPU {cpu:.2f} s = {cpu / gib:.2f} CPU s/GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes to move each way, in MiB")
    parser.add_argument("--sessions", type=int, default=0, help="also open this many sessions")
    parser.add_argument("--role", choices=("client", "console", "broker"), default="client")
    parser.add_argument("--port", type=int)
    parser.add_argument("--console-port", type=int)
    parser.add_argument("--key-dir")
    args = parser.parse_args()
    if args.role == "console":
        asyncio.run(console_main(args.port))
    elif args.role == "broker":
        broker_main(args.port, args.console_port, args.key_dir)
    else:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
