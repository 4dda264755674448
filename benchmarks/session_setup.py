"""Session set-up on the real stack: from a fresh token presented to the console's first
byte, through ``console-broker serve`` and its real resolver, for VNC in fd and tcp mode.

The stack is the VNC tests' (tests/vnc/vncstack.py): the tiny guest with a VNC display
that has a password, provisioned with ``console-broker xml enable --consoles vnc,serial
--mode MODE`` and booted on the test bed's libvirtd until its ready line; one guest per
mode. The broker is ``console-broker serve`` (a subprocess: the built-in plugins, the
libvirt resolver on ``qemu:///system``, JSON logs at the default level, info), with a
key pair made for it; tokens are minted in this process with its private key, the claims
``console-broker token UUID --protocol vnc`` makes, one fresh token per session.

Per session, one after the other (``--sessions`` per mode, after ``--warmup`` not
counted), the client (this process, a ``websockets`` client as noVNC's page would be):

* mints a token, then starts the clock and opens the WebSocket (TCP connect, the
  upgrade request carrying the token);
* **first byte**: the first message of the console arrives: ``RFB 003.008\\n``, the
  ProtocolVersion the VNC plugin sends once the broker has verified the token, looked
  the domain up in libvirt and connected to the display (fd: a socket from
  ``virDomainOpenGraphicsFD``; tcp: QEMU's VNC port);
* **ServerInit**: the RFB handshake on to QEMU's ServerInit (security None toward the
  client; toward QEMU the broker's own login: none in fd mode, the VNC password in tcp
  mode), the moment a viewer can ask for pixels;
* closes the session.

Beside it: the broker's own ``handshake_ms`` of each session (its ``session.opened``
log line: the request received to the console connected, the figure of the
``console_broker_handshake_seconds`` histogram); and, measured apart in this process on
the same code and libvirtd, each step of the broker's way to the console: the token's
verification (``TokenVerifier.verify``), the libvirt lookup (``LibvirtResolver.target``:
the domain by UUID, its state and live XML, the console's plan) and the console connect
(``LibvirtResolver.open``), then QEMU's first byte on that socket.

Issue 16's target: set-up (token presented to first byte) p99 <= 20 ms in fd mode.

    .venv/bin/python benchmarks/session_setup.py [--sessions 200] [--modes fd,tcp]

Needs root, libvirtd and the test bed (scripts/setup-host). Under a minute on the 2-core
machine for the defaults, most of it booting the guests; the guests and the broker are
removed on the way out (also on Ctrl-C or SIGTERM). Never dumps guest memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _kit import EVENT_LOOPS, free_port, wait_listening

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "vnc")]

from vncstack import GRAPHICS, enabled_guest  # noqa: E402 - after the path above

PROTOCOL = "vnc"
CONSOLE = "vnc"  # the console record the VNC protocol attaches to
NODE = "bench"
TOKEN_TTL = 60  # tokens.default_ttl, what ``console-broker token`` issues without --ttl
RFB_VERSION = b"RFB 003.008\n"
TARGET_P99_MS = 20.0  # issue 16: set-up p99 in fd mode


class RFBError(Exception):
    """The broker said something the benchmark's RFB client does not expect."""


# --- the broker ----------------------------------------------------------------------------


