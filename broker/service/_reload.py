"""Reloading on SIGHUP: the trusted token keys and the listeners' TLS files, while every
session goes on.

Theory of operation. ``serve`` reads its configuration file again on SIGHUP and loads,
from the files it names, the trusted public keys (``tokens.trust_local_key``: the state
directory's ``signing-key.pub.pem``; ``tokens.public_keys``) and the listeners' TLS
material (``tls.cert`` with ``tls.key``, ``tls.client_ca``). Everything is loaded and
checked first, off the event loop: a file missing or unreadable, a key or certificate
that does not parse, a certificate not matching its key, a configuration that does
not load. Then, only when all of it loaded, it is put in place at once; otherwise
nothing changes, ``broker.reload_failed`` names the file and the problem, and
``console_broker_reloads_total{result="failed"}`` counts it.

Sessions are not touched: a live TLS connection keeps the keys it was made with, a
session keeps the token it was admitted with. New connections use the new material:

* **Token keys**: :meth:`TokenVerifier.replace_keys`, for every token checked from then
  on (a SPICE session's further channels too: they present its token again).
* **TLS**: the listeners hold the contexts they were built with (:class:`ListenerTLS`'s
  *entry* contexts, one without and one with client certificates). Each has an SNI
  callback, which OpenSSL runs on every ClientHello, with or without a server name,
  before it chooses the certificate and before it verifies the client's: it moves the
  handshake to the current context (``SSLObject.context``, OpenSSL's
  ``SSL_set_SSL_CTX``), so the new certificate is shown and the new client CA trusted,
  on both listeners, a CONNECT tunnel's own TLS, asyncio and uvloop alike.

What a reload does not change (a restart does): everything else in the file, such as
the listeners' addresses, ``service.workers``, the plugins and their tables, limits,
``tls.client_subjects``, logging, and turning TLS or client certificates on or off.
Such changes are listed in the reload's log line (``restart_needed``); the old values
stay in force.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import attrs
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry, Counter

from broker.config import Config, ConfigError, ConfigTable, load_config
from broker.keys import KeyFileError, key_fingerprint, load_public_key
from broker.tokens import TokenVerifier

_log = structlog.get_logger("broker.service")

#: The settings a reload applies; any other change needs a restart.
RELOADABLE = ("tokens.trust_local_key", "tokens.public_keys", "tls.cert", "tls.key",
              "tls.client_ca")


class ReloadError(Exception):
    """A file a reload (or the start) needs cannot be used: *file* and *problem* say which
    and why; *key* is the setting that names it."""

    def __init__(self, key: str, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.key = key
        self.file = file
        self.problem = problem


def _read(key: str, path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ReloadError(key, path, f"no such {what} file") from None
    except IsADirectoryError:
        raise ReloadError(key, path, f"is a directory, not a {what} file") from None
    except PermissionError:
        raise ReloadError(key, path, f"permission denied reading the {what}") from None
    except OSError as exc:
        raise ReloadError(key, path, f"cannot read the {what}: {exc.strerror}") from None


def _certificates(key: str, path: str, what: str) -> list[x509.Certificate]:
    data = _read(key, path, what)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ReloadError(key, path, f"no PEM certificate in the {what} file")
    return found


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The broker's TLS server context for *cert* and *key* (TLS 1.2 or later); ReloadError
    naming the file and its problem when they cannot be used."""
    _certificates("tls.cert", cert, "certificate")
    data = _read("tls.key", key, "private key")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ReloadError("tls.key", key, "the private key is encrypted (the broker cannot "
                          "ask for a password)") from None
    except ValueError:
        raise ReloadError("tls.key", key, "not a PEM private key") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ReloadError("tls.key", key, f"does not match the certificate {cert}") from None
        raise ReloadError("tls.cert", cert, str(exc.reason or exc)) from None
    except OSError as exc:  # the file went away meanwhile
        raise ReloadError("tls.cert", cert, exc.strerror or str(exc)) from None
    return context


def require_client_certificates(context: ssl.SSLContext, ca: str) -> ssl.SSLContext:
    """*context* requiring client certificates signed by the CA in *ca* (``tls.client_ca``)."""
    _certificates("tls.client_ca", ca, "CA")
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ReloadError("tls.client_ca", ca, str(getattr(exc, "reason", None) or exc)) from None
    return context


