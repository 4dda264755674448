"""Throughput and CPU cost of a VNC session through the broker, each direction, on loopback,
with the VNC plugin's security proxy and with the raw pump, side by side.

Three processes: a console speaking RFB like QEMU (version 3.8, security None,
ServerInit; then, depending on the client's first message, it pours
FramebufferUpdate-sized blocks out or swallows what comes in), the broker (the
``vnc`` protocol served by the VNC plugin's session handler, and a ``bench-raw``
protocol served by ``broker.service.raw_proxy``, both reaching the console over
TCP) and the client (this process). Reported per protocol and direction: MiB/s and
the broker process's CPU seconds per GiB (user + system, from /proc).

Console to client is the bulk of a VNC session (framebuffer updates): the plugin
forwards it unparsed, so it should cost what the raw pump costs. Client to console
is input: every byte goes through ``ClientMessageFilter.filter_data``; here 64 KiB
messages of PointerEvents, far more than a browser sends.

    .venv/bin/python benchmarks/vnc_session.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 256 * 1024
SERVER_INIT = struct.pack(">HHBBBBHHHBBB3xI", 1024, 768, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 5)
SERVER_INIT += b"bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the console process: QEMU's handshake, then pour or sink ---------------------------


async def console_main(port: int) -> None:
    block = b"\x55" * CHUNK

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x01")  # one security type: None
            await reader.readexactly(1)
            writer.write(b"\x00\x00\x00\x00")  # SecurityResult OK
            await reader.readexactly(1)  # ClientInit
            writer.write(SERVER_INIT)
            first = await reader.readexactly(1)
            if first == b"\x03":  # a FramebufferUpdateRequest: pour
                await reader.readexactly(9)
                while True:
                    writer.write(block)
                    await writer.drain()
            else:  # input: swallow it
                while await reader.read(1 << 20):
                    pass
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
    from broker_vnc import PROTOCOL
    from broker_vnc._session import VNCSessionHandler, VNCSettings

    from broker import Protocol, hookimpl
    from broker.config import BrokerSection, Config, HTTPSection, LimitsSection, ListenSection
    from broker.keys import load_public_key
    from broker.plugins import PluginManager
    from broker.service import Session, raw_proxy
    from broker.service._app import Broker
    from broker.service._libvirt import Target
    from broker.service._logging import configure_logging
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

    async def no_password(session: Session) -> None:
        return None

    class BenchPlugin:
        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            return [PROTOCOL, Protocol(name="bench-raw", title="raw", console="vnc")]

        @hookimpl
        def console_broker_session_handler(self, protocol: str) -> object:
            if protocol == "vnc":
                return VNCSessionHandler(VNCSettings(), password_source=no_password)
            return raw_proxy

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
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("bench", BenchPlugin())])
    broker = Broker(config, verifier=verifier, resolver=StaticResolver(), plugins=plugins)  # type: ignore[arg-type]
    anyio.run(broker.serve, backend="asyncio")


# --- the client (this process) -----------------------------------------------------------


async def rfb_login(ws: object) -> bytes:
    """The browser's handshake; returns the bytes received beyond ServerInit."""
    from broker_vnc.rfb import NEED_DATA, RFBClient, ServerInit

    client = RFBClient()
    while True:
        event = client.next_event()
        if out := client.data_to_send():
            await ws.send(out)  # type: ignore[attr-defined]
        if event is NEED_DATA:
            client.receive_data(await ws.recv())  # type: ignore[attr-defined]
        elif isinstance(event, ServerInit):
            return client.take_trailing_data()


async def client_main(args: argparse.Namespace) -> None:
    import structlog
    from websockets.asyncio.client import connect

    from broker.keys import generate_keypair, load_private_key
    from broker.tokens import TokenIssuer

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    total = args.mib * 1024 * 1024
    pointer_block = struct.pack(">BBHH", 5, 1, 100, 100) * (65536 // 6)
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

            def url(protocol: str) -> str:
                domain = "6695eb01-f6a4-8304-79aa-97f2502e193f"
                token = issuer.issue(domain, protocol, ttl=60).token
                return f"ws://127.0.0.1:{broker_port}/ws/{protocol}?token={token}"

            for protocol in ("bench-raw", "vnc"):
                async with connect(url(protocol), max_size=None, compression=None) as ws:
                    got = len(await rfb_login(ws))
                    await ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 1024, 768))
                    cpu, start = cpu_seconds(broker.pid), time.perf_counter()
                    while got < total:
                        got += len(await ws.recv())
                    report(f"{protocol}: console -> client", got, time.perf_counter() - start,
                           cpu_seconds(broker.pid) - cpu)
                async with connect(url(protocol), max_size=None, compression=None) as ws:
                    await rfb_login(ws)
                    cpu, start, sent = cpu_seconds(broker.pid), time.perf_counter(), 0
                    while sent < total:
                        await ws.send(pointer_block)
                        sent += len(pointer_block)
                    await (await ws.ping())  # the broker has read everything before the pong
                    report(f"{protocol}: client -> console (PointerEvents, 64 KiB messages)",
                           sent, time.perf_counter() - start, cpu_seconds(broker.pid) - cpu)
        finally:
            for process in (broker, console):
                process.terminate()
                process.wait()


def report(what: str, size: int, wall: float, cpu: float) -> None:
    gib = size / 2**30
    print(f"{what}: {size / 2**20:.0f} MiB in {wall:.2f} s = {size / 2**20 / wall:.0f} MiB/s; "
          f"broker CPU {cpu:.2f} s = {cpu / gib:.2f} CPU s/GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes to move each way, in MiB")
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