class Served:
    """``console-broker serve`` with *event_loop* in ``[service]``, its log in *directory*."""

    def __init__(self, directory: Path, event_loop: str) -> None:
        from broker.keys import generate_keypair, load_private_key
        from broker.tokens import TokenIssuer

        self.port = free_port()
        state = directory / "state"
        files = generate_keypair(state)
        self.issuer = TokenIssuer(load_private_key(files.private_key), NODE)
        self.public_key = files.public_key
        config = directory / "broker.toml"
        config.write_text(
            f'[broker]\nnode = "{NODE}"\nstate_dir = "{state}"\n'
            f'[listen]\nhost = "127.0.0.1"\nport = {self.port}\n'
            "[http]\nallow_missing_origin = true\n"
            f'[service]\nevent_loop = "{event_loop}"\n'
            '[logging]\nformat = "json"\nlevel = "info"\n'
        )
        self.log = directory / "broker.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_listening(self.port, self.process, self.log)

    def url(self, domain_uuid: str) -> str:
        token = self.issuer.issue(domain_uuid, PROTOCOL, ttl=TOKEN_TTL).token
        return f"ws://127.0.0.1:{self.port}/ws/{PROTOCOL}?token={token}"

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{name}"' not in line:
                continue
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if doc.get("event") == name:
                    found.append(doc)
        return found

    def handshake_histogram(self) -> tuple[float, float]:
        """``console_broker_handshake_seconds{protocol="vnc"}``: its sum and count."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values = {}
        for part in ("sum", "count"):
            found = re.search(
                rf'^console_broker_handshake_seconds_{part}\{{protocol="{PROTOCOL}"\}} (\S+)$',
                text, re.M)
            values[part] = float(found.group(1)) if found else 0.0
        return values["sum"], values["count"]

    def uvloop_loaded(self) -> bool:
        """Whether uvloop's extension is mapped into the broker's process."""
        with contextlib.suppress(OSError):
            return "uvloop/loop." in Path(f"/proc/{self.process.pid}/maps").read_text()
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- the client ----------------------------------------------------------------------------


class Reader:
    """RFB bytes over a WebSocket whose messages split them anywhere."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.buffer = ws, bytearray()

    async def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            message = await self.ws.recv(decode=False)
            self.buffer += message
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


async def one_session(served: Served, domain_uuid: str) -> dict[str, float]:
    """One session: the seconds from the request to the upgrade, to the first byte of the
    console and to QEMU's ServerInit."""
    from websockets.asyncio.client import connect

    url = served.url(domain_uuid)  # minted before the clock starts
    start = time.perf_counter()
    async with connect(url, subprotocols=["binary"], compression=None,  # type: ignore[list-item]
                       ping_interval=None, open_timeout=10, close_timeout=5,
                       max_size=None) as ws:
        upgraded = time.perf_counter()
        rfb = Reader(ws)
        version = await asyncio.wait_for(rfb.read(len(RFB_VERSION)), 10)
        first = time.perf_counter()
        if version != RFB_VERSION:
            raise RFBError(f"ProtocolVersion {version!r}")
        await ws.send(RFB_VERSION)
        (count,) = await rfb.read(1)
        if count == 0:
            (length,) = struct.unpack("!I", await rfb.read(4))
            raise RFBError(f"refused: {(await rfb.read(length)).decode(errors='replace')}")
        if 1 not in await rfb.read(count):
            raise RFBError("security None not offered")
        await ws.send(b"\x01")
        if (result := await rfb.read(4)) != b"\0\0\0\0":
            raise RFBError(f"SecurityResult {result!r}")
        await ws.send(b"\x01")  # ClientInit: shared
        init = await asyncio.wait_for(rfb.read(24), 10)
        (name_length,) = struct.unpack("!I", init[20:])
        await rfb.read(name_length)
        server_init = time.perf_counter()
    return {"upgrade": upgraded - start, "first_byte": first - start,
            "server_init": server_init - start}


class Events:
    """The resolver's events, unused here."""

    def domain_gone(self, domain_uuid: str, ending: object) -> None: ...

    def connection_lost(self) -> None: ...

    def connection_restored(self) -> None: ...


