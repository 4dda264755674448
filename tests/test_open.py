"""``console-broker open`` without a VM: what the URL names, the options, the errors, and
the NativeClient's parts against real sockets in process (a WebSocket server standing
in for the broker)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.abc
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

import broker.plugins
from broker import native
from broker.cli import build_parser, main
from broker.hookspecs import OPEN_FLAGS, OpenOption, Protocol, hookimpl
from broker.native import (
    BridgeEnd,
    NativeClient,
    OpenError,
    parse_listen,
    parse_target,
    token_protocol,
)
from broker.plugins import PluginError, PluginManager

CLI = [sys.executable, "-m", "broker.cli"]


def fake_token(proto: str | None = "vnc", **claims: Any) -> str:
    """A token-shaped string whose claims hold *proto* (never verified here)."""
    body = {"aud": "console-broker", **({"proto": proto} if proto else {}), **claims}

    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part(body)}.c2lnbmF0dXJl"


TOKEN = fake_token()


# --- what a URL names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base", "protocol"),
    [
        (f"http://127.0.0.1:6080/console/vnc/?token={TOKEN}", "http://127.0.0.1:6080", "vnc"),
        (f"https://c.example/console/vnc?token={TOKEN}", "https://c.example", "vnc"),
        (f"ws://127.0.0.1:6080/ws/vnc?token={TOKEN}", "http://127.0.0.1:6080", "vnc"),
        (f"wss://c.example:8443/hv1/ws/vnc?token={TOKEN}", "https://c.example:8443/hv1", "vnc"),
        (f"https://c.example/file/vnc?token={TOKEN}", "https://c.example", "vnc"),
        # a cluster's front door: the node's prefix
        (f"https://console.example/n/node1/console/vnc/?token={TOKEN}",
         "https://console.example/n/node1", "vnc"),
        (f"wss://console.example/n/node1/ws/vnc?token={TOKEN}",
         "https://console.example/n/node1", "vnc"),
        (f"HTTPS://[::1]:6080/console/vnc/?token={TOKEN}", "https://[::1]:6080", "vnc"),
    ],
)
def test_a_console_url_names_the_broker_protocol_and_token(
    url: str, base: str, protocol: str
) -> None:
    target = parse_target(url)
    assert (target.base_url, target.protocol, target.token) == (base, protocol, TOKEN)
    assert TOKEN not in repr(target)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://console.example/n/node1", "https://console.example/n/node1"),
        ("https://console.example/n/node1/", "https://console.example/n/node1"),
        ("http://127.0.0.1:6080", "http://127.0.0.1:6080"),
        ("wss://c.example", "https://c.example"),
    ],
)
def test_a_base_url_and_token_take_the_protocol_from_the_token(url: str, base: str) -> None:
    token = fake_token("spice")
    target = parse_target(url, token)
    assert (target.base_url, target.protocol, target.token) == (base, "spice", token)


def test_token_given_twice_or_for_another_protocol() -> None:
    assert parse_target(f"http://h/ws/vnc?token={TOKEN}", TOKEN).token == TOKEN  # the same
    with pytest.raises(OpenError, match="carries a token already: leave out --token"):
        parse_target(f"http://h/ws/vnc?token={TOKEN}", fake_token(jti="other"))
    with pytest.raises(OpenError, match="the token is for protocol 'spice', the URL for 'vnc'"):
        parse_target("http://h/console/vnc/", fake_token("spice"))
    with pytest.raises(OpenError, match="more than one token"):
        parse_target(f"http://h/ws/vnc?token={TOKEN}&token={TOKEN}")


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("http://h/console/vnc/", None, "no token: give the console URL with its"),
        ("http://h:6080", None, "no token"),
        ("ftp://h/ws/vnc?token=x.y.z", None, "https://, http://, wss:// or ws://"),
        ("/ws/vnc?token=x.y.z", None, "https://, http://, wss:// or ws://"),
        ("http://user:pw@h/ws/vnc?token=x.y.z", None, "must not carry a user name"),
        ("http://h:99999/ws/vnc?token=x.y.z", None, "malformed"),
        ("http://h", "not-a-token", "not a console token"),
        ("http://h", "a.b.c", "claims cannot be read"),
        ("http://h", fake_token(None), "names no protocol"),
        ("http://h", fake_token("Bad Name"), "names no protocol"),
    ],
)
def test_what_names_no_console(url: str, token: str | None, message: str) -> None:
    with pytest.raises(OpenError, match=message):
        parse_target(url, token)


def test_the_url_protocol_wins_over_an_unreadable_token() -> None:
    """The broker says what is wrong with a token the URL carries."""
    assert parse_target("http://h/ws/serial?token=a.b.c").protocol == "serial"


def test_token_protocol_reads_the_unverified_claim() -> None:
    assert token_protocol(fake_token("serial")) == "serial"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5900", ("127.0.0.1", 5900)),
        ("0", ("127.0.0.1", 0)),
        ("0.0.0.0:5901", ("0.0.0.0", 5901)),
        ("[::1]:5902", ("::1", 5902)),
        ("localhost:5903", ("localhost", 5903)),
    ],
)
def test_listen_takes_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", ":5900", "host:", "host:x", "70000", "::1:5900"])
def test_listen_refuses_what_is_no_address(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_listen(text)


def client_for(base: str = "http://127.0.0.1:6080", **kwargs: Any) -> NativeClient:
    return NativeClient(protocol="vnc", token=TOKEN, base_url=base, **kwargs)


def test_the_client_names_the_websocket_and_origin() -> None:
    client = client_for("https://console.example/n/node1")
    assert client.websocket_url == f"wss://console.example/n/node1/ws/vnc?token={TOKEN}"
    assert client.origin == "https://console.example"
    assert client.broker_address == "console.example:443"
    assert TOKEN not in repr(client)
    assert client_for("http://[::1]:6080").broker_address == "[::1]:6080"


def test_close_text_names_the_reason() -> None:
    refusals = {4100: [("vm_stopped", "VM stopped")],
                4004: [("replayed_token", "token already used")],
                4012: [("vm_not_running", "VM not running")],
                1000: [("console_closed", "console closed"), ("client_closed", "client closed")]}
    client = client_for(refusals=refusals)

    def ws(code: int | None, reason: str = "") -> Any:
        return SimpleNamespace(close_code=code, close_reason=reason)

    assert client.close_text(ws(4100, "VM stopped")) == (
        "the console closed: vm_stopped (4100): VM stopped"
    )
    assert client.close_text(ws(1000, "client closed")) == (
        "the console closed: client_closed (1000): client closed"
    )
    assert client.close_text(ws(4100)) == "the console closed: vm_stopped (4100): VM stopped"
    # refusals before a session, after the upgrade (http.refusals = "close")
    assert client.close_text(ws(4004, "token already used")) == (
        "the broker refused the token: token already used (4004)"
    )
    assert client.close_text(ws(4012)) == "the broker refused the console: VM not running (4012)"
    assert client.close_text(ws(4999, "odd")) == "the console closed with code 4999: odd"
    assert "lost" in client.close_text(ws(None))
    assert "lost" in client.close_text(ws(1006))


# --- options ------------------------------------------------------------------------------


def test_an_open_option_is_a_lower_case_flag() -> None:
    assert OpenOption("--read-only", "watch only").key == "read_only"
    for bad in ("take", "-t", "--Take", "--a b"):
        with pytest.raises(ValueError, match="--lower-case-words"):
            OpenOption(bad, "x")
    assert Protocol(name="p", title="P").open_options == ()


def plugin(*protocols: Protocol) -> Any:
    class Module:
        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            return list(protocols)

    return Module()


TAKE = OpenOption("--take", "take the console's input")
ROWS = OpenOption("--rows", "rows of the terminal", metavar="N")


def test_two_protocols_with_one_flag_is_a_load_error() -> None:
    one = Protocol(name="one", title="One", open_options=(TAKE,))
    two = Protocol(name="two", title="Two", open_options=(OpenOption("--take", "other"),))
    with pytest.raises(PluginError, match=r"--take of plugin 'b' \(protocol 'two'\) is "
                       r"plugin 'a' \(protocol 'one'\)'s already"):
        PluginManager(load_entrypoints=False, plugins=[("a", plugin(one)), ("b", plugin(two))])


@pytest.mark.parametrize("flag", OPEN_FLAGS)
def test_a_flag_of_the_command_is_a_load_error(flag: str) -> None:
    mine = Protocol(name="one", title="One", open_options=(OpenOption(flag, "mine"),))
    with pytest.raises(PluginError, match=f"{flag} of plugin 'a'.*the open command's already"):
        PluginManager(load_entrypoints=False, plugins=[("a", plugin(mine))])


def test_the_command_has_the_flags_it_reserves() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {f for a in subparsers.choices["open"]._actions for f in a.option_strings}
    assert set(OPEN_FLAGS) <= flags


@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """``console-broker open`` with the protocols ``one`` (``--take``, ``--rows``) and
    ``two`` (no options), whose ``open_client`` records its client."""
    seen: list[Any] = []

    class Recording(Protocol):
        async def open_client(self, client: NativeClient) -> int:
            seen.append(client)
            return 7

    one = Recording(name="one", title="One", open_options=(TAKE, ROWS),
                    subprotocols=("one.v1", "binary"))
    two = Recording(name="two", title="Two")
    real = broker.plugins.PluginManager

    def manager(**_kwargs: Any) -> PluginManager:
        return real(load_entrypoints=False, plugins=[("fake", plugin(one, two))])

    monkeypatch.setattr(broker.plugins, "PluginManager", manager)
    yield seen


def test_protocol_options_reach_their_protocol(
    fake_plugins: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["open", "--help"])
    out = capsys.readouterr().out
    assert "one options:" in out
    assert "--take" in out and "take the console's input (one)" in out
    assert "--rows N" in out and "rows of the terminal (one)" in out

    url = f"https://console.example/n/node1/console/one/?token={fake_token('one')}"
    assert main(["open", url, "--take", "--rows", "40", "--no-viewer", "--listen", "5999",
                 "--ca", "/ca.pem"]) == 7
    client = fake_plugins[-1]
    assert client.options == {"take": True, "rows": "40"}
    assert (client.protocol, client.base_url) == ("one", "https://console.example/n/node1")
    assert (client.start_viewer, client.listen, client.ca) == (False, ("127.0.0.1", 5999),
                                                               "/ca.pem")
    assert client.subprotocols == ("one.v1", "binary")
    assert client.refusals[4100] == [("vm_stopped", "VM stopped")]  # the core's table
    assert main(["open", url, "--viewer", "v {host}"]) == 7
    assert fake_plugins[-1].options == {"take": False, "rows": None}
    assert fake_plugins[-1].viewer == "v {host}"


def test_a_flag_of_another_protocol_is_a_usage_error(
    fake_plugins: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://h/ws/two?token={fake_token('two')}"
    assert main(["open", url, "--take"]) == 2
    assert "--take is an option of one consoles, and this is a two console" in (
        capsys.readouterr().err
    )
    assert main(["open", url, "--viewer", "x", "--no-viewer"]) == 2
    assert not fake_plugins


def test_a_protocol_no_plugin_serves(
    fake_plugins: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["open", f"http://h/ws/three?token={fake_token('three')}"]) == 1
    assert capsys.readouterr().err == (
        "console-broker: error: no loaded plugin serves protocol 'three' (loaded: one, two)\n"
    )


def test_a_protocol_without_a_native_client() -> None:
    class Bare(Protocol):
        pass

    client = client_for()
    with pytest.raises(OpenError, match=r"^bare has no native client$"):
        anyio.run(Bare(name="bare", title="Bare").open_client, client)


# --- against sockets ------------------------------------------------------------------------

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeBroker:
    """A WebSocket server standing in for the broker: refuses with *status* and *body*
    when set, else echoes binary messages (upper-cased) and closes with *close* after
    the message ``b"close"``; records each request's headers and subprotocol."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = b""
        self.close = (4100, "VM stopped")
        self.requests: list[Headers] = []
        self.subprotocols: list[str | None] = []
        self.port = 0

    def process(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request.headers)
        if self.status is None:
            return None
        headers = Headers([("Content-Length", str(len(self.body)))])
        return Response(self.status, "Refused", headers, self.body)

    async def handler(self, ws: ServerConnection) -> None:
        self.subprotocols.append(ws.subprotocol)
        async for message in ws:
            if message == b"close":
                await ws.close(*self.close)
                return
            assert isinstance(message, bytes)
            await ws.send(message.upper())


