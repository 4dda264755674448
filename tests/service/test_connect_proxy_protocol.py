"""listen.connect_proxy_protocol: the CONNECT listener reads the client's address from the
PROXY protocol v1 header a trusted TCP relay (a front door's nginx stream proxy) opens
each connection with: against a served broker (plain, and with client certificates: the
header, then TLS, then CONNECT), in process for the per-client limits, and the
configuration's checks."""

from __future__ import annotations

import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from attrs import evolve
from brokerkit import FakeDomain, FakeResolver, free_port, make_config, running_broker
from certs import make_certificates
from conftest import DOMAIN
from servedbroker import ServedBroker

from broker import Protocol, hookimpl
from broker.config import (
    ConfigError,
    HTTPSection,
    LimitsSection,
    TLSSection,
    config_from_dict,
)
from broker.plugins import PluginManager
from broker.service import ClientClosed, Session
from broker.service._connect import (
    PLAIN_PORT,
    TLS_PORT,
    UNEXPECTED_PROXY_HEADER,
    handle_for_token,
)
from broker.service._gate import ConnectionGate
from broker.service._metrics import Metrics
from broker.service._request import TrustedProxies
from broker.service.cli import _client_ssl_context, _ssl_context
from broker.tokens import TokenIssuer, TokenVerifier

#: The client a front names in its headers, and another.
CLIENT, OTHER = "203.0.113.7", "203.0.113.8"
FRONT_SUBJECT = "CN=front.console.example,O=Example"
REFUSED_METRIC = re.compile(
    r'^console_broker_connections_refused_total\{listener="connect",reason="proxy_protocol"\}'
    r" (\S+)$",
    re.MULTILINE,
)


def proxy_line(client: str = CLIENT, port: int = 7001) -> bytes:
    """What nginx's stream module sends first (``proxy_protocol on``)."""
    return f"PROXY TCP4 {client} 192.0.2.10 51234 {port}\r\n".encode()


def connect_head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def exchange(port: int, send: bytes, source: str = "127.0.0.1") -> bytes:
    """*send* in one write from *source* to *port*; what comes back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(send)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionError:
            pass
        return received


class RelayedBroker(ServedBroker):
    """A served broker whose CONNECT listener reads PROXY headers, trusting 127.0.0.1
    (the front); with *certs*, also TLS whose listeners require the front's certificate
    (its own requests show it)."""

    def __init__(self, directory: Path, certs: dict[str, Path] | None = None) -> None:
        self.certs = certs
        # libvirt's test driver: these tests need no hypervisor, only one that answers.
        extra = '[libvirt]\nuri = "test:///default"\n'
        if certs is not None:
            extra += (
                f'[tls]\ncert = "{certs["server"]}"\nkey = "{certs["server-key"]}"\n'
                f'ca = "{certs["ca"]}"\nclient_ca = "{certs["ca"]}"\n'
                f'client_subjects = ["{FRONT_SUBJECT}"]\n'
            )
        super().__init__(
            directory, protocol="vnc", connect_port=True, extra_config=extra,
            listen_config="connect_proxy_protocol = true\n",
            http_config='trusted_proxies = ["127.0.0.1"]\n',
            limits_config="handshake_timeout = 2\n",
        )

    @property
    def url(self) -> str:
        return f"{'http' if self.certs is None else 'https'}://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        if self.certs is None:
            return super().get(path)
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5,
                                        context=front_context(self.certs)) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The last log line *name* that *match* accepts, once written."""
        deadline = time.monotonic() + 10
        while True:
            found = [event for event in self.events(name) if match(event)]
            if found or time.monotonic() > deadline:
                assert found, self.log_text()[-3000:]
                return found[-1]
            time.sleep(0.05)

    def proxy_refusals(self) -> float:
        """``connections_refused_total{listener="connect", reason="proxy_protocol"}``."""
        status, body = self.get("/metrics")
        assert status == 200
        found = REFUSED_METRIC.search(body.decode())
        return float(found[1]) if found else 0.0


def front_context(certs: dict[str, Path], shown: str | None = "front") -> ssl.SSLContext:
    """A client trusting the node's CA (no name check), showing *shown*'s certificate."""
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.check_hostname = False
    if shown is not None:
        context.load_cert_chain(certs[shown], certs[f"{shown}-key"])
    return context


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayedBroker]:
    broker = RelayedBroker(tmp_path_factory.mktemp("relayed"))
    try:
        yield broker
    finally:
        broker.stop()
    assert "Traceback" not in broker.log_text()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"), clients={"front": FRONT_SUBJECT})