def trusted_keys(config: Config) -> list[tuple[Path, Ed25519PublicKey]]:
    """The public keys *config* trusts, each with its file; ReloadError when one cannot be
    loaded or none is listed."""
    found = []
    for path in config.public_key_paths:
        try:
            found.append((path, load_public_key(path)))
        except KeyFileError as exc:
            problem = str(exc).removeprefix(f"{path}: ")
            raise ReloadError("tokens.public_keys", str(path), problem) from None
    if not found:
        raise ReloadError("tokens.public_keys", str(config.source or "the configuration"),
                          "no trusted public key (tokens.trust_local_key is false and "
                          "tokens.public_keys is empty)")
    return found


@attrs.frozen
class Material:
    """What a reload puts in place, loaded and checked."""

    keys: list[tuple[Path, Ed25519PublicKey]]
    server: ssl.SSLContext | None = attrs.field(eq=False, repr=False)
    client: ssl.SSLContext | None = attrs.field(eq=False, repr=False)
    #: A digest of each TLS file's contents, by its setting (what changed is logged).
    digests: dict[str, str]
    #: The certificate shown, for the log: subject, serial, expiry.
    certificate: dict[str, str] | None


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def load_material(config: Config) -> Material:
    """Load and check everything :data:`RELOADABLE` names in *config* (ReloadError)."""
    keys = trusted_keys(config)
    tls = config.tls
    server = client = None
    digests: dict[str, str] = {}
    certificate = None
    if config.tls_enabled:
        server = server_context(tls.cert, tls.key)
        if tls.client_ca:
            client = require_client_certificates(server_context(tls.cert, tls.key),
                                                 tls.client_ca)
        leaf = _certificates("tls.cert", tls.cert, "certificate")[0]
        certificate = {
            "subject": leaf.subject.rfc4514_string(),
            "serial": format(leaf.serial_number, "x"),
            "not_after": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for name, path in (("tls.cert", tls.cert), ("tls.key", tls.key),
                           ("tls.client_ca", tls.client_ca)):
            if path:
                digests[name] = f"{path}:{_digest(path)}"
    return Material(keys, server, client, digests, certificate)


class ListenerTLS:
    """The listeners' TLS contexts, replaceable while they listen (see the module's notes).

    :attr:`server` (no client certificates: the WebSocket listener without them, every
    CONNECT tunnel's own TLS) and :attr:`client` (``tls.client_ca``) are the contexts to
    build the listeners with; :meth:`replace` sets what their new handshakes use.
    """

    def __init__(self, server: ssl.SSLContext | None, client: ssl.SSLContext | None) -> None:
        self.server = server
        self.client = client
        self._current: dict[int, ssl.SSLContext] = {}
        for entry in (server, client):
            if entry is not None:
                entry.sni_callback = self._switch
                self._current[id(entry)] = entry

    def replace(self, server: ssl.SSLContext | None, client: ssl.SSLContext | None) -> None:
        """New handshakes use *server* and *client* from now on (each None: unchanged)."""
        for entry, new in ((self.server, server), (self.client, client)):
            if entry is not None and new is not None:
                self._current[id(entry)] = new

    def current(self, entry: ssl.SSLContext) -> ssl.SSLContext:
        return self._current.get(id(entry), entry)

    def _switch(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
        entry: ssl.SSLContext,
    ) -> None:
        current = self._current.get(id(entry))
        if current is not None and current is not entry:
            ssl_object.context = current


def _changed_settings(old: Config, new: Config) -> list[str]:
    """The settings (``table.key``) whose values differ between *old* and *new*."""
    changed: list[str] = []
    for field in attrs.fields(Config):
        if field.name in ("plugin_tables", "source"):
            continue
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        changed.extend(
            f"{field.name}.{key.name}" for key in attrs.fields(type(before))
            if getattr(before, key.name) != getattr(after, key.name)
        )
    for name in sorted({*old.plugin_tables, *new.plugin_tables}):
        table: Any = old.plugin_tables.get(name)
        other: Any = new.plugin_tables.get(name)
        if table == other:
            continue
        if attrs.has(type(table)) and type(table) is type(other):
            changed.extend(
                f"{name}.{key.name}" for key in attrs.fields(type(table))
                if getattr(table, key.name) != getattr(other, key.name)
            )
        else:
            changed.append(name)
    return changed


class Reloader:
    """Reloads one broker process's keys and TLS files from *path* (the configuration file
    it started with; None: the built-in defaults) on :meth:`reload`."""

    def __init__(
        self,
        config: Config,
        path: Path | None,
        tables: Iterable[ConfigTable[Any]],
        verifier: TokenVerifier,
        tls: ListenerTLS,
        registry: CollectorRegistry,
        material: Material,
        load: Callable[[Path | None, Iterable[ConfigTable[Any]]], Config] = load_config,
    ) -> None:
        self.config = config
        self._path = path
        self._tables = list(tables)
        self._verifier = verifier
        self._tls = tls
        self._material = material
        self._load = load
        self._lock = anyio.Lock()
        self.reloads = Counter(
            "console_broker_reloads", "Reloads of the keys and certificates (SIGHUP), by "
            "result: ok, failed (the old ones kept).", ["result"], registry=registry,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    async def reload(self) -> bool:
        """Reload (one at a time); True when the new material is in place."""
        async with self._lock:
            try:
                config, material, restart = await anyio.to_thread.run_sync(self._prepare)
            except ReloadError as exc:
                self.reloads.labels("failed").inc()
                _log.error("broker.reload_failed", file=exc.file, problem=exc.problem,
                           setting=exc.key, kept="the keys and certificates loaded before")
                return False
            self._apply(config, material, restart)
            return True

    def _prepare(self) -> tuple[Config, Material, list[str]]:
        try:
            new = self._load(self._path, self._tables)
        except ConfigError as exc:
            # Each problem names the file itself (and its key): drop the repeated file.
            where = str(self._path)
            problems = [p.removeprefix(f"{where}: ") for p in exc.problems]
            raise ReloadError("--config", where, "; ".join(problems)) from None
        old = self.config
        restart = [name for name in _changed_settings(old, new) if name not in RELOADABLE]
        # TLS or client certificates switched on or off: not without a restart.
        if new.tls_enabled != old.tls_enabled or bool(new.tls.client_ca) != bool(
            old.tls.client_ca
        ):
            restart.extend(
                name for name in ("tls.cert", "tls.key", "tls.client_ca")
                if getattr(new.tls, name[4:]) != getattr(old.tls, name[4:])
            )
            new = attrs.evolve(new, tls=attrs.evolve(
                new.tls, cert=old.tls.cert, key=old.tls.key, client_ca=old.tls.client_ca,
            ))
        # What runs from now on: the old configuration with the reloadable settings
        # replaced (so a change needing a restart is reported again at the next reload).
        running = attrs.evolve(
            old,
            tls=attrs.evolve(old.tls, cert=new.tls.cert, key=new.tls.key,
                             client_ca=new.tls.client_ca),
            tokens=attrs.evolve(old.tokens, trust_local_key=new.tokens.trust_local_key,
                                public_keys=new.tokens.public_keys),
        )
        return running, load_material(running), restart

    def _apply(self, config: Config, material: Material, restart: list[str]) -> None:
        old = self._material
        self._verifier.replace_keys([key for _, key in material.keys])
        self._tls.replace(material.server, material.client)
        before = {key_fingerprint(key) for _, key in old.keys}
        after = {key_fingerprint(key) for _, key in material.keys}
        changed = [name for name in ("tls.cert", "tls.key", "tls.client_ca")
                   if old.digests.get(name) != material.digests.get(name)]
        if before != after:
            changed.insert(0, "trusted_keys")
        self.config = config
        self._material = material
        self.reloads.labels("ok").inc()
        _log.info(
            "broker.reloaded",
            changed=changed,
            keys=sorted(after),
            keys_added=sorted(after - before),
            keys_removed=sorted(before - after),
            certificate=material.certificate,
            restart_needed=sorted(restart),
        )
