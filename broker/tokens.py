"""Console tokens: compact JWTs signed with Ed25519, verified without shared state.

Theory of operation. An issuer holding the private key signs a token that
names one domain, one protocol, one node and the rights granted, valid for a
short time. A broker holds only public keys (a list, so keys can rotate) and
checks, in this order:

1. the token's shape and header: ``alg`` must be ``EdDSA`` (``none``, HMAC and
   everything else are refused before any key is touched);
2. the signature, with the key the ``kid`` header names (see below);
3. the claims: all present, well typed, ``aud`` is ``console-broker``;
4. time: not before ``nbf`` and not after ``exp``, each with ``leeway`` seconds
   of clock skew, and a lifetime no longer than ``max_ttl``;
5. what the caller expects: protocol, node, domain;
6. single use: the ``jti`` is consumed in a :class:`ReplayStore`: a
   :class:`ReplayCache` in memory, or the broker's file shared by its worker
   processes (:class:`broker.service._sharedstate.SharedReplayCache`).

A handoff handle (``h.`` and 32 random characters, :mod:`broker.handoff`) is accepted
wherever a token is: steps 1-3 become a look-up in the verifier's
:class:`~broker.handoff.HandoffTable` (an unknown handle is invalid), steps 4-6 are
the same. :meth:`TokenVerifier.hand_off` issues one for a live session's claims.

Each refusal is a :class:`TokenRefused` subclass with a ``reason`` (the value
logged as ``token.rejected``). No message, log line or ``repr`` holds a token.

``kid`` handling: tokens are issued with ``kid`` = the signing key's
fingerprint. When a token has a ``kid``, only that key is tried, and a ``kid``
no trusted key has is refused at once ("unknown key"): a key we do not list
is a key we do not trust, and guessing would hide an issuer misconfiguration.
When a token has no ``kid`` (an issuer that does not set one), every trusted
key is tried; the list is short (the current key and, during a rotation, the
previous one), so this costs a few signature checks at most.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from heapq import heappop, heappush
from typing import Any, ClassVar, Protocol

import attrs
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.handoff import Handoff, HandoffTable, handle_id, is_handle
from broker.hookspecs import OPERATOR
from broker.keys import (
    KeyFileError,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_keys,
)
from broker.recordings import RECORDING, RECORDING_ID

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "NO_DOMAIN",
    "Claims",
    "ExpiredToken",
    "InvalidToken",
    "IssuedToken",
    "KeyFileError",
    "NotYetValidToken",
    "ReplayCache",
    "ReplayCacheFull",
    "ReplayStore",
    "ReplayStoreUnavailable",
    "ReplayedToken",
    "Rights",
    "TokenIssuer",
    "TokenRefused",
    "TokenVerifier",
    "WrongDomain",
    "WrongNode",
    "WrongProtocol",
    "generate_keypair",
    "key_fingerprint",
    "load_private_key",
    "load_public_keys",
]

#: The only JWS algorithm issued and accepted (Ed25519).
ALGORITHM = "EdDSA"
#: The ``aud`` claim of every console token: it keeps a JWT that the same key
#: signed for another purpose from being taken as a console token.
AUDIENCE = "console-broker"
#: Longest token accepted at all, before any parsing (ours are ~400 characters).
MAX_TOKEN_LENGTH = 4096
#: Longest ``jti`` accepted (ours are 22 characters); bounds the replay cache's memory.
MAX_JTI_LENGTH = 128
#: A ``dev`` claim: a libvirt device alias (``serial1``, ``console1``, ``ua-log``) or an index.
DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Longest ``name`` claim accepted, in characters.
MAX_NAME_LENGTH = 64
#: The ``sub`` of an operator token (``proto`` :data:`~broker.hookspecs.OPERATOR`): the
#: nil UUID (RFC 9562, section 5.9), no domain: the token is for the node's operator
#: page, and names no domain of it.
NO_DOMAIN = "00000000-0000-0000-0000-000000000000"


def valid_name(value: object) -> bool:
    """Whether *value* may be a ``name`` claim: a string of 1 to :data:`MAX_NAME_LENGTH`
    printable characters (no control characters, no line breaks), not only spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_LENGTH
        and value.isprintable()
        and not value.isspace()
    )

Clock = Callable[[], float]

_log = structlog.get_logger("broker.tokens")
_JWS = jwt.PyJWS(algorithms=[ALGORITHM])


