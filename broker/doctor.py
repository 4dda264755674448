"""``console-broker doctor``: check a hypervisor host for what the broker needs.

Each check is a small function returning :class:`Finding` values (``ok``, ``warning``,
``problem``, or ``skipped`` where it does not apply), each with a one-line message and,
unless it is ok, a one-line fix. The boundaries a check meets (libvirt, the clock, the
time-synchronisation tools, the broker answering ``/healthz``) are parameters, so that the
tests replace them. Nothing waits without a bound: libvirt calls run in a daemon thread
and are given up after ``--timeout`` seconds, HTTP and tools get the same bound.

Like every server-side command, the module imports the server's dependencies (libvirt,
lxml, cryptography) inside the checks only: ``console-broker --help`` imports it on a
client-only install too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import functools
import http.client
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import attrs

from broker.config import PUBLIC_KEY_NAME, Config, ConfigError
from broker.errors import CommandError

if TYPE_CHECKING:
    from cryptography import x509

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

OK = "ok"
WARNING = "warning"
PROBLEM = "problem"
SKIPPED = "skipped"
STATUSES = (OK, WARNING, PROBLEM, SKIPPED)

#: Seconds a libvirt call, an HTTP request or a tool may take before it counts as hung.
DEFAULT_TIMEOUT = 5.0
#: A certificate with fewer days left than this is a warning.
CERT_WARN_DAYS = 30
#: The files each console page needs below ``http.assets_dir`` (the pages' own checks:
#: broker_vnc's ``core/rfb.js``, broker_spice's ``src/main.js``, broker_serial's ASSETS;
#: the core imports no plugin, so they are named here).
ASSETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vnc": ("noVNC", ("@novnc/novnc/core/rfb.js",)),
    "spice": ("spice-html5", ("@spice-project/spice-html5/src/main.js",)),
    "serial": (
        "xterm.js",
        (
            "@xterm/xterm/lib/xterm.js",
            "@xterm/xterm/css/xterm.css",
            "@xterm/addon-fit/lib/addon-fit.js",
        ),
    ),
}
#: The system instance's qemu.conf (``qemu:///system``).
SYSTEM_QEMU_CONF = Path("/etc/libvirt/qemu.conf")


@attrs.frozen
class Finding:
    """One line of the report."""

    #: The check's name: libvirt, keys, tls, ports, assets, clock, domains, qemu.conf.
    check: str
    #: One of :data:`STATUSES`.
    status: str
    message: str
    #: What to do about it (empty when ok or skipped).
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "message": self.message,
                "fix": self.fix}


def _one(check: str, findings: list[Finding], ok_message: str) -> list[Finding]:
    """*findings*, or one ok finding with *ok_message* when there are none."""
    return findings or [Finding(check, OK, ok_message)]


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


# --- 1. libvirt -------------------------------------------------------------------------


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


def _error_text(exc: BaseException) -> str:
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
        return LibvirtAccess(uri, error=_error_text(exc))


def _version(number: int) -> str:
    major, rest = divmod(int(number), 1_000_000)
    minor, release = divmod(rest, 1_000)
    return f"{major}.{minor}.{release}"


def _libvirt_fix(uri: str, error: str) -> str:
    lowered = error.lower()
    if "permission denied" in lowered or "authentication" in lowered or "polkit" in lowered:
        return (f"run as root or as a user in the libvirt group (or allowed by polkit) to "
                f"use {uri}; try: virsh -c {uri} version")
    if ("no such file" in lowered or "connection refused" in lowered
            or "did not answer" in lowered or "failed to connect" in lowered):
        return (f"start libvirtd (systemctl start libvirtd, or virtqemud.socket with the "
                f"modular daemons) and check it answers: virsh -c {uri} version")
    return f"check libvirt.uri ({uri}) and that libvirtd runs: virsh -c {uri} version"


def check_libvirt(access: LibvirtAccess, *, timeout: float = DEFAULT_TIMEOUT) -> list[Finding]:
    """libvirt answers at ``libvirt.uri``: its version and the hypervisor's."""
    if access.conn is None:
        return [Finding("libvirt", PROBLEM, f"cannot connect to {access.uri}: {access.error}",
                        _libvirt_fix(access.uri, access.error))]
    conn = access.conn
    try:
        lib, hyp, kind = bounded(
            lambda: (conn.getLibVersion(), conn.getVersion(), conn.getType()), timeout
        )
    except Exception as exc:
        error = _error_text(exc)
        return [Finding("libvirt", PROBLEM, f"{access.uri} does not answer: {error}",
                        _libvirt_fix(access.uri, error))]
    return [Finding("libvirt", OK,
                    f"{access.uri}: libvirt {_version(lib)}, {kind} {_version(hyp)}")]


