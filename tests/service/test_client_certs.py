"""Client certificates (tls.client_ca, tls.client_subjects): only the front door's
certificate reaches a node broker, on both listeners, over real TLS."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.tls import TLSStream
from attrs import evolve
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from certs import make_certificates
from conftest import DOMAIN
from servedbroker import CLI, ServedBroker, free_port
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

from broker import Protocol, hookimpl
from broker.cli import CommandError
from broker.config import ConfigError, TLSSection, load_config, rfc4514_name
from broker.plugins import PluginManager
from broker.service import ClientClosed, Session
from broker.service._clientcert import LOG_INTERVAL
from broker.service._connect import TLS_PORT, handle_for_token
from broker.service.cli import _client_ssl_context, _ssl_context
from broker.tokens import TokenIssuer, TokenVerifier

#: The front door's subject, and how the configuration writes it (spacing and the case
#: of attribute keys do not matter).
FRONT = "CN=front.console.example,O=Example"
FRONT_WRITTEN = "cn=front.console.example, o=Example"
INTRUDER = "CN=intruder.console.example,O=Example"
REFUSED_METRIC = re.compile(
    r'^console_broker_connections_refused_total\{listener="(\w+)",reason="client_certificate"\}'
    r" (\S+)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The node's CA and server certificate, the front's client certificate and an
    intruder's (same CA, another subject), and a front certificate of another CA
    (``stranger``)."""
    directory = tmp_path_factory.mktemp("certs")
    paths = make_certificates(directory / "node", clients={"front": FRONT, "intruder": INTRUDER})
    other = make_certificates(directory / "other", clients={"front": FRONT})
    paths["stranger"], paths["stranger-key"] = other["front"], other["front-key"]
    return paths


def client_context(certs: dict[str, Path], shown: str | None) -> ssl.SSLContext:
    """A client trusting the node's CA (no name check), showing the certificate *shown*
    (``front``, ``intruder``, ``stranger``; None: none)."""
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.check_hostname = False
    if shown is not None:
        context.load_cert_chain(certs[shown], certs[f"{shown}-key"])
    return context


