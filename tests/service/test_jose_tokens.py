"""Tokens minted elsewhere (docs/tokens.md, "Minting tokens elsewhere"): by a second,
independent JWT implementation (jose, on Node.js, from the checkout's node_modules),
and by the documentation's own examples, run as they stand there.

jose is pinned in package.json; ``scripts/setup-host`` installs it with ``npm ci``, before
the suite runs. A missing jose fails these tests: they are never skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from servedbroker import CLI, NODE_MODULES, ServedBroker
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from broker.keys import key_fingerprint, load_public_keys
from broker.tokens import InvalidToken, ReplayCache, Rights, TokenVerifier

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tokens.md"
SECTION = "## Minting tokens elsewhere (a control plane)"
#: The node name of a ServedBroker.
NODE = "testnode"
#: A domain no hypervisor has: a token for it passes verification and is refused then.
DOMAIN = str(uuid.uuid4())

#: Mints with the documented example (``./mint.mjs``) and, for the tokens the broker
#: must refuse, with jose directly: the documented token but for one thing.
DRIVER = """
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { SignJWT, importPKCS8 } from 'JOSE';
import { fingerprint, mintConsoleToken } from './mint.mjs';

const [privateFile, publicFile, domain, node] = process.argv.slice(2);
const pem = readFileSync(privateFile, 'utf8');
const publicPem = readFileSync(publicFile, 'utf8');
const key = await importPKCS8(pem, 'EdDSA');
const kid = fingerprint(pem);

async function variant({ header = { alg: 'EdDSA', kid, typ: 'JWT' }, aud = 'console-broker',
                         signingKey = key } = {}) {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ aud, proto: 'vnc', node, rights: 'full' })
    .setProtectedHeader(header)
    .setSubject(domain)
    .setIssuedAt(now)
    .setNotBefore(now)
    .setExpirationTime(now + 60)
    .setJti(randomUUID())
    .sign(signingKey);
}

const other = generateKeyPairSync('ed25519').privateKey.export({ type: 'pkcs8', format: 'pem' });
const tokens = {
  kid,
  accepted: {
    documented: await mintConsoleToken(pem, domain.toUpperCase(), 'vnc', node,
                                       { ttl: 120, viewOnly: true }),
    device: await mintConsoleToken(pem, domain, 'serial', node, { device: 'serial1' }),
    no_kid: await variant({ header: { alg: 'EdDSA', typ: 'JWT' } }),
  },
  other_node: await mintConsoleToken(pem, domain, 'vnc', 'othernode'),
  invalid: {
    other_kid: await variant({ header: { alg: 'EdDSA', kid: fingerprint(other), typ: 'JWT' } }),
    other_key: await variant({ signingKey: await importPKCS8(other, 'EdDSA') }),
    other_aud: await variant({ aud: 'console-broker-admin' }),
    aud_array: await variant({ aud: ['console-broker'] }),
    alg_ed25519: await variant({ header: { alg: 'Ed25519', kid, typ: 'JWT' },
                                 signingKey: await importPKCS8(pem, 'Ed25519') }),
    alg_hs256: await variant({ header: { alg: 'HS256', kid, typ: 'JWT' },
                               signingKey: new TextEncoder().encode(publicPem) }),
    too_long: await mintConsoleToken(pem, domain, 'vnc', node, { ttl: 301 }),
  },
};
process.stdout.write(JSON.stringify(tokens));
"""

#: Why each of the driver's ``invalid`` tokens is refused (TokenRefused.detail).
INVALID = {
    "other_kid": "unknown key",
    "other_key": "bad signature",
    "other_aud": "claims: 'aud' is not 'console-broker'",
    "aud_array": "claims: 'aud' must be a non-empty string",
    "alg_ed25519": "algorithm not accepted",
    "alg_hs256": "algorithm not accepted",
    "too_long": "lifetime exceeds the broker's max_ttl",
}


def doc_example(language: str) -> str:
    """The one ``language`` code block of the section on minting elsewhere."""
    text = DOCS.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", text[start:end], re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"{len(blocks)} {language} blocks in {SECTION!r}"
    return str(blocks[0])


@pytest.fixture(scope="module")
def node() -> str:
    """Node.js (scripts/setup-host installs it)."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed: scripts/setup-host installs it", pytrace=False)
    return found