@pytest.fixture
async def fake_broker() -> AsyncIterator[FakeBroker]:
    fake = FakeBroker()
    async with serve(fake.handler, "127.0.0.1", 0, process_request=fake.process,
                     subprotocols=["binary"]) as server:  # type: ignore[list-item]
        fake.port = next(iter(server.sockets)).getsockname()[1]
        yield fake


@pytest.mark.anyio
async def test_connect_offers_the_subprotocols_and_the_brokers_origin(
    fake_broker: FakeBroker,
) -> None:
    client = client_for(f"http://127.0.0.1:{fake_broker.port}/prefix",
                        subprotocols=("binary",))
    ws = await client.connect()
    await ws.close()
    headers = fake_broker.requests[-1]
    assert headers["Origin"] == f"http://127.0.0.1:{fake_broker.port}"
    assert headers["Sec-WebSocket-Protocol"] == "binary"
    assert headers["User-Agent"].startswith("console-broker/")
    assert fake_broker.subprotocols == ["binary"]


@pytest.mark.anyio
async def test_a_refusal_is_the_brokers_answer_in_one_line(fake_broker: FakeBroker) -> None:
    client = client_for(f"http://127.0.0.1:{fake_broker.port}")
    fake_broker.status, fake_broker.body = 401, b"token already used\n"
    with pytest.raises(OpenError) as caught:
        await client.connect()
    assert str(caught.value) == "the broker refused the token: token already used (401)"
    fake_broker.status, fake_broker.body = 409, b"VM not running\n"
    refused = r"^the broker refused the console: VM not running \(409\)$"
    with pytest.raises(OpenError, match=refused):
        await client.connect()
    fake_broker.status = 502
    fake_broker.body = b"<html><body><h1>502</h1>\n<p>node node1 does not answer</p></body></html>"
    with pytest.raises(OpenError, match=r"console: 502 node node1 does not answer \(502\)$"):
        await client.connect()