class ClientCertBroker(ServedBroker):
    """A served broker with TLS whose listeners require the front's certificate; its own
    requests (the health check, :meth:`get`) show the front's."""

    def __init__(self, directory: Path, certs: dict[str, Path]) -> None:
        self.certs = certs
        tls = (
            f'[tls]\ncert = "{certs["server"]}"\nkey = "{certs["server-key"]}"\n'
            f'ca = "{certs["ca"]}"\nclient_ca = "{certs["ca"]}"\n'
            f'client_subjects = ["{FRONT_WRITTEN}"]\n'
        )
        # libvirt's test driver: these tests need no hypervisor, only one that answers.
        libvirt = '[libvirt]\nuri = "test:///default"\n'
        super().__init__(
            directory, protocol="vnc", extra_config=tls + libvirt, connect_port=True
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        context = client_context(self.certs, "front")
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5, context=context) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def refused(self, listener: str) -> float:
        """``connections_refused_total{listener, reason="client_certificate"}``."""
        status, body = self.get("/metrics")
        assert status == 200
        found = {name: float(value) for name, value in REFUSED_METRIC.findall(body.decode())}
        return found.get(listener, 0.0)

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The last log line *name* that *match* accepts, once written."""
        deadline = time.monotonic() + 5
        while True:
            found = [event for event in self.events(name) if match(event)]
            if found or time.monotonic() > deadline:
                assert found, self.log_text()[-3000:]
                return found[-1]
            time.sleep(0.05)

    def wait_refusal_logged(self, reason: str) -> dict[str, Any]:
        """The last ``tls.client_refused`` line with *reason*."""
        return self.wait_event("tls.client_refused", lambda event: event["reason"] == reason)

    def wait_refused(self, listener: str, count: float) -> None:
        """Until *listener* counted *count* client certificates refused."""
        deadline = time.monotonic() + 5
        while self.refused(listener) < count:
            assert time.monotonic() < deadline, self.refused(listener)
            time.sleep(0.05)
        assert self.refused(listener) == count


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]
) -> Iterator[ClientCertBroker]:
    broker = ClientCertBroker(tmp_path_factory.mktemp("broker"), certs)
    try:
        yield broker
    finally:
        broker.stop()
    assert "Traceback" not in broker.log_text()


def tls_exchange(
    port: int, context: ssl.SSLContext, send: bytes = b"", *, read: bool = True
) -> bytes:
    """TLS to *port*, *send*, then what comes back until the broker closes (b"" when the
    handshake or the first read fails: the broker refused the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            with context.wrap_socket(sock) as tls:
                if send:
                    tls.sendall(send)
                received = b""
                while read and (chunk := tls.recv(65536)):
                    received += chunk
                return received
        except (ssl.SSLError, ConnectionError):
            return b""


def tls_with_the_request(port: int, context: ssl.SSLContext, request: bytes) -> bytes:
    """TLS to *port* whose last handshake message and *request* leave in one write (so
    the broker's handshake ends with the request's bytes in hand); the answer."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(request)
        sock.sendall(outgoing.read())  # the client's Finished, then the request
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
        return answer


def plain_exchange(port: int, send: bytes) -> bytes:
    """*send* without TLS to *port*; what comes back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(send)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionError:
            pass
        return received


def ws_get(token: str = "not-a-token") -> bytes:
    return (
        f"GET /ws/vnc?token={token} HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def connect_head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


# --- the WebSocket and HTTP listener -------------------------------------------------------


def test_the_fronts_certificate_gets_through(served: ClientCertBroker) -> None:
    status, body = served.get("/healthz")
    assert status == 200 and json.loads(body)["node"] == "testnode"
    # a WebSocket request reaches the token's check: the token is refused, not the client
    with pytest.raises(InvalidStatus) as refused:
        connect(
            f"wss://127.0.0.1:{served.port}/ws/vnc?token=not-a-token",
            ssl=client_context(served.certs, "front"), open_timeout=10,
        )
    assert refused.value.response.status_code == 401
    assert served.events("request.refused")[-1]["reason"] == "invalid_token"
    listening = served.events("broker.listening")[0]
    assert listening["tls"] is True and listening["client_certificates"] is True


def test_a_request_sent_with_the_last_handshake_message_is_read(
    served: ClientCertBroker,
) -> None:
    answer = tls_with_the_request(served.port, client_context(served.certs, "front"), ws_get())
    assert answer.startswith(b"HTTP/1.1 401 "), answer


@pytest.mark.parametrize(
    ("shown", "reason"),
    [(None, "no certificate"), ("stranger", "unknown CA")],
)
def test_no_certificate_or_another_cas_fails_the_handshake(
    served: ClientCertBroker, shown: str | None, reason: str
) -> None:
    before = served.refused("http")
    requests = len(served.events("request.refused"))
    time.sleep(LOG_INTERVAL)  # the refusal gets a log line of its own
    assert tls_exchange(served.port, client_context(served.certs, shown), ws_get()) == b""
    logged = served.wait_refusal_logged(reason)
    assert logged["listener"] == "http" and logged["peer"] == "127.0.0.1"
    assert logged["level"] == "warning"
    served.wait_refused("http", before + 1)
    assert len(served.events("request.refused")) == requests  # no request was read


def test_a_subject_not_accepted_is_answered_403_before_its_request(
    served: ClientCertBroker,
) -> None:
    before = served.refused("http")
    time.sleep(LOG_INTERVAL)
    # the answer comes without a request: none is read
    answer = tls_exchange(served.port, client_context(served.certs, "intruder"))
    assert answer.startswith(b"HTTP/1.1 403 ") and b"client certificate not accepted" in answer
    logged = served.wait_refusal_logged(f"subject not accepted: {INTRUDER}")
    assert logged["peer"] == "127.0.0.1"
    served.wait_refused("http", before + 1)


def test_refusals_are_logged_at_most_once_a_second(served: ClientCertBroker) -> None:
    time.sleep(LOG_INTERVAL)
    before = served.refused("http")
    lines = len(served.events("tls.client_refused"))
    for _ in range(5):
        assert tls_exchange(served.port, client_context(served.certs, None), ws_get()) == b""
    served.wait_refused("http", before + 5)
    assert len(served.events("tls.client_refused")) <= lines + 2
    time.sleep(LOG_INTERVAL)
    tls_exchange(served.port, client_context(served.certs, "intruder"))
    logged = served.wait_event("tls.client_refused",
                               lambda event: event["reason"].startswith("subject"))
    assert logged["suppressed"] >= 3


# --- the CONNECT listener ----------------------------------------------------------------


def test_the_connect_listener_speaks_tls_and_requires_the_certificate(
    served: ClientCertBroker,
) -> None:
    port = served.connect_port
    assert port is not None
    target = f"not-a-handle:{TLS_PORT}"
    # a plain CONNECT head is no TLS handshake: closed without an answer
    assert plain_exchange(port, connect_head(target)) == b""
    served.wait_event("tls.handshake_failed", lambda event: event["listener"] == "connect")
    before = served.refused("connect")
    time.sleep(LOG_INTERVAL)
    assert tls_exchange(port, client_context(served.certs, None), connect_head(target)) == b""
    assert served.wait_refusal_logged("no certificate")["listener"] == "connect"
    time.sleep(LOG_INTERVAL)
    assert tls_exchange(port, client_context(served.certs, "stranger"),
                        connect_head(target)) == b""
    assert served.wait_refusal_logged("unknown CA")["listener"] == "connect"
    answer = tls_exchange(port, client_context(served.certs, "intruder"))
    assert answer.startswith(b"HTTP/1.1 403 ")
    served.wait_refused("connect", before + 3)
    # the front's certificate: the CONNECT head gets the broker's usual answer
    answer = tls_exchange(port, client_context(served.certs, "front"), connect_head(target))
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert served.events("request.refused")[-1]["route"] == "connect"


# --- whole sessions, in process: WebSocket, and TLS inside the tunnel's TLS -----------------


async def _echo(session: Session) -> None:
    await session.client.send(b"hello")
    try:
        while True:
            await session.client.send(await session.client.receive())
    except ClientClosed:
        pass


class Echo:
    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="echo", title="echo", console="vnc", native_clients=True,
                         handler=_echo)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_sessions_through_both_listeners(
    certs: dict[str, Path], issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    base = make_config()
    tls = TLSSection(cert=str(certs["server"]), key=str(certs["server-key"]),
                     client_ca=str(certs["ca"]), client_subjects=(FRONT,))
    config = evolve(base, listen=evolve(base.listen, connect_port=free_port()), tls=tls)
    server, client_certs = _ssl_context(config), _client_ssl_context(config)
    assert server is not None and server.verify_mode == ssl.CERT_NONE
    assert client_certs is not None and client_certs.verify_mode == ssl.CERT_REQUIRED
    front = client_context(certs, "front")
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("echo", Echo())])
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(config, verifier, resolver, plugins, ssl_context=server,
                              client_ssl_context=client_certs) as running:
        url = f"wss://127.0.0.1:{running.port}/ws/echo?token="
        async with ws_connect(url + issuer.issue(DOMAIN, "echo", ttl=60).token,
                              ssl=front) as ws:
            assert await ws.recv() == b"hello"
            await ws.send(b"over the front's TLS")
            assert await ws.recv() == b"over the front's TLS"
        # the tunnel: outer TLS (the front's), CONNECT, then the client's own TLS inside
        port = running.broker.connect_addresses[0][1]
        handle = handle_for_token(issuer.issue(DOMAIN, "echo", ttl=60).token)
        stream = await anyio.connect_tcp("127.0.0.1", port)
        outer = await TLSStream.wrap(stream, hostname="node", ssl_context=front,
                                     standard_compatible=False)
        await outer.send(connect_head(f"{handle}:{TLS_PORT}"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += await outer.receive(1)
        assert head.startswith(b"HTTP/1.1 200 ")
        inner = await TLSStream.wrap(outer, hostname="node",
                                     ssl_context=client_context(certs, None),
                                     standard_compatible=False)
        assert await inner.receive() == b"hello"
        await inner.send(b"tls in tls")
        assert await inner.receive() == b"tls in tls"
        await inner.aclose()
        # a WebSocket client without the certificate never reaches the token
        with pytest.raises((ssl.SSLError, ConnectionError, InvalidHandshake)):
            async with ws_connect(url + "x", ssl=client_context(certs, None)):
                pass
        registry = running.broker.metrics.registry
        assert registry.get_sample_value(
            "console_broker_connections_refused_total",
            {"listener": "http", "reason": "client_certificate"},
        ) == 1


# --- configuration ------------------------------------------------------------------------


def test_subjects_compare_as_names() -> None:
    assert rfc4514_name(FRONT_WRITTEN) == rfc4514_name(FRONT)
    assert rfc4514_name(" CN = front.console.example ,O=Example") == rfc4514_name(FRONT)
    assert rfc4514_name("CN=front.console.example") != rfc4514_name(FRONT)
    assert rfc4514_name("CN=Front.console.example,O=Example") != rfc4514_name(FRONT)
    assert rfc4514_name("CN=a\\, b,O=x").rfc4514_string() == "CN=a\\, b,O=x"
    assert rfc4514_name("CN=a\\ ,O=x").rfc4514_string() == "CN=a\\ ,O=x"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


TLS = '[tls]\ncert = "c.pem"\nkey = "k.pem"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tls]\nclient_subjects = ["CN=front"]\n',
         "tls.client_subjects: names accepted client certificates, but tls.client_ca"),
        (TLS + 'client_subjects = ["CN=front"]\n', "tls.client_ca (the CA that signs them)"),
        ('[tls]\nclient_ca = "ca.pem"\n', "tls.client_ca: client certificates need TLS"),
        (TLS + 'client_ca = "ca.pem"\nclient_subjects = ["front.console.example"]\n',
         "tls.client_subjects: 'front.console.example' is not an RFC 4514 name"),
        (TLS + 'client_ca = "ca.pem"\nclient_subjects = [""]\n', "is not an RFC 4514 name"),
        (TLS + 'client_ca = "ca.pem"\nclient_subjects = ["CN=a, C=USA"]\n',
         "is not an RFC 4514 name"),
        ('[broker]\npublic_connect_url = "http://front:7001"\n',
         "broker.public_connect_url: names a way to the CONNECT listener, which is off"),
        ('[listen]\nconnect_port = 6081\n[broker]\npublic_connect_url = "https://front:7001"\n',
         "broker.public_connect_url: must be an http:// URL with a host and a port"),
        ('[listen]\nconnect_port = 6081\n[broker]\npublic_connect_url = "http://front"\n',
         "broker.public_connect_url: must name its port"),
        ('[listen]\nconnect_port = 6081\n[broker]\npublic_connect_url = "http://f:99999"\n',
         "broker.public_connect_url: must have a port from 1 to 65535"),
        ('[listen]\nconnect_port = 6081\n[broker]\npublic_connect_url = "http://f:1/x"\n',
         "broker.public_connect_url: must be http://host:port, with nothing after the port"),
        ('[listen]\nconnect_port = 6081\n[broker]\npublic_connect_url = "http://u@f:1"\n',
         "broker.public_connect_url: must not hold a user name or password"),
    ],
)
def test_configuration_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_paths_are_relative_to_the_file_and_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, TLS + 'client_ca = "front-ca.pem"\n'
                  f'client_subjects = ["{FRONT_WRITTEN}"]\n'
                  '[listen]\nconnect_port = 6081\n'
                  '[broker]\npublic_connect_url = "http://Console.Example:7001/"\n')
    config = load_config(path)
    assert config.tls.client_ca == str(tmp_path / "front-ca.pem")
    assert config.tls.client_subjects == (FRONT_WRITTEN,)
    assert config.connect_proxy_url == "http://console.example:7001"
    checked = subprocess.run([*CLI, "config", "--check", str(path)], capture_output=True,
                             text=True)
    assert checked.returncode != 0
    assert "tls.cert" in checked.stderr  # the first file missing
    certs = make_certificates(tmp_path / "tls")
    path.write_text(path.read_text().replace('"c.pem"', f'"{certs["server"]}"')
                    .replace('"k.pem"', f'"{certs["server-key"]}"'))
    checked = subprocess.run([*CLI, "config", "--check", str(path)], capture_output=True,
                             text=True)
    assert checked.returncode != 0
    assert f"tls.client_ca: {tmp_path / 'front-ca.pem'}: no such file" in checked.stderr
    # serve cannot load a CA that is no PEM
    (tmp_path / "front-ca.pem").write_text("not a certificate\n")
    with pytest.raises(CommandError, match=r"tls\.client_ca: cannot load the CA"):
        _client_ssl_context(load_config(path))
