"""Handoff handles: a fresh, single-use way into a live session's console, for another client.

Theory of operation. A console page's token is used up when its WebSocket opens, and
a broker cannot sign tokens (in a cluster, nodes trust only the control plane's key).
To let the user open the same console in a native client, the broker hands the page's
session a *handle* instead: an opaque, random string (``h.`` and 32 URL-safe
characters, 192 random bits; a JWT never starts with ``h.``) that stands for claims
the broker keeps in memory, copied from the live session's token (domain, protocol,
node, rights, device) with a lifetime of its own. Wherever the broker accepts a token,
it accepts a handle: the verifier looks it up here instead of checking a signature,
then checks it as it checks a token (lifetime, protocol, node; single use through the
same replay cache).

The table is keyed by :func:`handle_id`, a hash of the handle, which is also the
claims' ``jti``: the id logs may carry, from which the handle cannot be found. It is
bounded: at most *maxsize* entries and, per session, *per_session* handles not yet
used; entries are kept until their expiry plus the verifier's leeway plus
:data:`LINGER` seconds, so that a handle used late is refused as expired rather than
unknown (when the table is full, those lingering entries make room first). The table
lives in one broker process: a handle is usable only on the broker that issued it (with
worker processes, the worker that issued it: each issues only handles that route to
itself, :mod:`broker.service._workers`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections.abc import Callable
from heapq import heappop, heappush
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from broker.tokens import Claims

__all__ = [
    "HANDLE",
    "LINGER",
    "MAX_HANDOFFS",
    "MAX_OUTSTANDING",
    "PREFIX",
    "Handoff",
    "HandoffLimit",
    "HandoffTable",
    "handle_id",
    "is_handle",
]

#: What every handle starts with (a compact JWS starts with ``eyJ``).
PREFIX = "h."
#: A handle's shape: the prefix and 32 URL-safe characters (``secrets.token_urlsafe(24)``).
HANDLE = re.compile(r"h\.[A-Za-z0-9_-]{32}")
#: Handles a broker keeps at most (issued, not yet expired).
MAX_HANDOFFS = 10_000
#: Handles of one session not yet used (nor expired) at most.
MAX_OUTSTANDING = 4
#: Seconds an expired handle is still known (refused as expired, not as unknown).
LINGER = 60


def is_handle(token: object) -> bool:
    """Whether *token* is meant as a handle (it may still be no valid one)."""
    return isinstance(token, str) and token.startswith(PREFIX)


def handle_id(handle: str) -> str:
    """The id of *handle*: its claims' ``jti``, loggable (the handle is not derivable
    from it): ``h-`` and the unpadded base64url of the first 16 bytes of its SHA-256."""
    digest = hashlib.sha256(handle.encode("utf-8", "surrogateescape")).digest()[:16]
    return "h-" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class HandoffLimit(Exception):
    """No handle can be issued now: the table is full, or the session has enough
    handles not yet used. The message says which."""


@attrs.frozen
class Handoff:
    """A handle just issued, and what it stands for. ``repr`` leaves the handle out."""

    handle: str = attrs.field(repr=False)
    claims: Claims
    #: The ``jti`` of the session's token the handle was issued for.
    parent: str


@attrs.define
class _Entry:
    claims: Claims
    parent: str
    used: bool = False


class HandoffTable:
    """The handles a broker issued, by :func:`handle_id` (see the module's notes).

    *leeway* is the verifier's (an entry is live until ``exp + leeway``). Safe to call
    from several threads.
    """

    def __init__(
        self,
        *,
        maxsize: int = MAX_HANDOFFS,
        per_session: int = MAX_OUTSTANDING,
        leeway: int = 5,
        linger: int = LINGER,
    ) -> None:
        if maxsize < 1 or per_session < 1:
            raise ValueError("a handoff table needs room for at least one handle")
        self.maxsize = maxsize
        self.per_session = per_session
        self._leeway = leeway
        self._linger = linger
        self._entries: dict[str, _Entry] = {}
        #: (expires_at, id), the earliest first.
        self._expiry: list[tuple[int, str]] = []
        #: The ids of each session's handles not yet used, by the session's jti.
        self._outstanding: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        #: With worker processes: which handles this worker may issue (those that hash
        #: to it, so that a handle's uses reach the worker that knows it); None: any.
        self.accepts: Callable[[str], bool] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def _drop_until(self, moment: float) -> None:
        """Forget every entry that expired (with the leeway) by *moment*."""
        while self._expiry and self._expiry[0][0] + self._leeway <= moment:
            _, key = heappop(self._expiry)
            entry = self._entries.pop(key)
            self._settle(key, entry)

    def _settle(self, key: str, entry: _Entry) -> None:
        """*entry* is no longer outstanding for its session."""
        children = self._outstanding.get(entry.parent)
        if children is not None:
            children.discard(key)
            if not children:
                del self._outstanding[entry.parent]

    def issue(self, parent: Claims, *, ttl: int, now: float) -> Handoff:
        """A new handle for the session of *parent* (its token's claims): the same domain,
        protocol, node, rights and device, valid *ttl* seconds from *now*, with its own
        ``jti``. Raises :class:`HandoffLimit`."""
        if ttl < 1:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        with self._lock:
            self._drop_until(now - self._linger)
            live = now - self._leeway
            children = self._outstanding.get(parent.jti, set())
            for key in list(children):  # expired ones no longer count
                if self._entries[key].claims.expires_at <= live:
                    self._settle(key, self._entries[key])
            if len(children) >= self.per_session:
                raise HandoffLimit(
                    f"the session has {len(children)} handoff handles not yet used "
                    f"(at most {self.per_session}); use one or let them expire"
                )
            if len(self._entries) >= self.maxsize:
                self._drop_until(now)  # lingering entries make room first
            if len(self._entries) >= self.maxsize:
                raise HandoffLimit(
                    f"the broker holds {self.maxsize} live handoff handles; "
                    "refusing new ones until some expire"
                )
            handle = PREFIX + secrets.token_urlsafe(24)
            while self.accepts is not None and not self.accepts(handle):
                handle = PREFIX + secrets.token_urlsafe(24)
            key = handle_id(handle)
            issued = int(now)
            claims = attrs.evolve(
                parent, issued_at=issued, not_before=issued, expires_at=issued + ttl, jti=key
            )
            self._entries[key] = _Entry(claims, parent.jti)
            heappush(self._expiry, (claims.expires_at, key))
            self._outstanding.setdefault(parent.jti, set()).add(key)
        return Handoff(handle=handle, claims=claims, parent=parent.jti)

    def claims(self, handle: str, *, now: float) -> Claims | None:
        """What *handle* stands for, or None when it is no handle this table knows (never
        issued here, malformed, or expired more than the linger ago)."""
        if not HANDLE.fullmatch(handle):
            return None
        with self._lock:
            self._drop_until(now - self._linger)
            entry = self._entries.get(handle_id(handle))
        return None if entry is None else entry.claims

    def used(self, key: str) -> None:
        """The handle of id *key* opened a session: it no longer counts as outstanding."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.used:
                entry.used = True
                self._settle(key, entry)
