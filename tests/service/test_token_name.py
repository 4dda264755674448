"""The token's optional ``name`` claim: who the token is for, shown to the console's other
viewers. Issued, verified, refused when malformed, copied into handoff handles, and
``console-broker token --name``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import DOMAIN, FakeClock, MakeVerifier
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_token_cli import keyed_config, run, token_of, verifier_for  # noqa: F401

from broker.keys import key_fingerprint
from broker.tokens import AUDIENCE, MAX_NAME_LENGTH, InvalidToken, TokenIssuer, valid_name


def _signed(key: Ed25519PrivateKey, **claims: Any) -> str:
    now = 1_893_456_000
    payload = {
        "aud": AUDIENCE, "sub": DOMAIN, "proto": "vnc", "node": "hv1", "rights": "full",
        "iat": now, "nbf": now, "exp": now + 60, "jti": "j1", **claims,
    }
    return jwt.encode(payload, key, algorithm="EdDSA",
                      headers={"kid": key_fingerprint(key.public_key())})


def test_a_name_is_issued_and_verified(issuer: TokenIssuer, make_verifier: MakeVerifier) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60, name="Alice Ops (on call)")
    assert issued.claims.name == "Alice Ops (on call)"
    assert issued.claims.to_payload()["name"] == "Alice Ops (on call)"
    claims = make_verifier().verify(issued.token)
    assert claims.name == "Alice Ops (on call)"
    nameless = issuer.issue(DOMAIN, "vnc", ttl=60)
    assert "name" not in nameless.claims.to_payload()
    assert make_verifier().verify(nameless.token).name is None


@pytest.mark.parametrize(
    "name",
    ["", " ", "x" * (MAX_NAME_LENGTH + 1), "two\nlines", "tab\there", "bell\x07", 7, ["a"]],
)
def test_a_malformed_name_is_refused(
    name: object, private_key: Ed25519PrivateKey, make_verifier: MakeVerifier
) -> None:
    assert not valid_name(name)
    with pytest.raises(InvalidToken, match="'name' must be a string of 1 to 64"):
        make_verifier().verify(_signed(private_key, name=name))


def test_names_of_any_script_up_to_the_limit_are_kept(
    private_key: Ed25519PrivateKey, make_verifier: MakeVerifier
) -> None:
    for name in ("Zoë Ä. Ñúñez", "李小龍", "x" * MAX_NAME_LENGTH, "<b>&amp;</b>"):
        assert make_verifier().verify(_signed(private_key, name=name)).name == name


def test_the_issuer_refuses_a_malformed_name(issuer: TokenIssuer) -> None:
    with pytest.raises(ValueError, match="a name is 1 to 64 printable characters"):
        issuer.issue(DOMAIN, "vnc", ttl=60, name="two\nlines")


def test_a_handoff_handle_keeps_the_name(
    issuer: TokenIssuer, make_verifier: MakeVerifier, clock: FakeClock
) -> None:
    verifier = make_verifier()
    claims = verifier.verify(issuer.issue(DOMAIN, "vnc", ttl=60, name="Alice").token)
    handoff = verifier.hand_off(claims, ttl=60)
    assert handoff.claims.name == "Alice"
    assert verifier.verify(handoff.handle).name == "Alice"


def test_the_token_command_names_the_token(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    status, out, err = run(capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--name", "Alice",
                           "--json", "--config", str(keyed_config))
    assert status == 0, err
    doc = json.loads(out)
    assert doc["name"] == "Alice"
    assert verifier_for(keyed_config).verify(doc["token"]).name == "Alice"
    status, out, err = run(capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--name", "Bob B.",
                           "--config", str(keyed_config))
    assert status == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["name"].strip() == "Bob B."
    assert verifier_for(keyed_config).verify(token_of(lines["page"].strip())).name == "Bob B."
    status, out, _ = run(capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--json",
                         "--config", str(keyed_config))
    assert json.loads(out)["name"] is None


def test_the_token_command_refuses_a_malformed_name(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    status, out, err = run(capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--name", "x" * 65,
                           "--config", str(keyed_config))
    assert (status, out) == (2, "")
    assert "--name: 1 to 64 printable characters" in err
