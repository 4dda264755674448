"""The operator page and its token, with a served broker on libvirt's test driver.

The driver's node file (written here) holds ``web1``, running, its VNC and serial
consoles enabled by ``console-broker xml enable``, and ``idle``, shut off, with none.
No libvirtd runs: the test driver lives in the broker's process.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from servedbroker import CLI, ServedBroker
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from broker import Protocol, hookimpl
from broker.config import Config
from broker.keys import load_public_keys
from broker.plugins import PluginError, PluginManager
from broker.service._operator import (
    MAX_MESSAGE,
    Bucket,
    ListDomains,
    OpenConsole,
    OperatorError,
    Operators,
    Ping,
    parse,
)
from broker.tokens import NO_DOMAIN, Claims, InvalidToken, ReplayCache, TokenVerifier

WEB1 = "6695eb01-f6a4-8304-79aa-97f2502e193f"
IDLE = "1b0f3b9e-8a53-4a34-9d6b-0b8c2b1f7a10"
UNKNOWN = "0f0f0f0f-1111-2222-3333-444455556666"
SUBPROTOCOL = "console-broker.operator.v1"

_DOMAIN = """<domain type='test'>
  <name>web1</name>
  <uuid>{uuid}</uuid>
  <memory>131072</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
"""
_IDLE = f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>idle</name>
  <uuid>{IDLE}</uuid>
  <test:runstate>5</test:runstate>
  <memory>131072</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""


def node_file(directory: Path) -> Path:
    """The test driver's node: web1 with VNC and serial enabled, idle shut off."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", "--consoles", "vnc,serial", "-"],
        input=_DOMAIN.format(uuid=WEB1), check=True, capture_output=True, text=True,
    ).stdout
    path = directory / "node.xml"
    path.write_text(f"<node>\n{enabled}\n{_IDLE}</node>\n")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    directory = tmp_path_factory.mktemp("operator")
    node = node_file(directory)
    broker = ServedBroker(directory, protocol="vnc",
                          extra_config=f'[libvirt]\nuri = "test://{node}"\n')
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


