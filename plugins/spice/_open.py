"""``console-broker open`` for SPICE: remote-viewer on a local port, every channel it
opens a WebSocket of the same broker session.

A SPICE session is a connection per channel (main, display, inputs, cursor, playback,
record, usbredir, ...). The broker binds them into one session by the token: the first
WebSocket (which must link the main channel) uses it up, and later ones bearing it join
that session while it lives (``Protocol.multi_connection``, docs/spice.md). Here every
connection the viewer opens to the local listener gets a WebSocket of its own with the
same token, and bytes are bridged unchanged: the broker does the SPICE link, the
channel policy and the ticket, as it does for spice-html5.

The viewer gets a generated ``.vv`` file (``type=spice``, ``host=127.0.0.1``, the local
port, a title) in a private temporary directory (mode 0700, the file 0600), removed
when the command ends. It holds no secret: the token stays in this process.

The first bytes of a connection (SPICE's link header, ``REDQ`` and the link message)
name its channel type, for the messages on stderr; they are read before the WebSocket
is opened, and sent on as its first message. The command ends when the main channel
ends (the broker closed the session, its reason said on stderr; or the viewer closed
it) or when the viewer exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs

if TYPE_CHECKING:
    import anyio.abc

    from broker.api import NativeClient

#: The viewer started without ``--viewer``, and its Debian package.
DEFAULT_VIEWER = ("remote-viewer", "{file}")
VIEWER_PACKAGE = "virt-viewer"
#: ``REDQ``, major, minor, size, then SpiceLinkMess: connection_id u32, channel_type u8.
LINK_HEADER = 21
MAGIC = b"REDQ"
MAIN = 1
#: ``SPICE_CHANNEL_*`` names, for what the command says.
CHANNELS = {1: "main", 2: "display", 3: "inputs", 4: "cursor", 5: "playback", 6: "record",
            7: "tunnel", 8: "smartcard", 9: "usbredir", 10: "port", 11: "webdav"}
#: Signals that end a viewer on purpose (its exit is then no failure).
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Seconds a connection has to send its link header.
LINK_TIMEOUT = 10.0


def vv_text(host: str, port: int, title: str) -> str:
    """The ``.vv`` file remote-viewer reads: the local listener, a title, the keys."""
    clean = "".join(ch for ch in title if ch.isprintable())[:200]
    return "\n".join([
        "[virt-viewer]",
        "type=spice",
        f"host={host}",
        f"port={port}",
        f"title={clean}",
        "fullscreen=0",
        "release-cursor=shift+f12",
        "secure-attention=ctrl+alt+end",
        "toggle-fullscreen=shift+f11",
        "",
    ])


def write_vv(directory: Path, text: str) -> Path:
    """*text* as ``console.vv`` in *directory*, mode 0600 from its creation."""
    path = directory / "console.vv"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


async def read_link_header(stream: anyio.abc.ByteStream) -> tuple[int, bytes]:
    """The channel type a connection links, and the bytes read to learn it (to be sent
    on); ValueError when it is no SPICE link."""
    data = b""
    with anyio.fail_after(LINK_TIMEOUT):
        while len(data) < LINK_HEADER:
            data += await stream.receive(65536)
    if data[:4] != MAGIC:
        raise ValueError("not a SPICE link")
    (channel,) = struct.unpack_from("<B", data, 20)
    return channel, data


@attrs.define
class SpiceOpen:
    """One ``console-broker open`` of a SPICE console: its channels' bridges."""

    client: NativeClient
    #: The exit status, once the main channel or the viewer ended the command.
    status: int | None = None
    main_seen: bool = False
    refused: set[int] = attrs.field(factory=set)
    #: Why the main channel could not be opened (the broker refused the token, say).
    error: Exception | None = None

    async def channel(self, stream: anyio.abc.SocketStream, group: anyio.abc.TaskGroup) -> None:
        """Bridge one local connection to a WebSocket of the session."""
        from websockets.exceptions import ConnectionClosed

        from broker.api import BridgeEnd, OpenError

        client = self.client
        async with stream:
            try:
                channel, first = await read_link_header(stream)
            except (TimeoutError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError,
                    OSError):
                return  # no SPICE link: nothing to bridge
            name = CHANNELS.get(channel, f"type {channel}")
            is_main = channel == MAIN and not self.main_seen
            if is_main:
                self.main_seen = True
            try:
                ws = await client.connect()
            except OpenError as exc:
                if is_main:
                    self.error = exc
                    group.cancel_scope.cancel()
                else:
                    client.status(f"the {name} channel was not opened: {exc}")
                return
            with contextlib.suppress(ConnectionClosed):  # closed at once: bridge() says why
                await ws.send(first)
            end = await client.bridge(stream, ws)
            if is_main:
                if end is BridgeEnd.BROKER:
                    client.status(client.close_text(ws))
                    self.status = 0 if ws.close_code == 1000 else 1
                else:
                    client.status("the viewer closed the session")
                    self.status = 0
                group.cancel_scope.cancel()
            elif (
                end is BridgeEnd.BROKER
                and ws.close_code not in (1000, None)
                and channel not in self.refused  # said once per channel type
            ):
                self.refused.add(channel)
                client.status(f"{name} channel: {client.close_text(ws)}")

    async def watch(self, viewer: anyio.abc.Process, group: anyio.abc.TaskGroup) -> None:
        """End the command when the viewer exits."""
        code = await viewer.wait()
        if self.status is None:
            ended = code == 0 or -code in ENDING_SIGNALS  # closed, or ended on purpose
            self.status = 0 if ended else 1
            self.client.status("the viewer exited" + ("" if ended else f" (status {code})"))
        group.cancel_scope.cancel()


async def open_spice(client: NativeClient) -> int:
    """The SPICE console of ``client``'s token in remote-viewer; the exit status."""
    run = SpiceOpen(client)
    client.check_viewer(DEFAULT_VIEWER, VIEWER_PACKAGE)
    directory = Path(tempfile.mkdtemp(prefix="console-broker-spice-"))  # mode 0700
    try:
        async with await client.local_listener() as listener:
            vv = write_vv(
                directory,
                vv_text(listener.host, listener.port,
                        f"SPICE console via {client.broker_address}"),
            )
            viewer = await client.run_viewer(
                DEFAULT_VIEWER, VIEWER_PACKAGE, host=listener.host, port=listener.port,
                file=str(vv),
            )
            if viewer is None:
                client.status(
                    f"waiting for a SPICE client on {listener.address} (spice://"
                    f"{listener.address}, or the file {vv})"
                )
            async with anyio.create_task_group() as group:
                if viewer is not None:
                    group.start_soon(run.watch, viewer, group)

                async def serve() -> None:
                    while True:
                        stream = await listener.accept()
                        group.start_soon(run.channel, stream, group)

                group.start_soon(serve)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if run.error is not None:
        raise run.error
    return 0 if run.status is None else run.status
