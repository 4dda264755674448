"""Throughput of the RFB client-to-server filter (broker_vnc.rfb.ClientMessageFilter).

A realistic noVNC stream: mostly PointerEvents, key presses (QEMU extended key
events and plain KeyEvents, down and up), incremental FramebufferUpdateRequests,
and now and then a short ClientCutText (which takes the slow, per-message path).
Run: ``.venv/bin/python benchmarks/rfb_filter.py [--messages N]``.
"""

from __future__ import annotations

import argparse
import random
import struct
import time
from collections.abc import Callable

from broker_vnc.rfb import NEED_DATA, ClientMessageFilter


def realistic_stream(count: int, seed: int = 1) -> tuple[bytes, list[bytes]]:
    """*count* messages, as one stream and one by one."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    messages = []
    x, y = 400, 300
    for _ in range(count):
        roll = rng.random()
        if roll < 0.60:
            x = max(0, min(1279, x + rng.randint(-8, 8)))
            y = max(0, min(799, y + rng.randint(-8, 8)))
            messages.append(struct.pack(">BBHH", 5, rng.choice((0, 0, 0, 1)), x, y))
        elif roll < 0.75:
            keysym, keycode = rng.choice(((0x61, 0x1E), (0x62, 0x30), (0xFF0D, 0x1C)))
            messages.append(struct.pack(">BBHII", 255, 0, rng.randint(0, 1), keysym, keycode))
        elif roll < 0.85:
            messages.append(struct.pack(">BBxxI", 4, rng.randint(0, 1), rng.choice((0x61, 0xFF0D))))
        elif roll < 0.999:
            messages.append(struct.pack(">BBHHHH", 3, 1, 0, 0, 1280, 800))
        else:
            text = b"clipboard text %d" % rng.randint(0, 999)
            messages.append(struct.pack(">BxxxI", 6, len(text)) + text)
    return b"".join(messages), messages


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def fast_path(pieces: list[bytes], view_only: bool) -> int:
    flt = ClientMessageFilter(view_only=view_only)
    return sum(len(flt.filter_data(piece)) for piece in pieces)


def event_path(pieces: list[bytes], view_only: bool) -> int:
    flt = ClientMessageFilter(view_only=view_only)
    forwarded = 0
    for piece in pieces:
        flt.receive_data(piece)
        while (event := flt.next_event()) is not NEED_DATA:
            if event.forward:  # type: ignore[union-attr]
                forwarded += len(event.data)  # type: ignore[union-attr]
    return forwarded


def measure(label: str, run: Callable[[], int], nbytes: int, nmessages: int) -> None:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<52} {nbytes / best / 1e6:8.1f} MB/s  {nmessages / best / 1e6:6.2f} M msg/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    stream, messages = realistic_stream(args.messages)
    n, size = len(messages), len(stream)
    print(f"{n} messages, {size} bytes (mean {size / n:.1f} bytes/message)")
    big = chunks(stream, 65536)
    small = chunks(stream, 1500)
    for view_only in (False, True):
        mode = "view-only" if view_only else "full"
        measure(
            f"filter_data, 64 KiB feeds, {mode}", lambda v=view_only: fast_path(big, v), size, n
        )
        measure(
            f"filter_data, 1500 B feeds, {mode}", lambda v=view_only: fast_path(small, v), size, n
        )
        measure(
            f"filter_data, one message per feed, {mode}",
            lambda v=view_only: fast_path(messages, v),
            size,
            n,
        )
        measure(
            f"next_event, 64 KiB feeds, {mode}", lambda v=view_only: event_path(big, v), size, n
        )
        measure(
            f"next_event, one message per feed, {mode}",
            lambda v=view_only: event_path(messages, v),
            size,
            n,
        )


if __name__ == "__main__":
    main()
