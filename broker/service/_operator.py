"""The operator page: the node's domains, their consoles and live sessions, in one place.

``GET /operator/?token=T`` serves the page (``broker/web/operator.*``); ``T`` is an
operator token (``console-broker token --operator``: ``proto`` ``operator``, short-lived
and single use like every token). The page presents it once, to open the WebSocket
``/operator/ws?token=T`` (Origin-checked like a console's), which uses it up and stays
open as the page's operator session. Over it, in JSON text frames (docs/operations.md,
"The operator page"):

* from the page: ``domains`` (the list), ``open`` (``domain``: a UUID, ``protocol``,
  optional ``view_only``: have the broker mint a console token), ``ping``; each may carry
  an ``id`` (a short string or a number), echoed in its answer;
* from the broker: ``hello`` first (the node, the operator's name, the loaded protocols
  with their page paths, whether this broker mints), then one answer per request:
  ``domains`` (name, UUID, state, enabled consoles, live sessions of each), ``opened``
  (the console page's URL with a fresh token), ``pong``, or ``error`` (``error``: a code,
  ``message``: what to do; the session goes on).

The core names no protocol here: the protocols and their pages come from the loaded
plugins (``/console/{protocol}/``), and a domain's console is enabled when its
console-broker metadata records the protocol's :attr:`~broker.hookspecs.Protocol.console`
(for a protocol that opens no console of the domain's, when the domain runs).

The broker mints with its own signing key (the state directory's, which it must trust:
``tokens.trust_local_key``) exactly as ``console-broker token`` does: the same claims,
``tokens.default_ttl``, the operator's ``name`` (else ``operator``). Minting and listing
are rate-limited per session; messages are bounded; a garbled one is answered with an
``error`` and the session goes on.

:func:`parse`, the answers and :class:`Bucket` are sans-I/O; :class:`Operators` admits
and serves the sessions for the broker's listener.
"""

from __future__ import annotations

import importlib.resources
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import attrs
import structlog

from broker.hookspecs import OPERATOR, Page
from broker.service._pump import ClientClosed
from broker.service._refusals import (
    CLIENT_CLOSED,
    INTERNAL_ERROR,
    INVALID_TOKEN,
    LIMIT_REACHED,
    REPLAYED_TOKEN,
    SHUTDOWN,
    TOKEN_REFUSALS,
    Refusal,
    Refused,
)
from broker.service._session import ClientChannel, WebSocketChannel
from broker.tokens import Claims, TokenIssuer, TokenRefused

if TYPE_CHECKING:
    from broker.config import Config
    from broker.hookspecs import Protocol as ConsoleProtocol
    from broker.service._connection import BrokerConnection
    from broker.service._libvirt import DomainInfo
    from broker.service._sessions import SessionRunner
    from broker.tokens import TokenVerifier

_log = structlog.get_logger("broker.service")

#: The WebSocket subprotocol of the operator session (a client offering none is welcome).
SUBPROTOCOL = "console-broker.operator.v1"
#: Largest message accepted from the page, in characters.
MAX_MESSAGE = 4096
#: Longest request ``id`` echoed, in characters.
MAX_ID = 64
#: Operator sessions open at once on one broker process.
MAX_SESSIONS = 16
#: The longest an operator session lasts, in seconds: then the page asks for a new
#: operator token.
MAX_LIFETIME = 8 * 3600
#: Console tokens minted per session: a burst, then one every so many seconds.
MINT_BURST, MINT_EVERY = 10, 2.0
#: Domain lists per session: a burst, then one every so many seconds.
LIST_BURST, LIST_EVERY = 5, 1.0
#: Who a minted token names when the operator token names nobody.
ANONYMOUS = "operator"

#: How an operator session ends when it has lasted :data:`MAX_LIFETIME`.
EXPIRED = Refusal(
    "operator_expired", 0, 1000, "the operator session has expired: get a new operator token"
)

#: Served from ``broker/web``: path below ``/operator/`` -> file.
FILES = {"": "operator.html", "operator.js": "operator.js", "operator.css": "operator.css"}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page(path: str) -> Page | None:
    """The operator page or one of its files at *path* (below ``/operator/``), or None
    (a 404) for anything else."""
    name = FILES.get(path)
    if name is None:
        return None
    body = importlib.resources.files("broker").joinpath("web", name).read_bytes()
    kind = CONTENT_TYPES[name[name.rindex("."):]]
    headers = [("Content-Security-Policy", CSP)] if name.endswith(".html") else []
    return Page(body, kind, headers)


# --- the messages (sans-I/O) --------------------------------------------------------------


