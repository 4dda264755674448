"""Recording tokens and ``GET /recording`` without a VM: the ``rec`` claim and what it goes
with, the route and its ``part``, the index and the parts served in process from a
recordings directory (the token checked, not used up; a recording found by the token's
domain and id only, never by a path), every refusal, a recording token refused wherever a
console is, and ``console-broker token --recording`` (here and for a node elsewhere)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import structlog
from brokerkit import FakeDomain, FakeResolver, Running, make_config, running_broker
from conftest import DOMAIN, FakeClock
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_broker_requests import http_get

from broker import Protocol, hookimpl
from broker.cli import main
from broker.config import RecordingsSection
from broker.plugins import PluginManager
from broker.recordings import RECORDING, RecordingKind, part_name
from broker.service._refusals import Refused
from broker.service._request import NotAllowed, RecordingRoute, route
from broker.tokens import Claims, InvalidToken, TokenIssuer, TokenVerifier

#: A recording kind like the VNC plugin's (an RFB stream in JSON lines, played from part 1).
VNC = RecordingKind(
    protocol="vnc", suffix=".rfb.jsonl", title="RFB (JSON lines)",
    content_type="application/x-ndjson", page="playback/", parts_play_alone=False,
)
OTHER = "0b6f8d3c-8d0e-4b8e-9a57-3c1c5b7b2a10"
T = 1_893_456_000


def part(directory: Path, recording: str, number: int, *, domain: str = DOMAIN,
         events: int = 3) -> Path:
    path = directory / domain / part_name(T, recording, number, VNC.suffix)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    header = {"format": "console-broker-rfb", "version": 1, "timestamp": T + number,
              "console_broker": {"domain": {"name": "web1", "uuid": domain}, "device": None,
                                 "recording": recording, "part": number,
                                 "offset": float(number - 1), "input": False}}
    lines = [json.dumps(header)] + [
        json.dumps([number - 1 + i / 10, "o", "UkZC"]) for i in range(events)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the claim ---------------------------------------------------------------------------------


def payload(**claims: Any) -> dict[str, Any]:
    base = {"aud": "console-broker", "sub": DOMAIN, "proto": RECORDING, "node": "hv1",
            "rights": "view", "iat": T, "nbf": T, "exp": T + 60, "jti": "j", "rec": "0badcafe"}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def test_the_rec_claim_goes_with_the_recording_purpose_and_view_rights() -> None:
    claims = Claims.from_payload(payload())
    assert claims.recording == "0badcafe" and claims.view_only and claims.protocol == RECORDING
    assert claims.to_payload()["rec"] == "0badcafe"
    for bad, why in (
        (payload(proto="vnc"), "goes with the protocol 'recording'"),
        (payload(rec=None), "goes with the protocol 'recording'"),
        (payload(rights="full"), "view rights only"),
        (payload(rec="../etc"), "must be a recording id"),
        (payload(rec="0BADCAFE"), "must be a recording id"),
        (payload(rec=12345678), "must be a recording id"),
        (payload(rec="0badcaf"), "must be a recording id"),
    ):
        with pytest.raises(InvalidToken, match=why):
            Claims.from_payload(bad)
    assert Claims.from_payload(payload(proto="vnc", rec=None, rights="full")).recording is None


def test_the_issuer_makes_view_only_recording_tokens(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    issued = issuer.issue(DOMAIN, RECORDING, ttl=60, recording="0badcafe")
    claims = verifier.verify(issued.token, protocol=RECORDING, consume=False)
    assert claims.recording == "0badcafe" and claims.view_only
    for protocol, recording in (("vnc", "0badcafe"), (RECORDING, None), (RECORDING, "x/../y")):
        with pytest.raises(ValueError, match="recording"):
            issuer.issue(DOMAIN, protocol, ttl=60, recording=recording)


# --- the route ---------------------------------------------------------------------------------


def test_the_recording_route() -> None:
    assert route("/recording?token=T") == RecordingRoute("T", None)
    assert route("/recording?token=T&part=2") == RecordingRoute("T", 2)
    assert route("/hv1/recording?part=007&token=T", "/hv1") == RecordingRoute("T", 7)
    assert route("/recording?token=T", method="HEAD") == RecordingRoute("T", None)
    assert route("/recording?token=T", method="POST") == NotAllowed(("GET", "HEAD"))
    for query in ("part=0", "part=1000", "part=x", "part=../1", "part=-1", "part=1&part=2",
                  "part=" + "9" * 5000, "part=%C2%B2"):
        with pytest.raises(Refused) as info:
            route(f"/recording?token=T&{query}")
        assert info.value.refusal.reason == "bad_request", query
    with pytest.raises(Refused) as info:
        route("/recording")
    assert info.value.refusal.reason == "invalid_token"


# --- in process --------------------------------------------------------------------------------


class RawVNC:
    """The vnc protocol served raw, recorded as the VNC plugin records it."""

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="vnc")]

    @hookimpl
    def console_broker_recording_kinds(self) -> list[RecordingKind]:
        return [VNC]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def broker(tmp_path: Path, verifier: TokenVerifier) -> AsyncIterator[Running]:
    config = attrs.evolve(make_config(), recordings=RecordingsSection(dir=str(tmp_path)))
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[("raw", RawVNC())])
    resolver = FakeResolver(FakeDomain(DOMAIN, name="web1"))
    async with running_broker(config, verifier, resolver, plugins) as running:
        yield running


def token_for(issuer: TokenIssuer, recording: str = "0badcafe", domain: str = DOMAIN) -> str:
    return issuer.issue(domain, RECORDING, ttl=60, recording=recording).token


@pytest.mark.anyio
async def test_the_index_and_the_parts(
    broker: Running, issuer: TokenIssuer, tmp_path: Path
) -> None:
    first, second = part(tmp_path, "0badcafe", 1), part(tmp_path, "0badcafe", 2)
    part(tmp_path, "deadbeef", 1)
    token = token_for(issuer)
    with structlog.testing.capture_logs() as logs:
        status, headers, body = await http_get(broker, f"/recording?token={token}")
        assert status == 200 and headers["content-type"] == "application/json"
        index = json.loads(body)
        assert index["recording"] == "0badcafe" and index["protocol"] == "vnc"
        assert index["domain"] == {"name": "web1", "uuid": DOMAIN} and index["complete"]
        assert [p["part"] for p in index["parts"]] == [1, 2]
        assert str(tmp_path) not in body.decode()
        for number, path in ((1, first), (2, second), (2, second)):  # not used up
            status, headers, body = await http_get(
                broker, f"/recording?token={token}&part={number}"
            )
            assert status == 200 and body == path.read_bytes()
            assert headers["content-type"] == "application/x-ndjson"
            assert headers["cache-control"] == "no-store"
            assert headers["content-disposition"] == (
                f'inline; filename="recording-0badcafe-00{number}.rfb.jsonl"'
            )
    served = [e for e in logs if e["event"] == "recording.served"]
    assert [e["part"] for e in served] == [None, 1, 2, 2]
    assert served[0]["recording"] == "0badcafe" and served[0]["protocol"] == "vnc"
    assert token not in repr(logs)


@pytest.mark.anyio
async def test_what_is_refused(
    broker: Running, issuer: TokenIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    part(tmp_path, "0badcafe", 1)
    part(tmp_path, "feedface", 1, domain=OTHER)
    token = token_for(issuer)

    async def status_of(path: str) -> tuple[int, bytes]:
        status, _, body = await http_get(broker, path)
        return status, body

    assert await status_of(f"/recording?token={token}&part=2") == (
        404, b"no such recording (never made here, or deleted)\n"
    )
    # the token names its domain: another domain's recording of that id is not found
    assert (await status_of(f"/recording?token={token_for(issuer, 'feedface')}"))[0] == 404
    assert (await status_of(f"/recording?token={token_for(issuer, 'aaaaaaaa')}"))[0] == 404
    assert (await status_of(f"/recording?token={token}&part=../1"))[0] == 400
    session = issuer.issue(DOMAIN, "vnc", ttl=60, view_only=True).token
    assert (await status_of(f"/recording?token={session}"))[0] == 403  # wrong_protocol
    assert (await status_of(f"/ws/vnc?token={token}"))[0] in (403, 426)
    assert (await status_of(f"/screenshot?token={token}"))[0] == 403
    assert (await status_of("/recording?token=nonsense"))[0] == 401
    forged = jwt.encode(payload(exp=int(clock()) + 60, nbf=int(clock()), iat=int(clock())),
                        Ed25519PrivateKey.generate(), algorithm="EdDSA")
    assert (await status_of(f"/recording?token={forged}"))[0] == 401
    clock.advance(120)
    assert (await status_of(f"/recording?token={token}"))[0] == 401  # expired


@pytest.mark.anyio
async def test_a_recording_token_opens_no_console(
    broker: Running, issuer: TokenIssuer, tmp_path: Path
) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    part(tmp_path, "0badcafe", 1)
    with pytest.raises(InvalidStatus) as info:
        async with connect(broker.url("vnc", token_for(issuer))):
            pass
    assert info.value.response.status_code == 403


# --- console-broker token --recording -------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def keyed_config(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(capsys, "keygen", "--config", str(config_file))[0] == 0
    return config_file


def test_a_recording_token_from_the_command(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from broker_serial._recording import Recording

    from broker.keys import load_public_keys
    from broker.tokens import ReplayCache

    recordings = keyed_config.parent / "state" / "recordings"
    rec = Recording(recordings, domain_uuid=DOMAIN, domain_name="web1", max_size=4096)
    rec.output(b"x" * 5000)
    rec.output(b"y")  # a second part
    rec.close()
    capsys.readouterr()
    config = ["--config", str(keyed_config)]
    status, out, err = run(capsys, "token", "--recording", rec.id, "--json", *config)
    assert status == 0, err
    doc = json.loads(out)
    assert "page" not in doc  # serial recordings have no player: asciinema plays the parts
    assert doc["index"].startswith("http://127.0.0.1:6080/recording?token=eyJ")
    assert doc["recording"] == rec.id and doc["plays"] == "serial" and doc["parts"] == 2
    assert doc["protocol"] == RECORDING and doc["view_only"] is True
    assert doc["domain"] == {"name": "web1", "uuid": DOMAIN}
    keys = load_public_keys([keyed_config.parent / "state" / "signing-key.pub.pem"])
    verifier = TokenVerifier(keys, replay_cache=ReplayCache(10))
    claims = verifier.verify(doc["token"], protocol=RECORDING, node="hv1")
    assert (claims.recording, claims.domain_uuid, claims.view_only) == (rec.id, DOMAIN, True)
    status, out, err = run(capsys, "token", "web1", "--recording", rec.id, *config)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"recording: {rec.id} (serial, asciicast v2, 2 parts, started ")
    assert lines[1] == f"domain:    web1 ({DOMAIN})"
    assert lines[2] == "purpose:   recording (view only), node hv1"
    assert lines[4].startswith("index:     http://127.0.0.1:6080/recording?token=")
    for argv, code, why in (
        (["--recording", "aaaaaaaa"], 1, "no recording aaaaaaaa in"),
        (["--recording", "../x"], 2, "is not a recording id"),
        (["db1", "--recording", rec.id], 1, "is of the domain web1, not db1"),
        (["--recording", rec.id, "-p", "vnc"], 1, "is a serial recording, not vnc"),
        (["--recording", rec.id, "--device", "serial0"], 2, "not for a recording token"),
        (["--recording", rec.id, "--node", "n2"], 2, "name the recording's DOMAIN"),
        (["--recording", rec.id, "--ttl", "9999"], 2, "--ttl must be between 1 and"),
        (["web1"], 2, "DOMAIN and --protocol are required"),
    ):
        status, _, err = run(capsys, "token", *argv, *config)
        assert (status, why in err) == (code, True), (argv, err)


def test_a_control_plane_mints_a_recording_token(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys, "token", DOMAIN, "--recording", "0badcafe", "--protocol", "serial",
        "--node", "node7", "--key-dir", str(keyed_config.parent / "state"),
        "--public-url", "https://console.example/n/node7", "--json",
    )
    assert status == 0, err
    doc = json.loads(out)
    assert doc["index"].startswith("https://console.example/n/node7/recording?token=")
    assert doc["node"] == "node7" and doc["parts"] is None  # the node looks it up
    status, _, err = run(capsys, "token", "web1", "--recording", "0badcafe", "-p", "serial",
                         "--node", "node7", "--key-dir", str(keyed_config.parent / "state"))
    assert status == 2 and "DOMAIN is the UUID" in err
