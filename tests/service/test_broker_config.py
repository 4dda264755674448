"""The configuration: defaults, the documented default file, errors naming key and file."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from broker import config as config_module
from broker.config import Config, ConfigError, find_config, key_specs, load_config, render_defaults
from broker.plugins import PluginManager

#: The built-in plugins' tables ([vnc], [spice], [serial]).
BUILTIN = PluginManager(disabled=()).config_tables


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config == Config()
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 6080)
    assert config.libvirt.uri == "qemu:///system"
    assert config.node_name == socket.gethostname()
    assert config.state_dir == Path("/var/lib/console-broker")
    assert config.private_key_path == Path("/var/lib/console-broker/signing-key.pem")
    assert config.public_key_paths == [Path("/var/lib/console-broker/signing-key.pub.pem")]
    assert not config.tls_enabled
    assert config.public_url == "http://127.0.0.1:6080"
    assert config.ws_url == "ws://127.0.0.1:6080"
    assert config.http.allowed_origins == () and config.http.allow_missing_origin is False
    tokens = config.tokens
    assert (tokens.default_ttl, tokens.leeway, tokens.replay_cache_size) == (60, 5, 100_000)
    assert tokens.max_ttl >= tokens.default_ttl
    limits = config.limits
    assert (
        limits.max_sessions,
        limits.max_sessions_per_domain,
        limits.max_sessions_per_client,
    ) == (
        10_000,
        16,
        64,
    )
    assert (limits.handshake_timeout, limits.idle_timeout, limits.shutdown_grace) == (
        10.0,
        0.0,
        5.0,
    )
    assert (config.logging.format, config.logging.level) == ("json", "info")


def test_rendered_defaults_load_back_to_the_defaults(tmp_path: Path) -> None:
    text = render_defaults()
    assert load_config(write(tmp_path, text)) == Config()
    text = render_defaults(BUILTIN)
    assert [name for name in tomllib.loads(text)] == [
        "broker", "listen", "tls", "http", "libvirt", "tokens", "limits", "proxy", "logging",
        "recordings", "service", "audit", "vnc", "spice", "serial",
    ]
    loaded = load_config(write(tmp_path, text), BUILTIN)
    assert loaded == load_config(None, BUILTIN)
    assert [loaded.table(table) for table in BUILTIN] == [table.schema() for table in BUILTIN]
    parsed = tomllib.loads(text)
    for spec in key_specs(BUILTIN):
        assert spec.name in parsed[spec.table], spec.dotted
        assert f"# {spec.doc.split()[0]}" in text  # each key is preceded by its documentation


def test_every_key_is_documented() -> None:
    for spec in key_specs(BUILTIN):
        assert spec.doc.strip().endswith("."), spec.dotted


def test_values_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
node = "hv7"
state_dir = "state"
[listen]
host = "0.0.0.0"
port = 8443
[tls]
cert = "/etc/pki/broker.crt"
key = "broker.key"
[tokens]
default_ttl = 30
public_keys = ["keys/control-plane.pub.pem", "/etc/old.pub.pem"]
[limits]
handshake_timeout = 3
[http]
allowed_origins = ["https://portal.example.com", "http://localhost:8080"]
""",
    )
    config = load_config(path)
    assert config.source == path
    assert config.node_name == "hv7"
    assert config.state_dir == tmp_path / "state"  # relative to the file's directory
    assert config.tls.key == str(tmp_path / "broker.key")
    assert config.tls.cert == "/etc/pki/broker.crt"
    assert config.public_key_paths == [
        tmp_path / "state" / "signing-key.pub.pem",
        tmp_path / "keys" / "control-plane.pub.pem",
        Path("/etc/old.pub.pem"),
    ]
    assert config.limits.handshake_timeout == 3.0 and isinstance(
        config.limits.handshake_timeout, float
    )
    assert config.public_url == "https://hv7:8443"  # wildcard listen: the node name
    assert config.ws_url == "wss://hv7:8443"
    assert config.http.allowed_origins == ("https://portal.example.com", "http://localhost:8080")


def test_public_url_override_and_ipv6(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[broker]\npublic_url = "https://consoles.example.com/hv1/"\n')
    )
    assert config.public_url == "https://consoles.example.com/hv1"
    assert config.ws_url == "wss://consoles.example.com/hv1"
    config = load_config(write(tmp_path, '[listen]\nhost = "::1"\n'))
    assert config.public_url == "http://[::1]:6080"