@pytest.fixture(scope="module")
def served_tls(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]
) -> Iterator[RelayedBroker]:
    broker = RelayedBroker(tmp_path_factory.mktemp("relayed-tls"), certs)
    try:
        yield broker
    finally:
        broker.stop()
    assert "Traceback" not in broker.log_text()


# --- a served broker ------------------------------------------------------------------------


def test_the_headers_client_is_the_sessions(served: RelayedBroker) -> None:
    """A header naming 203.0.113.7, then a CONNECT with a bad handle: the broker's usual
    refusal, logged with the header's client; the header and the CONNECT head may come
    in one segment (nginx sends them so without proxy_ssl)."""
    assert served.connect_port is not None
    head = connect_head(f"not-a-handle:{PLAIN_PORT}")
    answer = exchange(served.connect_port, proxy_line() + head)
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    refused = served.wait_event("request.refused", lambda event: event.get("route") == "connect")
    assert (refused["client"], refused["reason"]) == (CLIENT, "invalid_token")
    assert served.events("broker.connect_listening")[0]["proxy_protocol"] is True


def test_unknown_means_the_peer(served: RelayedBroker) -> None:
    assert served.connect_port is not None
    answer = exchange(served.connect_port,
                      b"PROXY UNKNOWN\r\n" + connect_head(f"still-not-a-handle:{PLAIN_PORT}"))
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    refused = served.wait_event("request.refused", lambda event: event.get("route") == "connect")
    assert refused["client"] == "127.0.0.1"


def test_no_header_is_refused(served: RelayedBroker) -> None:
    """A CONNECT without the header: closed without an answer, and the node's log says
    what came instead."""
    assert served.connect_port is not None
    before = served.proxy_refusals()
    assert exchange(served.connect_port, connect_head(f"not-a-handle:{PLAIN_PORT}")) == b""
    logged = served.wait_event("connect.proxy_refused",
                               lambda event: "'CONNECT'" in event["detail"])
    assert logged["peer"] == "127.0.0.1" and logged["level"] == "warning"
    assert logged["detail"] == "no PROXY header: the connection starts with 'CONNECT'"
    assert served.proxy_refusals() == before + 1


def test_a_version_2_header_is_refused_clearly(served: RelayedBroker) -> None:
    assert served.connect_port is not None
    v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12)
    assert exchange(served.connect_port, v2 + connect_head(f"x:{PLAIN_PORT}")) == b""
    served.wait_event("connect.proxy_refused",
                      lambda event: event["detail"].startswith("PROXY v2 not supported"))


