"""``console-broker doctor``'s checks of libvirt: it answers, and each enabled domain's
consoles can be reached (:mod:`broker.doctor` runs them).

The consoles are reached the way the broker reaches them when a token arrives, without
naming a protocol: for every loaded protocol whose console a running domain has enabled,
the resolver (:class:`broker.service._libvirt.LibvirtResolver`, or a fake in the tests)
plans the endpoint from the live XML and opens it (a graphics fd, a TCP or TLS port, a
UNIX socket, a console stream), or the protocol's own ``open_endpoint`` does; the
endpoint is closed at once. Nothing waits without a bound: libvirt calls made here run
in a daemon thread and are given up after the timeout, and every console gets as long.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from broker.checks import FAIL, OK, SKIP, WARN, Finding
from broker.config import Config

if TYPE_CHECKING:
    from broker.hookspecs import Protocol
    from broker.service import ConsoleTLS
    from broker.service._libvirt import Resolver

#: Seconds a libvirt call, or reaching one console, may take before it counts as hung.
DEFAULT_TIMEOUT = 5.0


def bounded(function: Callable[[], Any], timeout: float) -> Any:
    """*function*'s result, run in a daemon thread; TimeoutError when it has not returned
    within *timeout* seconds (the thread is left behind: it cannot be stopped, and does
    not keep the process from exiting)."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["value"] = function()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="doctor", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


# --- libvirt answers --------------------------------------------------------------------


@attrs.define
class LibvirtAccess:
    """The libvirt connection the checks share, or why there is none."""

    uri: str
    conn: Any = None
    error: str = ""

    def close(self, timeout: float) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                bounded(conn.close, timeout)


def _open_libvirt(uri: str) -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def error_text(exc: BaseException) -> str:
    """One line for a libvirt error (its message without libvirt's prefix) or another."""
    getter = getattr(exc, "get_error_message", None)
    text = getter() if callable(getter) else None
    return " ".join(str(text or exc).split()) or type(exc).__name__


def connect_libvirt(
    uri: str, *, opener: Callable[[str], Any] = _open_libvirt, timeout: float = DEFAULT_TIMEOUT
) -> LibvirtAccess:
    """A connection to *uri*, opened within *timeout* seconds, or the error."""
    try:
        return LibvirtAccess(uri, conn=bounded(lambda: opener(uri), timeout))
    except TimeoutError as exc:
        return LibvirtAccess(uri, error=f"libvirtd did not answer: {exc}")
    except Exception as exc:  # libvirtError, or anything else it raises
        return LibvirtAccess(uri, error=error_text(exc))


def _version(number: int) -> str:
    major, rest = divmod(int(number), 1_000_000)
    minor, release = divmod(rest, 1_000)
    return f"{major}.{minor}.{release}"


def libvirt_fix(uri: str, error: str) -> str:
    """What to do when libvirt at *uri* fails with *error*."""
    lowered = error.lower()
    if "permission denied" in lowered or "authentication" in lowered or "polkit" in lowered:
        return (f"run as root or as a user in the libvirt group (or allowed by polkit) to "
                f"use {uri}; try: virsh -c {uri} version")
    if ("no such file" in lowered or "connection refused" in lowered
            or "did not answer" in lowered or "failed to connect" in lowered):
        return (f"start libvirtd (systemctl start libvirtd, or virtqemud.socket with the "
                f"modular daemons) and check it answers: virsh -c {uri} version")
    return f"check libvirt.uri ({uri}) and that libvirtd runs: virsh -c {uri} version"


def _no_answer(uri: str, error: str) -> Finding:
    return Finding(FAIL, uri, f"does not answer: {error}", libvirt_fix(uri, error))


def check_libvirt(access: LibvirtAccess, *, timeout: float = DEFAULT_TIMEOUT) -> list[Finding]:
    """libvirt answers at ``libvirt.uri``: its version and the hypervisor's."""
    if access.conn is None:
        return [Finding(FAIL, access.uri, f"cannot connect: {access.error}",
                        libvirt_fix(access.uri, access.error))]
    conn = access.conn
    try:
        lib, kind = bounded(lambda: (conn.getLibVersion(), conn.getType()), timeout)
    except Exception as exc:
        return [_no_answer(access.uri, error_text(exc))]
    try:
        hyp = bounded(conn.getVersion, timeout)
    except TimeoutError as exc:
        # The daemon answers; its driver is busy: libvirt's QEMU driver probes every
        # installed emulator the first time the hypervisor's version or its capabilities
        # are asked for after libvirtd started or QEMU changed (seconds each, then cached).
        return [Finding(
            WARN, access.uri,
            f"libvirt {_version(lib)} answers, but its {kind} driver did not report the "
            f"hypervisor's version: {exc}",
            "libvirt probes every installed QEMU binary after it starts or after QEMU was "
            "upgraded: run doctor again in a minute (or with a longer --timeout); if it "
            f"persists, look at libvirtd's log; try: virsh -c {access.uri} version",
        )]
    except Exception as exc:
        return [_no_answer(access.uri, error_text(exc))]
    return [Finding(OK, access.uri, f"libvirt {_version(lib)}, {kind} {_version(hyp)}")]


