"""``console-broker doctor``'s checks of the host itself: the key pair, the TLS files, the
listen ports and the clock (:mod:`broker.doctor` runs them).

Each returns :class:`broker.checks.Finding` values; the boundaries it meets (the
``/healthz`` request, the time-synchronisation tools, the time) are parameters, so that
the tests replace them. The server's dependencies (cryptography) are imported inside the
checks: ``console-broker --help`` imports this module on a client-only install too.
"""

from __future__ import annotations

import datetime
import errno
import http.client
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.checks import FAIL, OK, SKIP, WARN, Finding
from broker.config import PUBLIC_KEY_NAME, Config

if TYPE_CHECKING:
    from cryptography import x509

#: Seconds an HTTP request or a tool may take before it counts as hung.
DEFAULT_TIMEOUT = 5.0
#: A certificate with fewer days left than this is a warning.
CERT_WARN_DAYS = 30

#: ``/healthz`` of a broker on this host: its JSON, or None.
Health = Callable[[str, int, bool, float], "dict[str, Any] | None"]
#: A tool's standard output, or None when it is missing, fails or hangs.
Tool = Callable[[Sequence[str], float], "str | None"]


def _one(findings: list[Finding], ok: Finding) -> list[Finding]:
    """*findings*, or *ok* alone when there are none."""
    return findings or [ok]


# --- the key pair -----------------------------------------------------------------------


def check_keys(config: Config) -> list[Finding]:
    """The signing key pair in ``broker.state_dir`` is there and private (the key 0600,
    owned by the user running doctor, the directory 0700); every trusted public key (the
    local one, ``tokens.public_keys``) can be read."""
    from broker.keys import KeyFileError, key_fingerprint, load_private_key, load_public_key

    state_dir = config.state_dir
    private = config.private_key_path
    uid = os.geteuid()
    found: list[Finding] = []
    keygen = "console-broker keygen" + (f" --config {config.source}" if config.source else "")
    as_broker = "run doctor as the user the broker runs as"
    try:
        dir_stat = state_dir.stat()
    except FileNotFoundError:
        return [Finding(WARN, "key pair", f"no state directory {state_dir} yet, so no key pair",
                        f"run '{keygen}' (console-broker serve also makes it on first start)")]
    except OSError as exc:
        return [Finding(FAIL, "key pair", f"{state_dir}: cannot read it: {exc.strerror}",
                        as_broker)]
    mode = stat.S_IMODE(dir_stat.st_mode)
    if mode & 0o077:
        found.append(Finding(FAIL, "state directory",
                             f"{state_dir}: mode {mode:04o}: others may enter it",
                             f"chmod 700 {state_dir}"))
    fingerprint = ""
    key_stat: os.stat_result | None = None
    try:
        key_stat = private.lstat()
    except FileNotFoundError:
        found.append(Finding(WARN, "private key", f"{private}: no signing key yet",
                             f"run '{keygen}' (console-broker serve also makes it on first "
                             "start)"))
    except OSError as exc:
        found.append(Finding(FAIL, "private key", f"{private}: cannot read it: {exc.strerror}",
                             as_broker))
    if key_stat is not None:
        key_mode = stat.S_IMODE(key_stat.st_mode)
        if not stat.S_ISREG(key_stat.st_mode):
            found.append(Finding(FAIL, "private key", f"{private}: not a plain file",
                                 f"replace it: {keygen} --force"))
        elif key_mode & 0o077:
            found.append(Finding(
                FAIL, "private key",
                f"{private}: mode {key_mode:04o}: group or others may read the private key",
                f"chmod 600 {private}"))
        elif key_stat.st_uid != uid:
            found.append(Finding(
                FAIL, "private key",
                f"{private}: owned by uid {key_stat.st_uid}, not by uid {uid} running doctor",
                "run doctor as the broker's user, or chown the key to that user"))
        else:
            try:
                fingerprint = key_fingerprint(load_private_key(private).public_key())
            except KeyFileError as exc:
                found.append(Finding(FAIL, "private key", str(exc),
                                     f"restore the key from a backup, or make a new one: "
                                     f"{keygen} --force"))
    local_public = state_dir / PUBLIC_KEY_NAME
    rewritten = "console-broker serve writes it again from the private key when it starts"
    trusted = 0
    for path in config.public_key_paths:
        try:
            public = load_public_key(path)
        except KeyFileError as exc:
            local = path == local_public
            if local and fingerprint:
                found.append(Finding(WARN, "public key", str(exc), rewritten))
            elif not local or key_stat is not None:
                found.append(Finding(FAIL, "public key", str(exc),
                                     "make it readable, or remove it from tokens.public_keys"))
            continue
        trusted += 1
        if fingerprint and path == local_public and key_fingerprint(public) != fingerprint:
            found.append(Finding(WARN, "public key",
                                 f"{path}: not the private key's public key", rewritten))
    plural = "s" if trusted != 1 else ""
    return _one(found, Finding(
        OK, "key pair", f"signing key {fingerprint} in {state_dir} (0600, directory 0700); "
        f"{trusted} trusted public key{plural} readable"))


# --- TLS files --------------------------------------------------------------------------


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
    """A finding when *certificate* is expired, not yet valid or near its end; else its
    end, for the ok line."""
    subject = certificate.subject.rfc4514_string() or "(no subject)"
    after, before = certificate.not_valid_after_utc, certificate.not_valid_before_utc
    days = (after - now).days
    title = f"{key} {subject}"
    renew = f"renew {path} ({key}) and restart the broker"
    if after <= now:
        return Finding(FAIL, title, f"expired on {after:%Y-%m-%d}", renew), ""
    if before > now:
        return Finding(FAIL, title, f"not valid before {before:%Y-%m-%d %H:%M} UTC",
                       "check the clock, or use a certificate valid now"), ""
    if days < CERT_WARN_DAYS:
        return Finding(WARN, title, f"expires on {after:%Y-%m-%d}, {days} days left", renew), ""
    return None, f"{key} until {after:%Y-%m-%d} ({days} days left)"


