"""The keygen, config and token commands, run through broker.cli.main."""

from __future__ import annotations

import json
import subprocess
import sys
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


# --- token for a node elsewhere (a control plane): --node, --key-dir, --public-url -------

NODE_URL = "https://console.example/n/node1"
#: Runs ``console-broker ARGS`` with libvirt's connection functions made to fail loudly
#: and /etc/console-broker/broker.toml replaced by the path argv[1] names: nothing may ask
#: libvirt for a connection, and no configuration but the one the test gives is read.
NO_LIBVIRT = """
import sys
from pathlib import Path

import libvirt

def refuse(*args, **kwargs):
    raise SystemExit("libvirt was asked for a connection")

libvirt.open = libvirt.openReadOnly = libvirt.openAuth = refuse
import broker.config

broker.config.DEFAULT_CONFIG_PATH = Path(sys.argv[1])
from broker.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def control_plane_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A control plane's key directory, as ``keygen --state-dir`` makes it."""
    keys = tmp_path / "control-plane"
    assert run(capsys, "keygen", "--state-dir", str(keys))[0] == 0
    return keys


def run_elsewhere(
    tmp_path: Path, *argv: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``console-broker ARGV`` in a process with an empty HOME, no libvirt connection
    possible, and no configuration file but *config* (through CONSOLE_BROKER_CONFIG)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONSAFEPATH": "1",
        "LIBVIRT_DEFAULT_URI": "qemu:///system?socket=/nonexistent/libvirt-sock",
    }
    if config is not None:
        env["CONSOLE_BROKER_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-c", NO_LIBVIRT, str(tmp_path / "no-etc-config.toml"), *argv],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


@pytest.mark.parametrize("with_config", [False, True], ids=["no-config", "node-config"])
def test_token_for_a_node_elsewhere(
    tmp_path: Path, control_plane_keys: Path, with_config: bool
) -> None:
    """What a control plane runs: no libvirt asked (even with --connect), no state
    directory touched, no configuration needed; the links are under the node's URL."""
    config = None
    node_state = tmp_path / "node-state"
    if with_config:  # a node's configuration: none of it may be used but the limits
        config = tmp_path / "node.toml"
        config.write_text(
            f'[broker]\nnode = "hv1"\nstate_dir = "{node_state}"\n'
            'public_url = "http://hv1.internal:6080"\n'
            '[libvirt]\nuri = "qemu:///system?socket=/nonexistent/libvirt-sock"\n'
        )
    done = run_elsewhere(
        tmp_path, "token", DOMAIN, "-p", "vnc", "--json", "--view-only",
        "--node", "node1", "--key-dir", str(control_plane_keys), "--public-url", NODE_URL + "/",
        "--connect", "qemu:///system?socket=/nonexistent/libvirt-sock",
        config=config,
    )
    assert done.returncode == 0, done.stderr
    assert "libvirt was asked" not in done.stderr
    assert not node_state.exists()
    doc: dict[str, Any] = json.loads(done.stdout)
    token = doc["token"]
    # The JSON document of any other token, in shape.
    assert set(doc) == {
        "page", "websocket", "token", "expires_at", "protocol", "domain", "node",
        "view_only", "device", "name", "jti",
    }
    assert doc["page"] == f"{NODE_URL}/console/vnc/?token={token}"
    assert doc["websocket"] == f"wss://console.example/n/node1/ws/vnc?token={token}"
    assert doc["domain"] == {"name": None, "uuid": DOMAIN}
    assert doc["node"] == "node1" and doc["view_only"] is True
    verifier = TokenVerifier(
        load_public_keys([control_plane_keys / "signing-key.pub.pem"]),
        replay_cache=ReplayCache(10),
    )
    claims = verifier.verify(token, protocol="vnc", node="node1", domain=DOMAIN)
    assert claims.rights is Rights.VIEW and claims.jti == doc["jti"]


def test_token_for_a_node_elsewhere_text(
    tmp_path: Path, control_plane_keys: Path
) -> None:
    done = run_elsewhere(
        tmp_path, "token", DOMAIN.upper(), "-p", "serial", "--node", "node1",
        "--key-dir", str(control_plane_keys), "--public-url", NODE_URL,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert lines["domain"].strip() == DOMAIN
    assert lines["protocol"].strip() == "serial (full control), node node1"
    assert lines["page"].strip().startswith(f"{NODE_URL}/console/serial/?token=")
    assert lines["websocket"].strip().startswith("wss://console.example/n/node1/ws/serial?token=")
    assert "file" not in lines


def test_token_ttl_bounded_by_the_configuration_in_effect(
    tmp_path: Path, control_plane_keys: Path
) -> None:
    argv = ("token", DOMAIN, "-p", "vnc", "--node", "node1",
            "--key-dir", str(control_plane_keys), "--public-url", NODE_URL)
    done = run_elsewhere(tmp_path, *argv, "--ttl", "301")  # the defaults: max_ttl 300
    assert done.returncode == 2
    assert "--ttl must be between 1 and tokens.max_ttl (300) seconds" in done.stderr
    config = tmp_path / "limits.toml"
    config.write_text("[tokens]\nmax_ttl = 120\ndefault_ttl = 30\n")
    done = run_elsewhere(tmp_path, *argv, "--ttl", "121", "--config", str(config))
    assert done.returncode == 2
    assert "--ttl must be between 1 and tokens.max_ttl (120) seconds" in done.stderr
    done = run_elsewhere(tmp_path, *argv, "--json", "--config", str(config))
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)["token"]
    verifier = TokenVerifier(
        load_public_keys([control_plane_keys / "signing-key.pub.pem"]),
        replay_cache=ReplayCache(10),
    )
    claims = verifier.verify(token)
    assert claims.expires_at - claims.issued_at == 30  # the file's default_ttl