class Rights(enum.StrEnum):
    """What the token lets the client do with the console."""

    FULL = "full"
    VIEW = "view"


# --- refusals ---------------------------------------------------------------------------


class TokenRefused(Exception):
    """A token was refused. ``reason`` names the case; the message never holds the token."""

    reason: ClassVar[str] = "refused"

    def __init__(self, detail: str, claims: Claims | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        #: The verified claims, when the refusal came after the signature check.
        self.claims = claims


class InvalidToken(TokenRefused):
    """Malformed, bad signature, unknown key, algorithm not EdDSA, or bad claims."""

    reason = "invalid"


class ExpiredToken(TokenRefused):
    """``exp`` (plus leeway) has passed."""

    reason = "expired"


class NotYetValidToken(TokenRefused):
    """``nbf`` (less leeway) is still in the future."""

    reason = "not_yet_valid"


class ReplayedToken(TokenRefused):
    """The token's ``jti`` was already used."""

    reason = "replayed"


class ReplayCacheFull(TokenRefused):
    """The replay cache is full of live entries: refused rather than forget one."""

    reason = "limit_reached"


class ReplayStoreUnavailable(TokenRefused):
    """The replay store could not record the token (its file busy beyond its timeout, the
    disk full, an I/O error): refused rather than admitted without being recorded."""

    reason = "limit_reached"


class WrongProtocol(TokenRefused):
    """The token is for another protocol than the endpoint it was presented to."""

    reason = "wrong_protocol"


class WrongNode(TokenRefused):
    """The token names another node than this broker."""

    reason = "wrong_node"


class WrongDomain(TokenRefused):
    """The token names another domain than the caller expected."""

    reason = "wrong_domain"


# --- claims -----------------------------------------------------------------------------


def _canonical_uuid(value: str) -> str:
    """The lower-case, hyphenated form of a UUID, or ValueError."""
    parsed = uuid.UUID(value)
    return str(parsed)


@attrs.frozen
class Claims:
    """The verified content of a token.

    JWT claim names: ``sub`` = :attr:`domain_uuid`, ``proto`` = :attr:`protocol`,
    ``node``, ``rights``, ``iat`` / ``nbf`` / ``exp`` (seconds since the epoch),
    ``jti``, and ``aud`` = :data:`AUDIENCE`.
    """

    #: The domain's UUID, lower-case hyphenated (``sub``).
    domain_uuid: str
    #: The protocol name, as a plugin declares it (``proto``).
    protocol: str
    #: The node (hypervisor) name the token is for (``node``).
    node: str
    rights: Rights
    issued_at: int
    not_before: int
    expires_at: int
    #: The token's unique id (``jti``), the single-use key.
    jti: str
    #: The console device the token is for (``dev``, optional): an alias such as
    #: ``serial1`` or an index such as ``1``; None: the device the domain's console
    #: record names. Only console streams (serial) can be chosen this way.
    device: str | None = None
    #: Who the token is for, as the issuer names them (``name``, optional): shown to the
    #: other viewers of the console (docs/vnc.md, "Presence and control"), never checked.
    #: None: the token names nobody.
    name: str | None = None
    #: The recording a recording token plays back (``rec``): its ``proto`` is
    #: ``recording`` (:data:`broker.recordings.RECORDING`), its rights ``view``; such a
    #: token opens no console, it fetches that recording of its domain
    #: (``GET /recording``). None for every other token.
    recording: str | None = None

    @property
    def view_only(self) -> bool:
        return self.rights is Rights.VIEW

    @property
    def operator(self) -> bool:
        """An operator token (``proto`` ``operator``, ``sub`` :data:`NO_DOMAIN`): it opens
        the node's operator page, and no console."""
        return self.protocol == OPERATOR

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "aud": AUDIENCE,
            "sub": self.domain_uuid,
            "proto": self.protocol,
            "node": self.node,
            "rights": self.rights.value,
            "iat": self.issued_at,
            "nbf": self.not_before,
            "exp": self.expires_at,
            "jti": self.jti,
        }
        if self.device is not None:
            payload["dev"] = self.device
        if self.name is not None:
            payload["name"] = self.name
        if self.recording is not None:
            payload["rec"] = self.recording
        return payload

    @classmethod
    def from_payload(cls, payload: object) -> Claims:
        """Check and convert a decoded payload; :class:`InvalidToken` if it does not fit.

        Claims this version does not know are ignored (an issuer may add its own,
        e.g. for audit).
        """
        if not isinstance(payload, dict):
            raise InvalidToken("claims: the payload is not a JSON object")
        strings = ("sub", "proto", "node", "rights", "jti", "aud")
        integers = ("iat", "nbf", "exp")
        for name in (*strings, *integers):
            if name not in payload:
                raise InvalidToken(f"claims: {name!r} is missing")
        for name in strings:
            if not isinstance(payload[name], str) or not payload[name]:
                raise InvalidToken(f"claims: {name!r} must be a non-empty string")
        for name in integers:
            value = payload[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidToken(f"claims: {name!r} must be an integer (seconds since the epoch)")
        if payload["aud"] != AUDIENCE:
            raise InvalidToken(f"claims: 'aud' is not {AUDIENCE!r}")
        try:
            domain_uuid = _canonical_uuid(payload["sub"])
        except ValueError:
            raise InvalidToken("claims: 'sub' is not a domain UUID") from None
        try:
            rights = Rights(payload["rights"])
        except ValueError:
            raise InvalidToken("claims: 'rights' must be 'full' or 'view'") from None
        if len(payload["jti"]) > MAX_JTI_LENGTH:
            raise InvalidToken(f"claims: 'jti' is longer than {MAX_JTI_LENGTH} characters")
        if not payload["iat"] <= payload["exp"] or not payload["nbf"] <= payload["exp"]:
            raise InvalidToken("claims: 'exp' is before 'iat' or 'nbf'")
        device = payload.get("dev")
        if device is not None and (not isinstance(device, str) or not DEVICE.fullmatch(device)):
            raise InvalidToken("claims: 'dev' must be a device alias or index")
        who = payload.get("name")
        if who is not None and not valid_name(who):
            raise InvalidToken(
                f"claims: 'name' must be a string of 1 to {MAX_NAME_LENGTH} printable characters"
            )
        recording = payload.get("rec")
        if recording is not None and (
            not isinstance(recording, str) or not RECORDING_ID.fullmatch(recording)
        ):
            raise InvalidToken("claims: 'rec' must be a recording id (hex)")
        if (recording is not None) != (payload["proto"] == RECORDING):
            raise InvalidToken(
                f"claims: 'rec' goes with the protocol {RECORDING!r}, and only with it"
            )
        if recording is not None and rights is not Rights.VIEW:
            raise InvalidToken("claims: a recording token has view rights only")
        if (domain_uuid == NO_DOMAIN) != (payload["proto"] == OPERATOR):
            raise InvalidToken(
                f"claims: the nil UUID in 'sub' goes with the protocol {OPERATOR!r}, and only "
                "with it"
            )
        if payload["proto"] == OPERATOR and (rights is not Rights.FULL or device is not None):
            raise InvalidToken("claims: an operator token has full rights and no 'dev'")
        return cls(
            domain_uuid=domain_uuid,
            protocol=payload["proto"],
            node=payload["node"],
            rights=rights,
            issued_at=payload["iat"],
            not_before=payload["nbf"],
            expires_at=payload["exp"],
            jti=payload["jti"],
            device=device,
            name=who,
            recording=recording,
        )


def _utc(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@attrs.frozen
class IssuedToken:
    """A freshly signed token with what it says. ``repr`` leaves the token out."""

    token: str = attrs.field(repr=False)
    claims: Claims
    expires_at: datetime


# --- issuing ----------------------------------------------------------------------------


class TokenIssuer:
    """Signs tokens for one node with one private key."""

    def __init__(
        self, private_key: Ed25519PrivateKey, node: str, *, now: Clock = time.time
    ) -> None:
        if not node:
            raise ValueError("the node name must not be empty")
        self._private_key = private_key
        self._kid = key_fingerprint(private_key.public_key())
        self._node = node
        self._now = now

    @property
    def kid(self) -> str:
        """The fingerprint of the signing key, put in every token's ``kid`` header."""
        return self._kid

    def issue(
        self,
        domain_uuid: str,
        protocol: str,
        *,
        ttl: int,
        view_only: bool = False,
        device: str | None = None,
        name: str | None = None,
        recording: str | None = None,
    ) -> IssuedToken:
        """Sign a token for *domain_uuid* and *protocol*, valid *ttl* seconds from now.

        *device* names the console device (``dev`` claim): an alias or an index; *name*
        who the token is for (``name`` claim), shown to the console's other viewers.
        *recording* makes a recording token (``rec`` claim): *protocol* must then be
        :data:`broker.recordings.RECORDING`, and its rights are view only.
        """
        try:
            domain_uuid = _canonical_uuid(domain_uuid)
        except ValueError:
            raise ValueError(f"{domain_uuid!r} is not a domain UUID") from None
        if not protocol:
            raise ValueError("the protocol must not be empty")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if device is not None and not DEVICE.fullmatch(device):
            raise ValueError(f"{device!r} is not a device alias or index")
        if name is not None and not valid_name(name):
            raise ValueError(
                f"a name is 1 to {MAX_NAME_LENGTH} printable characters, not {name!r}"
            )
        if recording is not None and not RECORDING_ID.fullmatch(recording):
            raise ValueError(f"{recording!r} is not a recording id")
        if (recording is not None) != (protocol == RECORDING):
            raise ValueError(
                f"a recording id goes with the protocol {RECORDING!r}, and only with it"
            )
        if (domain_uuid == NO_DOMAIN) != (protocol == OPERATOR):
            raise ValueError(
                f"the nil UUID goes with the protocol {OPERATOR!r} (operator tokens), and "
                "only with it"
            )
        if protocol == OPERATOR and (view_only or device is not None):
            raise ValueError("an operator token has full rights and no device")
        issued_at = int(self._now())
        claims = Claims(
            domain_uuid=domain_uuid,
            protocol=protocol,
            node=self._node,
            rights=Rights.VIEW if view_only or recording is not None else Rights.FULL,
            issued_at=issued_at,
            not_before=issued_at,
            expires_at=issued_at + ttl,
            jti=secrets.token_urlsafe(16),
            device=device,
            name=name,
            recording=recording,
        )
        token = jwt.encode(
            claims.to_payload(),
            self._private_key,
            algorithm=ALGORITHM,
            headers={"kid": self._kid},
        )
        _log.info(
            "token.issued",
            jti=claims.jti,
            domain=claims.domain_uuid,
            protocol=claims.protocol,
            node=claims.node,
            rights=claims.rights.value,
            device=claims.device,
            recording=claims.recording,
            expires_at=claims.expires_at,
            kid=self._kid,
        )
        return IssuedToken(token=token, claims=claims, expires_at=_utc(claims.expires_at))

    def issue_operator(self, *, ttl: int, name: str | None = None) -> IssuedToken:
        """An operator token valid *ttl* seconds from now: ``proto`` ``operator``, ``sub``
        :data:`NO_DOMAIN`, full rights, single use like every token; *name* says who the
        operator is (``name`` claim), and goes into the ``name`` of the console tokens the
        operator page has the broker mint."""
        return self.issue(NO_DOMAIN, OPERATOR, ttl=ttl, name=name)


# --- single use -------------------------------------------------------------------------


class ReplayStore(Protocol):
    """Where a verifier records the ``jti`` of the tokens used (:class:`ReplayCache`, or
    :class:`~broker.service._sharedstate.SharedReplayCache`)."""

    def __len__(self) -> int: ...

    def __contains__(self, jti: object) -> bool: ...

    def consume(self, jti: str, until: float, *, now: float) -> None:
        """Record *jti* as used until *until*, or raise :class:`ReplayedToken` (used
        already), :class:`ReplayCacheFull` (full of live entries) or
        :class:`ReplayStoreUnavailable`."""
        ...


class ReplayCache:
    """The ``jti`` of every token used, each kept until its token can no longer verify.

    Bounded: at most *maxsize* entries. Expired entries are evicted first; when
    the cache is still full of live entries, the new token is refused
    (:class:`ReplayCacheFull`) rather than an entry forgotten, because forgetting
    a live ``jti`` would let that token be used again. The cache drains by
    itself within ``max_ttl + leeway`` seconds. Only tokens with a valid
    signature reach the cache, so filling it takes an issuer's cooperation.

    The cache lives in one process and forgets everything when it ends: ``serve`` uses
    :class:`~broker.service._sharedstate.SharedReplayCache` instead, the same rules in a
    file of the state directory that every worker process shares and that outlives a
    crash or a restart. This one serves tests and benchmarks that build a verifier
    themselves. Safe to call from several threads.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("the replay cache needs room for at least one entry")
        self.maxsize = maxsize
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, jti: object) -> bool:
        return jti in self._until

    def _evict(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, jti = heappop(self._expiry)
            del self._until[jti]

    def consume(self, jti: str, until: float, *, now: float) -> None:
        """Record *jti* as used until *until*; refuse it if it was used already.

        Raises :class:`ReplayedToken`, or :class:`ReplayCacheFull` when no
        entry can be evicted.
        """
        with self._lock:
            self._evict(now)
            if jti in self._until:
                raise ReplayedToken("the token was already used")
            if len(self._until) >= self.maxsize:
                raise ReplayCacheFull(
                    f"the replay cache is full ({self.maxsize} live tokens); refusing new tokens "
                    "until some expire"
                )
            self._until[jti] = until
            heappush(self._expiry, (until, jti))


# --- verifying --------------------------------------------------------------------------


class TokenVerifier:
    """Checks tokens against the trusted public keys and consumes them.

    *public_keys* is the trusted list (duplicates are harmless). *leeway* is
    the clock skew allowed on ``nbf`` and ``exp``, in seconds. A token whose
    lifetime (``exp - nbf``) exceeds *max_ttl* is refused: the replay cache must
    remember each token until it expires, so lifetimes must be bounded.
    """

    def __init__(
        self,
        public_keys: Sequence[Ed25519PublicKey],
        *,
        replay_cache: ReplayStore,
        leeway: int = 5,
        max_ttl: int = 300,
        now: Clock = time.time,
        handoffs: HandoffTable | None = None,
    ) -> None:
        self._keys = {key_fingerprint(key): key for key in public_keys}
        if not self._keys:
            raise ValueError("a token verifier needs at least one trusted public key")
        if leeway < 0 or max_ttl < 1:
            raise ValueError("leeway must be >= 0 and max_ttl >= 1")
        self._cache = replay_cache
        self._leeway = leeway
        self._max_ttl = max_ttl
        self._now = now
        #: The handoff handles this verifier issued and accepts (see :meth:`hand_off`).
        self.handoffs = handoffs if handoffs is not None else HandoffTable(leeway=leeway)

    @property
    def key_ids(self) -> frozenset[str]:
        """The fingerprints of the trusted keys."""
        return frozenset(self._keys)

    def replace_keys(self, public_keys: Sequence[Ed25519PublicKey]) -> None:
        """Trust *public_keys* from now on instead of the keys trusted so far (a reload:
        ``serve`` on SIGHUP). Sessions already open are not affected; ValueError (and the
        old keys kept) when *public_keys* is empty."""
        keys = {key_fingerprint(key): key for key in public_keys}
        if not keys:
            raise ValueError("a token verifier needs at least one trusted public key")
        self._keys = keys

    def verify(
        self,
        token: str,
        *,
        protocol: str | None = None,
        node: str | None = None,
        domain: str | None = None,
        consume: bool = True,
    ) -> Claims:
        """Verify *token* and return its claims, or raise a :class:`TokenRefused`.

        *protocol*, *node* and *domain* (a UUID, in any case; ValueError if it is
        not one), when given, must match the claims. With *consume* (the default)
        the token is used up.

        Sessions of several connections (SPICE channels): pass ``consume=False``
        to check a token without using it up. The caller then owns single use:
        it must call :meth:`consume` once, when it opens the session, and admit
        further connections bearing the same ``jti`` only into that session.
        """
        try:
            claims = self._check(token, protocol=protocol, node=node, domain=domain)
            if consume:
                self._consume(claims)
        except TokenRefused as exc:
            _log.warning(
                "token.rejected",
                reason=exc.reason,
                detail=exc.detail,
                jti=exc.claims.jti if exc.claims is not None else None,
            )
            raise
        _log.debug(
            "token.accepted",
            jti=claims.jti,
            domain=claims.domain_uuid,
            protocol=claims.protocol,
            rights=claims.rights.value,
            consumed=consume,
        )
        return claims

    def used(self, claims: Claims | str) -> bool:
        """Whether the token of *claims* (verified; or of this ``jti``) has been used up
        already."""
        return (claims if isinstance(claims, str) else claims.jti) in self._cache

    def session_jti(self, token: str, *, protocol: str, node: str) -> str:
        """The ``jti`` of the session *token* (a token or a handle) opens, as proof that a
        client holds it: a token's shape, signature and claims, protocol and node, but
        not its lifetime (a session outlives its token, which may have expired since);
        a handle's :func:`~broker.handoff.handle_id`, which only its holder can compute.
        The caller looks that ``jti`` up among the sessions it runs. Raises
        :class:`TokenRefused` (logged as ``token.rejected``)."""
        if is_handle(token):
            return handle_id(token)
        try:
            claims = self._verified_claims(token)
            if claims.protocol != protocol:
                raise WrongProtocol(
                    f"the token is for protocol {claims.protocol!r}, not {protocol!r}", claims
                )
            if claims.node != node:
                raise WrongNode(f"the token is for node {claims.node!r}, not {node!r}", claims)
        except TokenRefused as exc:
            _log.warning(
                "token.rejected",
                reason=exc.reason,
                detail=exc.detail,
                jti=exc.claims.jti if exc.claims is not None else None,
            )
            raise
        return claims.jti

    def hand_off(self, claims: Claims, *, ttl: int) -> Handoff:
        """A handoff handle for the live session of *claims*, valid *ttl* seconds (at
        most ``max_ttl``) from now, accepted by :meth:`verify` like a token. Raises
        :class:`~broker.handoff.HandoffLimit`."""
        return self.handoffs.issue(claims, ttl=min(ttl, self._max_ttl), now=self._now())

    def consume(self, claims: Claims) -> None:
        """Use up a token checked with ``verify(..., consume=False)``.

        Raises :class:`ReplayedToken` if it was used already, :class:`ReplayCacheFull`.
        """
        try:
            self._consume(claims)
        except TokenRefused as exc:
            _log.warning("token.rejected", reason=exc.reason, detail=exc.detail, jti=claims.jti)
            raise

    def _consume(self, claims: Claims) -> None:
        try:
            self._cache.consume(claims.jti, claims.expires_at + self._leeway, now=self._now())
        except TokenRefused as exc:
            exc.claims = claims
            raise
        self.handoffs.used(claims.jti)

    def _check(
        self, token: str, *, protocol: str | None, node: str | None, domain: str | None
    ) -> Claims:
        now = self._now()
        if is_handle(token):
            found = self.handoffs.claims(token, now=now)
            if found is None:
                raise InvalidToken(
                    "unknown handoff handle: malformed, expired a while ago, or issued by "
                    "another broker process"
                )
            claims = found
        else:
            claims = self._verified_claims(token)
        if claims.not_before > now + self._leeway:
            raise NotYetValidToken("the token is not valid yet", claims)
        if claims.expires_at <= now - self._leeway:
            raise ExpiredToken("the token has expired", claims)
        if claims.expires_at - claims.not_before > self._max_ttl:
            raise InvalidToken(
                f"the token's lifetime exceeds the broker's max_ttl ({self._max_ttl} s)", claims
            )
        if protocol is not None and claims.protocol != protocol:
            raise WrongProtocol(
                f"the token is for protocol {claims.protocol!r}, not {protocol!r}", claims
            )
        if node is not None and claims.node != node:
            raise WrongNode(f"the token is for node {claims.node!r}, not {node!r}", claims)
        if domain is not None and claims.domain_uuid != _canonical_uuid(domain):
            raise WrongDomain(f"the token is for domain {claims.domain_uuid}, not {domain}", claims)
        return claims

    def _candidate_keys(self, header: dict[str, Any]) -> list[Ed25519PublicKey]:
        if "kid" not in header:
            return list(self._keys.values())
        kid = header["kid"]
        if not isinstance(kid, str) or kid not in self._keys:
            raise InvalidToken("unknown key: the token's 'kid' names no trusted public key")
        return [self._keys[kid]]

    def _verified_claims(self, token: str) -> Claims:
        if not isinstance(token, str) or not token.isascii():
            raise InvalidToken("malformed: not an ASCII string")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"malformed: longer than {MAX_TOKEN_LENGTH} characters")
        try:
            header = _JWS.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed: not a compact JWS") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"algorithm not accepted: only {ALGORITHM} is")
        if "crit" in header or "b64" in header:
            raise InvalidToken("malformed: JWS extensions ('crit', 'b64') are not accepted")
        payload: bytes | None = None
        for key in self._candidate_keys(header):
            try:
                payload = _JWS.decode(token, key, algorithms=[ALGORITHM])
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                raise InvalidToken("malformed: not a compact JWS") from None
            break
        if payload is None:
            raise InvalidToken("bad signature: no trusted key verifies the token")
        try:
            decoded = json.loads(payload)
        except (ValueError, RecursionError):
            raise InvalidToken("malformed: the payload is not JSON") from None
        return Claims.from_payload(decoded)
