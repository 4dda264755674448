"""Two core features the serial plugin rests on: a token's ``dev`` claim choosing the console
device (issued, verified, planned, from the CLI), and endpoints shared by the sessions of a
``shared_console`` protocol (opened once, closed after the last session)."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import anyio.abc
import jwt
import pytest
from brokerkit import FakeDomain, FakeResolver, make_config, running_broker
from conftest import DOMAIN
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lxml import etree
from websockets.asyncio.client import connect

from broker import Protocol, hookimpl
from broker.cli import main
from broker.config import load_config
from broker.keys import load_public_keys
from broker.plugins import PluginManager
from broker.service import Endpoint, Session
from broker.service._plan import EndpointPlan, plan_endpoint
from broker.service._refusals import CONSOLE_NOT_ENABLED, Refused
from broker.service._shared import SharedEndpoints
from broker.tokens import InvalidToken, ReplayCache, TokenIssuer, TokenVerifier

# --- the dev claim ------------------------------------------------------------------------


def test_a_token_carries_the_device_it_was_issued_for(
    issuer: TokenIssuer, verifier: TokenVerifier, private_key: Ed25519PrivateKey
) -> None:
    issued = issuer.issue(DOMAIN, "serial", ttl=60, device="serial1")
    assert jwt.decode(issued.token, options={"verify_signature": False})["dev"] == "serial1"
    assert verifier.verify(issued.token, protocol="serial").device == "serial1"
    plain = issuer.issue(DOMAIN, "serial", ttl=60)
    assert "dev" not in jwt.decode(plain.token, options={"verify_signature": False})
    assert verifier.verify(plain.token).device is None


@pytest.mark.parametrize("device", ["", "serial 1", "../x", "x" * 65, "sérial"])
def test_a_bad_device_is_neither_issued_nor_accepted(
    issuer: TokenIssuer, verifier: TokenVerifier, private_key: Ed25519PrivateKey, device: str
) -> None:
    with pytest.raises(ValueError):
        issuer.issue(DOMAIN, "serial", ttl=60, device=device)
    good = jwt.decode(
        issuer.issue(DOMAIN, "serial", ttl=60).token, options={"verify_signature": False}
    )
    forged = jwt.encode({**good, "dev": device}, private_key, algorithm="EdDSA")
    with pytest.raises(InvalidToken, match="'dev'"):
        verifier.verify(forged)
    numeric = jwt.encode({**good, "dev": 1}, private_key, algorithm="EdDSA")
    with pytest.raises(InvalidToken, match="'dev'"):
        verifier.verify(numeric)


def test_the_token_command_takes_a_device(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--config", str(config_file)]) == 0
    capsys.readouterr()
    argv = ["token", DOMAIN, "--uuid", "-p", "serial", "--config", str(config_file)]
    assert main([*argv, "--device", "serial1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"] == "serial1"
    config = load_config(config_file)
    verifier = TokenVerifier(load_public_keys(config.public_key_paths),
                             replay_cache=ReplayCache(10))
    assert verifier.verify(doc["token"]).device == "serial1"
    assert main([*argv, "--device", "1"]) == 0
    assert "device:    1\n" in capsys.readouterr().out
    assert main([*argv, "--device", "no such/device"]) == 2
    assert "--device" in capsys.readouterr().err


SERIAL_RECORD = (
    "<cb:console protocol='serial' mode='stream' device='serial' device-type='pty'/>"
)
DEVICES = (
    "<serial type='pty'><target port='0'/><alias name='serial0'/></serial>"
    "<serial type='file'><target port='1'/><alias name='serial1'/></serial>"
    "<serial type='pty'><target port='2'/><alias name='ua-log'/></serial>"
    "<console type='pty'><target type='serial' port='0'/><alias name='serial0'/></console>"
    "<console type='pty'><target type='virtio' port='1'/><alias name='console1'/></console>"
)


def _live(devices: str, record: str) -> etree._Element:
    return etree.fromstring(
        "<domain type='qemu'><name>g</name><metadata>"
        "<cb:consoles xmlns:cb='https://console-broker.dev/xmlns/consoles/1'>"
        f"{record}</cb:consoles></metadata><devices>{devices}</devices></domain>"
    )


@pytest.mark.parametrize(
    ("choice", "alias"),
    [
        (None, "serial0"),
        ("serial0", "serial0"),
        ("0", "serial0"),
        ("ua-log", "ua-log"),
        ("2", "ua-log"),
        ("console1", "console1"),
        ("3", "console1"),  # serial ports first, then consoles that mirror none
    ],
)
def test_a_device_is_chosen_by_alias_or_index(choice: str | None, alias: str) -> None:
    plan = plan_endpoint(_live(DEVICES, SERIAL_RECORD), "serial", choice)
    assert plan == EndpointPlan("stream", "serial", device=alias)


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("serial1", "not a pty"),
        ("1", "not a pty"),
        ("4", "no console device '4'"),
        ("serial9", "no console device"),
    ],
)
def test_a_device_that_cannot_be_opened_is_refused(choice: str, message: str) -> None:
    with pytest.raises(Refused, match=message) as info:
        plan_endpoint(_live(DEVICES, SERIAL_RECORD), "serial", choice)
    assert info.value.refusal is CONSOLE_NOT_ENABLED


def test_graphics_consoles_have_no_devices_to_choose() -> None:
    record = "<cb:console protocol='vnc' mode='fd' device='graphics' device-type='vnc'/>"
    with pytest.raises(Refused, match="no devices to choose"):
        plan_endpoint(_live("<graphics type='vnc'/>", record), "vnc", "0")


# --- shared endpoints ---------------------------------------------------------------------


class FakeStream(anyio.abc.ByteStream):
    def __init__(self) -> None:
        self.closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(self, item: bytes) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_shared_endpoints_open_once_and_close_after_the_last_user() -> None:
    shared = SharedEndpoints()
    opened: list[FakeStream] = []

    async def open_() -> Endpoint:
        await anyio.sleep(0.05)  # the second acquire waits for this one
        opened.append(FakeStream())
        return Endpoint(opened[-1], "stream", "fake")

    got: list[Endpoint] = []
    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(lambda: _append(got, shared.acquire("k", open_)))
    assert len(opened) == 1 and len({id(e) for e in got}) == 1
    assert shared.users("k") == 3
    other = await shared.acquire("other", open_)
    assert len(opened) == 2 and other is not got[0]
    assert await shared.release(got[0]) and await shared.release(got[0])
    assert not opened[0].closed
    assert await shared.release(got[0])
    assert opened[0].closed and shared.users("k") == 0
    assert not await shared.release(got[0])  # not shared (any more): the caller closes it
    assert await shared.release(other) and len(shared) == 0


async def _append(into: list[Endpoint], item: object) -> None:
    into.append(await item)  # type: ignore[misc]


@pytest.mark.anyio
async def test_a_failed_open_leaves_nothing_behind() -> None:
    shared = SharedEndpoints()

    async def fail() -> Endpoint:
        raise Refused(CONSOLE_NOT_ENABLED, "no")

    with pytest.raises(Refused):
        await shared.acquire("k", fail)
    assert len(shared) == 0 and shared.users("k") == 0


class SharedRaw:
    """A protocol whose sessions share the serial console, each proxying raw bytes."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        async def wait(session: Session) -> None:
            await session.client.receive()  # until the client closes

        return [Protocol(name="shared-serial", title="t", console="serial", shared_console=True,
                         handler=wait),
                Protocol(name="own-serial", title="t", console="serial")]  # raw_proxy


@pytest.mark.anyio
async def test_the_broker_opens_a_shared_console_once_per_console(
    verifier: TokenVerifier, issuer: TokenIssuer
) -> None:
    resolver = FakeResolver(FakeDomain(DOMAIN))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("s", SharedRaw())])
    async with running_broker(make_config(), verifier, resolver, plugins) as broker:
        url = broker.url
        a = await connect(url("shared-serial", issuer.issue(DOMAIN, "shared-serial", ttl=60).token))
        b = await connect(url("shared-serial", issuer.issue(DOMAIN, "shared-serial", ttl=60).token))
        c = await connect(url("own-serial", issuer.issue(DOMAIN, "own-serial", ttl=60).token))
        with anyio.fail_after(5):
            while broker.broker.session_count < 3:
                await anyio.sleep(0.01)
        assert resolver.opened == 2  # one for both shared sessions, one of its own
        await a.close()
        with anyio.fail_after(5):
            while broker.broker.session_count > 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
        assert resolver.closed == 0  # b still uses it
        await b.close()
        await c.close()
        with anyio.fail_after(5):
            while resolver.closed < 2:
                await anyio.sleep(0.01)