def check_schema(path: str | None = None) -> list[Finding]:
    """libvirt's RelaxNG domain schema, which ``xml enable`` validates every edit against,
    is installed and loads."""
    from broker.xml import DOMAIN_SCHEMA, SchemaError, domain_schema

    path = path or DOMAIN_SCHEMA
    title = "libvirt's domain schema"
    try:
        schema = domain_schema(path)
    except SchemaError as exc:
        return [Finding(FAIL, title, f"{exc}: console-broker xml enable and enable DOMAIN "
                                     "stop with this error",
                        "reinstall libvirt's schemas (Debian: apt install --reinstall libvirt0)")]
    if schema is None:
        return [Finding(WARN, title, f"{path} not found: console-broker xml enable and "
                                     "enable DOMAIN write domain XML without checking it",
                        "install libvirt's schemas (Debian: the libvirt0 package installs "
                        f"{path})")]
    return [Finding(OK, title, f"{path} loads")]


# --- the enabled domains ----------------------------------------------------------------


@attrs.frozen
class EnabledDomain:
    """A domain whose consoles ``console-broker xml enable`` recorded."""

    uuid: str
    name: str
    active: bool
    #: The consoles recorded (their records' names), sorted.
    consoles: tuple[str, ...]


def _domain_state(dom: Any) -> tuple[str, str, bool, str]:
    active = bool(dom.isActive())
    return dom.UUIDString(), dom.name(), active, dom.XMLDesc(0)