def operator_token(served: ServedBroker, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(served.cli("token", "--operator", "--json", *extra))
    served.tokens.append(doc["token"])
    return doc


def open_operator(served: ServedBroker, url: str, origin: str | None = None) -> ClientConnection:
    return connect(url, subprotocols=[Subprotocol(SUBPROTOCOL)],
                   origin=Origin(origin if origin is not None else served.url), open_timeout=10)


def ask(ws: ClientConnection, message: str | bytes) -> dict[str, Any]:
    ws.send(message)
    answer = json.loads(ws.recv(timeout=10))
    assert isinstance(answer, dict)
    return answer


@pytest.fixture
def session(served: ServedBroker) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """An open operator session (named ``Alice``) and its ``hello``."""
    doc = operator_token(served, "--name", "Alice")
    with open_operator(served, doc["websocket"]) as ws:
        hello = json.loads(ws.recv(timeout=10))
        yield ws, hello


def verifier(served: ServedBroker) -> TokenVerifier:
    """A verifier trusting the served broker's own key (what it signs with)."""
    keys = load_public_keys([served.directory / "state" / "signing-key.pub.pem"])
    return TokenVerifier(keys, replay_cache=ReplayCache(10))


# --- the token -------------------------------------------------------------------------------


def test_token_operator_prints_the_page_url(served: ServedBroker) -> None:
    doc = operator_token(served, "--name", "Alice Martin", "--ttl", "30")
    assert doc["page"].startswith(f"{served.url}/operator/?token=")
    assert doc["websocket"].startswith(f"ws://127.0.0.1:{served.port}/operator/ws?token=")
    assert parse_qs(urlsplit(doc["page"]).query)["token"] == [doc["token"]]
    assert doc["protocol"] == "operator" and doc["node"] == "testnode"
    assert doc["name"] == "Alice Martin"
    claims = verifier(served).verify(doc["token"], protocol="operator", node="testnode")
    assert claims.operator and claims.domain_uuid == NO_DOMAIN and not claims.view_only
    assert claims.expires_at - claims.issued_at == 30
    text = served.cli("token", "--operator")
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["purpose"].strip() == "operator page, node testnode"
    assert "single use" in lines["expires"]
    assert lines["page"].strip().startswith(f"{served.url}/operator/?token=")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["web1"], "DOMAIN"),
        (["--protocol", "vnc"], "--protocol"),
        (["--view-only"], "--view-only"),
        (["--recording", "0badcafe"], "--recording"),
        (["--name", "\n"], "--name"),
        (["--ttl", "100000"], "--ttl"),
    ],
)
def test_token_operator_usage_errors(served: ServedBroker, args: list[str], says: str) -> None:
    done = subprocess.run(
        [*CLI, "token", "--operator", *args, "--config", str(served.config)],
        capture_output=True, text=True, env=served.env,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and done.stdout == ""


def test_operator_claims_go_together() -> None:
    base = {"aud": "console-broker", "node": "n", "rights": "full", "iat": 1, "nbf": 1,
            "exp": 60, "jti": "j"}
    assert Claims.from_payload({**base, "sub": NO_DOMAIN, "proto": "operator"}).operator
    for bad in (
        {"sub": NO_DOMAIN, "proto": "vnc"},           # a console token for no domain
        {"sub": WEB1, "proto": "operator"},           # an operator token for a domain
        {"sub": NO_DOMAIN, "proto": "operator", "rights": "view"},
        {"sub": NO_DOMAIN, "proto": "operator", "dev": "serial0"},
    ):
        with pytest.raises(InvalidToken):
            Claims.from_payload({**base, **bad})


def test_no_plugin_may_declare_the_operator_protocol() -> None:
    class Squatter:
        @staticmethod
        @hookimpl
        def console_broker_protocols() -> list[Protocol]:
            return [Protocol(name="operator", title="not the core's")]

    with pytest.raises(PluginError, match=r"'operator'.*core's own"):
        PluginManager(load_entrypoints=False, plugins=[("squatter", Squatter)])


# --- tokens of one kind are refused where the other goes ---------------------------------------


def test_a_console_endpoint_refuses_an_operator_token(served: ServedBroker) -> None:
    doc = operator_token(served)
    token = doc["token"]
    for path, status in ((f"/ws/vnc?token={token}", 403), (f"/ws/operator?token={token}", 404)):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{served.port}{path}", origin=Origin(served.url),
                    open_timeout=10)
        assert refused.value.response.status_code == status
    assert served.get(f"/screenshot?token={token}")[0] == 403
    assert served.get(f"/file/vnc?token={token}")[0] == 404
    # refused without being used up: it still opens the operator page's session
    with open_operator(served, doc["websocket"]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


def test_the_operator_page_refuses_a_console_token(served: ServedBroker) -> None:
    console = served.token("web1")
    with pytest.raises(InvalidStatus) as refused:
        open_operator(served, f"ws://127.0.0.1:{served.port}/operator/ws?token={console['token']}")
    assert refused.value.response.status_code == 403  # wrong_protocol
    assert any(e["reason"] == "wrong_protocol" for e in served.events("request.refused"))


def test_an_operator_token_opens_one_session_only(served: ServedBroker) -> None:
    doc = operator_token(served)
    with open_operator(served, doc["websocket"]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        with pytest.raises(InvalidStatus) as refused:
            open_operator(served, doc["websocket"])
        assert refused.value.response.status_code == 401  # replayed_token
    with pytest.raises(InvalidStatus):
        open_operator(served, doc["websocket"])


def test_a_foreign_origin_is_refused(served: ServedBroker) -> None:
    doc = operator_token(served)
    with pytest.raises(InvalidStatus) as refused:
        open_operator(served, doc["websocket"], origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with open_operator(served, doc["websocket"]) as ws:  # not used up by the refusal
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"


# --- the session ------------------------------------------------------------------------------


def test_hello_and_the_domain_list(session: tuple[ClientConnection, dict[str, Any]]) -> None:
    ws, hello = session
    assert hello["type"] == "hello" and hello["node"] == "testnode" and hello["name"] == "Alice"
    assert hello["minting"] is True
    pages = {p["name"]: p["page"] for p in hello["protocols"]}
    assert pages == {"serial": "/console/serial/", "spice": "/console/spice/",
                     "vnc": "/console/vnc/"}
    answer = ask(ws, json.dumps({"type": "domains", "id": "list-1"}))
    assert answer["type"] == "domains" and answer["id"] == "list-1"
    domains = {d["name"]: d for d in answer["domains"]}
    assert domains["web1"] == {"uuid": WEB1, "name": "web1", "state": "running",
                               "running": True, "consoles": ["serial", "vnc"], "sessions": []}
    assert domains["idle"]["state"] == "shut off" and domains["idle"]["running"] is False
    assert domains["idle"]["consoles"] == []


def test_minting_a_console_token(
    served: ServedBroker, session: tuple[ClientConnection, dict[str, Any]]
) -> None:
    ws, _ = session
    answer = ask(ws, json.dumps({"type": "open", "domain": WEB1, "protocol": "vnc", "id": 7}))
    assert answer["type"] == "opened" and answer["id"] == 7, answer
    assert answer["domain"] == {"uuid": WEB1, "name": "web1"} and answer["protocol"] == "vnc"
    assert answer["page"].startswith(f"{served.url}/console/vnc/?token=")
    token = parse_qs(urlsplit(answer["page"]).query)["token"][0]
    served.tokens.append(token)
    claims = verifier(served).verify(token, protocol="vnc", node="testnode", domain=WEB1)
    assert claims.name == "Alice" and not claims.view_only and claims.jti == answer["jti"]
    assert claims.expires_at - claims.issued_at == 60  # tokens.default_ttl
    viewer = ask(ws, json.dumps({"type": "open", "domain": WEB1, "protocol": "vnc",
                                 "view_only": True}))
    token = parse_qs(urlsplit(viewer["page"]).query)["token"][0]
    served.tokens.append(token)
    assert verifier(served).verify(token, protocol="vnc").view_only
    minted = served.events("operator.minted")
    assert {e["minted"] for e in minted} >= {answer["jti"], viewer["jti"]}
    assert all(e["name"] == "Alice" and e["domain"] == WEB1 for e in minted)


@pytest.mark.parametrize(
    ("request_doc", "code"),
    [
        ({"domain": UNKNOWN, "protocol": "vnc"}, "unknown_domain"),
        ({"domain": WEB1, "protocol": "telnet"}, "unknown_protocol"),
        ({"domain": WEB1, "protocol": "spice"}, "console_not_enabled"),
        ({"domain": IDLE, "protocol": "vnc"}, "vm_not_running"),
        ({"domain": "web1", "protocol": "vnc"}, "bad_message"),  # a name, not a UUID
    ],
)
def test_what_cannot_be_minted_is_refused_and_the_session_goes_on(
    session: tuple[ClientConnection, dict[str, Any]], request_doc: dict[str, str], code: str
) -> None:
    ws, _ = session
    answer = ask(ws, json.dumps({"type": "open", "id": "x", **request_doc}))
    assert answer["type"] == "error" and answer["error"] == code and answer["id"] == "x"
    assert answer["message"]
    assert ask(ws, '{"type": "ping", "data": "still"}') == {"type": "pong", "data": "still"}


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x00binary", "bad_message"),
        ("not json", "bad_message"),
        ("[1, 2]", "bad_message"),
        ('{"no": "type"}', "bad_message"),
        ('{"type": "reboot"}', "unknown_type"),
        ('{"type": "open", "domain": 5, "protocol": "vnc"}', "bad_message"),
        ('{"type": "domains", "id": {"a": 1}}', "bad_message"),
        (json.dumps({"type": "ping", "data": "x" * MAX_MESSAGE}), "bad_message"),
    ],
)
def test_garbled_messages_are_refused_clearly(
    session: tuple[ClientConnection, dict[str, Any]], message: str | bytes, code: str
) -> None:
    ws, _ = session
    answer = ask(ws, message)
    assert answer["type"] == "error" and answer["error"] == code, answer
    assert ask(ws, '{"type": "ping"}')["type"] == "pong"


def test_the_page_and_its_files(served: ServedBroker) -> None:
    status, body = served.get("/operator/?token=anything")  # the page checks no token
    assert status == 200 and b"operator.js" in body
    assert served.get("/operator/operator.js")[0] == 200
    assert served.get("/operator/operator.css")[0] == 200
    assert served.get("/operator/nothing.js")[0] == 404
    assert served.get("/operator/ws?token=x")[0] == 426  # a WebSocket endpoint
    assert served.get("/operator/ws")[0] == 401  # no token
    assert served.get("/operator")[0] == 200  # redirected to /operator/
    reply = urllib.request.urlopen(f"{served.url}/operator/", timeout=5)
    csp = reply.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert reply.headers["Referrer-Policy"] == "no-referrer"


# --- sans-I/O ---------------------------------------------------------------------------------


def test_parse() -> None:
    assert parse('{"type": "domains"}') == ListDomains()
    assert parse('{"type": "ping", "id": 3}') == Ping(None, 3)
    upper = WEB1.upper()
    opened = parse(json.dumps({"type": "open", "domain": upper, "protocol": "vnc",
                               "view_only": True, "id": "a"}))
    assert opened == OpenConsole(WEB1, "vnc", True, "a")
    with pytest.raises(OperatorError) as refused:
        parse(json.dumps({"type": "open", "domain": WEB1, "protocol": "vnc", "view_only": 1,
                          "id": 9}))
    assert refused.value.code == "bad_message" and refused.value.request_id == 9
    with pytest.raises(OperatorError, match="at most 64"):
        parse(json.dumps({"type": "domains", "id": "x" * 65}))


def test_the_rate_limit_bucket() -> None:
    now = [100.0]
    bucket = Bucket(3, 2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(2.0)  # empty: one more in 2 s
    now[0] += 1.0
    assert bucket.take() == pytest.approx(1.0)
    now[0] += 1.0
    assert bucket.take() == 0.0
    now[0] += 1000.0  # refills up to the burst, no more
    assert [bucket.take() for _ in range(4)][-1] > 0




def test_a_request_beyond_the_rate_is_refused_before_any_work() -> None:
    async def no_sessions() -> list[dict[str, Any]]:
        raise AssertionError("not asked")

    key = Ed25519PrivateKey.generate()
    verifier = TokenVerifier([key.public_key()], replay_cache=ReplayCache(1))
    operators = Operators(Config(), verifier, {}, object(), None,  # type: ignore[arg-type]
                          no_sessions)
    operator = Claims.from_payload({"aud": "console-broker", "sub": NO_DOMAIN,
                                    "proto": "operator", "node": "n", "rights": "full",
                                    "iat": 1, "nbf": 1, "exp": 60, "jti": "j"})
    now = [0.0]
    empty = Bucket(1, 2.0, clock=lambda: now[0])
    empty.take()

    async def main() -> None:
        for request in (ListDomains("l"), OpenConsole(WEB1, "vnc", False, "o")):
            with pytest.raises(OperatorError) as refused:
                await operators.answer(request, operator, empty, empty, None)
            assert refused.value.code == "rate_limited" and "2 s" in refused.value.message
            assert refused.value.request_id == request.id

    anyio.run(main)


def test_the_broker_ends_operator_sessions_when_it_stops(tmp_path: Path) -> None:
    broker = ServedBroker(tmp_path, extra_config='[libvirt]\nuri = "test:///default"\n')
    try:
        doc = operator_token(broker)
        with open_operator(broker, doc["websocket"]) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            broker.stop()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1001
    finally:
        broker.stop()
    closed = broker.events("operator.closed")
    assert [e["reason"] for e in closed] == ["shutdown"]


def test_the_operator_page_with_worker_processes(tmp_path: Path) -> None:
    """With ``service.workers``, whichever worker accepts the page's WebSocket, the session
    opens once, lists the domains and mints."""
    node = node_file(tmp_path)
    broker = ServedBroker(
        tmp_path, extra_config=f'[libvirt]\nuri = "test://{node}"\n[service]\nworkers = 2\n'
    )
    try:
        doc = operator_token(broker, "--name", "Bob")
        with open_operator(broker, doc["websocket"]) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            listed = ask(ws, '{"type": "domains"}')
            assert {d["name"] for d in listed["domains"]} == {"web1", "idle"}
            opened = ask(ws, json.dumps({"type": "open", "domain": WEB1, "protocol": "serial"}))
            assert opened["type"] == "opened", opened
            broker.tokens.append(parse_qs(urlsplit(opened["page"]).query)["token"][0])
            for _ in range(4):  # the token is used on every worker alike
                with pytest.raises(InvalidStatus) as refused:
                    open_operator(broker, doc["websocket"])
                assert refused.value.response.status_code == 401
    finally:
        broker.stop()
    broker.assert_no_token_logged()
