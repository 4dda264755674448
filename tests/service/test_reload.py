"""Reloading keys and certificates (``broker.service._reload``) in process: a broker with
real TLS listeners, a fake hypervisor, and :meth:`Reloader.reload` called as SIGHUP
calls it. tests/service/test_reload_served.py sends the real signal to ``serve``."""

from __future__ import annotations

import re
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest
from anyio.streams.tls import TLSStream
from brokerkit import BANNER, FakeDomain, FakeResolver, free_port, running_broker
from certs import make_certificates
from conftest import DOMAIN
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from broker.config import load_config
from broker.service._reload import ListenerTLS, Reloader, load_material
from broker.service.cli import _client_ssl_context, _ssl_context
from broker.tokens import ReplayCache, TokenIssuer, TokenVerifier

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the loop tests/conftest.py chose (uvloop's policy, or asyncio's)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def install(source: dict[str, Path], live: Path) -> None:
    """Copy *source*'s certificate files over the ones the configuration names (in
    *live*), as an operator renews them in place."""
    for name, stem in (("server", "server-cert.pem"), ("server-key", "server-key.pem"),
                       ("ca", "ca-cert.pem"), ("client", "client-cert.pem"),
                       ("client-key", "client-key.pem")):
        shutil.copyfile(source[name], live / stem)


@attrs.define
class Setup:
    directory: Path
    config_path: Path
    live: Path
    first: dict[str, Path]
    second: dict[str, Path]
    key: Ed25519PrivateKey
    new_key: Ed25519PrivateKey
    reloader: Reloader
    port: int
    #: The CONNECT listener's (TLS, since the broker requires client certificates).
    connect_port: int

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws/vnc?token="

    def trusting(self, certs: dict[str, Path], *, client: bool = True) -> ssl.SSLContext:
        """A client trusting *certs*' CA alone (no name check), showing its client
        certificate."""
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        context.check_hostname = False
        if client:
            context.load_cert_chain(certs["client"], certs["client-key"])
        return context

    def issue(self, key: Ed25519PrivateKey | None = None) -> str:
        return TokenIssuer(key or self.key, "hv1").issue(DOMAIN, "vnc", ttl=60).token