# --- 2. the key pair --------------------------------------------------------------------


def check_keys(config: Config) -> list[Finding]:
    """The signing key pair in ``broker.state_dir`` is there and private; every trusted
    public key (``tokens.public_keys``, and the local one) can be read."""
    from broker.keys import KeyFileError, key_fingerprint, load_private_key, load_public_key

    state_dir = config.state_dir
    private = config.private_key_path
    uid = os.geteuid()
    found: list[Finding] = []

    def problem(message: str, fix: str) -> None:
        found.append(Finding("keys", PROBLEM, message, fix))

    keygen = "console-broker keygen" + (f" --config {config.source}" if config.source else "")
    try:
        dir_stat = state_dir.stat()
    except FileNotFoundError:
        return [Finding("keys", WARNING, f"{state_dir}: no state directory yet, so no key pair",
                        f"run '{keygen}' (console-broker serve also creates it on first start)")]
    except OSError as exc:
        return [Finding("keys", PROBLEM, f"{state_dir}: cannot read it: {exc.strerror}",
                        "run doctor as the user the broker runs as")]
    mode = stat.S_IMODE(dir_stat.st_mode)
    if mode & 0o077:
        problem(f"{state_dir}: mode {mode:04o}: others may enter the state directory",
                f"chmod 700 {state_dir}")
    fingerprint = ""
    try:
        key_stat = private.lstat()
    except FileNotFoundError:
        found.append(Finding("keys", WARNING, f"{private}: no signing key yet",
                             f"run '{keygen}' (console-broker serve also creates it on first "
                             "start)"))
        key_stat = None
    except OSError as exc:
        problem(f"{private}: cannot read it: {exc.strerror}",
                "run doctor as the user the broker runs as")
        key_stat = None
    if key_stat is not None:
        key_mode = stat.S_IMODE(key_stat.st_mode)
        if not stat.S_ISREG(key_stat.st_mode):
            problem(f"{private}: not a plain file", f"replace it: {keygen} --force")
        elif key_mode & 0o077:
            problem(f"{private}: mode {key_mode:04o}: group or others may read the private key",
                    f"chmod 600 {private}")
        elif key_stat.st_uid != uid:
            problem(f"{private}: owned by uid {key_stat.st_uid}, not by uid {uid} running "
                    "doctor", "run doctor as the broker's user, or chown the key to that user")
        else:
            try:
                fingerprint = key_fingerprint(load_private_key(private).public_key())
            except KeyFileError as exc:
                problem(str(exc), f"restore the key from a backup, or make a new one: "
                                  f"{keygen} --force")
    local_public = state_dir / PUBLIC_KEY_NAME
    trusted = 0
    for path in config.public_key_paths:
        try:
            public = load_public_key(path)
        except KeyFileError as exc:
            local = path == local_public
            if local and fingerprint:
                found.append(Finding("keys", WARNING, str(exc),
                                     "console-broker serve writes it again from the private key "
                                     "when it starts"))
            elif not local or key_stat is not None:
                problem(str(exc), "make it readable, or remove it from tokens.public_keys")
            continue
        trusted += 1
        if fingerprint and path == local_public and (
            key_fingerprint(public) != fingerprint
        ):
            found.append(Finding("keys", WARNING, f"{path}: not the private key's public key",
                                 "console-broker serve writes it again from the private key "
                                 "when it starts"))
    return _one("keys", found,
                f"signing key {fingerprint} in {state_dir} (0600, directory 0700); "
                f"{trusted} trusted public key{'s' if trusted != 1 else ''} readable")


