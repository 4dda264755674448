"""The keygen, config and token commands, run through broker.cli.main."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker import config as config_module
from broker.cli import main
from broker.config import load_config, render_defaults, render_markdown
from broker.keys import PREVIOUS_PUBLIC_KEY_NAME, key_fingerprint, load_public_keys
from broker.plugins import PluginManager
from broker.tokens import ReplayCache, Rights, TokenVerifier

DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"
#: The domain libvirt's built-in test driver (test:///default) always has.
TEST_DRIVER_DOMAIN = ("test", "6695eb01-f6a4-8304-79aa-97f2502e193f")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def keyed_config(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """*config_file* with its key pair generated."""
    assert run(capsys, "keygen", "--config", str(config_file))[0] == 0
    return config_file


def verifier_for(config_file: Path) -> TokenVerifier:
    config = load_config(config_file)
    return TokenVerifier(load_public_keys(config.public_key_paths), replay_cache=ReplayCache(10))


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


# --- keygen -----------------------------------------------------------------------------


def test_keygen(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "keygen", "--config", str(config_file))
    assert status == 0, err
    state = config_file.parent / "state"
    public = load_public_keys([state / "signing-key.pub.pem"])[0]
    assert (
        out
        == f"public key:  {state / 'signing-key.pub.pem'}\nfingerprint: {key_fingerprint(public)}\n"
    )
    assert (state / "signing-key.pem").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


def test_keygen_does_not_overwrite(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = keyed_config.parent / "state" / "signing-key.pem"
    before = key.read_bytes()
    status, out, err = run(capsys, "keygen", "--config", str(keyed_config))
    assert status == 1 and out == ""
    assert "already exists" in err and "--force" in err
    assert key.read_bytes() == before
    status, out, err = run(capsys, "keygen", "--config", str(keyed_config), "--force")
    assert status == 0, err
    assert key.read_bytes() != before
    assert PREVIOUS_PUBLIC_KEY_NAME in out


def test_keygen_state_dir_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "keygen", "--state-dir", str(tmp_path / "k"))
    assert status == 0
    assert str(tmp_path / "k" / "signing-key.pub.pem") in out


# --- config -----------------------------------------------------------------------------


def test_config_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    tables = PluginManager().config_tables  # the plugins' tables: [vnc], [spice], [serial]
    assert {"vnc", "spice", "serial"} <= {table.name for table in tables}
    assert run(capsys, "config", "--defaults") == (0, render_defaults(tables), "")
    assert run(capsys, "config", "--defaults", "--format", "markdown") == (
        0, render_markdown(tables), ""
    )
    out = run(capsys, "config", "--defaults")[1]
    assert "\n[vnc]\n" in out and "\n[spice]\n" in out and "\n[serial]\n" in out


def test_config_check_reads_the_plugins_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plugins.toml"
    path.write_text('[vnc]\nshared = false\n[serial]\nrecord = true\n')
    assert run(capsys, "config", "--check", str(path)) == (0, f"{path}: ok\n", "")
    path.write_text('[serial]\nrecord = "yes"\n')
    status, out, err = run(capsys, "config", "--check", str(path))
    assert status == 1 and out == ""
    assert f"{path}: serial.record: must be true or false, not a string" in err


def test_config_check_ok(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "config", "--check", str(config_file))
    assert status == 0 and out == f"{config_file}: ok\n"


def test_config_check_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[listen]\nprot = 1\n")
    status, out, err = run(capsys, "config", "--check", str(path))
    assert status == 1 and out == ""
    assert f"{path}: listen.prot: unknown key" in err
    path.write_text('[tokens]\npublic_keys = ["missing.pub.pem"]\n')
    status, _, err = run(capsys, "config", "--check", str(path))
    assert status == 1 and "tokens.public_keys" in err and "missing.pub.pem: no such" in err


def test_config_check_finds_the_file(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_BROKER_CONFIG", str(config_file))
    assert run(capsys, "config", "--check")[1] == f"{config_file}: ok\n"
    monkeypatch.delenv("CONSOLE_BROKER_CONFIG")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", config_file.parent / "absent.toml")
    assert run(capsys, "config", "--check")[1] == "built-in defaults: ok\n"


def test_config_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config"])
    assert info.value.code == 2
    capsys.readouterr()


# --- token ------------------------------------------------------------------------------


def test_token_text(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "token", DOMAIN, "--uuid", "--protocol", "vnc", "--config", str(keyed_config)
    )
    assert status == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines())
    page, websocket = lines["page"].strip(), lines["websocket"].strip()
    assert page.startswith("http://127.0.0.1:6080/console/vnc/?token=")
    assert websocket.startswith("ws://127.0.0.1:6080/ws/vnc?token=")
    assert token_of(page) == token_of(websocket)
    claims = verifier_for(keyed_config).verify(
        token_of(page), protocol="vnc", node="hv1", domain=DOMAIN
    )
    assert claims.rights is Rights.FULL
    assert claims.expires_at - claims.issued_at == 60
    assert lines["domain"].strip() == DOMAIN


def test_token_json(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keyed_config.write_text(
        keyed_config.read_text() + 'public_url = "https://consoles.example.com/hv1"\n'
    )
    status, out, err = run(
        capsys,
        "token",
        DOMAIN.upper(),
        "--uuid",
        "-p",
        "serial",
        "--ttl",
        "120",
        "--view-only",
        "--json",
        "--config",
        str(keyed_config),
    )
    assert status == 0, err
    doc: dict[str, Any] = json.loads(out)
    token = doc["token"]
    assert doc["page"] == f"https://consoles.example.com/hv1/console/serial/?token={token}"
    assert doc["websocket"] == f"wss://consoles.example.com/hv1/ws/serial?token={token}"
    assert doc["protocol"] == "serial"
    assert doc["domain"] == {"name": None, "uuid": DOMAIN}
    assert doc["view_only"] is True
    assert doc["node"] == "hv1"
    assert doc["expires_at"].endswith("Z")
    claims = verifier_for(keyed_config).verify(token, protocol="serial")
    assert datetime.fromisoformat(doc["expires_at"]).timestamp() == claims.expires_at
    assert claims.expires_at - claims.issued_at == 120
    assert claims.rights is Rights.VIEW and doc["jti"] == claims.jti


def test_token_never_in_a_log_line(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--json", "--config", str(keyed_config)
    )
    assert status == 0
    token = json.loads(out)["token"]  # stdout is the JSON document alone
    assert "token.issued" in err  # the audit line goes to stderr...
    assert token not in err  # ...without the token
    assert not any(part in err for part in token.split("."))


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["--uuid", "-p", "nope"], 1, "no loaded plugin serves protocol 'nope' (loaded:"),
        (
            ["--uuid", "-p", "vnc", "--ttl", "301"],
            2,
            "--ttl must be between 1 and tokens.max_ttl (300)",
        ),
        (["--uuid", "-p", "vnc", "--ttl", "0"], 2, "--ttl must be between"),
    ],
)
def test_token_refusals(
    keyed_config: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    message: str,
) -> None:
    result = run(capsys, "token", DOMAIN, *argv, "--config", str(keyed_config))
    assert result[0] == status
    assert message in result[2]


def test_token_uuid_option_needs_a_uuid(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(
        capsys, "token", "web1", "--uuid", "-p", "vnc", "--config", str(keyed_config)
    )
    assert status == 2 and "'web1' is not a UUID" in err


def test_token_without_a_key(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(
        capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--config", str(config_file)
    )
    assert status == 1
    assert "signing-key.pem: no such private key file; run 'console-broker keygen' first" in err


def test_token_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[tokens]\nttl = 1\n")
    status, _, err = run(capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--config", str(path))
    assert status == 1 and f"{path}: tokens.ttl: unknown key" in err


# --- token through libvirt (the built-in test driver: no daemon needed) -----------------


@pytest.fixture
def test_driver() -> str:
    """libvirt's in-process test driver: part of libvirt, a dependency, so never skipped."""
    import libvirt

    libvirt.open("test:///default").close()
    return "test:///default"


