"""Fan-out of one serial console to many clients through the broker, and a stalled client.

Two processes: the broker (``Broker`` with the real serial plugin, and a resolver
whose every console is one end of a socket pair; the other end pours terminal-like
lines as fast as the broker reads them) and the clients (this process: websockets
clients, all attached to the one console). Reported for 1, 10 and 100 clients: the
output rate of the console (what each client receives) and the broker's CPU seconds
per MiB read from the console. Then one client stops reading while nine others go on:
their rate, and the broker's resident memory, which the per-client bound keeps flat.

    .venv/bin/python benchmarks/serial_fanout.py [--mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from _kit import (
    BenchResolver,
    Children,
    Tokens,
    cpu_seconds,
    free_port,
    rss_mib,
    run_broker,
    wait_listening,
)

LINE = b"guest# " + b"0123456789abcdef" * 4 + b"\r\n"


# --- the broker process ------------------------------------------------------------------


class PouringResolver(BenchResolver):
    """Every console is one end of a socket pair whose other end pours terminal lines."""

    def plan(self, console: str) -> Any:
        from broker.service._plan import EndpointPlan

        return EndpointPlan("stream", console, device="serial0")

    async def open(self, target: Any) -> Any:
        from broker.service._session import Endpoint

        assert self.group is not None
        ours, theirs = socket.socketpair()
        stream = await anyio.abc.SocketStream.from_socket(ours)
        console = await anyio.abc.SocketStream.from_socket(theirs)
        block = LINE * (16384 // len(LINE))

        async def pour() -> None:
            try:
                while True:
                    await console.send(block)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

        self.group.start_soon(pour)
        return Endpoint(stream, "stream", "bench console")


def broker_main(port: int, public_key: Path) -> None:
    import broker_serial
    from broker_serial._config import SerialSection

    from broker.config import LimitsSection

    run_broker(
        port, public_key, PouringResolver(), [("serial", broker_serial)],
        replay=100_000, log_level="error",
        limits=LimitsSection(max_sessions_per_domain=1000, max_sessions_per_client=1000),
        plugin_tables={"serial": SerialSection(scrollback=65536, client_queue=262144)},
    )


# --- the clients (this process) ----------------------------------------------------------


async def close_all(clients: list[object]) -> None:
    for ws in clients:
        ws.transport.abort()  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)


async def run_clients(
    port: int, issue: object, count: int, mib: int, pid: int
) -> dict[str, float]:
    from websockets.asyncio.client import connect

    want = mib * 1024 * 1024
    clients = [
        await connect(f"ws://127.0.0.1:{port}/ws/serial?token={issue()}",  # type: ignore[operator]
                      subprotocols=["binary"], max_size=None)  # type: ignore[list-item]
        for _ in range(count)
    ]
    got = [0] * count
    cpu = cpu_seconds(pid)
    started = time.perf_counter()

    async def read(i: int, ws: object) -> None:
        while got[i] < want:
            got[i] += len(await ws.recv())  # type: ignore[attr-defined]

    await asyncio.gather(*(read(i, ws) for i, ws in enumerate(clients)))
    elapsed = time.perf_counter() - started
    used = cpu_seconds(pid) - cpu
    await close_all(clients)
    return {"seconds": elapsed, "mib_s": mib / elapsed, "broker_cpu_s": used,
            "broker_cpu_s_per_mib_read": used / mib}


async def stalled(port: int, issue: object, pid: int, seconds: float) -> dict[str, float]:
    from websockets.asyncio.client import connect

    def url() -> str:
        return f"ws://127.0.0.1:{port}/ws/serial?token={issue()}"  # type: ignore[operator]

    stuck = await connect(url(), subprotocols=["binary"], max_size=None, max_queue=1)  # type: ignore[list-item]
    readers = [await connect(url(), subprotocols=["binary"], max_size=None)  # type: ignore[list-item]
               for _ in range(9)]
    counts = [0] * len(readers)
    rss: list[float] = []

    async def read(i: int, ws: object) -> None:
        while True:
            counts[i] += len(await ws.recv())  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(readers)]
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        await asyncio.sleep(seconds / 10)
        rss.append(rss_mib(pid))
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await close_all([*readers, stuck])
    return {
        "mib_s_each": min(counts) / elapsed / 1024 / 1024,
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        "rss_max_mib": max(rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB each client receives")
    parser.add_argument("--broker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.broker:
        broker_main(int(args.broker[0]), Path(args.broker[1]))
        return

    with tempfile.TemporaryDirectory(prefix="serial-bench-") as tmp, Children() as children:
        tokens = Tokens(Path(tmp))

        def issue() -> str:
            return tokens.token("serial", ttl=300)

        port = free_port()
        broker = children.start([__file__, "--broker", str(port), str(tokens.public_key)])
        wait_listening(port, broker)
        results: dict[str, object] = {}
        for count in (1, 10, 100):
            mib = args.mib if count < 100 else max(1, args.mib // 10)
            result = asyncio.run(run_clients(port, issue, count, mib, broker.pid))
            result["mib_each"] = mib
            results[f"{count} clients"] = result
            print(f"{count:>3} clients: {result['mib_s']:.1f} MiB/s each "
                  f"({mib} MiB each in {result['seconds']:.2f} s), broker "
                  f"{result['broker_cpu_s_per_mib_read']:.3f} CPU s per MiB read")
        stall = asyncio.run(stalled(port, issue, broker.pid, 10.0))
        results["one stalled, nine reading"] = stall
        print(f"one stalled client, nine reading: {stall['mib_s_each']:.1f} MiB/s each; broker "
              f"RSS {stall['rss_first_mib']:.0f} -> {stall['rss_last_mib']:.0f} MiB "
              f"(max {stall['rss_max_mib']:.0f})")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