# --- 3. TLS files -----------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _load_certificates(path: Path) -> list[x509.Certificate]:
    from cryptography import x509

    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    if not certificates:
        raise ValueError("no PEM certificate in it")
    return certificates


def _validity(key: str, path: Path, certificate: x509.Certificate,
              now: datetime.datetime) -> tuple[Finding | None, str]:
    """A finding when *certificate* is expired, not yet valid or near its end; and its
    end for the ok message."""
    subject = certificate.subject.rfc4514_string() or "(no subject)"
    after, before = certificate.not_valid_after_utc, certificate.not_valid_before_utc
    days = (after - now).days
    renew = f"renew {path} ({key}) and restart the broker"
    if after <= now:
        return Finding("tls", PROBLEM, f"{key} {subject}: expired on {after:%Y-%m-%d}", renew), ""
    if before > now:
        return Finding("tls", PROBLEM,
                       f"{key} {subject}: not valid before {before:%Y-%m-%d %H:%M} UTC",
                       "check the clock, or use a certificate valid now"), ""
    if days < CERT_WARN_DAYS:
        return Finding("tls", WARNING, f"{key} {subject}: expires on {after:%Y-%m-%d}, "
                       f"{days} days left", renew), ""
    return None, f"{key} until {after:%Y-%m-%d} ({days} days)"


def check_tls(config: Config, *, now: datetime.datetime | None = None) -> list[Finding]:
    """The ``[tls]`` files: readable, the certificate and key match, dates valid."""
    from cryptography.hazmat.primitives import serialization

    now = now or _now()
    tls = config.tls
    files = [(k, v) for k, v in (("tls.cert", tls.cert), ("tls.ca", tls.ca),
                                 ("tls.client_ca", tls.client_ca)) if v]
    if not files:
        return [Finding("tls", SKIPPED, "no [tls]: the broker serves plain HTTP")]
    found: list[Finding] = []
    valid: list[str] = []
    leaf: x509.Certificate | None = None
    for key, name in files:
        path = Path(name)
        try:
            certificates = _load_certificates(path)
        except OSError as exc:
            found.append(Finding("tls", PROBLEM, f"{key} {path}: cannot read it: {exc.strerror}",
                                 f"make {path} readable by the broker's user, or fix {key}"))
            continue
        except ValueError as exc:
            found.append(Finding("tls", PROBLEM, f"{key} {path}: not a PEM certificate: {exc}",
                                 f"put the PEM certificate at {path}"))
            continue
        if key == "tls.cert":
            leaf = certificates[0]
        for certificate in certificates[:1] if key == "tls.cert" else certificates:
            finding, until = _validity(key, path, certificate, now)
            if finding is not None:
                found.append(finding)
            elif until:
                valid.append(until)
    if tls.key:
        path = Path(tls.key)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            found.append(Finding("tls", PROBLEM, f"tls.key {path}: cannot read it: "
                                 f"{exc.strerror}", f"make {path} readable by the broker's user"))
        except (ValueError, TypeError):
            found.append(Finding("tls", PROBLEM, f"tls.key {path}: not an unencrypted PEM "
                                 "private key", f"put the certificate's key at {path}, "
                                 "without a passphrase"))
        else:
            spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if leaf is not None and (
                leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki)
            ):
                found.append(Finding("tls", PROBLEM,
                                     f"tls.key {path} is not the key of tls.cert {tls.cert}",
                                     "set tls.key to the certificate's own key (or tls.cert "
                                     "to the key's certificate)"))
    return _one("tls", found, "key matches; " + ", ".join(valid))


# --- 4. listen ports --------------------------------------------------------------------