def test_a_header_that_never_comes_is_refused_in_time(served: RelayedBroker) -> None:
    """limits.handshake_timeout (2 s here) for the header too."""
    assert served.connect_port is not None
    with socket.create_connection(("127.0.0.1", served.connect_port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7")
        assert sock.recv(100) == b""  # closed, for the reason the log names below
    served.wait_event("connect.proxy_refused", lambda event: event["detail"] ==
                      "no PROXY header within 2 s (limits.handshake_timeout)")


def test_a_header_from_a_peer_not_trusted_is_refused(served: RelayedBroker) -> None:
    """127.0.0.2 is not in http.trusted_proxies: its header is not believed, and the
    connection is refused whatever follows."""
    assert served.connect_port is not None
    requests = len(served.events("request.refused"))
    answer = exchange(served.connect_port,
                      proxy_line() + connect_head(f"not-a-handle:{PLAIN_PORT}"),
                      source="127.0.0.2")
    assert answer == b""
    logged = served.wait_event("connect.proxy_refused",
                               lambda event: event["peer"] == "127.0.0.2")
    assert logged["detail"] == (
        f"a PROXY header from a peer not in http.trusted_proxies (it named {CLIENT})"
    )
    assert len(served.events("request.refused")) == requests  # its CONNECT was not read


def test_with_client_certificates_the_header_comes_before_the_tls(
    served_tls: RelayedBroker, certs: dict[str, Path]
) -> None:
    """The header in the clear, then the front's TLS with its certificate, then the
    CONNECT: the broker's own answer, inside the TLS, with the header's client."""
    port = served_tls.connect_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(proxy_line(OTHER))
        with front_context(certs).wrap_socket(sock) as tls:
            tls.sendall(connect_head(f"not-a-handle:{TLS_PORT}"))
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    refused = served_tls.wait_event("request.refused",
                                    lambda event: event.get("route") == "connect")
    assert refused["client"] == OTHER
    # TLS without the header first: its ClientHello is no PROXY header
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        pytest.raises((ssl.SSLError, ConnectionError)),
        front_context(certs).wrap_socket(sock) as tls,
    ):
        tls.sendall(connect_head(f"not-a-handle:{TLS_PORT}"))
        assert tls.recv(100) == b""
    logged = served_tls.wait_event(
        "connect.proxy_refused",
        lambda event: event["detail"] == "no PROXY header: the connection starts with a "
        "TLS handshake",
    )
    assert logged["peer"] == "127.0.0.1"


# --- in process: the per-client limits count the header's client ---------------------------


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


def relayed_config(**limits: Any) -> Any:
    base = make_config(http=HTTPSection(allow_missing_origin=True,
                                        trusted_proxies=("127.0.0.1",)),
                       limits=LimitsSection(**limits))
    return evolve(base, listen=evolve(base.listen, connect_port=free_port(),
                                      connect_proxy_protocol=True))


async def _tunnel(port: int, client: str, handle: str) -> tuple[anyio.abc.SocketStream, bytes]:
    """A relayed CONNECT for *client*: the stream and the head of the answer."""
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(proxy_line(client) + connect_head(f"{handle}:{PLAIN_PORT}"))
    answer = b""
    with anyio.fail_after(10):
        while b"\r\n\r\n" not in answer:
            try:
                answer += await stream.receive(1)
            except anyio.EndOfStream:
                break
    return stream, answer


@pytest.mark.anyio
async def test_sessions_per_client_count_the_headers_address(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """limits.max_sessions_per_client = 1: a second session for 203.0.113.7 is refused,
    one for 203.0.113.8 through the same front is not."""
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("echo", Echo())])
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(relayed_config(max_sessions_per_client=1), verifier, resolver,
                              plugins) as running:
        port = running.broker.connect_addresses[0][1]

        def handle() -> str:
            return handle_for_token(issuer.issue(DOMAIN, "echo", ttl=60).token)

        first, answer = await _tunnel(port, CLIENT, handle())
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert await first.receive() == b"hello"
        second, answer = await _tunnel(port, CLIENT, handle())
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        await second.aclose()
        third, answer = await _tunnel(port, OTHER, handle())
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert await third.receive() == b"hello"
        for stream in (first, third):
            await stream.aclose()


@pytest.mark.anyio
async def test_pending_connections_per_client_count_the_headers_address(
    verifier: TokenVerifier,
) -> None:
    """limits.max_pending_per_client = 2: a third connection whose header names the same
    client is answered 429 once the header is read; the front (trusted) and another
    client are not held back."""
    async with running_broker(relayed_config(max_pending_per_client=2, handshake_timeout=30),
                              verifier, FakeResolver()) as running:
        port = running.broker.connect_addresses[0][1]
        gate = running.broker._gate
        held = []
        for _ in range(2):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.send(proxy_line(CLIENT))  # no CONNECT head yet: pending
            held.append(stream)
        with anyio.fail_after(5):
            while gate._by_peer[CLIENT] < 2:
                await anyio.sleep(0.01)
        assert gate._by_peer["127.0.0.1"] == 0  # the front's count went to the client
        stream, answer = await _tunnel(port, CLIENT, "not-a-handle")
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        await stream.aclose()
        stream, answer = await _tunnel(port, OTHER, "not-a-handle")
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        await stream.aclose()
        for stream in held:
            await stream.aclose()
        with anyio.fail_after(5):
            while gate.pending:
                await anyio.sleep(0.01)
        registry = running.broker.metrics.registry
        assert registry.get_sample_value(
            "console_broker_connections_refused_total",
            {"listener": "connect", "reason": "client_pending_limit"},
        ) == 1


