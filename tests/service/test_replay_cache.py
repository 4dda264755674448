"""The replay cache: single use, eviction after expiry, and refusing (not forgetting) when full."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.tokens import ReplayCache, ReplayCacheFull, ReplayedToken, TokenIssuer

DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def test_consume_once() -> None:
    cache = ReplayCache(10)
    cache.consume("a", 100.0, now=0.0)
    assert "a" in cache and len(cache) == 1
    with pytest.raises(ReplayedToken):
        cache.consume("a", 100.0, now=50.0)


def test_entry_kept_until_its_expiry_then_evicted() -> None:
    cache = ReplayCache(10)
    cache.consume("a", 100.0, now=0.0)
    with pytest.raises(ReplayedToken):
        cache.consume("a", 200.0, now=99.9)
    cache.consume("b", 300.0, now=100.0)  # eviction happens on the next use
    assert "a" not in cache and len(cache) == 1


def test_full_of_live_entries_refuses_new_and_forgets_nothing() -> None:
    cache = ReplayCache(3)
    for jti in "abc":
        cache.consume(jti, 100.0, now=0.0)
    with pytest.raises(ReplayCacheFull) as info:
        cache.consume("d", 100.0, now=1.0)
    assert info.value.reason == "limit_reached"
    assert "d" not in cache
    for jti in "abc":  # none of the live entries was dropped to make room
        with pytest.raises(ReplayedToken):
            cache.consume(jti, 100.0, now=1.0)


def test_full_cache_makes_room_from_expired_entries() -> None:
    cache = ReplayCache(3)
    cache.consume("a", 10.0, now=0.0)
    cache.consume("b", 100.0, now=0.0)
    cache.consume("c", 100.0, now=0.0)
    cache.consume("d", 100.0, now=10.0)  # "a" expired: its slot is reused
    assert sorted(j for j in "abcd" if j in cache) == ["b", "c", "d"]
    cache.consume("e", 200.0, now=100.0)  # everything else expired too
    assert len(cache) == 1


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayCache(0)


def test_verifier_full_cache_is_limit_reached(
    issuer: TokenIssuer, make_verifier: Any, clock: Any
) -> None:
    verifier = make_verifier(cache_size=2)
    verifier.verify(issuer.issue(DOMAIN, "vnc", ttl=60).token)
    verifier.verify(issuer.issue(DOMAIN, "vnc", ttl=60).token)
    refused = issuer.issue(DOMAIN, "vnc", ttl=60).token
    with pytest.raises(ReplayCacheFull):
        verifier.verify(refused)
    clock.advance(60 + 5)  # the first two can no longer verify: their entries go
    fresh = issuer.issue(DOMAIN, "vnc", ttl=60).token
    verifier.verify(fresh)


def test_verifier_remembers_until_exp_plus_leeway(
    issuer: TokenIssuer, make_verifier: Any, clock: Any
) -> None:
    verifier = make_verifier(cache_size=10, leeway=5)
    token = issuer.issue(DOMAIN, "vnc", ttl=60).token
    verifier.verify(token)
    clock.advance(64)  # still inside exp + leeway: must still be remembered
    with pytest.raises(ReplayedToken):
        verifier.verify(token)


operations = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 50), st.integers(0, 5)), max_size=60
)


@given(operations, st.integers(1, 5))
def test_matches_a_plain_model(ops: list[tuple[str, int, int]], maxsize: int) -> None:
    """Against a model that keeps everything: same answers, never over maxsize."""
    cache = ReplayCache(maxsize)
    model: dict[str, float] = {}
    now = 0.0
    for jti, lifetime, step in ops:
        now += step
        live = {j: until for j, until in model.items() if until > now}
        until = now + lifetime
        if jti in live:
            with pytest.raises(ReplayedToken):
                cache.consume(jti, until, now=now)
        elif len(live) >= maxsize:
            with pytest.raises(ReplayCacheFull):
                cache.consume(jti, until, now=now)
        else:
            cache.consume(jti, until, now=now)
            live[jti] = until
        model = live
        assert len(cache) <= maxsize