def _bind_error(host: str, port: int) -> OSError | None:
    """None when *host*:*port* can be listened on now; else why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, exc.strerror)
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker does
        try:
            sock.bind(address)
            sock.listen(1)
        except OSError as exc:
            return exc
    return None


def fetch_health(host: str, port: int, tls: bool, timeout: float) -> dict[str, Any] | None:
    """The JSON ``/healthz`` answers at *host*:*port*, or None (no answer, not JSON).
    TLS is not verified: this only asks who holds the port."""
    connection: http.client.HTTPConnection
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        doc = json.loads(response.read(65536))
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return doc if isinstance(doc, dict) else None


def _is_broker(doc: dict[str, Any] | None) -> bool:
    return doc is not None and {"status", "version", "libvirt"} <= doc.keys()


def _reach(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def check_ports(
    config: Config,
    *,
    health: Callable[[str, int, bool, float], dict[str, Any] | None] = fetch_health,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """``listen.port`` (and ``listen.connect_port``) can be listened on, or is held by a
    console-broker running on this host (it answers ``/healthz`` there)."""
    listen = config.listen
    ports = [("listen.port", listen.host, listen.port)]
    if listen.connect_port:
        ports.append(("listen.connect_port", listen.connect_host, listen.connect_port))
    found: list[Finding] = []
    broker_here = False
    for key, host, port in ports:
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        error = _bind_error(host, port)
        if error is None:
            found.append(Finding("ports", OK, f"{key} {where}: free"))
            continue
        if error.errno == errno.EADDRINUSE:
            doc = None
            if key == "listen.port":
                doc = health(_reach(host), port, config.tls_enabled, timeout)
            if _is_broker(doc):
                assert doc is not None
                broker_here = True
                found.append(Finding(
                    "ports", OK, f"{key} {where}: held by the console-broker running here "
                    f"(version {doc.get('version')}, node {doc.get('node')}, "
                    f"status {doc.get('status')})"))
            elif key == "listen.connect_port" and broker_here:
                found.append(Finding("ports", OK, f"{key} {where}: in use, taken to be the "
                                     "CONNECT listener of the console-broker on listen.port"))
            else:
                found.append(Finding(
                    "ports", PROBLEM, f"{key} {where}: in use by another program",
                    f"stop it (ss -ltnp 'sport = :{port}' names it) or set {key} to a free "
                    "port"))
        elif error.errno == errno.EACCES:
            found.append(Finding(
                "ports", PROBLEM, f"{key} {where}: permission denied",
                "use a port above 1023, or give the broker CAP_NET_BIND_SERVICE "
                "(AmbientCapabilities= in its systemd unit)"))
        elif error.errno == errno.EADDRNOTAVAIL:
            host_key = "listen.host" if key == "listen.port" else "listen.connect_host"
            found.append(Finding(
                "ports", PROBLEM, f"{key} {where}: {host} is not an address of this host",
                f"set {host_key} to an address of this host (ip -br address lists them)"))
        else:
            found.append(Finding("ports", PROBLEM, f"{key} {where}: cannot listen: "
                                 f"{error.strerror or error}", f"check {key} and the host's "
                                 "network configuration"))
    return found


# --- 5. the console pages' assets -------------------------------------------------------


def check_assets(config: Config, protocols: Collection[str]) -> list[Finding]:
    """The browser clients of the console pages of *protocols* (the loaded plugins')
    are where the broker looks for them (``http.assets_dir``, :func:`broker.assets.assets_dir`)."""
    from broker.assets import assets_dir

    root = assets_dir(config.http.assets_dir)
    wanted = [p for p in ASSETS if p in protocols]
    if not wanted:
        return [Finding("assets", SKIPPED, "no plugin with a console page is loaded")]
    found: list[Finding] = []
    present: list[str] = []
    for protocol in wanted:
        title, files = ASSETS[protocol]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            found.append(Finding(
                "assets", PROBLEM, f"{title} ({protocol} page): {root / missing[0]} missing",
                f"install the browser clients under {root} ('npm ci' in a source tree), or set "
                "http.assets_dir to the node_modules directory holding them"))
        else:
            present.append(title)
    return _one("assets", found, f"{', '.join(present)} found in {root}")


# --- 6. the clock -----------------------------------------------------------------------


def run_tool(argv: Sequence[str], timeout: float) -> str | None:
    """The standard output of *argv*, or None when it is not installed, fails or hangs."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _synchronised(run: Callable[[Sequence[str], float], str | None],
                  timeout: float) -> tuple[bool | None, str]:
    """(whether the clock is synchronised, by which tool), (None, "") when neither
    timedatectl nor chronyc can tell."""
    out = run(["timedatectl", "show", "--property=NTPSynchronized", "--value"], timeout)
    if out is not None and out.strip() in ("yes", "no"):
        return out.strip() == "yes", "timedatectl"
    out = run(["chronyc", "-n", "tracking"], timeout)
    if out is not None:
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "leap status":
                return "not synchronised" not in value.lower(), "chronyc"
    return None, ""