class OperatorError(Exception):
    """A request the broker cannot answer as asked; ``code`` goes into the ``error``."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@attrs.frozen
class ListDomains:
    """The node's domains, their consoles and sessions."""

    id: str | int | None = None


@attrs.frozen
class OpenConsole:
    """Mint a console token for *protocol* of the domain *domain* (a UUID)."""

    domain: str
    protocol: str
    view_only: bool = False
    id: str | int | None = None


@attrs.frozen
class Ping:
    data: str | None = None
    id: str | int | None = None


Request = ListDomains | OpenConsole | Ping


def _request_id(doc: dict[str, Any]) -> str | int | None:
    value = doc.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise OperatorError("bad_message", "'id' must be a string or a number")
    if isinstance(value, str) and len(value) > MAX_ID:
        raise OperatorError("bad_message", f"'id' is at most {MAX_ID} characters")
    return value


def parse(message: str | bytes) -> Request:
    """The request a frame holds; :class:`OperatorError` if it holds none."""
    if isinstance(message, bytes):
        raise OperatorError("bad_message", "operator messages are JSON text frames")
    if len(message) > MAX_MESSAGE:
        raise OperatorError("bad_message", f"operator messages are at most {MAX_MESSAGE} "
                            "characters")
    try:
        doc = json.loads(message)
    except (ValueError, RecursionError):
        raise OperatorError("bad_message", "a text frame must hold a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise OperatorError("bad_message", "an operator message is a JSON object with a 'type'")
    request_id = _request_id(doc)
    kind = doc["type"]
    try:
        if kind == "domains":
            return ListDomains(request_id)
        if kind == "ping":
            data = doc.get("data")
            if data is not None and not isinstance(data, str):
                raise OperatorError("bad_message", "ping: 'data' must be a string")
            return Ping(data, request_id)
        if kind == "open":
            domain, protocol = doc.get("domain"), doc.get("protocol")
            view_only = doc.get("view_only", False)
            if not isinstance(domain, str) or not isinstance(protocol, str):
                raise OperatorError("bad_message", "open: 'domain' (a UUID) and 'protocol' "
                                    "are strings")
            if not isinstance(view_only, bool):
                raise OperatorError("bad_message", "open: 'view_only' is true or false")
            try:
                canonical = str(uuid.UUID(domain))
            except ValueError:
                raise OperatorError("bad_message", "open: 'domain' is not a UUID") from None
            return OpenConsole(canonical, protocol[:64], view_only, request_id)
    except OperatorError as exc:
        exc.request_id = request_id
        raise
    raise OperatorError("unknown_type", f"unknown operator message type {kind[:40]!r}",
                        request_id)


def _message(kind: str, request_id: str | int | None = None, **fields: Any) -> str:
    doc: dict[str, Any] = {"type": kind}
    if request_id is not None:
        doc["id"] = request_id
    doc.update(fields)
    return json.dumps(doc, separators=(",", ":"))


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).isoformat().replace("+00:00", "Z")


def error(code: str, message: str, request_id: str | int | None = None) -> str:
    """A request was refused; the session goes on."""
    return _message("error", request_id, error=code, message=message)


class Bucket:
    """A token bucket: *burst* at once, then one more every *every* seconds."""

    def __init__(self, burst: int, every: float, clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.every = every
        self._clock = clock
        self._level = float(burst)
        self._at = clock()

    def take(self) -> float:
        """0 when one was taken, else the seconds until one is there (nothing taken)."""
        now = self._clock()
        self._level = min(float(self.burst), self._level + (now - self._at) / self.every)
        self._at = now
        if self._level >= 1:
            self._level -= 1
            return 0.0
        return (1 - self._level) * self.every


def enabled(protocol: ConsoleProtocol, info: DomainInfo) -> bool:
    """Whether *protocol*'s console of the domain *info* can be opened, as the broker's
    admission sees it: its console recorded by ``xml enable`` (the domain has its
    device); for a protocol that opens no console of the domain's, the domain running."""
    if protocol.endpoint != "console":
        return info.active
    return protocol.console in info.consoles


def domain_doc(
    info: DomainInfo, protocols: Mapping[str, ConsoleProtocol], sessions: list[dict[str, Any]]
) -> dict[str, Any]:
    """One domain of the ``domains`` answer."""
    return {
        "uuid": info.uuid,
        "name": info.name,
        "state": info.state,
        "running": info.active,
        "consoles": [name for name, protocol in sorted(protocols.items())
                     if enabled(protocol, info)],
        "sessions": sessions,
    }


# --- live sessions --------------------------------------------------------------------------

#: The live sessions of the node (each a mapping with at least ``id``, ``domain`` (its
#: UUID), ``protocol``, ``rights``, ``client``, ``name`` and ``started``): what the
#: ``domains`` answer lists under each domain.
LiveSessions = Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]
#: The fields of a session the ``domains`` answer carries.
SESSION_FIELDS = ("id", "protocol", "rights", "client", "name", "started")