@pytest.mark.anyio
async def test_an_unreachable_broker() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        client = client_for(f"http://127.0.0.1:{port}")
        with pytest.raises(OpenError) as caught:
            await client.connect()
    assert str(caught.value) == f"cannot reach the broker at 127.0.0.1:{port}: Connection refused"


@pytest.mark.anyio
async def test_tls_verification_names_the_ca_option(tmp_path: Path) -> None:
    from certs import make_certificates

    certs = make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server"], certs["server-key"])
    fake = FakeBroker()
    async with serve(fake.handler, "127.0.0.1", 0, ssl=context) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = client_for(f"https://127.0.0.1:{port}")
        with pytest.raises(OpenError) as caught:
            await client.connect()
        assert str(caught.value).startswith(
            f"the broker's certificate at 127.0.0.1:{port} does not verify against the "
            "system's trust store: "
        )
        assert str(caught.value).endswith("pass --ca FILE with the CA that signed it")
        ws = await client_for(f"https://127.0.0.1:{port}", ca=str(certs["ca"])).connect()
        await ws.close()
        with pytest.raises(OpenError, match=r"^--ca /nonexistent.pem: cannot load it: "):
            await client_for(f"https://127.0.0.1:{port}", ca="/nonexistent.pem").connect()


@pytest.mark.anyio
async def test_bridge_moves_bytes_both_ways_until_the_broker_closes(
    fake_broker: FakeBroker,
) -> None:
    client = client_for(f"http://127.0.0.1:{fake_broker.port}",
                        refusals={4100: [("vm_stopped", "VM stopped")]})
    ws = await client.connect()
    async with await client.local_listener() as listener:
        assert listener.host == "127.0.0.1" and listener.port > 0
        viewer = await anyio.connect_tcp(listener.host, listener.port)
        stream = await listener.accept()
    async with anyio.create_task_group() as group:
        ended: list[BridgeEnd] = []

        async def run() -> None:
            ended.append(await client.bridge(stream, ws))

        group.start_soon(run)
        big = os.urandom(1_000_000).hex().lower().encode()  # 2 MB: many reads and sends
        await viewer.send(big)
        got = b""
        while len(got) < len(big):
            got += await viewer.receive()
        assert got == big.upper()
        await viewer.send(b"close")
        with pytest.raises(anyio.EndOfStream):
            await viewer.receive()  # the bridge closed the local side
        await viewer.aclose()
    assert ended == [BridgeEnd.BROKER]
    assert client.close_text(ws) == "the console closed: vm_stopped (4100): VM stopped"


