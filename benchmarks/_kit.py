"""What the benchmarks share: a broker without libvirt, its tokens, and the measuring.

Every benchmark runs the broker in a process of its own (``Broker`` as ``serve``
builds it, with a resolver of the benchmark's and plugins loaded directly) and
drives it from the benchmark's own process with websockets clients:

* :class:`BenchResolver` stands in for libvirt: every token's console is the one
  its :meth:`~BenchResolver.open` returns: by default a TCP connection to one
  console (the ``tcp`` mode's path);
* :class:`RawPlugin` serves a protocol with ``broker.service.raw_proxy``, the core's
  pump, so the bytes go through unchanged;
* :func:`run_broker` builds and serves the broker (in the broker's process);
* :class:`Tokens` makes a signing key and issues a fresh token per session (in the
  client's process);
* :func:`console_main` is a console to measure against: it pours, sinks or echoes.

The benchmarks are run as scripts (``python benchmarks/NAME.py``), so this module
is imported as ``_kit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from broker import Protocol, hookimpl

#: The domain every benchmark token names.
DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"
#: The protocol :class:`RawPlugin` serves by default.
RAW_PROTOCOL = "bench"
#: Open-file limit wanted in every process of a benchmark (two descriptors per session).
NOFILE = 131_072
CHUNK = 256 * 1024  # the console's writes when pouring
ACK_UNIT = 16 * 1024 * 1024  # the console acknowledges every this many bytes sunk


# --- the machine -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raise_nofile() -> tuple[int, int, int]:
    """Raise this process's RLIMIT_NOFILE as far as it may: both limits to :data:`NOFILE`
    where the hard limit may be raised (CAP_SYS_RESOURCE), else the soft limit to the
    hard limit. Returns the soft limit before, the soft limit after and the hard limit."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, NOFILE) if hard != resource.RLIM_INFINITY else NOFILE
    for limits in ((want, want), (hard, hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return before, soft, hard


def nofile_note(limits: tuple[int, int, int]) -> str:
    """What :func:`raise_nofile` did, in a line for the benchmark's output."""
    before, soft, hard = limits
    text = f"open-file limit: soft {before} -> {soft}, hard {hard}"
    if hard < NOFILE:
        text += f" (raising the hard limit to {NOFILE} was refused: it takes CAP_SYS_RESOURCE)"
    return text


def report(what: str, size: int, wall: float, cpu: float) -> None:
    gib = size / 2**30
    print(f"{what}: {size / 2**20:.0f} MiB in {wall:.2f} s = {size / 2**20 / wall:.0f} MiB/s; "
          f"broker CPU {cpu:.2f} s = {cpu / gib:.2f} CPU s/GiB")


# --- the broker's process ----------------------------------------------------------------

#: The event loops a benchmark's broker can run on (``service.event_loop``'s values).
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def chosen_loop(event_loop: str) -> str:
    """*event_loop* as the broker's process will run it: ``auto`` is uvloop when it is
    installed, else asyncio (as ``service.event_loop``); uvloop when it is not installed
    stops the benchmark."""
    have_uvloop = importlib.util.find_spec("uvloop") is not None
    if event_loop == "auto":
        return "uvloop" if have_uvloop else "asyncio"
    if event_loop == "uvloop" and not have_uvloop:
        raise SystemExit("uvloop is not installed: .venv/bin/pip install uvloop")
    if event_loop not in EVENT_LOOPS:
        raise SystemExit(f"unknown event loop {event_loop!r}: one of {', '.join(EVENT_LOOPS)}")
    return event_loop


def loop_line() -> str:
    """The running loop, as the broker's process prints it: ``event loop: uvloop (uvloop.Loop)``."""
    loop = asyncio.get_running_loop()
    kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    return f"event loop: {kind} ({type(loop).__module__}.{type(loop).__qualname__})"


def ran_on(log: Path, timeout: float = 10) -> str:
    """The loop a broker started with :func:`run_broker` printed to *log*
    (``uvloop`` or ``asyncio``), or ``?``."""
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = re.search(r"^event loop: (\S+)", log.read_text(errors="replace"), re.M)
            if found:
                return found.group(1)
        time.sleep(0.1)
    return "?"



class BenchResolver:
    """The broker's resolver without libvirt: every token's *console* is the one
    :meth:`open` returns (here: a TCP connection to ``127.0.0.1:console_port``).

    :meth:`run` keeps a task group (``self.group``) for what a console needs running
    beside the broker, such as a console's far end that pours bytes.
    """

    available = True

    def __init__(self, console_port: int = 0, *, domain: str = DOMAIN) -> None:
        self.console_port = console_port
        self.domain = domain
        self.group: anyio.abc.TaskGroup | None = None

    def health(self) -> dict[str, object]:
        return {"uri": "bench:///", "connected": True}

    async def run(self, events: object, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as group:
            self.group = group
            task_status.started()
            await anyio.sleep_forever()

    def plan(self, console: str) -> Any:
        from broker.service._plan import EndpointPlan

        return EndpointPlan("tcp", console, host="127.0.0.1", port=self.console_port)

    async def target(self, claims: object, console: str, tls: object = None) -> Any:
        from broker.service._libvirt import Target

        return Target(self.domain, "bench", self.plan(console))

    async def open(self, target: Any) -> Any:
        from broker.service._session import Endpoint
        from broker.service._sockstream import open_tcp

        # the console socket stream the broker's own resolver opens in tcp mode
        stream = await open_tcp("127.0.0.1", self.console_port)
        return Endpoint(stream, "tcp", f"127.0.0.1:{self.console_port}")

    async def ending_for(self, domain_uuid: str) -> None:
        return None


class RawPlugin:
    """Protocols served by the core's raw pump, as a third-party plugin would: the
    bytes through unchanged (the built-in vnc handler speaks RFB)."""

    def __init__(self, *protocols: Protocol) -> None:
        self.protocols = list(protocols) or [
            Protocol(name=RAW_PROTOCOL, title="Raw bytes (benchmark)")
        ]

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return self.protocols  # a Protocol's handler is raw_proxy unless it says otherwise


def run_broker(
    port: int,
    public_key: Path,
    resolver: BenchResolver,
    plugins: list[tuple[str, object]],
    *,
    replay: int = 10_000,
    log_level: str | None = "warning",
    event_loop: str = "asyncio",
    **sections: Any,
) -> None:
    """Build the broker and serve on ``127.0.0.1:port`` until the process is ended.

    Tokens are checked against *public_key* (with a replay cache of *replay*);
    *sections* are further ``Config`` fields (``limits`` defaults to 100,000
    sessions per domain and per client). *log_level* None: the broker's default
    logging (JSON, info), else console lines at that level. *event_loop*: what
    this process runs on, ``asyncio``, ``uvloop`` or ``auto`` (:func:`chosen_loop`);
    it prints the loop it runs on to stderr first (:func:`loop_line`, read back with
    :func:`ran_on`).
    """
    raise_nofile()
    loop = chosen_loop(event_loop)
    from broker.config import (
        BrokerSection,
        Config,
        HTTPSection,
        LimitsSection,
        ListenSection,
        ServiceSection,
    )
    from broker.keys import load_public_keys
    from broker.plugins import PluginManager
    from broker.service._app import Broker
    from broker.service._logging import configure_logging
    from broker.tokens import ReplayCache, TokenVerifier

    sections.setdefault(
        "limits",
        LimitsSection(max_sessions_per_domain=100_000, max_sessions_per_client=100_000),
    )
    sections.setdefault("service", ServiceSection(event_loop=loop))
    config = Config(
        broker=BrokerSection(node="bench", state_dir=str(public_key.parent)),
        listen=ListenSection(host="127.0.0.1", port=port),
        http=HTTPSection(allow_missing_origin=True),
        **sections,
    )
    if log_level is None:
        configure_logging(config.logging.format, config.logging.level)
    else:
        configure_logging("console", log_level)
    verifier = TokenVerifier(load_public_keys([public_key]), replay_cache=ReplayCache(replay))
    manager = PluginManager(disabled=(), load_entrypoints=False, plugins=plugins)
    broker = Broker(config, verifier=verifier, resolver=resolver, plugins=manager)

    async def serve() -> None:
        print(loop_line(), file=sys.stderr, flush=True)
        await broker.serve()

    anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


# --- the client's process ----------------------------------------------------------------


class Tokens:
    """A signing key pair in *directory*, and a fresh token per session from it."""

    def __init__(self, directory: Path) -> None:
        import logging

        import structlog

        from broker.keys import generate_keypair, load_private_key
        from broker.tokens import TokenIssuer

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        files = generate_keypair(directory / "state")
        self.public_key = files.public_key
        self.private_key = load_private_key(files.private_key)
        self.issuer = TokenIssuer(self.private_key, "bench")

    def token(self, protocol: str = RAW_PROTOCOL, ttl: int = 120) -> str:
        return str(self.issuer.issue(DOMAIN, protocol, ttl=ttl).token)

    def url(self, port: int, protocol: str = RAW_PROTOCOL) -> str:
        return f"ws://127.0.0.1:{port}/ws/{protocol}?token={self.token(protocol)}"


def role_arguments(parser: argparse.ArgumentParser) -> None:
    """The options a script's own console and broker processes are started with (by
    :meth:`Children.console_and_broker`); not for people."""
    parser.add_argument("--role", choices=("client", "console", "broker"), default="client",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--console-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--public-key", type=Path, help=argparse.SUPPRESS)


class Children:
    """The processes a benchmark starts (``with Children() as children``): every one is
    ended on the way out, its descendants too."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start *argv* (with this Python first when it starts with a script's path);
        output to *log* if given, else this process's."""
        if argv[0].endswith(".py"):
            argv = [sys.executable, *argv]
        if log is None:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        else:
            with log.open("wb") as out:
                process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def console_and_broker(
        self, script: str, tokens: Tokens
    ) -> tuple[int, subprocess.Popen[bytes], int]:
        """Start *script* as ``--role console --port P`` and as ``--role broker --port P
        --console-port P --public-key PATH``, and wait until the broker listens.
        Returns the console's port, the broker's process and its port."""
        console_port, broker_port = free_port(), free_port()
        self.start([script, "--role", "console", "--port", str(console_port)])
        broker = self.start(
            [script, "--role", "broker", "--port", str(broker_port),
             "--console-port", str(console_port), "--public-key", str(tokens.public_key)]
        )
        wait_listening(broker_port, broker)
        return console_port, broker, broker_port

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL; then any descendant left behind, by its pid (with psutil)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    children = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if psutil is not None:
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()


def wait_listening(
    port: int, process: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 30
) -> None:
    """Wait until something listens on *port*; stop if *process* exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None else ""
            raise SystemExit(f"exited early ({process.returncode}):\n{tail}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.1)
    raise SystemExit(f"not listening on {port}")


async def ws_round_trips(ws: Any, count: int, payload: bytes) -> list[float]:
    """*count* echoes of *payload* over a WebSocket, one at a time: seconds each."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await ws.send(payload)
        got = 0
        while got < len(payload):
            got += len(await ws.recv())
        times.append(time.perf_counter() - start)
    return times


async def tcp_round_trips(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: int, payload: bytes
) -> list[float]:
    """*count* echoes of *payload* straight over TCP, one at a time: seconds each."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        writer.write(payload)
        await reader.readexactly(len(payload))
        times.append(time.perf_counter() - start)
    return times


# --- the console's process ---------------------------------------------------------------


async def console_main(ports: list[int]) -> None:
    """A TCP console on each of *ports*. A connection's first byte picks what it does:
    ``P`` pours :data:`CHUNK`-sized writes out, ``S`` sinks what comes in and answers one
    byte per :data:`ACK_UNIT` taken, anything else echoes."""
    raise_nofile()
    block = b"\x55" * CHUNK

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            mode = await reader.readexactly(1)
            if mode == b"P":
                while True:
                    writer.write(block)
                    await writer.drain()
            elif mode == b"S":
                pending = 0
                while data := await reader.read(1 << 20):
                    pending += len(data)
                    if pending >= ACK_UNIT:
                        writer.write(b"K" * (pending // ACK_UNIT))
                        pending %= ACK_UNIT
            else:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
               for port in ports]
    await asyncio.gather(*(server.serve_forever() for server in servers))