@pytest.mark.parametrize("domain", TEST_DRIVER_DOMAIN)
def test_token_resolves_through_libvirt(
    keyed_config: Path, capsys: pytest.CaptureFixture[str], test_driver: str, domain: str
) -> None:
    status, out, err = run(
        capsys,
        "token",
        domain,
        "-p",
        "vnc",
        "--json",
        "--connect",
        test_driver,
        "--config",
        str(keyed_config),
    )
    assert status == 0, err
    doc = json.loads(out)
    assert doc["domain"] == {"name": TEST_DRIVER_DOMAIN[0], "uuid": TEST_DRIVER_DOMAIN[1]}
    assert verifier_for(keyed_config).verify(doc["token"]).domain_uuid == TEST_DRIVER_DOMAIN[1]


@pytest.mark.parametrize("domain", ["no-such-vm", "00000000-0000-0000-0000-000000000001"])
def test_token_unknown_domain(
    keyed_config: Path, capsys: pytest.CaptureFixture[str], test_driver: str, domain: str
) -> None:
    status, out, err = run(
        capsys,
        "token",
        domain,
        "-p",
        "vnc",
        "--connect",
        test_driver,
        "--config",
        str(keyed_config),
    )
    assert status == 1 and out == ""
    assert f"no domain {domain!r} at {test_driver}" in err


def test_token_libvirt_unreachable(keyed_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("libvirt")
    uri = "qemu:///system?socket=/nonexistent/libvirt-sock"
    status, out, err = run(
        capsys, "token", "web1", "-p", "vnc", "--connect", uri, "--config", str(keyed_config)
    )
    assert status == 1 and out == ""
    assert f"cannot reach libvirt at {uri}" in err