@pytest.mark.anyio
async def test_a_header_where_none_is_expected_is_refused_with_a_reason(
    verifier: TokenVerifier, certs: dict[str, Path]
) -> None:
    """The key off (a front sending PROXY headers to a node that was not told): without
    TLS the CONNECT parser answers 400 naming the key; with client certificates, where
    the header would only fail the TLS handshake, a warning names it (and an ordinary
    TLS client still gets through)."""
    base = make_config(http=HTTPSection(allow_missing_origin=True,
                                        trusted_proxies=("127.0.0.1",)))
    plain = evolve(base, listen=evolve(base.listen, connect_port=free_port()))
    with structlog.testing.capture_logs() as logs:
        async with running_broker(plain, verifier, FakeResolver()) as running:
            port = running.broker.connect_addresses[0][1]
            answer = await anyio.to_thread.run_sync(
                exchange, port, proxy_line() + connect_head(f"x:{PLAIN_PORT}"))
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    refused = [e for e in logs if e["event"] == "connect.refused"]
    assert refused[-1]["detail"] == UNEXPECTED_PROXY_HEADER
    assert "listen.connect_proxy_protocol is off" in UNEXPECTED_PROXY_HEADER

    tls = TLSSection(cert=str(certs["server"]), key=str(certs["server-key"]),
                     client_ca=str(certs["ca"]))
    with_certs = evolve(plain, listen=evolve(plain.listen, connect_port=free_port()), tls=tls)
    with structlog.testing.capture_logs() as logs:
        async with running_broker(with_certs, verifier, FakeResolver(),
                                  ssl_context=_ssl_context(with_certs),
                                  client_ssl_context=_client_ssl_context(with_certs)) as running:
            port = running.broker.connect_addresses[0][1]
            answer = await anyio.to_thread.run_sync(
                exchange, port, proxy_line() + b"\x16\x03\x01\x00\xb7\x01\x00")
            assert answer == b""

            def through_tls() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                        front_context(certs).wrap_socket(sock) as tls:
                    tls.sendall(connect_head(f"not-a-handle:{TLS_PORT}"))
                    answer = b""
                    while chunk := tls.recv(65536):
                        answer += chunk
                    return answer

            assert (await anyio.to_thread.run_sync(through_tls)).startswith(b"HTTP/1.1 401 ")
            registry = running.broker.metrics.registry
            assert registry.get_sample_value(
                "console_broker_connections_refused_total",
                {"listener": "connect", "reason": "proxy_protocol"},
            ) == 1
    warned = [e for e in logs if e["event"] == "connect.proxy_refused"]
    assert [(e["peer"], e["detail"], e["log_level"]) for e in warned] == [
        ("127.0.0.1", UNEXPECTED_PROXY_HEADER, "warning")
    ]


def test_the_gate_moves_a_connection_to_its_client() -> None:
    gate = ConnectionGate(total=10, per_client=1, proxies=TrustedProxies(["10.0.0.5"]),
                          metrics=Metrics())
    assert gate.enter("10.0.0.5", "connect") is None
    assert gate.enter("10.0.0.5", "connect") is None
    assert gate.move("10.0.0.5", CLIENT, "connect") is None
    refused = gate.move("10.0.0.5", CLIENT, "connect")
    assert refused is not None and refused.status == 429
    assert gate.move("10.0.0.5", "10.0.0.5", "connect") is None  # UNKNOWN: stays the peer's
    gate.leave(CLIENT, "connect")
    gate.leave("10.0.0.5", "connect")
    assert gate.pending == 0 and not gate._by_peer


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": {"connect_proxy_protocol": True},
          "http": {"trusted_proxies": ["10.0.2.0/24"]}},
         "listen.connect_proxy_protocol: reads a PROXY header on the CONNECT listener, "
         "which is off (listen.connect_port = 0)"),
        ({"listen": {"connect_proxy_protocol": True, "connect_port": 6081}},
         "listen.connect_proxy_protocol: the PROXY header is believed only from "
         "http.trusted_proxies, which is empty"),
        ({"listen": {"connect_proxy_protocol": "yes", "connect_port": 6081}},
         "listen.connect_proxy_protocol"),
    ],
)
def test_configuration_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert message in str(info.value)


def test_the_key_is_off_by_default() -> None:
    assert config_from_dict({}).listen.connect_proxy_protocol is False
    config = config_from_dict({"listen": {"connect_proxy_protocol": True, "connect_port": 6081},
                               "http": {"trusted_proxies": ["10.0.2.0/24"]}})
    assert config.listen.connect_proxy_protocol is True
