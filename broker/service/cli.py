"""The ``serve`` command: run the broker until SIGTERM or SIGINT; SIGHUP reloads its keys
and certificates (:mod:`broker.service._reload`).

The broker's own modules (and with them libvirt, lxml, cryptography, PyJWT and
prometheus_client) are imported when it is built, not with this module, which
``console-broker --help`` imports on a client-only install too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.abc
import structlog

from broker import service_unit
from broker.config import Config, ConfigError, find_config, load_config
from broker.errors import CommandError
from broker.plugins import PluginManager
from broker.service._logging import configure_logging
from broker.service._loop import choose_event_loop

if TYPE_CHECKING:
    from broker.service._app import Broker
    from broker.service._limits import SessionCounts
    from broker.service._notify import Lifecycle
    from broker.service._reload import Reloader
    from broker.service._workers import WorkerLink

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_log = structlog.get_logger("broker.service")
#: Seconds after a worker's first SIGTERM or SIGINT within which another is the same
#: one again (see :func:`run_until_signalled`), not a second asking to cut short.
SIGNAL_ECHO = 1.0


def _ssl_context(config: Config) -> ssl.SSLContext | None:
    """The broker's server context (``[tls]``), asking nothing of clients: the tunnels'
    own TLS, and both listeners' without client certificates."""
    from broker.service._reload import ReloadError, server_context

    if not config.tls_enabled:
        return None
    try:
        return server_context(config.tls.cert, config.tls.key)
    except ReloadError as exc:
        raise CommandError(f"tls.cert, tls.key: cannot load the certificate: {exc}") from None


def _client_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The listeners' server context with client certificates (``tls.client_ca``):
    required, and signed by that CA alone; None without them."""
    from broker.service._reload import ReloadError, require_client_certificates

    context = _ssl_context(config) if config.tls.client_ca else None
    if context is None:
        return None
    try:
        return require_client_certificates(context, config.tls.client_ca)
    except ReloadError as exc:
        raise CommandError(f"tls.client_ca: cannot load the CA: {exc}") from None


def raise_file_limit(sessions: int) -> None:
    """Raise the open-file limit to its hard maximum: each session holds two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = 2 * sessions + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warning(
            "broker.file_limit", limit=soft, needed=needed,
            hint="raise the open-file limit (LimitNOFILE) or lower limits.max_sessions",
        )


def build_broker(
    config: Config,
    plugins: PluginManager | None = None,
    *,
    link: WorkerLink | None = None,
    counts: SessionCounts | None = None,
    path: Path | None = None,
) -> tuple[Broker, Reloader]:
    """A broker for *config*: the key pair ensured, keys loaded, plugins (*plugins*, else
    those that load) and libvirt set up; with *link* and *counts*, one worker of several.
    With it, what reloads its keys and certificates from *path* (the configuration file
    *config* came from) on SIGHUP."""
    from broker.keys import KeyFileError, ensure_keypair
    from broker.service._app import Broker
    from broker.service._libvirt import LibvirtResolver
    from broker.service._reload import (
        ListenerTLS,
        Material,
        Reloader,
        ReloadError,
        load_material,
        trusted_keys,
    )
    from broker.service._sharedstate import REPLAY_FILE, SharedReplayCache, StateFileError
    from broker.tokens import TokenVerifier

    try:
        files = ensure_keypair(config.state_dir)
        key_files = trusted_keys(config)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    except ReloadError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{config.state_dir}: cannot prepare the state directory: "
                           f"{exc.strerror}") from None
    _log.info(
        "broker.starting",
        config=str(config.source) if config.source else "built-in defaults",
        state_dir=str(config.state_dir),
        key=files.fingerprint,
        key_created=files.created,
        trusted_keys=len(key_files),
    )
    tokens = config.tokens
    # used tokens in the state directory: shared by the workers, kept across restarts
    replay = SharedReplayCache(config.state_dir / REPLAY_FILE, tokens.replay_cache_size)
    try:
        replay.open()
    except StateFileError as exc:
        raise CommandError(str(exc)) from None
    verifier = TokenVerifier(
        [key for _, key in key_files],
        replay_cache=replay,
        leeway=tokens.leeway,
        max_ttl=tokens.max_ttl,
    )
    plugins = plugins if plugins is not None else PluginManager()
    # The listeners' contexts, whose new handshakes a reload moves to new certificates.
    tls = ListenerTLS(_ssl_context(config), _client_ssl_context(config))
    broker = Broker(
        config,
        verifier=verifier,
        resolver=LibvirtResolver(config.libvirt.uri, stream_buffer=config.proxy.write_buffer),
        plugins=plugins,
        ssl_context=tls.server,
        client_ssl_context=tls.client,
        link=link,
        counts=counts,
    )
    material = Material(key_files, tls.server, tls.client, {}, None)
    # What the reload compares with: digests of the files loaded now (a file changed
    # since they loaded a moment ago is for that reload to report).
    with contextlib.suppress(ReloadError):
        material = load_material(config)
    reloader = Reloader(config, path, plugins.config_tables, verifier, tls,
                        broker.metrics.registry, material)
    return broker, reloader