def by_domain(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """*records* (live sessions) by domain UUID, each with :data:`SESSION_FIELDS`."""
    found: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        found.setdefault(str(record.get("domain")), []).append(
            {name: record.get(name) for name in SESSION_FIELDS}
        )
    return found


# --- the I/O: admitting and serving operator sessions ---------------------------------------


@runtime_checkable
class DomainDirectory(Protocol):
    """A resolver that can list the hypervisor's domains (the libvirt one)."""

    async def domains(self) -> list[DomainInfo]: ...


@attrs.frozen
class PendingOperator:
    """A checked operator request waiting for its upgrade; its token is not used yet."""

    claims: Claims
    client: str


class Operators:
    """The operator sessions of one broker process (see the module's notes)."""

    def __init__(
        self,
        config: Config,
        verifier: TokenVerifier,
        protocols: Mapping[str, ConsoleProtocol],
        resolver: object,
        runner: SessionRunner,
        sessions: LiveSessions,
    ) -> None:
        self.config = config
        self._verifier = verifier
        self._protocols = dict(protocols)
        self._resolver = resolver
        self._runner = runner
        self._node = config.node_name
        #: Every live session of the broker, its worker processes' included
        #: (:meth:`broker.service._admin.Admin.live_sessions`).
        self._sessions = sessions
        self._issuer: TokenIssuer | None = None
        #: The open sessions' cancel scopes (ended when the broker shuts down).
        self._open: set[anyio.CancelScope] = set()

    @property
    def count(self) -> int:
        return len(self._open)

    def admit(self, token: str, client: str) -> PendingOperator:
        """Check an operator token (not used up: :meth:`take` does, once upgraded)."""
        try:
            claims = self._verifier.verify(token, protocol=OPERATOR, node=self._node,
                                           consume=False)
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None
        except ValueError:
            raise Refused(INVALID_TOKEN, "malformed token") from None
        if self._verifier.used(claims):
            raise Refused(REPLAYED_TOKEN, "the operator token was already used")
        if len(self._open) >= MAX_SESSIONS:
            raise Refused(LIMIT_REACHED, f"{MAX_SESSIONS} operator sessions are open already")
        return PendingOperator(claims, client)

    def take(self, pending: PendingOperator) -> None:
        """Use the operator token up (Refused when another request did first)."""
        try:
            self._verifier.consume(pending.claims)
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None

    def end_all(self) -> None:
        """End every operator session (the broker is shutting down)."""
        for scope in list(self._open):
            scope.cancel()

    def hello(self, claims: Claims) -> str:
        protocols = [
            {"name": name, "title": protocol.title, "description": protocol.description,
             "page": f"/console/{name}/", "view_only": protocol.view_only}
            for name, protocol in sorted(self._protocols.items())
        ]
        return _message(
            "hello", node=self._node, name=claims.name, protocols=protocols,
            minting=self._minting_problem() is None,
            expires_at=_time(time.time() + MAX_LIFETIME),
        )

    def _minting_problem(self) -> str | None:
        if not self.config.tokens.trust_local_key:
            return ("this broker does not trust its own signing key (tokens.trust_local_key "
                    "is false): console tokens come from the control plane")
        return None

    def _signer(self) -> TokenIssuer:
        """The broker's own issuer: the state directory's key, which it must trust."""
        problem = self._minting_problem()
        if problem is not None:
            raise OperatorError("no_signing_key", problem)
        if self._issuer is None or self._issuer.kid not in self._verifier.key_ids:
            from broker.keys import KeyFileError, key_fingerprint, load_private_key

            try:
                key = load_private_key(self.config.private_key_path)
            except KeyFileError as exc:
                raise OperatorError("no_signing_key", f"cannot read the signing key: {exc}") \
                    from None
            if key_fingerprint(key.public_key()) not in self._verifier.key_ids:
                raise OperatorError(
                    "no_signing_key", "the state directory's signing key is not one the "
                    "broker trusts now (it changed since the broker started: reload or restart "
                    "the broker)")
            self._issuer = TokenIssuer(key, self._node)
        return self._issuer

    async def _domains(self) -> list[DomainInfo]:
        if not isinstance(self._resolver, DomainDirectory):
            raise OperatorError("unavailable", "this broker's hypervisor lists no domains")
        try:
            return await self._resolver.domains()
        except Refused as exc:
            raise OperatorError(exc.refusal.reason, exc.refusal.text) from None

    async def list_domains(self) -> list[dict[str, Any]]:
        infos = await self._domains()
        sessions = by_domain(await self._sessions())
        return [domain_doc(info, self._protocols, sessions.get(info.uuid, [])) for info in infos]

    async def mint(self, operator: Claims, request: OpenConsole) -> dict[str, Any]:
        """A console token for *request*, as ``console-broker token`` would issue it; the
        ``opened`` answer's fields. :class:`OperatorError` when it cannot be."""
        from broker.token_cli import console_links

        protocol = self._protocols.get(request.protocol)
        if protocol is None:
            loaded = ", ".join(sorted(self._protocols)) or "none"
            raise OperatorError("unknown_protocol", f"no loaded plugin serves "
                                f"{request.protocol!r} (loaded: {loaded})")
        if request.view_only and not protocol.view_only:
            raise OperatorError("view_only_unsupported",
                                f"{protocol.name} consoles cannot be view-only")
        signer = self._signer()
        info = next((d for d in await self._domains() if d.uuid == request.domain), None)
        if info is None:
            raise OperatorError("unknown_domain", f"no domain {request.domain} on this node")
        if not info.active:
            raise OperatorError("vm_not_running", f"{info.name} is {info.state}: start it first")
        if not enabled(protocol, info):
            raise OperatorError(
                "console_not_enabled", f"{info.name} has no {protocol.name} console enabled "
                f"(console-broker enable {info.name} --consoles {protocol.name})")
        issued = signer.issue(info.uuid, protocol.name, ttl=self.config.tokens.default_ttl,
                              view_only=request.view_only, name=operator.name or ANONYMOUS)
        return {
            "domain": {"uuid": info.uuid, "name": info.name},
            "protocol": protocol.name,
            "view_only": request.view_only,
            "page": console_links(self.config, issued).page,
            "expires_at": _time(issued.claims.expires_at),
            "jti": issued.claims.jti,
        }

    async def answer(
        self, request: Request, operator: Claims, mints: Bucket, lists: Bucket, log: Any
    ) -> str:
        """The answer to one request."""
        if isinstance(request, Ping):
            return _message("pong", request.id, data=request.data)
        bucket = lists if isinstance(request, ListDomains) else mints
        wait = bucket.take()
        if wait:
            raise OperatorError("rate_limited", f"too many requests: try again in "
                                f"{max(1, round(wait))} s", request.id)
        try:
            if isinstance(request, ListDomains):
                return _message("domains", request.id, domains=await self.list_domains())
            opened = await self.mint(operator, request)
        except OperatorError as exc:
            exc.request_id = request.id
            if isinstance(request, OpenConsole):
                log.info("operator.refused", domain=request.domain, protocol=request.protocol,
                         error=exc.code)
            raise
        log.info("operator.minted", domain=opened["domain"]["uuid"],
                 domain_name=opened["domain"]["name"], protocol=opened["protocol"],
                 view_only=opened["view_only"], minted=opened["jti"], name=operator.name)
        return _message("opened", request.id, **opened)

    async def run(self, client: ClientChannel, operator: Claims, log: Any) -> None:
        """One operator session: ``hello``, then an answer per request, until the client
        leaves."""
        mints, lists = Bucket(MINT_BURST, MINT_EVERY), Bucket(LIST_BURST, LIST_EVERY)
        await client.send_text(self.hello(operator))
        while True:
            message = await client.receive_message()
            try:
                reply = await self.answer(parse(message), operator, mints, lists, log)
            except OperatorError as exc:
                reply = error(exc.code, exc.message, exc.request_id)
            await client.send_text(reply)

    async def serve(self, connection: BrokerConnection, pending: PendingOperator) -> None:
        """Run one upgraded operator session, then close it with why it ended."""
        claims = pending.claims
        log = _log.bind(operator=claims.jti, name=claims.name, client=pending.client)
        ending: Refusal = CLIENT_CLOSED
        with anyio.CancelScope() as scope:
            self._open.add(scope)
            log.info("operator.opened")
            try:
                with anyio.move_on_after(MAX_LIFETIME) as lifetime:
                    await self.run(WebSocketChannel(connection), claims, log)
                if lifetime.cancelled_caught:
                    ending = EXPIRED
            except ClientClosed:
                pass
            except Exception:
                log.exception("operator.failed")
                ending = INTERNAL_ERROR
            finally:
                self._open.discard(scope)
        if scope.cancelled_caught:
            ending = SHUTDOWN
        with anyio.CancelScope(shield=True):
            await self._runner.close(connection, ending)
        log.info("operator.closed", reason=ending.reason, code=ending.close_code)