async def steps_apart(served: Served, domain_uuid: str, rounds: int) -> dict[str, list[float]]:
    """The broker's steps to the console, each timed, in this process: the real
    ``TokenVerifier`` and ``LibvirtResolver`` on the test bed's libvirtd."""
    import anyio

    from broker.keys import load_public_keys
    from broker.service._libvirt import LibvirtResolver
    from broker.tokens import ReplayCache, TokenVerifier

    verifier = TokenVerifier(load_public_keys([served.public_key]),
                             replay_cache=ReplayCache(rounds + 10))
    resolver = LibvirtResolver("qemu:///system")
    steps: dict[str, list[float]] = {"verify": [], "lookup": [], "connect": [],
                                     "console_first_byte": []}
    async with anyio.create_task_group() as group:
        await group.start(resolver.run, Events())
        for _ in range(rounds):
            token = served.issuer.issue(domain_uuid, PROTOCOL, ttl=TOKEN_TTL).token
            start = time.perf_counter()
            claims = verifier.verify(token, protocol=PROTOCOL, node=NODE)
            verified = time.perf_counter()
            target = await resolver.target(claims, CONSOLE)
            looked_up = time.perf_counter()
            endpoint = await resolver.open(target)
            connected = time.perf_counter()
            try:
                got = b""
                with anyio.fail_after(10):
                    while len(got) < len(RFB_VERSION):
                        got += await endpoint.stream.receive()
                first = time.perf_counter()
            finally:
                await endpoint.stream.aclose()
            steps["verify"].append(verified - start)
            steps["lookup"].append(looked_up - verified)
            steps["connect"].append(connected - looked_up)
            steps["console_first_byte"].append(first - connected)
        group.cancel_scope.cancel()
    return steps


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values) * 1e3, "p99": percentile(values, 0.99) * 1e3,
            "max": max(values) * 1e3}


@contextlib.contextmanager
def guests(modes: list[str]) -> Iterator[dict[str, Any]]:
    """A booted guest per mode, removed on the way out."""
    from console_broker_testbed import Testbed

    testbed = Testbed(prefix="cbbench")
    made: dict[str, Any] = {}
    try:
        for mode in modes:
            print(f"booting the {mode} guest", file=sys.stderr)
            dom, serial = enabled_guest(testbed, mode, GRAPHICS, serial=True)
            if serial is not None:
                serial.close()  # booted to its ready line: the guest idles from here
            made[mode] = dom
        yield made
    finally:
        testbed.close()  # removes its domains


def facts() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    versions = {}
    for name in ("console-broker", "websockets", "anyio", "uvloop", "libvirt-python"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=True).stdout
        versions["QEMU"] = out.split("version", 1)[1].split()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": f"{os.cpu_count()} ({model})",
        "os": f"Linux {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": ", ".join(f"{name} {version}" for name, version in versions.items()),
        "load average at the start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


