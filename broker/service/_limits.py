"""Session limits: how many sessions at once, in all, per domain and per client address.

Sans-I/O bookkeeping, used from the event loop only. The listener *checks*
before the WebSocket upgrade (a cheap refusal with HTTP 429) and *acquires*
after it, when the session really starts; the two can disagree under a race,
and the acquire is the one that counts.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import attrs

from broker.service._refusals import LIMIT_REACHED, Refused

if TYPE_CHECKING:
    from broker.config import Config


@attrs.frozen
class Limits:
    """The caps (each at least 1)."""

    total: int = 10_000
    per_domain: int = 16
    per_client: int = 64


def refuse_over_limits(limits: Limits, total: int, domain: int, client: int) -> None:
    """Raise :class:`Refused` (``limit_reached``) if one more session beside *total* in
    all, *domain* on its domain and *client* from its client would exceed a cap."""
    if total >= limits.total:
        raise Refused(LIMIT_REACHED, f"the broker has {total} sessions (limits.max_sessions)")
    if domain >= limits.per_domain:
        raise Refused(
            LIMIT_REACHED, f"the domain has {domain} sessions (limits.max_sessions_per_domain)"
        )
    if client >= limits.per_client:
        raise Refused(
            LIMIT_REACHED, f"the client has {client} sessions (limits.max_sessions_per_client)"
        )


class SessionCounts:
    """Live session counts against :class:`Limits`, in this process.

    A broker of several worker processes counts in
    :class:`~broker.service._sharedstate.SharedSessionCounts` instead (the same methods),
    so that the caps hold across its workers.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._total = 0
        self._domains: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Sessions counted, in all."""
        return self._total

    def domain(self, domain: str) -> int:
        return self._domains[domain]

    def client(self, client: str) -> int:
        return self._clients[client]

    def check(self, domain: str, client: str) -> None:
        """Raise :class:`Refused` (``limit_reached``) if one more session would exceed a cap."""
        refuse_over_limits(self.limits, self._total, self._domains[domain], self._clients[client])

    def acquire(self, domain: str, client: str) -> None:
        """Count one more session, or raise :class:`Refused` like :meth:`check`."""
        self.check(domain, client)
        self._total += 1
        self._domains[domain] += 1
        self._clients[client] += 1

    def release(self, domain: str, client: str) -> None:
        """Count one session less (each :meth:`acquire` is released exactly once)."""
        if self._domains[domain] <= 0 or self._clients[client] <= 0 or self._total <= 0:
            raise RuntimeError("released a session that was not acquired")
        self._total -= 1
        self._domains[domain] -= 1
        if not self._domains[domain]:
            del self._domains[domain]
        self._clients[client] -= 1
        if not self._clients[client]:
            del self._clients[client]


def session_limits(config: Config) -> Limits:
    """The caps of *config*'s ``[limits]``."""
    limits = config.limits
    return Limits(
        limits.max_sessions, limits.max_sessions_per_domain, limits.max_sessions_per_client
    )