@pytest.mark.anyio
async def test_bridge_ends_when_the_viewer_leaves(fake_broker: FakeBroker) -> None:
    client = client_for(f"http://127.0.0.1:{fake_broker.port}")
    ws = await client.connect()
    async with await client.local_listener() as listener:
        viewer = await anyio.connect_tcp(listener.host, listener.port)
        stream = await listener.accept()
    await viewer.send(b"abc")
    await viewer.aclose()
    assert await client.bridge(stream, ws) is BridgeEnd.LOCAL
    assert ws.close_code == 1000  # closed by us, normally


@pytest.mark.anyio
async def test_listen_where_asked(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with await client_for(listen=("127.0.0.1", port)).local_listener() as listener:
        assert (listener.host, listener.port, listener.address) == (
            "127.0.0.1", port, f"127.0.0.1:{port}")
        with pytest.raises(OpenError, match=f"^cannot listen on 127.0.0.1:{port}: "):
            await client_for(listen=("127.0.0.1", port)).local_listener()
    async with await client_for(listen=("0.0.0.0", 0)).local_listener() as listener:
        assert listener.host == "127.0.0.1"  # where a viewer here connects
    assert "beyond this machine: whoever reaches it gets the console" in capsys.readouterr().err


@pytest.mark.anyio
async def test_run_viewer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "args"
    viewer = client_for(viewer=f"sh -c 'echo \"$0 $1\" > {out}' {{host}} {{port}}")
    process = await viewer.run_viewer(["remote-viewer", "vnc://{host}:{port}"], "virt-viewer",
                                      host="127.0.0.1", port=5999)
    assert process is not None
    assert await process.wait() == 0
    assert out.read_text() == "127.0.0.1 5999\n"

    with pytest.raises(OpenError) as caught:
        await client_for().run_viewer(["no-such-viewer-cb", "{host}"], "virt-viewer", host="h")
    assert str(caught.value) == (
        "no-such-viewer-cb not found: install the Debian package virt-viewer, or pass --viewer"
    )
    with pytest.raises(OpenError, match=r"^--viewer: no-such-viewer-cb not found"):
        await client_for(viewer="no-such-viewer-cb {host}").run_viewer(
            ["remote-viewer"], "virt-viewer", host="h")
    with pytest.raises(OpenError, match=r"^--viewer: cannot fill in 'file': it may use "
                       r"\{host\}, \{port\}$"):
        await client_for(viewer="v {file}").run_viewer(["v"], "v", host="h", port=1)

    assert await client_for(start_viewer=False).run_viewer(
        ["remote-viewer", "vnc://{host}:{port}"], "virt-viewer", host="127.0.0.1", port=5999
    ) is None
    assert capsys.readouterr().err == (
        "console-broker: no viewer started: connect one yourself, e.g. "
        "remote-viewer vnc://127.0.0.1:5999\n"
    )


@pytest.mark.anyio
async def test_the_viewers_end_with_the_command() -> None:
    client = client_for(viewer="sleep 60")
    process = await client.run_viewer(["x"], "x")
    assert process is not None and process.returncode is None
    await client.end_viewers()
    assert process.returncode == -signal.SIGTERM


# --- the command, as a user runs it -------------------------------------------------------


def test_an_unreachable_broker_is_one_line_and_status_1() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = subprocess.run(
            [*CLI, "open", f"http://127.0.0.1:{port}/console/vnc/?token={TOKEN}"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == (
        f"console-broker: error: cannot reach the broker at 127.0.0.1:{port}: "
        "Connection refused\n"
    )
    assert TOKEN not in done.stderr


def test_ctrl_c_ends_cleanly() -> None:
    """Waiting for a viewer (--no-viewer: the broker is not asked yet), SIGINT ends the
    command with 130 and no traceback."""
    process = subprocess.Popen(
        [*CLI, "open", "--no-viewer", f"http://127.0.0.1:9/console/vnc/?token={TOKEN}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    assert process.stderr is not None
    line = process.stderr.readline()
    while "waiting for a VNC viewer" not in line:
        assert time.monotonic() < deadline and line, line
        line = process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_sigterm_ends_cleanly() -> None:
    """SIGTERM while a SPICE console waits for its client: the .vv file's directory is
    removed, and the status is 143 (128 + SIGTERM), no traceback."""
    token = fake_token("spice")
    process = subprocess.Popen(
        [*CLI, "open", "--no-viewer", f"http://127.0.0.1:9/console/spice/?token={token}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    while "waiting for a SPICE client" not in line:
        assert line, process.communicate(timeout=30)
        line = process.stderr.readline()
    vv = Path(line.rsplit(" ", 1)[1].rstrip(")\n"))
    assert vv.name == "console.vv" and vv.stat().st_mode & 0o777 == 0o600
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM
    assert err == "console-broker: ended by SIGTERM\n"
    assert not vv.parent.exists()


def test_the_commands_path_loads_no_server_library() -> None:
    """``console-broker open`` (the parser, the plugins, the protocol's open_client up to
    the broker's WebSocket) loads none of the libraries only a broker needs."""
    code = (
        "import sys\n"
        "from broker.cli import main\n"
        "import broker_spice._open, broker_vnc._open\n"
        f"status = main(['open', 'http://127.0.0.1:9/console/vnc/?token={TOKEN}',"
        " '--viewer', 'true'])\n"
        "heavy = ('libvirt', 'lxml', 'cryptography', 'jwt', 'prometheus_client')\n"
        "print(status, sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert done.stdout.strip() == "1 []", done.stderr
    assert "cannot reach the broker at 127.0.0.1:9" in done.stderr


def test_the_api_names_are_the_native_modules() -> None:
    from broker import api

    assert api.NativeClient is native.NativeClient
    assert api.OpenError is native.OpenError
    assert api.OpenOption is OpenOption


@pytest.mark.parametrize("protocol", ["vnc", "spice"])
def test_a_missing_viewer_is_said_before_the_token_is_used(
    protocol: str, tmp_path: Path
) -> None:
    """No remote-viewer on PATH: the one line names its package, and the broker (here
    unreachable) is never asked, so the token would still be good."""
    token = fake_token(protocol)
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run(
        [*CLI, "open", f"http://127.0.0.1:9/console/{protocol}/?token={token}"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert (done.returncode, done.stderr) == (1, (
        "console-broker: error: remote-viewer not found: install the Debian package "
        "virt-viewer, or pass --viewer\n"
    ))
    done = subprocess.run(
        [*CLI, "open", f"http://127.0.0.1:9/console/{protocol}/?token={token}",
         "--viewer", "no-such-viewer-cb {host} {port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stderr) == (1, (
        "console-broker: error: --viewer: no-such-viewer-cb not found (not installed, or "
        "not on PATH)\n"
    ))