def test_untrusting_local_key(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[tokens]\ntrust_local_key = false\npublic_keys = ["/k.pem"]\n')
    )
    assert config.public_key_paths == [Path("/k.pem")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tokens]\nttl = 5\n", "tokens.ttl: unknown key (tokens has: default_ttl"),
        ("[bogus]\nx = 1\n", "bogus: unknown key (tables: broker, listen"),
        ("port = 6080\n", "port: unknown key"),
        ("listen = 5\n", "listen: must be a table ([listen]), not an integer"),
        ('[listen]\nport = "6080"\n', "listen.port: must be an integer, not a string"),
        ("[listen]\nport = 6080.0\n", "listen.port: must be an integer, not a float"),
        ("[listen]\nport = true\n", "listen.port: must be an integer, not a boolean"),
        ("[listen]\nport = 70000\n", "listen.port: must be a TCP port"),
        (
            "[limits]\nidle_timeout = false\n",
            "limits.idle_timeout: must be a number, not a boolean",
        ),
        ("[limits]\nidle_timeout = -1\n", "limits.idle_timeout: must be at least 0"),
        ("[http]\nallow_missing_origin = 1\n", "http.allow_missing_origin: must be true or false"),
        ("[http]\nallowed_origins = [1]\n", "http.allowed_origins: must be an array of strings"),
        ('[http]\nallowed_origins = "https://a"\n', "must be an array of strings, not a string"),
        ('[http]\nallowed_origins = ["https://a/path"]\n', "is not an origin"),
        ('[http]\nallowed_origins = ["*"]\n', "is not an origin"),
        ('[broker]\npublic_url = "ftp://x"\n', "broker.public_url: must be an http:// or https://"),
        ('[broker]\npublic_url = "https://x/?a=1"\n', "must not have a query"),
        ('[broker]\nstate_dir = ""\n', "broker.state_dir: must not be empty"),
        ('[logging]\nformat = "xml"\n', "logging.format: must be one of 'json', 'console'"),
        ('[logging]\nlevel = "loud"\n', "logging.level: must be one of"),
        ("[tokens]\nreplay_cache_size = 0\n", "tokens.replay_cache_size: must be at least 1"),
        ('[tls]\ncert = "c.pem"\n', "tls.cert, tls.key: set both"),
        ("[tokens]\ndefault_ttl = 600\n", "tokens.default_ttl: 600 exceeds tokens.max_ttl"),
        ("[tokens]\ntrust_local_key = false\n", "no public key is trusted"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert all(problem.startswith(f"{path}: ") for problem in info.value.problems)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[bogus]\nx = 1\n",
            "bogus: unknown key (tables: broker, listen, tls, http, libvirt, tokens, limits, "
            "proxy, logging, recordings, service, audit, vnc, spice, serial)",
        ),
        ("[vnc]\nshare = true\n", "vnc.share: unknown key (vnc has: shared, input, tls_ca"),
        ("[vnc]\nshared = 1\n", "vnc.shared: must be true or false, not an integer"),
        ('[vnc]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n', "vnc.tls_cert: a client "
         "certificate needs vnc.tls_ca (TLS to QEMU)"),
        ('[spice]\ndeny_channels = ["main"]\n', "spice.deny_channels: 'main' is not a SPICE "
         "channel type one can deny"),
        ('[spice]\ntls_ca = "ca.pem"\ntls_key = "k.pem"\n', "spice.tls_cert, spice.tls_key: "
         "set both (a client certificate) or neither"),
        ('[spice]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n', "spice.tls_cert: a client "
         "certificate needs spice.tls_ca (TLS to QEMU)"),
        ("[serial]\nclient_queue = 100\n", "serial.client_queue: must be at least 4096"),
        ("serial = 1\n", "serial: must be a table ([serial]), not an integer"),
    ],
)
def test_errors_in_the_builtin_plugins_tables(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, BUILTIN)
    assert message in str(info.value)
    assert all(problem.startswith(f"{path}: ") for problem in info.value.problems)


def test_plugin_tables_need_their_plugins(tmp_path: Path) -> None:
    path = write(tmp_path, '[vnc]\ntls_ca = "ca.pem"\n[serial]\nrecord = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)  # no plugin's tables
    assert info.value.problems == [
        f"{path}: vnc: unknown key (tables: broker, listen, tls, http, libvirt, tokens, "
        "limits, proxy, logging, recordings, service, audit)",
        f"{path}: serial: unknown key (tables: broker, listen, tls, http, libvirt, tokens, "
        "limits, proxy, logging, recordings, service, audit)",
    ]
    config = load_config(path, BUILTIN)
    assert config.table("vnc").tls_ca == str(tmp_path / "ca.pem")
    assert config.table("serial").record is True and config.table("spice").tls_ca == ""


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, '[tokens]\nttl = 5\nleeway = "5"\n[listen]\nport = 0\n[nope]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 4


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[listen]\nport = \n")
    with pytest.raises(ConfigError, match=r"broker\.toml: not valid TOML: .*line 2"):
        load_config(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the configuration"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[broker]\nnode = "\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_find_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "explicit.toml"
    monkeypatch.setenv("CONSOLE_BROKER_CONFIG", str(tmp_path / "env.toml"))
    assert find_config(explicit) == explicit
    assert find_config(None) == tmp_path / "env.toml"
    monkeypatch.delenv("CONSOLE_BROKER_CONFIG")
    default = tmp_path / "etc.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    assert find_config(None) is None
    default.write_text("")
    assert find_config(None) == default