def test_token_node_needs_a_uuid(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys, "token", "web1", "-p", "vnc", "--node", "node1", "--config", str(keyed_config)
    )
    assert status == 2 and out == ""
    assert (
        "'web1' is not a UUID (with --node, DOMAIN must be the domain's UUID: a token for "
        "a node elsewhere is made without asking libvirt, so a name cannot be looked up)"
    ) in err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://console.example/n/node1", "is not an http:// or https:// URL with a host"),
        ("console.example/n/node1", "is not an http:// or https:// URL with a host"),
        ("https:///n/node1", "is not an http:// or https:// URL with a host"),
        ("https://console.example:99999/n/node1", "the port must be 0 to 65535"),
        ("https://console.example/n/node1?x=1", "must not have a query or a fragment"),
        ("https://console.example/n/node1?", "must not have a query or a fragment"),
        ("https://console.example/n/node1#top", "must not have a query or a fragment"),
        ("https://user:pw@console.example/n/node1", "must not carry a user name or password"),
    ],
)
def test_token_bad_public_url(
    keyed_config: Path, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", DOMAIN, "-p", "vnc", "--uuid", "--public-url", url,
              "--config", str(keyed_config)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --public-url: {url!r} {message}".replace("' the", "': the") in err


@pytest.mark.parametrize("node", ["", "node 1", "node\x01"])
def test_token_bad_node(
    keyed_config: Path, capsys: pytest.CaptureFixture[str], node: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", DOMAIN, "-p", "vnc", "--node", node, "--config", str(keyed_config)])
    assert info.value.code == 2
    assert f"argument --node: {node!r} is not a node name" in capsys.readouterr().err


def test_token_public_url_with_the_node_configuration(
    keyed_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--public-url alone: the links under it (scheme lower-cased, no trailing slash),
    the node and key of the configuration."""
    status, out, err = run(
        capsys, "token", DOMAIN, "--uuid", "-p", "vnc", "--json",
        "--public-url", "HTTP://127.0.0.1:8080/hv1/", "--config", str(keyed_config),
    )
    assert status == 0, err
    doc = json.loads(out)
    assert doc["page"] == f"http://127.0.0.1:8080/hv1/console/vnc/?token={doc['token']}"
    assert doc["websocket"] == f"ws://127.0.0.1:8080/hv1/ws/vnc?token={doc['token']}"
    assert verifier_for(keyed_config).verify(doc["token"], node="hv1").domain_uuid == DOMAIN


def test_token_key_dir_without_a_key(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-keys"
    status, out, err = run(
        capsys, "token", DOMAIN, "-p", "vnc", "--node", "node1", "--key-dir", str(missing),
        "--public-url", NODE_URL, "--config", str(config_file),
    )
    assert status == 1 and out == ""
    assert (
        f"{missing / 'signing-key.pem'}: no such private key file; "
        f"run 'console-broker keygen --state-dir {missing}' first"
    ) in err
    assert not missing.exists()


def test_token_client_file_for_a_node_elsewhere(
    tmp_path: Path, control_plane_keys: Path
) -> None:
    """--client-file keeps needing the configuration's CONNECT listener (docs/tokens.md:
    a control plane fetches the node's /file/ URL instead)."""
    done = run_elsewhere(
        tmp_path, "token", DOMAIN, "-p", "spice", "--node", "node1",
        "--key-dir", str(control_plane_keys), "--public-url", NODE_URL,
        "--client-file", str(tmp_path / "console.vv"),
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "--client-file: no connection file for spice with this configuration" in done.stderr
    assert not (tmp_path / "console.vv").exists()


def test_token_for_a_node_elsewhere_names_the_nodes_file_url(
    tmp_path: Path, control_plane_keys: Path
) -> None:
    """A control plane cannot make the .vv file (no CONNECT listener of its own), but it
    hands out the URL the node serves it at, under the node's public URL."""
    done = run_elsewhere(
        tmp_path, "token", DOMAIN, "-p", "spice", "--node", "node1",
        "--key-dir", str(control_plane_keys), "--public-url", NODE_URL, "--json",
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["file"] == f"{NODE_URL}/file/spice?token={doc['token']}"
    assert "vv" not in doc
