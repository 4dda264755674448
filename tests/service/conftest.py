"""Fixtures for the token and configuration tests: a settable clock, keys, issuers, verifiers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.tokens import ReplayCache, TokenIssuer, TokenVerifier

#: A fixed moment (2030-01-01T00:00:00Z) the fake clock starts at.
T0 = 1_893_456_000.0
DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"


class FakeClock:
    """A clock tests move by hand: ``clock()`` is now, ``clock.advance(s)`` moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """The CLI may configure structlog for its process; undo that after each test."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def issuer(private_key: Ed25519PrivateKey, clock: FakeClock) -> TokenIssuer:
    return TokenIssuer(private_key, "hv1", now=clock)


MakeVerifier = Callable[..., TokenVerifier]


@pytest.fixture
def make_verifier(private_key: Ed25519PrivateKey, clock: FakeClock) -> MakeVerifier:
    """A verifier factory; by default it trusts *private_key*'s public key."""

    def make(
        keys: list[Ed25519PrivateKey] | None = None,
        *,
        cache_size: int = 100,
        leeway: int = 5,
        max_ttl: int = 300,
    ) -> TokenVerifier:
        trusted = [key.public_key() for key in (keys if keys is not None else [private_key])]
        return TokenVerifier(
            trusted,
            replay_cache=ReplayCache(cache_size),
            leeway=leeway,
            max_ttl=max_ttl,
            now=clock,
        )

    return make


@pytest.fixture
def verifier(make_verifier: MakeVerifier) -> TokenVerifier:
    return make_verifier()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A configuration whose state directory is under *tmp_path*, node ``hv1``."""
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nnode = "hv1"\nstate_dir = "state"\n')
    return path