async def _reload(reloader: Reloader, lifecycle: Lifecycle) -> None:
    lifecycle.reload_started()
    lifecycle.reload_done(await reloader.reload())


async def _on_signals(
    broker: Broker, group: anyio.abc.TaskGroup, echo: float, reloader: Reloader | None,
    lifecycle: Lifecycle,
) -> None:
    try:
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP
        ) as signals:
            # SIGHUP was blocked from the start (serve, a forked worker): one sent
            # meanwhile arrives now, to this receiver, instead of ending the process.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            await _handle_signals(broker, group, echo, reloader, lifecycle, signals)
    finally:
        # Blocked again before the receiver's handler goes: a late SIGHUP must not end
        # the process while it finishes.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


async def _handle_signals(
    broker: Broker, group: anyio.abc.TaskGroup, echo: float, reloader: Reloader | None,
    lifecycle: Lifecycle, signals: AsyncIterator[int],
) -> None:
    """SIGHUP reloads (never a stop); the first SIGTERM or SIGINT begins the shutdown, a
    second (not an echo of the first) cuts its grace short."""
    first = 0.0
    async for signum in signals:
        if signum == signal.SIGHUP:
            # A reload, never a stop; none once the broker is stopping.
            if reloader is not None and not first:
                group.start_soon(_reload, reloader, lifecycle)
            continue
        if not first:
            first = time.monotonic()
            lifecycle.stopping()
            _log.info("broker.signal", signal=signal.Signals(signum).name,
                      grace=broker.config.limits.shutdown_grace)
            broker.shutdown()
        elif time.monotonic() - first >= echo:
            _log.warning("broker.signal_again", signal=signal.Signals(signum).name)
            group.cancel_scope.cancel()