def package_time() -> float:
    """When this package's files were written (built, or installed)."""
    return Path(__file__).stat().st_mtime


def check_clock(
    config: Config,
    *,
    now: float | None = None,
    package: float | None = None,
    run: Callable[[Sequence[str], float], str | None] = run_tool,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """The clock is not before the signing key was made nor before this package's files
    were written, and timedatectl or chronyc (when there) say it is synchronised."""
    now = time.time() if now is None else now
    package = package_time() if package is None else package
    fix = "set the clock and keep it synchronised (timedatectl set-ntp true, or chrony)"
    found: list[Finding] = []
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    try:
        key_made = config.private_key_path.stat().st_mtime
    except OSError:
        key_made = None
    if key_made is not None and now < key_made - 60:
        made = datetime.datetime.fromtimestamp(key_made, datetime.UTC)
        found.append(Finding("clock", PROBLEM, f"the clock says {stamp:%Y-%m-%d %H:%M} UTC, "
                             f"before the signing key was made ({made:%Y-%m-%d %H:%M} UTC): "
                             "tokens would be refused", fix))
    if now < package - 60:
        written = datetime.datetime.fromtimestamp(package, datetime.UTC)
        found.append(Finding("clock", PROBLEM, f"the clock says {stamp:%Y-%m-%d %H:%M} UTC, "
                             f"before console-broker was built or installed "
                             f"({written:%Y-%m-%d %H:%M} UTC)", fix))
    synced, tool = _synchronised(run, timeout)
    if synced is False:
        found.append(Finding("clock", WARNING, f"{tool}: the clock is not synchronised; "
                             "tokens' lifetimes rely on it", fix))
    how = f", synchronised ({tool})" if synced else ""
    return _one("clock", found, f"{stamp:%Y-%m-%d %H:%M:%S} UTC{how}")


# --- 7. the consoles of the domains -----------------------------------------------------


def _console_tls(config: Config, protocol: str) -> bool:
    """Whether the broker has TLS to *protocol*'s consoles (its table's ``tls_ca``)."""
    try:
        table = config.table(protocol)
    except KeyError:
        return False
    return bool(getattr(table, "tls_ca", ""))


def _domain_state(dom: Any) -> tuple[str, bool, str]:
    active = bool(dom.isActive())
    return dom.name(), active, dom.XMLDesc(0)


def _domain_finding(config: Config, name: str, active: bool, xml: str) -> Finding | None:
    """A domain's finding; None for a domain whose consoles console-broker did not enable."""
    from lxml import etree

    from broker.service._plan import console_device, plan_endpoint
    from broker.service._refusals import CONSOLE_NOT_ENABLED, Refused
    from broker.xml import XmlError, read_consoles

    enable = f"console-broker enable {name} --consoles ..."
    try:
        root = etree.fromstring(xml.encode(), etree.XMLParser(
            resolve_entities=False, no_network=True, huge_tree=False))
        records = read_consoles(root)
    except (etree.XMLSyntaxError, XmlError) as exc:
        return Finding("domains", PROBLEM, f"{name}: the console-broker metadata: {exc}",
                       f"enable its consoles again: {enable}")
    if not records:
        return None
    enabled = ", ".join(sorted(records))
    if not active:
        return Finding("domains", OK, f"{name}: {enabled} enabled; not running (checked when "
                                      "it runs)")
    plans: list[str] = []
    problems: list[str] = []
    not_enabled = False
    devices = root.find("devices")
    for protocol in sorted(records):
        try:
            plan = plan_endpoint(root, protocol, tls=_console_tls(config, protocol))
            if plan.kind == "stream" and plan.device is not None and devices is not None:
                console_device(devices, plan.device)  # a pty libvirt can open
            if plan.kind == "unix" and plan.path and not Path(plan.path).exists():
                problems.append(f"{protocol}: {plan.path} does not exist")
                continue
        except Refused as exc:
            not_enabled = not_enabled or exc.refusal is CONSOLE_NOT_ENABLED
            problems.append(f"{protocol}: {exc.detail}")
            continue
        plans.append(f"{protocol} {plan.describe()}")
    if problems:
        fix = (f"enable the consoles again ({enable}) and restart the domain" if not_enabled
               else f"restart the domain so that libvirt applies its console XML "
                    f"(virsh dumpxml {name} shows the live graphics)")
        return Finding("domains", PROBLEM, f"{name}: " + "; ".join(problems), fix)
    return Finding("domains", OK, f"{name}: " + ", ".join(plans))


def check_domains(
    config: Config, access: LibvirtAccess, *, timeout: float = DEFAULT_TIMEOUT
) -> list[Finding]:
    """Every domain whose consoles console-broker enabled: for a running one, the plan
    the broker would follow to reach each console can be made from its live XML."""
    conn = access.conn
    if conn is None:
        return [Finding("domains", SKIPPED, "libvirt is unreachable")]
    try:
        domains = bounded(lambda: conn.listAllDomains(0), timeout)
    except Exception as exc:
        return [Finding("domains", PROBLEM, f"cannot list the domains: {_error_text(exc)}",
                        _libvirt_fix(access.uri, _error_text(exc)))]
    found: list[Finding] = []
    for dom in domains:
        try:
            name, active, xml = bounded(functools.partial(_domain_state, dom), timeout)
        except Exception as exc:  # gone meanwhile, or libvirtd stuck
            found.append(Finding("domains", WARNING, f"a domain could not be read: "
                                 f"{_error_text(exc)}", "run doctor again"))
            continue
        finding = _domain_finding(config, name, active, xml)
        if finding is not None:
            found.append(finding)
    return found or [Finding("domains", SKIPPED, "no domain has consoles enabled by "
                                                 "console-broker")]


# --- 8. qemu.conf -----------------------------------------------------------------------


def qemu_conf_path(uri: str) -> Path | None:
    """The qemu.conf that libvirt's QEMU driver at *uri* reads on this host; None for a
    remote URI or another driver."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.hostname not in (None, "", "localhost"):
        return None
    if parts.path == "/session":
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base, "libvirt", "qemu.conf")
    return SYSTEM_QEMU_CONF


def parse_qemu_conf(text: str) -> dict[str, str]:
    """The ``key = value`` settings of a qemu.conf (quotes removed; lists left as text)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.split("#", 1)[0].strip() if not value.strip().startswith('"') else value
        settings[key.strip()] = value.strip().strip('"')
    return settings


def check_qemu_conf(
    config: Config, protocols: Collection[str], *, path: Path | None = None
) -> list[Finding]:
    """What the consoles need of qemu.conf, as docs/vnc.md and docs/spice.md say: TLS to
    QEMU's VNC and SPICE servers on both sides or neither."""
    path = path if path is not None else qemu_conf_path(config.libvirt.uri)
    if path is None:
        return [Finding("qemu.conf", SKIPPED, f"{config.libvirt.uri}: not a local QEMU driver")]
    try:
        settings = parse_qemu_conf(path.read_text(errors="replace"))
    except FileNotFoundError:
        settings = {}  # libvirt's defaults: no TLS
    except OSError as exc:
        return [Finding("qemu.conf", SKIPPED, f"{path}: cannot read it: {exc.strerror}")]
    found: list[Finding] = []
    certs = settings.get("default_tls_x509_cert_dir", "/etc/pki/qemu")
    if "vnc" in protocols:
        vnc = config.table("vnc") if "vnc" in config.plugin_tables else None
        tls_ca, tls_cert = getattr(vnc, "tls_ca", ""), getattr(vnc, "tls_cert", "")
        vnc_tls = settings.get("vnc_tls") == "1"
        vnc_certs = settings.get("vnc_tls_x509_cert_dir", certs)
        if vnc_tls and not tls_ca:
            found.append(Finding(
                "qemu.conf", PROBLEM, f"{path}: vnc_tls = 1, so QEMU's VNC servers want "
                "VeNCrypt, and vnc.tls_ca is empty: VNC sessions fail (console_auth_failed)",
                f"set vnc.tls_ca to {vnc_certs}/ca-cert.pem (docs/vnc.md, VeNCrypt)"))
        elif vnc_tls and settings.get("vnc_tls_x509_verify") == "1" and not tls_cert:
            found.append(Finding(
                "qemu.conf", PROBLEM, f"{path}: vnc_tls_x509_verify = 1, so QEMU wants a client "
                "certificate, and vnc.tls_cert is empty", "set vnc.tls_cert and vnc.tls_key to a "
                f"certificate the CA of {vnc_certs} signed (docs/vnc.md, VeNCrypt)"))
        elif tls_ca and not vnc_tls:
            found.append(Finding(
                "qemu.conf", WARNING, f"vnc.tls_ca is set but {path} does not set vnc_tls = 1: "
                "QEMU's VNC servers speak without TLS", "set vnc_tls = 1 and "
                "vnc_tls_x509_cert_dir in qemu.conf and restart libvirtd, or empty vnc.tls_ca"))
    if "spice" in protocols:
        spice = config.table("spice") if "spice" in config.plugin_tables else None
        tls_ca = getattr(spice, "tls_ca", "")
        spice_tls = settings.get("spice_tls") == "1"
        spice_certs = settings.get("spice_tls_x509_cert_dir", certs)
        if spice_tls and not tls_ca:
            found.append(Finding(
                "qemu.conf", WARNING, f"{path}: spice_tls = 1 and spice.tls_ca is empty: the "
                "broker uses the plain port, and refuses domains whose SPICE is TLS only "
                "(--spice-tls)", f"set spice.tls_ca to {spice_certs}/ca-cert.pem "
                "(docs/spice.md, TLS to QEMU)"))
        elif tls_ca and not spice_tls:
            found.append(Finding(
                "qemu.conf", WARNING, f"spice.tls_ca is set but {path} does not set "
                "spice_tls = 1: SPICE graphics get no TLS port", "set spice_tls = 1 and "
                "spice_tls_x509_cert_dir in qemu.conf and restart libvirtd, or empty "
                "spice.tls_ca"))
    tls = [f"{k} {'on' if settings.get(k) == '1' else 'off'}" for k in ("vnc_tls", "spice_tls")]
    return _one("qemu.conf", found, f"{path}: TLS to QEMU as the broker expects "
                                    f"({', '.join(tls)})")


# --- running them -----------------------------------------------------------------------


def run_checks(
    config: Config,
    protocols: Collection[str],
    *,
    opener: Callable[[str], Any] = _open_libvirt,
    health: Callable[[str, int, bool, float], dict[str, Any] | None] = fetch_health,
    run: Callable[[Sequence[str], float], str | None] = run_tool,
    qemu_conf: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """Every check, in the order of ``doctor --help``."""
    access = connect_libvirt(config.libvirt.uri, opener=opener, timeout=timeout)
    try:
        return [
            *check_libvirt(access, timeout=timeout),
            *check_keys(config),
            *check_tls(config),
            *check_ports(config, health=health, timeout=timeout),
            *check_assets(config, protocols),
            *check_clock(config, run=run, timeout=timeout),
            *check_domains(config, access, timeout=timeout),
            *check_qemu_conf(config, protocols, path=qemu_conf),
        ]
    finally:
        access.close(timeout)


def exit_status(findings: Sequence[Finding], *, strict: bool = False) -> int:
    """1 with a problem (or with a warning when *strict*), else 0."""
    failing = {PROBLEM, WARNING} if strict else {PROBLEM}
    return 1 if any(f.status in failing for f in findings) else 0


def _summary(findings: Sequence[Finding]) -> str:
    counts = {s: sum(f.status == s for f in findings) for s in STATUSES}
    parts = [f"{counts[PROBLEM]} problem{'s' if counts[PROBLEM] != 1 else ''}",
             f"{counts[WARNING]} warning{'s' if counts[WARNING] != 1 else ''}"]
    return ", ".join(parts)


def render_table(findings: Sequence[Finding]) -> str:
    """The human report: check, status and message, and each fix on the line below."""
    width = max([len("CHECK"), *(len(f.check) for f in findings)]) + 2
    indent = " " * (width + 9)
    lines = [f"{'CHECK':<{width}}{'STATUS':<9}MESSAGE"]
    for finding in findings:
        lines.append(f"{finding.check:<{width}}{finding.status:<9}{finding.message}")
        if finding.fix:
            lines.append(f"{indent}fix: {finding.fix}")
    lines.append("")
    lines.append(_summary(findings))
    return "\n".join(lines) + "\n"


def _doctor_command(args: argparse.Namespace) -> int:
    from broker.configfile import read_config
    from broker.plugins import PluginManager

    try:
        config = read_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    protocols = {p.name for info in PluginManager().plugin_infos() for p in info.protocols}
    findings = run_checks(config, protocols, timeout=args.timeout)
    status = exit_status(findings, strict=args.strict)
    if args.json:
        doc = {"exit_status": status, "strict": args.strict,
               "checks": [f.as_dict() for f in findings]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(findings))
    return status


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"from 0 to 300 seconds, not {value:g}")
    return value


DESCRIPTION = """\
Check this hypervisor host for what the broker needs, and print each problem with its
fix. The checks, in order:

  libvirt    libvirt answers at libvirt.uri; its version and the hypervisor's
             (a problem when it does not: start libvirtd, check the URI, permissions)
  keys       the signing key pair in broker.state_dir: the private key 0600, owned by
             the user running doctor, the directory 0700; every trusted public key
             (the local one, tokens.public_keys) readable
  tls        tls.cert, tls.key, tls.ca, tls.client_ca readable, the certificate and key
             match, dates valid (a warning under 30 days left, a problem when expired)
  ports      listen.port and listen.connect_port free, or held by the console-broker
             running here (it answers /healthz on listen.port)
  assets     the console pages' browser clients (noVNC, spice-html5, xterm.js) where
             the broker reads them: http.assets_dir, or its default
  clock      the time is not before the signing key was made nor before this package
             was built or installed; timedatectl or chronyc, if installed, say it is
             synchronised (a warning when they say it is not)
  domains    each domain whose consoles console-broker enabled: for a running one, the
             broker can plan the way to each console from its live XML (a VNC/SPICE
             port, socket or graphics fd, a pty serial console)
  qemu.conf  TLS to QEMU's VNC and SPICE servers set on both sides or neither
             (vnc_tls, spice_tls against vnc.tls_ca, spice.tls_ca; docs/vnc.md,
             docs/spice.md); skipped when it cannot be read or libvirt is remote

Statuses: ok, warning, problem, skipped (does not apply here). Exit status: 0 when no
check found a problem, 1 when one did (or a warning, with --strict). Nothing waits
longer than --timeout seconds. Run it as the user the broker runs as. See
docs/operations.md."""


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this host for what the broker needs, with the fix for each problem",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="configuration file (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.add_argument("--json", action="store_true",
                        help="print a JSON object: exit_status, strict, checks (check, "
                        "status, message, fix)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on warnings too")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long a libvirt call, HTTP request or tool may take "
                        f"(default: {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=_doctor_command, needs_server=True)
