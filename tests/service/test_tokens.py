"""Issuing and verifying tokens: every refusal reason, rotation, no token in any message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from broker.keys import key_fingerprint
from broker.tokens import (
    ALGORITHM,
    AUDIENCE,
    ExpiredToken,
    InvalidToken,
    NotYetValidToken,
    ReplayedToken,
    Rights,
    TokenIssuer,
    TokenRefused,
    TokenVerifier,
    WrongDomain,
    WrongNode,
    WrongProtocol,
)

DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"
OTHER_DOMAIN = "0b5c3a8e-1f8e-4f0c-9d2a-6f7a8b9c0d1e"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return json.loads(unb64(header)), json.loads(unb64(payload)), signature


def sign(key: Ed25519PrivateKey, payload: Any, headers: dict[str, Any] | None = None) -> str:
    """A token with exactly *payload*, signed by *key* (for shapes the issuer never makes)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return jwt.PyJWS().encode(body, key, algorithm=ALGORITHM, headers=headers)


def payload_for(clock_now: float, **changes: Any) -> dict[str, Any]:
    now = int(clock_now)
    payload = {
        "aud": AUDIENCE,
        "sub": DOMAIN,
        "proto": "vnc",
        "node": "hv1",
        "rights": "full",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "jti-1",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


# --- the happy path ---------------------------------------------------------------------


def test_issue_and_verify(issuer: TokenIssuer, verifier: TokenVerifier, clock: Any) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    claims = verifier.verify(issued.token, protocol="vnc", node="hv1", domain=DOMAIN)
    assert claims == issued.claims
    assert claims.domain_uuid == DOMAIN
    assert claims.protocol == "vnc"
    assert claims.node == "hv1"
    assert claims.rights is Rights.FULL and not claims.view_only
    assert claims.issued_at == claims.not_before == int(clock())
    assert claims.expires_at == int(clock()) + 60
    assert issued.expires_at.timestamp() == claims.expires_at
    assert issued.expires_at.tzinfo is not None


def test_token_shape(issuer: TokenIssuer, private_key: Ed25519PrivateKey) -> None:
    issued = issuer.issue(DOMAIN, "spice", ttl=30, view_only=True)
    header, payload, _ = segments(issued.token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == key_fingerprint(private_key.public_key()) == issuer.kid
    assert payload == {
        "aud": "console-broker",
        "sub": DOMAIN,
        "proto": "spice",
        "node": "hv1",
        "rights": "view",
        "iat": issued.claims.issued_at,
        "nbf": issued.claims.issued_at,
        "exp": issued.claims.issued_at + 30,
        "jti": issued.claims.jti,
    }
    assert len(issued.claims.jti) >= 22


def test_jti_unique(issuer: TokenIssuer) -> None:
    assert len({issuer.issue(DOMAIN, "vnc", ttl=60).claims.jti for _ in range(200)}) == 200


def test_uuid_normalised(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN.upper(), "vnc", ttl=60)
    assert issued.claims.domain_uuid == DOMAIN
    assert verifier.verify(issued.token, domain=DOMAIN.upper()).domain_uuid == DOMAIN


@pytest.mark.parametrize(
    ("domain", "protocol", "ttl"),
    [("not-a-uuid", "vnc", 60), (DOMAIN, "", 60), (DOMAIN, "vnc", 0), (DOMAIN, "vnc", True)],
)
def test_issue_refuses_bad_arguments(
    issuer: TokenIssuer, domain: str, protocol: str, ttl: int
) -> None:
    with pytest.raises(ValueError):
        issuer.issue(domain, protocol, ttl=ttl)


def test_issued_token_repr_hides_token(issuer: TokenIssuer) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    assert issued.token not in repr(issued)


# --- time -------------------------------------------------------------------------------


def test_expiry_with_leeway(issuer: TokenIssuer, make_verifier: Any, clock: Any) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    clock.advance(60 + 5 - 1)  # past exp, within the leeway
    make_verifier().verify(issued.token)
    clock.advance(1)  # exp + leeway
    with pytest.raises(ExpiredToken) as info:
        make_verifier().verify(issued.token)
    assert info.value.reason == "expired"
    assert info.value.claims == issued.claims


def test_expiry_without_leeway(issuer: TokenIssuer, make_verifier: Any, clock: Any) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    clock.advance(60)
    with pytest.raises(ExpiredToken):
        make_verifier(leeway=0).verify(issued.token)


def test_not_before(issuer: TokenIssuer, make_verifier: Any, clock: Any) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    clock.advance(-6)  # the broker's clock is behind the issuer's by more than the leeway
    with pytest.raises(NotYetValidToken) as info:
        make_verifier().verify(issued.token)
    assert info.value.reason == "not_yet_valid"
    clock.advance(1)  # exactly the leeway behind
    make_verifier().verify(issued.token)


def test_lifetime_longer_than_max_ttl_refused(issuer: TokenIssuer, make_verifier: Any) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=301)
    with pytest.raises(InvalidToken, match="max_ttl"):
        make_verifier(max_ttl=300).verify(issued.token)
    make_verifier(max_ttl=301).verify(issued.token)


# --- single use -------------------------------------------------------------------------


def test_replay_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    verifier.verify(issued.token)
    for _ in range(2):
        with pytest.raises(ReplayedToken) as info:
            verifier.verify(issued.token)
        assert info.value.reason == "replayed"


def test_refused_token_is_not_consumed(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    with pytest.raises(WrongProtocol):
        verifier.verify(issued.token, protocol="serial")
    verifier.verify(issued.token, protocol="vnc")


def test_session_seam_consume_false(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN, "spice", ttl=60)
    first = verifier.verify(issued.token, protocol="spice", consume=False)
    again = verifier.verify(issued.token, protocol="spice", consume=False)
    assert first == again
    verifier.consume(first)  # the session opens: the token is used up now
    with pytest.raises(ReplayedToken):
        verifier.consume(first)
    with pytest.raises(ReplayedToken):
        verifier.verify(issued.token)


# --- what the caller expects ------------------------------------------------------------


def test_wrong_protocol(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    with pytest.raises(WrongProtocol) as info:
        verifier.verify(issued.token, protocol="spice")
    assert info.value.reason == "wrong_protocol"


def test_wrong_node(private_key: Ed25519PrivateKey, clock: Any, verifier: TokenVerifier) -> None:
    issued = TokenIssuer(private_key, "hv2", now=clock).issue(DOMAIN, "vnc", ttl=60)
    with pytest.raises(WrongNode) as info:
        verifier.verify(issued.token, node="hv1")
    assert info.value.reason == "wrong_node"


def test_wrong_domain(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue(DOMAIN, "vnc", ttl=60)
    with pytest.raises(WrongDomain) as info:
        verifier.verify(issued.token, domain=OTHER_DOMAIN)
    assert info.value.reason == "wrong_domain"


# --- forgery ----------------------------------------------------------------------------


def _flip(segment: str, index: int) -> str:
    """*segment* with one character changed, keeping it valid base64url."""
    char = segment[index]
    return segment[:index] + ("A" if char != "A" else "B") + segment[index + 1 :]


def test_flipped_byte_in_payload(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    header, payload, signature = issuer.issue(DOMAIN, "vnc", ttl=60).token.split(".")
    for index in (0, len(payload) // 2, len(payload) - 2):
        with pytest.raises(InvalidToken):
            verifier.verify(f"{header}.{_flip(payload, index)}.{signature}")


def test_flipped_byte_in_signature(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    header, payload, signature = issuer.issue(DOMAIN, "vnc", ttl=60).token.split(".")
    for index in (0, len(signature) // 2, len(signature) - 2):
        with pytest.raises(InvalidToken, match="bad signature"):
            verifier.verify(f"{header}.{payload}.{_flip(signature, index)}")


def test_rewritten_claims_keep_no_signature(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    header, payload, signature = issuer.issue(DOMAIN, "vnc", ttl=60, view_only=True).token.split(
        "."
    )
    claims = json.loads(unb64(payload))
    claims["rights"] = "full"
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(forged)


def test_wrong_key_with_kid(clock: Any, verifier: TokenVerifier) -> None:
    stranger = TokenIssuer(Ed25519PrivateKey.generate(), "hv1", now=clock)
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(stranger.issue(DOMAIN, "vnc", ttl=60).token)


def test_wrong_key_without_kid(clock: Any, verifier: TokenVerifier) -> None:
    token = sign(Ed25519PrivateKey.generate(), payload_for(clock()))
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(token)


def test_no_kid_tries_every_trusted_key(clock: Any, make_verifier: Any) -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    token = sign(keys[2], payload_for(clock()))
    assert make_verifier(keys).verify(token).jti == "jti-1"


def test_kid_not_a_string(
    clock: Any, private_key: Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    header = {"alg": "EdDSA", "kid": 7}
    body = b64(json.dumps(payload_for(clock())).encode())
    signing_input = f"{b64(json.dumps(header).encode())}.{body}"
    token = f"{signing_input}.{b64(private_key.sign(signing_input.encode()))}"
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_alg_none_refused(clock: Any, verifier: TokenVerifier) -> None:
    body = b64(json.dumps(payload_for(clock())).encode())
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        for token in (f"{header}.{body}.", f"{header}.{body}.{b64(b'x' * 64)}"):
            with pytest.raises(InvalidToken, match="algorithm"):
                verifier.verify(token)


def test_hs256_with_public_key_as_secret_refused(
    clock: Any, private_key: Ed25519PrivateKey, verifier: TokenVerifier
) -> None:
    """The classic confusion: HMAC keyed with the (public) verification key."""
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    kid = key_fingerprint(private_key.public_key())
    body = b64(json.dumps(payload_for(clock())).encode())
    for secret in (public_pem, raw):
        for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": kid}):
            signing_input = f"{b64(json.dumps(header).encode())}.{body}"
            mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
            with pytest.raises(InvalidToken, match="algorithm"):
                verifier.verify(f"{signing_input}.{b64(mac)}")


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "EdDSA", "crit": ["exp"], "exp": 1},
        {"alg": "EdDSA", "crit": ["b64"], "b64": True},
        {"alg": "EdDSA", "b64": True},
    ],
)
def test_jws_extensions_refused(
    clock: Any, private_key: Ed25519PrivateKey, verifier: TokenVerifier, header: dict[str, Any]
) -> None:
    body = b64(json.dumps(payload_for(clock())).encode())
    signing_input = f"{b64(json.dumps(header).encode())}.{body}"
    token = f"{signing_input}.{b64(private_key.sign(signing_input.encode()))}"
    with pytest.raises(InvalidToken, match="malformed"):
        verifier.verify(token)


# --- rotation ---------------------------------------------------------------------------


def test_key_rotation(clock: Any, make_verifier: Any) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old_token = TokenIssuer(old, "hv1", now=clock).issue(DOMAIN, "vnc", ttl=60).token
    new_token = TokenIssuer(new, "hv1", now=clock).issue(DOMAIN, "vnc", ttl=60).token
    during = make_verifier([new, old])  # both listed while old tokens may live
    during.verify(old_token)
    during.verify(new_token)
    after = make_verifier([new])  # the old key removed from the list
    with pytest.raises(InvalidToken, match="unknown key"):
        after.verify(old_token)
    assert after.key_ids == {key_fingerprint(new.public_key())}


def test_verifier_needs_a_key() -> None:
    from broker.tokens import ReplayCache

    with pytest.raises(ValueError):
        TokenVerifier([], replay_cache=ReplayCache(1))


# --- malformed tokens and claims --------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "...", "é.é.é", "x" * 5000, "eyJhbGciOiJFZERTQSJ9.!!!.abc"],
)
def test_malformed(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(InvalidToken, match="malformed"):
        verifier.verify(token)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"aud": None}, "'aud' is missing"),
        ({"aud": "another-service"}, "'aud' is not"),
        ({"sub": None}, "'sub' is missing"),
        ({"sub": "web1"}, "not a domain UUID"),
        ({"proto": ""}, "'proto' must be a non-empty string"),
        ({"node": 3}, "'node' must be a non-empty string"),
        ({"rights": "admin"}, "'rights'"),
        ({"exp": True}, "'exp' must be an integer"),
        ({"exp": 1.5e9}, "'exp' must be an integer"),
        ({"nbf": "0"}, "'nbf' must be an integer"),
        ({"jti": "j" * 200}, "'jti' is longer"),
        ({"iat": 2_000_000_000}, "'exp' is before"),
    ],
)
def test_bad_claims(
    private_key: Ed25519PrivateKey,
    clock: Any,
    verifier: TokenVerifier,
    changes: dict[str, Any],
    match: str,
) -> None:
    with pytest.raises(InvalidToken, match=match):
        verifier.verify(sign(private_key, payload_for(clock(), **changes)))


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"a string"'])
def test_payload_not_an_object(
    private_key: Ed25519PrivateKey, verifier: TokenVerifier, payload: bytes
) -> None:
    with pytest.raises(InvalidToken):
        verifier.verify(sign(private_key, payload))


def test_unknown_claims_ignored(
    private_key: Ed25519PrivateKey, clock: Any, verifier: TokenVerifier
) -> None:
    token = sign(private_key, payload_for(clock(), user="alice"))
    assert verifier.verify(token).jti == "jti-1"


# --- no token in any message or log line ------------------------------------------------


def test_no_token_in_errors_or_logs(
    issuer: TokenIssuer, make_verifier: Any, private_key: Ed25519PrivateKey, clock: Any
) -> None:
    verifier = make_verifier(cache_size=2)
    tokens: list[str] = []
    errors: list[TokenRefused] = []

    def refuse(token: str, **kwargs: Any) -> None:
        tokens.append(token)
        with pytest.raises(TokenRefused) as info:
            verifier.verify(token, **kwargs)
        errors.append(info.value)

    with capture_logs() as logs:
        used = issuer.issue(DOMAIN, "vnc", ttl=60).token
        tokens.append(used)
        verifier.verify(used)
        refuse(used)  # replayed
        refuse(issuer.issue(DOMAIN, "vnc", ttl=60).token, protocol="serial")
        refuse(issuer.issue(DOMAIN, "vnc", ttl=60).token, node="hv9")
        refuse(issuer.issue(DOMAIN, "vnc", ttl=60).token, domain=OTHER_DOMAIN)
        refuse(issuer.issue(DOMAIN, "vnc", ttl=301).token)  # too long a lifetime
        header, payload, signature = issuer.issue(DOMAIN, "vnc", ttl=60).token.split(".")
        refuse(f"{header}.{payload}.{_flip(signature, 3)}")
        refuse(f"{header}.{_flip(payload, 3)}.{signature}")
        refuse(
            TokenIssuer(Ed25519PrivateKey.generate(), "hv1", now=clock)
            .issue(DOMAIN, "vnc", ttl=60)
            .token
        )
        refuse(sign(private_key, payload_for(clock(), aud="x")))
        verifier.verify(issuer.issue(DOMAIN, "vnc", ttl=60).token)  # fills the cache (2)
        refuse(issuer.issue(DOMAIN, "vnc", ttl=60).token)  # limit reached
        late = issuer.issue(DOMAIN, "vnc", ttl=60).token
        clock.advance(3600)
        refuse(late)  # expired
        early = issuer.issue(DOMAIN, "vnc", ttl=60).token
        clock.advance(-60)
        refuse(early)  # not yet valid
    reasons = {error.reason for error in errors}
    assert reasons == {
        "replayed",
        "wrong_protocol",
        "wrong_node",
        "wrong_domain",
        "invalid",
        "limit_reached",
        "expired",
        "not_yet_valid",
    }
    assert any(entry["event"] == "token.issued" for entry in logs)
    assert any(entry["event"] == "token.rejected" for entry in logs)
    rendered_logs = [repr(entry) for entry in logs]
    for token in tokens:
        parts = [part for part in token.split(".") if len(part) > 8]
        for error in errors:
            text = f"{error} {error!r} {error.detail} {error.claims!r} {error.args!r}"
            assert token not in text
            assert not any(part in text for part in parts)
        for line in rendered_logs:
            assert token not in line
            assert not any(part in line for part in parts)