async def run_until_signalled(
    broker: Broker,
    echo: float = 0.0,
    reloader: Reloader | None = None,
    lifecycle: Lifecycle | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (a second signal cuts the grace short, unless it comes
    within *echo* seconds of the first: a worker may get one signal twice, from systemd
    stopping every process of the service and from its supervisor passing it on); SIGHUP
    reloads with *reloader* (without one it is ignored). *lifecycle* is told when the
    broker listens, reloads and stops (default: systemd, through sd_notify)."""
    from broker.service._notify import SYSTEMD

    lifecycle = lifecycle if lifecycle is not None else SYSTEMD
    async with anyio.create_task_group() as group:
        group.start_soon(_on_signals, broker, group, echo, reloader, lifecycle)
        async with anyio.create_task_group() as serving:
            await serving.start(broker.serve)
            where = ", ".join(f"{host}:{port}" for host, port in broker.addresses)
            lifecycle.listening(f"serving on {where}")
        group.cancel_scope.cancel()


def _serve_command(args: argparse.Namespace) -> int:
    # SIGHUP reloads: until the broker listens for it (run_until_signalled, or the
    # supervisor's loop), one that comes is held back rather than end the process.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    plugins = PluginManager()
    path = find_config(args.config)
    try:
        config = load_config(path, plugins.config_tables)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    configure_logging(config.logging.format, config.logging.level)
    raise_file_limit(config.limits.max_sessions)
    loop = choose_event_loop(config.service.event_loop)
    workers = args.workers if args.workers is not None else config.service.workers
    if workers > 1:
        return _serve_workers(config, plugins, workers, loop.backend_options, path)
    broker, reloader = build_broker(config, plugins, path=path)
    try:
        anyio.run(run_until_signalled, broker, 0.0, reloader, backend="asyncio",
                  backend_options=loop.backend_options)
    except (OSError, BaseExceptionGroup) as exc:
        found = _listen_error(exc, broker)
        if found is None:
            raise
        where = f"{config.listen.host}:{config.listen.port}"
        raise CommandError(f"cannot listen on {where}: {found.strerror or found}") from None
    return 0


def _listen_error(exc: BaseException, broker: Broker) -> OSError | None:
    """The OSError that kept *broker* from listening (*exc* itself, or inside the task
    groups' exception groups), or None when it listened or failed otherwise."""
    if broker.addresses:
        return None
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _listen_error(inner, broker)) is not None:
                return found
    return None


def _serve_workers(
    config: Config, plugins: PluginManager, workers: int, backend_options: dict[str, Any],
    path: Path | None = None,
) -> int:
    """``serve --workers N``: the supervisor of N worker processes (broker.service._workers)."""
    from broker.keys import KeyFileError, ensure_keypair
    from broker.service._admin import admin_listener
    from broker.service._limits import session_limits
    from broker.service._notify import Lifecycle
    from broker.service._sharedstate import (
        REPLAY_FILE,
        SESSIONS_FILE,
        SharedReplayCache,
        SharedSessionCounts,
        StateFileError,
    )
    from broker.service._workers import (
        CANNOT_START,
        LISTENING,
        RELOAD_FAILED,
        RELOADED,
        Supervisor,
        reuse_port_free,
    )

    listen = config.listen
    addresses = [(listen.host, listen.port)]
    if listen.connect_port:
        addresses.append((listen.connect_host, listen.connect_port))
    try:
        reuse_port_free(addresses)
    except OSError as exc:
        where = ", ".join(f"{host}:{port}" for host, port in addresses)
        raise CommandError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        ensure_keypair(config.state_dir)  # once, before the workers race to make it
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{config.state_dir}: cannot prepare the state directory: "
                           f"{exc.strerror}") from None
    sessions_file = config.state_dir / SESSIONS_FILE
    counts = SharedSessionCounts(session_limits(config), sessions_file, None)
    # Both files made (WAL mode, schema) here, once: workers opening a new file at the
    # same moment would find it locked while one of them converts it to WAL.
    replay = SharedReplayCache(config.state_dir / REPLAY_FILE, config.tokens.replay_cache_size)
    try:
        counts.reset()
        replay.open()
    except StateFileError as exc:
        raise CommandError(str(exc)) from None
    finally:
        replay.close()

    def run_worker(link: WorkerLink) -> int:
        try:
            mine = SharedSessionCounts(session_limits(config), sessions_file, link.index)
            broker, reloader = build_broker(config, plugins, link=link, counts=mine, path=path)
            # The supervisor speaks to systemd for every worker (NotifyAccess=main).
            lifecycle = Lifecycle(
                listening=lambda _status: link.report(LISTENING),
                reload_started=lambda: None,
                reload_done=lambda ok: link.report(RELOADED if ok else RELOAD_FAILED),
                stopping=lambda: None,
            )
            try:
                anyio.run(run_until_signalled, broker, SIGNAL_ECHO, reloader, lifecycle,
                          backend="asyncio", backend_options=backend_options)
            except BaseExceptionGroup as group:
                found = _listen_error(group, broker)
                if found is None:
                    raise
                raise found from None
        except CommandError as exc:
            _log.error("worker.start_failed", worker=link.index, error=str(exc))
            return CANNOT_START
        except OSError as exc:
            _log.error("worker.start_failed", worker=link.index,
                       error=f"cannot listen: {exc.strerror or exc}")
            return CANNOT_START
        return 0

    _log.info("broker.workers", workers=workers, pid=os.getpid())
    supervisor = Supervisor(workers, run_worker, forget=counts.forget_worker)
    # The admin socket, bound once here: every worker accepts on it, and it outlives a
    # worker's restart (broker.service._admin).
    with admin_listener(config.admin_socket) as supervisor.link.admin_socket:
        status = supervisor.run()
    if status != 0:
        raise CommandError("a worker could not start (worker.start_failed in the log says why)")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def register_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the console broker",
        description=(
            "Serve consoles: WebSocket endpoints /ws/{protocol}?token=..., console pages, "
            "/healthz and /metrics on one port (see docs/service.md). Creates the signing key "
            "pair in the state directory on first start. SIGTERM or SIGINT shut it down "
            "cleanly within limits.shutdown_grace; a second signal stops it at once. "
            "SIGHUP reloads the trusted token keys (tokens.trust_local_key, "
            "tokens.public_keys) and the TLS files (tls.cert, tls.key, tls.client_ca) "
            "for new connections, keeping every open session; a file that cannot be "
            "loaded keeps the old ones (broker.reload_failed in the log). Other settings "
            "need a restart."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="worker processes sharing the listeners (default: service.workers, 1); each "
        "has its own libvirt connection and serves the sessions of the domains it owns "
        "(docs/service.md, Worker processes)",
    )
    parser.set_defaults(func=_serve_command, needs_server=True)


#: ``serve``, and ``install-service`` (the systemd unit that runs it: broker.service_unit).
REGISTRARS: list[Callable[[Subparsers], None]] = [register_serve, *service_unit.REGISTRARS]