async def shown_certificate(port: int, certs: dict[str, Path]) -> x509.Certificate:
    """The certificate a new TLS connection to *port* is shown (it shows *certs*' client
    certificate and trusts nothing: the test compares what it saw)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(certs["client"], certs["client-key"])
    stream = await anyio.connect_tcp("127.0.0.1", port)
    tls = await TLSStream.wrap(stream, hostname="node", ssl_context=context,
                               standard_compatible=False)
    der = tls.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
    await tls.aclose()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    live = tmp_path / "live"
    live.mkdir()
    first = make_certificates(tmp_path / "first", client=True)
    second = make_certificates(tmp_path / "second", client=True)
    install(first, live)
    key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "issuer.pub.pem").write_bytes(public_pem(key))
    config_path = tmp_path / "broker.toml"
    config_path.write_text(
        '[broker]\nnode = "hv1"\nstate_dir = "state"\n'
        f'[listen]\nhost = "127.0.0.1"\nport = {free_port()}\nconnect_port = {free_port()}\n'
        "[http]\nallow_missing_origin = true\n"
        '[tokens]\ntrust_local_key = false\npublic_keys = ["issuer.pub.pem"]\n'
        '[tls]\ncert = "live/server-cert.pem"\nkey = "live/server-key.pem"\n'
        'client_ca = "live/ca-cert.pem"\n'
    )
    config = load_config(config_path)
    material = load_material(config)
    verifier = TokenVerifier([k for _, k in material.keys], replay_cache=ReplayCache(100))
    tls = ListenerTLS(_ssl_context(config), _client_ssl_context(config))
    resolver = FakeResolver(FakeDomain(DOMAIN))
    async with running_broker(config, verifier, resolver, ssl_context=tls.server,
                              client_ssl_context=tls.client) as running:
        reloader = Reloader(config, config_path, (), verifier, tls,
                            running.broker.metrics.registry, material)
        yield Setup(tmp_path, config_path, live, first, second, key, new_key, reloader,
                    running.port, running.broker.connect_addresses[0][1])


def reloads(setup: Setup, result: str) -> float | None:
    return setup.reloader.reloads.labels(result)._value.get()


async def test_a_session_goes_on_while_new_connections_get_the_new_certificate(
    setup: Setup,
) -> None:
    first, second = setup.first, setup.second
    assert await shown_certificate(setup.port, first) == certificate(first["server"])
    assert await shown_certificate(setup.connect_port, first) == certificate(first["server"])
    async with connect(setup.url + setup.issue(), ssl=setup.trusting(first)) as before:
        assert await before.recv() == BANNER
        install(second, setup.live)
        assert await setup.reloader.reload()
        assert reloads(setup, "ok") == 1
        # The session made with the first certificate goes on.
        await before.send(b"still here")
        assert await before.recv() == b"still here"
        # A new connection is shown the second certificate, on both listeners, and its
        # client certificate must now be the second CA's.
        assert await shown_certificate(setup.port, second) == certificate(second["server"])
        assert await shown_certificate(setup.connect_port, second) == certificate(
            second["server"]
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(setup.url + setup.issue(), ssl=setup.trusting(first)):
                pass
        async with connect(setup.url + setup.issue(), ssl=setup.trusting(second)) as after:
            assert await after.recv() == BANNER
            await after.send(b"new")
            assert await after.recv() == b"new"
        # The first CA's client certificate no longer gets in.
        mixed = setup.trusting(second, client=False)
        mixed.load_cert_chain(first["client"], first["client-key"])
        with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
            async with connect(setup.url + setup.issue(), ssl=mixed) as ws:
                await ws.recv()
        await before.send(b"and after that")
        assert await before.recv() == b"and after that"


@pytest.mark.parametrize(
    ("breakage", "file", "problem"),
    [
        ("missing key", "live/server-key.pem", "no such private key file"),
        ("garbage certificate", "live/server-cert.pem", "no PEM certificate"),
        ("mismatched key", "live/server-key.pem", "does not match the certificate"),
        ("garbage CA", "live/ca-cert.pem", "no PEM certificate in the CA file"),
        ("bad public key", "issuer.pub.pem", "not a PEM public key"),
        ("bad configuration", "broker.toml", "not valid TOML"),
    ],
)
async def test_a_failed_reload_keeps_the_old_material(
    setup: Setup, breakage: str, file: str, problem: str
) -> None:
    path = setup.directory / file
    if breakage == "missing key":
        path.unlink()
    elif breakage == "mismatched key":
        shutil.copyfile(setup.second["server-key"], path)
    elif breakage == "bad configuration":
        path.write_text(path.read_text() + "[tls\n")
    else:
        path.write_text("-----BEGIN NOTHING-----\n")
    # Beside a broken file, a good new certificate (with its own key) is not taken either.
    if breakage in ("bad public key", "bad configuration"):
        shutil.copyfile(setup.second["server-key"], setup.live / "server-key.pem")
        shutil.copyfile(setup.second["server"], setup.live / "server-cert.pem")
    with capture_logs() as logs:
        assert not await setup.reloader.reload()
    (line,) = logs
    assert line["event"] == "broker.reload_failed"
    assert line["log_level"] == "error"
    assert line["file"] == str(path)
    assert problem in line["problem"]
    assert reloads(setup, "failed") == 1
    assert reloads(setup, "ok") == 0
    # The old certificate, client CA and key are still in force.
    assert await shown_certificate(setup.port, setup.first) == certificate(
        setup.first["server"]
    )
    async with connect(setup.url + setup.issue(), ssl=setup.trusting(setup.first)) as ws:
        assert await ws.recv() == BANNER


async def test_new_token_keys_verify_after_the_reload(setup: Setup) -> None:
    context = setup.trusting(setup.first)
    with pytest.raises(Exception, match="HTTP 401"):
        async with connect(setup.url + setup.issue(setup.new_key), ssl=context):
            pass
    # The rotation's second step: the new key listed beside the old one.
    (setup.directory / "new.pub.pem").write_bytes(public_pem(setup.new_key))
    text = setup.config_path.read_text().replace(
        '["issuer.pub.pem"]', '["issuer.pub.pem", "new.pub.pem"]'
    )
    setup.config_path.write_text(text)
    with capture_logs() as logs:
        assert await setup.reloader.reload()
    (line,) = logs
    assert line["event"] == "broker.reloaded"
    assert line["changed"] == ["trusted_keys"]
    assert len(line["keys_added"]) == 1 and line["keys_removed"] == []
    assert line["restart_needed"] == []
    for key in (setup.key, setup.new_key):
        async with connect(setup.url + setup.issue(key), ssl=context) as ws:
            assert await ws.recv() == BANNER
    # Its last step: the old key dropped, its tokens refused from then on.
    setup.config_path.write_text(text.replace('"issuer.pub.pem", ', ""))
    assert await setup.reloader.reload()
    with pytest.raises(Exception, match="HTTP 401"):
        async with connect(setup.url + setup.issue(setup.key), ssl=context):
            pass


async def test_settings_a_reload_cannot_change_are_named_and_kept(setup: Setup) -> None:
    text = setup.config_path.read_text()
    text = re.sub(r"(?m)^port = \d+", "port = 7001", text)
    text = re.sub(r"(?m)^connect_port = \d+", "connect_port = 7002", text)
    text = text.replace('client_ca = "live/ca-cert.pem"\n', "")  # client certificates off
    setup.config_path.write_text(text + "[limits]\nmax_sessions = 5\n")
    with capture_logs() as logs:
        assert await setup.reloader.reload()
    (line,) = logs
    assert line["restart_needed"] == [
        "limits.max_sessions", "listen.connect_port", "listen.port", "tls.client_ca"
    ]
    assert line["changed"] == []
    # Client certificates are still required (turning them off needs a restart).
    with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
        async with connect(setup.url + setup.issue(),
                           ssl=setup.trusting(setup.first, client=False)) as ws:
            await ws.recv()
    # ... and said again at the next reload, until the broker restarts.
    with capture_logs() as logs:
        assert await setup.reloader.reload()
    assert logs[0]["restart_needed"] == line["restart_needed"]