async def client_main(args: argparse.Namespace, served: Served,
                      doms: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode, dom in doms.items():
        domain_uuid = dom.UUIDString()
        for _ in range(args.warmup):
            await one_session(served, domain_uuid)
        before = served.handshake_histogram()
        opened_before = len(served.events("session.opened"))
        runs = []
        for _ in range(args.sessions):
            runs.append(await one_session(served, domain_uuid))
            if args.pause:
                await asyncio.sleep(args.pause)
        await asyncio.sleep(0.5)  # the last session's log line
        after = served.handshake_histogram()
        logged = [doc["handshake_ms"] / 1e3 for doc in served.events("session.opened")
                  [opened_before:] if doc.get("domain") == domain_uuid]
        steps = await steps_apart(served, domain_uuid, args.sessions)
        results[mode] = {
            "first_byte_ms": ms([run["first_byte"] for run in runs]),
            "server_init_ms": ms([run["server_init"] for run in runs]),
            "upgrade_ms": ms([run["upgrade"] for run in runs]),
            "broker_handshake_ms": ms(logged) if logged else None,
            "broker_handshake_logged": len(logged),
            "histogram_mean_ms": ((after[0] - before[0]) / (after[1] - before[1]) * 1e3
                                  if after[1] > before[1] else None),
            "steps_apart_ms": {name: ms(values) for name, values in steps.items()},
            "sessions": len(runs),
        }
        first = results[mode]["first_byte_ms"]
        print(f"{mode}: first byte p50 {first['p50']:.1f} ms, p99 {first['p99']:.1f} ms",
              file=sys.stderr)
    return results


def render(results: dict[str, Any], machine: dict[str, str], args: argparse.Namespace,
           loop: str) -> str:
    modes = list(results)

    def cell(figure: dict[str, float] | None) -> str:
        if figure is None:
            return "-"
        return f"{figure['p50']:.2f} / {figure['p99']:.2f} (max {figure['max']:.1f})"

    rows = [
        ("token presented -> first console byte (RFB 003.008)",
         [cell(results[m]["first_byte_ms"]) for m in modes]),
        ("token presented -> QEMU's ServerInit (RFB handshake done)",
         [cell(results[m]["server_init_ms"]) for m in modes]),
        ("token presented -> WebSocket upgraded",
         [cell(results[m]["upgrade_ms"]) for m in modes]),
        ("broker's handshake_ms (session.opened: request to console connected)",
         [cell(results[m]["broker_handshake_ms"]) for m in modes]),
        ("console_broker_handshake_seconds: mean over the sessions",
         [f"{results[m]['histogram_mean_ms']:.2f}" if results[m]["histogram_mean_ms"]
          else "-" for m in modes]),
    ]
    for name, label in (("verify", "token verification"),
                        ("lookup", "libvirt lookup (LibvirtResolver.target)"),
                        ("connect", "console connect (LibvirtResolver.open)"),
                        ("console_first_byte", "then QEMU's first byte on that socket")):
        rows.append((f"apart: {label}",
                     [cell(results[m]["steps_apart_ms"][name]) for m in modes]))
    header = ["ms: p50 / p99 (max)", *(f"{m} mode" for m in modes)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    lines.append("")
    if "fd" in results:
        p99 = results["fd"]["first_byte_ms"]["p99"]
        verdict = "met" if p99 <= TARGET_P99_MS else (
            f"missed by {p99 - TARGET_P99_MS:.1f} ms ({p99 / TARGET_P99_MS:.1f}x the target)")
        lines.append(f"Issue 16's target, set-up p99 <= {TARGET_P99_MS:.0f} ms in fd mode: "
                     f"{verdict} ({p99:.2f} ms).")
    lines += [
        "",
        *(f"{key}: {value}" for key, value in machine.items()),
        f"broker: console-broker serve, [service] event_loop = \"{args.event_loop}\"; "
        f"uvloop in its process: {loop}",
        f"Sessions: {args.sessions} per mode one after the other, after {args.warmup} not "
        "counted; a fresh token each (minted before the clock starts). 'apart': the same "
        f"steps timed in this process, {args.sessions} rounds, on the same libvirtd.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200,
                        help="sessions per mode, one after the other (default 200)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="sessions per mode before those counted (default 5)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between two sessions (default 0)")
    parser.add_argument("--modes", default="fd,tcp", help="comma-separated: fd, tcp")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto",
                        help="the broker's [service] event_loop (default auto)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--logs", help="keep the broker's configuration and log in this "
                        "directory (new)")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in ("fd", "tcp") for mode in modes):
        raise SystemExit("--modes: fd, tcp or both")
    if os.geteuid() != 0:
        raise SystemExit("needs root (libvirtd's qemu:///system and the test bed)")
    # SIGTERM unwinds as Ctrl-C does: the guests and the broker are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import logging

    import structlog

    # this process's own token and resolver calls log nothing below a warning (the
    # broker, at its default level, logs none of them either)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    machine = facts()
    with contextlib.ExitStack() as stack:
        if args.logs:
            directory = Path(args.logs)
            directory.mkdir(parents=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        doms = stack.enter_context(guests(modes))
        served = Served(directory, args.event_loop)
        stack.callback(served.stop)
        loop = "yes" if served.uvloop_loaded() else "no"
        results = asyncio.run(client_main(args, served, doms))
        machine["load average at the end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(render(results, machine, args, loop))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"machine": machine, "args": vars(args), "uvloop_in_broker": loop,
                 "results": results}, indent=2))


if __name__ == "__main__":
    main()