def enabled_domains(
    access: LibvirtAccess, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[list[EnabledDomain], list[Finding]]:
    """The domains with console records (their live XML when running), and findings for
    those that could not be read."""
    from lxml import etree

    from broker.xml import XmlError, read_consoles

    conn = access.conn
    assert conn is not None
    try:
        domains = bounded(lambda: conn.listAllDomains(0), timeout)
    except Exception as exc:
        return [], [Finding(FAIL, "domains", f"cannot list them: {error_text(exc)}",
                            libvirt_fix(access.uri, error_text(exc)))]
    found: list[EnabledDomain] = []
    problems: list[Finding] = []
    for dom in domains:
        try:
            uuid, name, active, xml = bounded(functools.partial(_domain_state, dom), timeout)
        except Exception as exc:  # gone meanwhile, or libvirtd stuck
            problems.append(Finding(WARN, "a domain", f"could not be read: {error_text(exc)}",
                                    "run doctor again"))
            continue
        try:
            root = etree.fromstring(xml.encode(), etree.XMLParser(
                resolve_entities=False, no_network=True, huge_tree=False))
            records = read_consoles(root)
        except (etree.XMLSyntaxError, XmlError) as exc:
            problems.append(Finding(
                FAIL, f"domain {name}", f"the console-broker metadata: {exc}",
                f"enable its consoles again: console-broker enable {name} --consoles ..."))
            continue
        if records:
            found.append(EnabledDomain(uuid, name, active, tuple(sorted(records))))
    return found, problems


@attrs.frozen
class Reacher:
    """A loaded protocol, as the consoles check reaches its consoles."""

    protocol: Protocol
    #: Its plugin's name, for what the check says about the plugin.
    plugin: str
    #: Its ``console_tls`` (None: none).
    tls: ConsoleTLS | None = None
    #: Why its ``console_tls`` could not be had (the plugin's own checks say more).
    tls_error: str = ""


def _claims(config: Config, domain: EnabledDomain, protocol: str) -> Any:
    """Claims of a token the resolver resolves the way it resolves a real one's."""
    from broker.tokens import Claims, Rights

    now = int(time.time())
    return Claims(domain_uuid=domain.uuid, protocol=protocol, node=config.node_name,
                  rights=Rights.VIEW, issued_at=now, not_before=now, expires_at=now + 60,
                  jti="console-broker-doctor")


@attrs.frozen
class _Reached:
    """How one console of one domain went: a status, what was found, and the fix."""

    status: str
    text: str
    fix: str = ""


async def _reach_one(
    resolver: Resolver, config: Config, domain: EnabledDomain, reacher: Reacher,
    timeout: float,
) -> _Reached:
    import anyio
    import structlog

    from broker.service import Endpoint, EndpointRequest, Refused
    from broker.service import _refusals as refusals

    protocol = reacher.protocol
    name = protocol.name
    claims = _claims(config, domain, name)
    endpoint: Endpoint | None = None
    if reacher.tls_error:
        return _Reached(FAIL, f"{name}: its TLS to consoles cannot be loaded: "
                              f"{reacher.tls_error}",
                        f"see the {name} checks below, then run doctor again")
    try:
        with anyio.fail_after(timeout):
            if protocol.endpoint == "console":
                target = await resolver.target(claims, protocol.console, reacher.tls)
                endpoint = await resolver.open(target)
            else:
                target = await resolver.target(claims, None, None)
                if protocol.endpoint == "none":
                    return _Reached(OK, f"{name}: running (the plugin reaches the VM itself)")
                log = structlog.get_logger("console_broker.doctor")
                try:
                    endpoint = await protocol.open_endpoint(
                        EndpointRequest(claims, target.domain_name, target.handle, log))
                except Refused:
                    raise
                except Exception as exc:
                    return _Reached(FAIL, f"{name}: the plugin {reacher.plugin}'s open_endpoint "
                                          f"raised {type(exc).__name__}: {exc}",
                                    f"report it to the plugin {reacher.plugin}'s authors")
    except TimeoutError:
        return _Reached(FAIL, f"{name}: no answer within {timeout:g} s",
                        "check libvirtd and the domain (virsh domstate "
                        f"{domain.name} --reason), then run doctor again")
    except Refused as exc:
        refusal = exc.refusal
        if refusal is refusals.CONSOLE_BUSY:
            return _Reached(WARN, f"{name}: busy: {exc.detail}",
                            "another client holds the console (virsh console, say): sessions "
                            "are refused console_busy until it lets go; a broker's own session "
                            "holding it is fine")
        if refusal is refusals.VM_NOT_RUNNING:
            return _Reached(OK, f"{name}: stopped meanwhile (checked when it runs)")
        if refusal is refusals.CONSOLE_NOT_ENABLED:
            fix = (f"enable the console again (console-broker enable {domain.name} "
                   f"--consoles {protocol.console}) and restart the domain")
        elif refusal is refusals.CONSOLE_AUTH_FAILED:
            fix = (f"the broker's TLS to this console does not verify QEMU's certificate: "
                   f"see the {name} checks below")
        elif refusal is refusals.HYPERVISOR_UNAVAILABLE:
            fix = libvirt_fix(config.libvirt.uri, exc.detail)
        else:
            fix = (f"restart the domain so that libvirt applies its console XML "
                   f"(virsh dumpxml {domain.name} shows the live devices)")
        return _Reached(FAIL, f"{name}: {refusal.reason}: {exc.detail}", fix)
    finally:
        if endpoint is not None:
            await endpoint.aclose()
    assert endpoint is not None
    return _Reached(OK, f"{name} {endpoint.description}")


async def reach_consoles(
    resolver: Resolver, config: Config, domains: Sequence[EnabledDomain],
    reachers: Sequence[Reacher], *, timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """One finding per domain: each console of a running domain reached through
    *resolver* (or the protocol's own endpoint), by every loaded protocol that serves it."""
    import anyio

    class _Quiet:
        def domain_gone(self, domain_uuid: str, ending: object) -> None:
            pass

        def connection_lost(self) -> None:
            pass

        def connection_restored(self) -> None:
            pass

    found: list[Finding] = []
    async with anyio.create_task_group() as group:
        await group.start(functools.partial(resolver.run, _Quiet()))
        for domain in domains:
            served = [r for r in reachers if r.protocol.console in domain.consoles]
            enabled = ", ".join(domain.consoles)
            title = f"domain {domain.name}"
            if not served:
                found.append(Finding(SKIP, title, f"{enabled} enabled; no loaded plugin "
                                                  "serves them"))
                continue
            if not domain.active:
                found.append(Finding(OK, title, f"{enabled} enabled; not running (its "
                                                "consoles are reached when it runs)"))
                continue
            reached = [await _reach_one(resolver, config, domain, r, timeout) for r in served]
            worst = max((r.status for r in reached), key=(OK, SKIP, WARN, FAIL).index)
            fixes = "; ".join(dict.fromkeys(r.fix for r in reached if r.fix))
            found.append(Finding(worst, title, ", ".join(r.text for r in reached),
                                 fixes if worst in (WARN, FAIL) else ""))
        group.cancel_scope.cancel()
    return found


def _libvirt_resolver(uri: str) -> Resolver:
    from broker.service._libvirt import LibvirtResolver

    return LibvirtResolver(uri)


def check_domains(
    config: Config,
    access: LibvirtAccess,
    reachers: Sequence[Reacher],
    *,
    resolver: Callable[[str], Resolver] = _libvirt_resolver,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """Every domain whose consoles console-broker enabled: for a running one, each
    console a loaded protocol serves is reached as the broker would reach it."""
    import anyio

    if access.conn is None:
        return [Finding(SKIP, "domains", "libvirt is unreachable")]
    domains, found = enabled_domains(access, timeout=timeout)
    if domains:
        # Every console has its timeout; a libvirt call stuck in a worker thread cannot be
        # cancelled, so the whole is bounded too (its thread is then left behind).
        consoles = sum(len(d.consoles) for d in domains if d.active)
        whole = timeout * (consoles + 2)
        try:
            found += bounded(lambda: anyio.run(functools.partial(
                reach_consoles, resolver(access.uri), config, domains, reachers,
                timeout=timeout)), whole)
        except TimeoutError:
            found.append(Finding(FAIL, "domains", f"reaching the consoles took more than "
                                                  f"{whole:g} s",
                                 libvirt_fix(access.uri, "did not answer")))
    return found or [Finding(SKIP, "domains", "no domain has consoles enabled by "
                                              "console-broker")]
