"""TLS: the same port serves wss:// (and https://) with the configured certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from attrs import evolve
from brokerkit import BANNER, FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from broker.cli import CommandError
from broker.config import TLSSection
from broker.service.cli import _ssl_context
from broker.tokens import TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_wss(tmp_path: Path, verifier: TokenVerifier, issuer: TokenIssuer) -> None:
    cert, key = _certificate(tmp_path)
    config = make_config()
    config = evolve(config, tls=TLSSection(cert=str(cert), key=str(key)))
    server_context = _ssl_context(config)
    assert server_context is not None
    client_context = ssl.create_default_context(cafile=str(cert))
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
