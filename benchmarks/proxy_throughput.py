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
import statistics
import tempfile
import time
from pathlib import Path

from _kit import (
    BenchResolver,
    Children,
    RawPlugin,
    Tokens,
    console_main,
    cpu_seconds,
    nofile_note,
    raise_nofile,
    report,
    role_arguments,
    rss_mib,
    run_broker,
    tcp_round_trips,
    ws_round_trips,
)

# --- the client (this process) -----------------------------------------------------------


async def client_main(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import connect

    print(nofile_note(raise_nofile()))
    total = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        tokens = Tokens(Path(tmp))
        console_port, broker, broker_port = children.console_and_broker(__file__, tokens)

        def url() -> str:
            return tokens.url(broker_port)

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
            through = await ws_round_trips(ws, 2000, b"m" * 100)
        reader, writer = await asyncio.open_connection("127.0.0.1", console_port)
        writer.write(b"E")
        direct = await tcp_round_trips(reader, writer, 2000, b"m" * 100)
        writer.close()
        via, straight = statistics.median(through) * 1e6, statistics.median(direct) * 1e6
        print(f"round trip, 100 bytes: {via:.0f} us through the broker, {straight:.0f} us "
              f"direct: {via - straight:.0f} us added (median of 2000; client-side WebSocket "
              "framing included)")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes to move each way, in MiB")
    parser.add_argument("--sessions", type=int, default=0, help="also open this many sessions")
    role_arguments(parser)
    args = parser.parse_args()
    if args.role == "console":
        asyncio.run(console_main([args.port]))
    elif args.role == "broker":
        resolver = BenchResolver(args.console_port)
        run_broker(args.port, args.public_key, resolver, [("bench", RawPlugin())])
    else:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
