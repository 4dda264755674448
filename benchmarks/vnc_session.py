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
import struct
import tempfile
import time
from pathlib import Path

from _kit import (
    CHUNK,
    BenchResolver,
    Children,
    RawPlugin,
    Tokens,
    cpu_seconds,
    report,
    role_arguments,
    run_broker,
)

SERVER_INIT = struct.pack(">HHBBBBHHHBBB3xI", 1024, 768, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 5)
SERVER_INIT += b"bench"


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


def broker_main(port: int, console_port: int, public_key: Path) -> None:
    from broker_vnc import PROTOCOL
    from broker_vnc._session import VNCSessionHandler, VNCSettings

    from broker import Protocol, hookimpl
    from broker.service import Session

    async def no_password(session: Session) -> None:
        return None

    class VNCPlugin:
        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            handler = VNCSessionHandler(VNCSettings(), password_source=no_password)
            # The RFB proxy with no VNC password to look up in libvirt.
            return [Protocol(name="vnc", title=PROTOCOL.title, view_only=True, handler=handler)]

    raw = RawPlugin(Protocol(name="bench-raw", title="raw", console="vnc"))
    run_broker(port, public_key, BenchResolver(console_port),
               [("vnc", VNCPlugin()), ("bench", raw)])


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
    from websockets.asyncio.client import connect

    total = args.mib * 1024 * 1024
    pointer_block = struct.pack(">BBHH", 5, 1, 100, 100) * (65536 // 6)
    with tempfile.TemporaryDirectory() as tmp, Children() as children:
        tokens = Tokens(Path(tmp))
        _, broker, broker_port = children.console_and_broker(__file__, tokens)

        def url(protocol: str) -> str:
            return tokens.url(broker_port, protocol)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="bytes to move each way, in MiB")
    role_arguments(parser)
    args = parser.parse_args()
    if args.role == "console":
        asyncio.run(console_main(args.port))
    elif args.role == "broker":
        broker_main(args.port, args.console_port, args.public_key)
    else:
        asyncio.run(client_main(args))


if __name__ == "__main__":
    main()