def check_tls(config: Config, *, now: datetime.datetime | None = None) -> list[Finding]:
    """The ``[tls]`` files: readable, the key is the certificate's, dates valid."""
    from cryptography.hazmat.primitives import serialization

    now = now or _now()
    tls = config.tls
    files = [(k, v) for k, v in (("tls.cert", tls.cert), ("tls.ca", tls.ca),
                                 ("tls.client_ca", tls.client_ca)) if v]
    if not files:
        return [Finding(SKIP, "TLS", "no [tls]: the broker serves plain HTTP")]
    found: list[Finding] = []
    valid: list[str] = []
    leaf: x509.Certificate | None = None
    for key, name in files:
        path = Path(name)
        try:
            certificates = _load_certificates(path)
        except OSError as exc:
            found.append(Finding(FAIL, f"{key} {path}", f"cannot read it: {exc.strerror}",
                                 f"make {path} readable by the broker's user, or fix {key}"))
            continue
        except ValueError as exc:
            found.append(Finding(FAIL, f"{key} {path}", f"not a PEM certificate: {exc}",
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
            found.append(Finding(FAIL, f"tls.key {path}", f"cannot read it: {exc.strerror}",
                                 f"make {path} readable by the broker's user"))
        except (ValueError, TypeError):
            found.append(Finding(FAIL, f"tls.key {path}", "not an unencrypted PEM private key",
                                 f"put the certificate's key at {path}, without a passphrase"))
        else:
            spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if leaf is not None and (
                leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki)
            ):
                found.append(Finding(FAIL, f"tls.key {path}",
                                     f"not the key of tls.cert {tls.cert}",
                                     "set tls.key to the certificate's own key (or tls.cert "
                                     "to the key's certificate)"))
    return _one(found, Finding(OK, "TLS", "key matches; " + ", ".join(valid)))


# --- listen ports -----------------------------------------------------------------------


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
    config: Config, *, health: Health = fetch_health, timeout: float = DEFAULT_TIMEOUT
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
        title = f"{key} {host}:{port}" if ":" not in host else f"{key} [{host}]:{port}"
        error = _bind_error(host, port)
        if error is None:
            found.append(Finding(OK, title, "free"))
        elif error.errno == errno.EADDRINUSE:
            doc = health(_reach(host), port, config.tls_enabled, timeout) if (
                key == "listen.port") else None
            if doc is not None and _is_broker(doc):
                broker_here = True
                found.append(Finding(
                    OK, title, f"held by the console-broker running here (version "
                    f"{doc.get('version')}, node {doc.get('node')}, status {doc.get('status')})"))
            elif key == "listen.connect_port" and broker_here:
                found.append(Finding(OK, title, "in use, taken to be the CONNECT listener of "
                                                "the console-broker on listen.port"))
            else:
                found.append(Finding(
                    FAIL, title, "in use by another program",
                    f"stop it (ss -ltnp 'sport = :{port}' names it) or set {key} to a free "
                    "port"))
        elif error.errno == errno.EACCES:
            found.append(Finding(
                FAIL, title, "permission denied",
                "use a port above 1023, or give the broker CAP_NET_BIND_SERVICE "
                "(AmbientCapabilities= in its systemd unit)"))
        elif error.errno == errno.EADDRNOTAVAIL:
            host_key = "listen.host" if key == "listen.port" else "listen.connect_host"
            found.append(Finding(
                FAIL, title, f"{host} is not an address of this host",
                f"set {host_key} to an address of this host (ip -br address lists them)"))
        else:
            found.append(Finding(FAIL, title, f"cannot listen: {error.strerror or error}",
                                 f"check {key} and the host's network configuration"))
    return found


# --- the clock --------------------------------------------------------------------------


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


def _synchronised(run: Tool, timeout: float) -> tuple[bool | None, str]:
    """(whether the clock is synchronised, by which tool); (None, "") when neither
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
    run: Tool = run_tool,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Finding]:
    """The clock is not before the signing key was made nor before this package's files
    were written, and timedatectl or chronyc (when there) say it is synchronised."""
    now = time.time() if now is None else now
    package = package_time() if package is None else package
    fix = "set the clock and keep it synchronised (timedatectl set-ntp true, or chrony)"
    found: list[Finding] = []
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
    says = f"the clock says {stamp:%Y-%m-%d %H:%M} UTC"
    try:
        key_made: float | None = config.private_key_path.stat().st_mtime
    except OSError:
        key_made = None
    if key_made is not None and now < key_made - 60:
        made = datetime.datetime.fromtimestamp(key_made, datetime.UTC)
        found.append(Finding(FAIL, "clock", f"{says}, before the signing key was made "
                             f"({made:%Y-%m-%d %H:%M} UTC): tokens would be refused", fix))
    if now < package - 60:
        written = datetime.datetime.fromtimestamp(package, datetime.UTC)
        found.append(Finding(FAIL, "clock", f"{says}, before console-broker was built or "
                             f"installed ({written:%Y-%m-%d %H:%M} UTC)", fix))
    synced, tool = _synchronised(run, timeout)
    if synced is False:
        found.append(Finding(WARN, "clock", f"{tool}: not synchronised; tokens' lifetimes "
                             "rely on it", fix))
    how = f", synchronised ({tool})" if synced else ""
    return _one(found, Finding(OK, "clock", f"{stamp:%Y-%m-%d %H:%M:%S} UTC{how}"))
