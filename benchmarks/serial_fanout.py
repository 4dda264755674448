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
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = b"guest# " + b"0123456789abcdef" * 4 + b"\r\n"
DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the broker process ------------------------------------------------------------------


async def broker_main(port: int, public_key: Path) -> None:
    import anyio
    import anyio.abc
    import broker_serial

    from broker.config import (
        BrokerSection,
        Config,
        HTTPSection,
        LimitsSection,
        ListenSection,
        SerialSection,
    )
    from broker.keys import load_public_keys
    from broker.plugins import PluginManager
    from broker.service._app import Broker
    from broker.service._libvirt import Target
    from broker.service._plan import EndpointPlan
    from broker.service._session import Endpoint
    from broker.tokens import ReplayCache, TokenVerifier

    class PouringResolver:
        available = True

        def health(self) -> dict[str, object]:
            return {"uri": "bench:///", "connected": True}

        async def run(self, events: object, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with anyio.create_task_group() as group:
                self._group = group
                task_status.started()
                await anyio.sleep_forever()

        async def target(self, claims: object, console: str) -> Target:
            return Target(DOMAIN, "bench", EndpointPlan("stream", console, device="serial0"))

        async def open(self, target: Target) -> Endpoint:
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

            self._group.start_soon(pour)
            return Endpoint(stream, "stream", "bench console")

        async def ending_for(self, domain_uuid: str) -> None:
            return None

    config = Config(
        broker=BrokerSection(node="bench", state_dir="/nonexistent"),
        listen=ListenSection(host="127.0.0.1", port=port),
        http=HTTPSection(allow_missing_origin=True),
        limits=LimitsSection(max_sessions_per_domain=1000, max_sessions_per_client=1000),
        serial=SerialSection(scrollback=65536, client_queue=262144),
    )
    verifier = TokenVerifier(load_public_keys([public_key]), replay_cache=ReplayCache(100_000))
    plugins = PluginManager(disabled=(), load_entrypoints=False,
                            plugins=[("serial", broker_serial)])
    service = Broker(config, verifier=verifier, resolver=PouringResolver(),  # type: ignore[arg-type]
                     plugins=plugins)
    await service.serve()


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
        asyncio.run(broker_main(int(args.broker[0]), Path(args.broker[1])))
        return

    import logging

    import structlog

    from broker.keys import generate_keypair, load_private_key
    from broker.tokens import TokenIssuer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    state = Path(tempfile.mkdtemp(prefix="serial-bench-"))
    files = generate_keypair(state)
    issuer = TokenIssuer(load_private_key(files.private_key), "bench")

    def issue() -> str:
        return issuer.issue(DOMAIN, "serial", ttl=300).token

    port = free_port()
    broker = subprocess.Popen([sys.executable, __file__, "--broker", str(port),
                               str(files.public_key)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
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
    finally:
        broker.terminate()
        broker.wait(timeout=10)


if __name__ == "__main__":
    main()
