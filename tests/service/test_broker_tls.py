"""TLS: the same port serves wss:// (and https://) with the configured certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from attrs import evolve
from brokerkit import BANNER, FakeDomain, FakeResolver, make_config, running_broker
from certs import make_certificates
from conftest import DOMAIN
from websockets.asyncio.client import connect

from broker.cli import CommandError
from broker.config import TLSSection
from broker.service.cli import _ssl_context
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_wss(tmp_path: Path, verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    paths = make_certificates(tmp_path)
    cert, key = paths["server"], paths["server-key"]
    config = make_config()
    config = evolve(config, tls=TLSSection(cert=str(cert), key=str(key)))
    server_context = _ssl_context(config)
    assert server_context is not None
    client_context = ssl.create_default_context(cafile=str(paths["ca"]))
    resolver = FakeResolver(FakeDomain(DOMAIN))
    async with running_broker(config, verifier, resolver, ssl_context=server_context) as running:
        token = issuer.issue(DOMAIN, "vnc", ttl=60).token
        url = f"wss://127.0.0.1:{running.port}/ws/vnc?token={token}"
        async with connect(url, ssl=client_context) as ws:
            assert await ws.recv() == BANNER


def test_an_unreadable_certificate_is_a_clear_error(tmp_path: Path) -> None:
    config = evolve(make_config(), tls=TLSSection(cert=str(tmp_path / "no.pem"), key="k.pem"))
    with pytest.raises(CommandError, match=r"tls\.cert, tls\.key: cannot load"):
        _ssl_context(config)