@pytest.fixture(scope="module")
def jose_url(node: str) -> str:
    """The file URL of jose's entry point in the checkout's node_modules (an ES module in
    a temporary directory cannot import a bare 'jose' from there)."""
    if not (NODE_MODULES / "jose" / "package.json").is_file():
        pytest.fail(
            f"jose is not installed in {NODE_MODULES}: run scripts/setup-host "
            "(npm ci installs package-lock.json's packages)",
            pytrace=False,
        )
    resolve = (
        "const { createRequire } = require('node:module');"
        "const { pathToFileURL } = require('node:url');"
        "const entry = createRequire(process.argv[1]).resolve('jose');"
        "process.stdout.write(pathToFileURL(entry).href);"
    )
    done = subprocess.run(
        [node, "-e", resolve, str(NODE_MODULES.parent / "package.json")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The control plane's key directory, made by ``console-broker keygen --state-dir``."""
    keys = tmp_path_factory.mktemp("control-plane")
    subprocess.run([*CLI, "keygen", "--state-dir", str(keys)], check=True, capture_output=True)
    return keys


@pytest.fixture(scope="module")
def minted(
    node: str, jose_url: str, control_plane: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The driver's tokens: the documented JavaScript example's, and jose's variants."""
    scripts = tmp_path_factory.mktemp("jose")
    example = doc_example("js")
    assert example.count("from 'jose';") == 1
    (scripts / "mint.mjs").write_text(example.replace("from 'jose';", f"from '{jose_url}';"))
    (scripts / "driver.mjs").write_text(DRIVER.replace("'JOSE'", f"'{jose_url}'"))
    done = subprocess.run(
        [
            node, str(scripts / "driver.mjs"),
            str(control_plane / "signing-key.pem"), str(control_plane / "signing-key.pub.pem"),
            DOMAIN, NODE,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning either (an experimental API, say)
    tokens: dict[str, Any] = json.loads(done.stdout)
    return tokens


def verifier(keys: Path) -> TokenVerifier:
    return TokenVerifier(
        load_public_keys([keys / "signing-key.pub.pem"]), replay_cache=ReplayCache(100)
    )


def test_jose_tokens_pass_the_verifier(minted: dict[str, Any], control_plane: Path) -> None:
    public_key = load_public_keys([control_plane / "signing-key.pub.pem"])[0]
    assert minted["kid"] == key_fingerprint(public_key)  # the documented fingerprint
    check = verifier(control_plane)
    documented = minted["accepted"]["documented"]
    assert jwt.get_unverified_header(documented) == {
        "alg": "EdDSA", "kid": key_fingerprint(public_key), "typ": "JWT",
    }
    claims = check.verify(documented, protocol="vnc", node=NODE, domain=DOMAIN)
    assert claims.domain_uuid == DOMAIN  # lower-cased by the example
    assert claims.rights is Rights.VIEW and claims.device is None
    assert claims.not_before == claims.issued_at
    assert claims.expires_at - claims.issued_at == 120
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", claims.jti)
    device = check.verify(minted["accepted"]["device"], protocol="serial", node=NODE)
    assert device.device == "serial1" and device.rights is Rights.FULL
    assert device.expires_at - device.issued_at == 60
    assert check.verify(minted["accepted"]["no_kid"], node=NODE).domain_uuid == DOMAIN
    assert check.verify(minted["other_node"]).node == "othernode"
    assert set(minted["invalid"]) == set(INVALID)
    for name, token in minted["invalid"].items():
        with pytest.raises(InvalidToken) as refused:
            check.verify(token)
        assert INVALID[name] in refused.value.detail, name


@pytest.fixture
def node_broker(tmp_path: Path, control_plane: Path) -> Iterator[ServedBroker]:
    """A node broker that trusts the control plane's key only, its domains those of
    libvirt's test driver (in-process: none of them is DOMAIN)."""
    broker = ServedBroker(
        tmp_path,
        extra_config=(
            "[tokens]\ntrust_local_key = false\n"
            f'public_keys = ["{control_plane / "signing-key.pub.pem"}"]\n'
            '[libvirt]\nuri = "test:///default"\n'
        ),
    )
    try:
        yield broker
    finally:
        broker.stop()


def refusal(broker: ServedBroker, protocol: str, token: str) -> tuple[int, bytes]:
    """The HTTP status and body the broker refuses a WebSocket for *token* with."""
    broker.tokens.append(token)  # none may reach the log
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{broker.port}/ws/{protocol}?token={token}", open_timeout=10)
    return refused.value.response.status_code, bytes(refused.value.response.body or b"")


def test_a_node_broker_accepts_jose_tokens(
    minted: dict[str, Any], node_broker: ServedBroker
) -> None:
    """jose's tokens pass the node's checks, and are refused for the domain alone; those
    with another kid, key, aud, alg or a lifetime over max_ttl are invalid."""
    accepted = minted["accepted"]
    for name, protocol in (("documented", "vnc"), ("device", "serial"), ("no_kid", "vnc")):
        assert refusal(node_broker, protocol, accepted[name]) == (404, b"unknown domain\n"), name
    assert refusal(node_broker, "vnc", minted["other_node"]) == (
        421, b"token is for another node\n"
    )
    for name, token in minted["invalid"].items():
        assert refusal(node_broker, "vnc", token) == (401, b"invalid token\n"), name
    rejected = [(e["reason"], e["detail"]) for e in node_broker.events("token.rejected")]
    assert [reason for reason, _ in rejected] == ["wrong_node"] + ["invalid"] * len(INVALID)
    expected_details = [INVALID[name] for name in minted["invalid"]]
    for (_, detail), expected in zip(rejected[1:], expected_details, strict=True):
        assert expected in detail
    node_broker.assert_no_token_logged(require_tokens=True)


def test_the_documented_python_example(control_plane: Path) -> None:
    """docs/tokens.md's Python example, run as it stands: its tokens verify."""
    namespace: dict[str, Any] = {}
    exec(compile(doc_example("python"), str(DOCS), "exec"), namespace)
    pem = (control_plane / "signing-key.pem").read_bytes()
    token = namespace["mint_console_token"](pem, DOMAIN.upper(), "serial", NODE, ttl=90,
                                            view_only=True, device="1")
    public_key = load_public_keys([control_plane / "signing-key.pub.pem"])[0]
    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA", "kid": key_fingerprint(public_key), "typ": "JWT",
    }
    claims = verifier(control_plane).verify(token, protocol="serial", node=NODE, domain=DOMAIN)
    assert claims.rights is Rights.VIEW and claims.device == "1"
    assert claims.expires_at - claims.not_before == 90


def test_the_documented_fingerprint_command(control_plane: Path) -> None:
    """The openssl pipeline of docs/tokens.md prints keygen's fingerprint."""
    text = DOCS.read_text()
    start = text.index(SECTION)
    command = re.search(r"^```sh\n(openssl pkey .*?)^```$", text[start:], re.DOTALL | re.M)
    assert command is not None
    for tool in ("openssl", "basenc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.group(1)], cwd=control_plane,
        capture_output=True, text=True, timeout=30, check=True,
    )
    public_key = load_public_keys([control_plane / "signing-key.pub.pem"])[0]
    assert done.stdout.strip() == key_fingerprint(public_key)
