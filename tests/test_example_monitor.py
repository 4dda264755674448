"""The QEMU monitor example (examples/qemu-monitor) installed as a third-party
distribution, through the command line: listed, its table in the configuration, its
``qga`` XML edit (which is no protocol), its page's URL in a token, and a second
distribution claiming its protocol refused. The real-stack tests are in
test_example_monitor_vm.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import cb_qemu_monitor
import pytest
from distributions import installed
from lxml import etree

from broker.plugins import PluginManager
from broker.xml import EditOptions, disable_xml, enable_xml, parse_document, plugin_edits

pytestmark = pytest.mark.usefixtures("monitor_installed")

CLI = [sys.executable, "-m", "broker.cli"]
CORPUS = Path(__file__).parent / "xml_corpus"
UUID = "2f6d8a51-6f1e-4b0c-9a55-3c2b1e0d9f7a"
QGA_CHANNEL = "channel[target/@name='org.qemu.guest_agent.0']"


def agent_channels(data: bytes) -> list[etree._Element]:
    """The guest agent channels of the domain XML *data*."""
    devices = parse_document(data).root.find("devices")
    found = [] if devices is None else devices.xpath(QGA_CHANNEL)
    assert isinstance(found, list)
    return [el for el in found if isinstance(el, etree._Element)]


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\nnode = "n1"\nstate_dir = "{tmp_path / "state"}"\n[listen]\nport = 7700\n'
    )
    return path


def test_it_is_listed_with_its_distribution_and_protocol() -> None:
    listed = {entry["name"]: entry for entry in json.loads(cli("plugins", "--json").stdout)}
    assert listed["monitor"]["distribution"] == "console-broker-qemu-monitor"
    assert listed["monitor"]["version"] == "0.1.0"
    assert [p["name"] for p in listed["monitor"]["protocols"]] == ["monitor"]
    assert {"vnc", "spice", "serial"} <= set(listed)
    text = cli("plugins").stdout.decode()
    assert "console-broker-qemu-monitor" in text and "protocols: monitor" in text


def test_config_defaults_shows_its_table() -> None:
    done = cli("config", "--defaults")
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "# The QEMU monitor console (the example plugin" in text
    assert tomllib.loads(text)["monitor"] == {
        "view_only_commands": ["info"], "timeout": 10.0, "max_output": 65536
    }
    markdown = cli("config", "--defaults", "--format", "markdown").stdout.decode()
    assert "| `monitor.view_only_commands` |" in markdown


def test_config_check_takes_its_table_and_names_a_bad_key(config: Path) -> None:
    base = config.read_text()
    config.write_text(base + '[monitor]\nview_only_commands = ["info", "help"]\ntimeout = 1\n')
    assert cli("config", "--check", str(config)).returncode == 0
    config.write_text(base + "[monitor]\ntimeout = 0\n")
    done = cli("config", "--check", str(config))
    assert done.returncode != 0
    assert "monitor.timeout: must be at least 0.1" in done.stderr.decode() + done.stdout.decode()


def test_a_token_for_it_prints_its_page(config: Path) -> None:
    assert cli("keygen", "--config", str(config)).returncode == 0
    done = cli("token", UUID, "--uuid", "--protocol", "monitor", "--view-only", "--json",
               "--config", str(config))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["page"].startswith("http://127.0.0.1:7700/console/monitor/?token=")
    assert doc["websocket"].startswith("ws://127.0.0.1:7700/ws/monitor?token=")
    assert doc["view_only"] is True


def test_no_token_is_issued_for_the_qga_edit(config: Path) -> None:
    assert cli("keygen", "--config", str(config)).returncode == 0
    done = cli("token", UUID, "--uuid", "--protocol", "qga", "--config", str(config))
    assert done.returncode == 1
    assert done.stdout == b""
    error = done.stderr.decode()
    assert "no loaded plugin serves protocol 'qga'" in error
    assert "monitor" in error  # the loaded protocols are listed


def test_xml_enable_qga_adds_the_channel_once_and_disable_gives_the_input_back() -> None:
    data = (CORPUS / "console-virtio-only.xml").read_bytes()
    done = cli("xml", "enable", "--consoles", "qga", stdin=data)
    assert done.returncode == 0, done.stderr
    enabled = done.stdout
    assert len(agent_channels(enabled)) == 1
    assert cli("xml", "enable", "--consoles", "qga", stdin=enabled).stdout == enabled
    assert cli("xml", "enable", "--consoles", "qga", "--check", stdin=enabled).returncode == 0
    shown = json.loads(cli("xml", "show", "--json", stdin=enabled).stdout)
    assert shown == {"qga": {"protocol": "qga", "mode": "unix", "device": None,
                             "settings": {}, "slots": ["channel"]}}
    assert cli("xml", "disable", stdin=enabled).stdout == data
    # beside a built-in protocol's console, and each undone alone
    both = cli("xml", "enable", "--consoles", "serial,qga", stdin=data).stdout
    only_serial = cli("xml", "disable", "--consoles", "qga", stdin=both).stdout
    assert cli("xml", "enable", "--consoles", "serial", stdin=data).stdout == only_serial
    assert cli("xml", "disable", stdin=both).stdout == data


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.xml")), ids=lambda path: path.stem)
def test_qga_on_the_corpus(path: Path) -> None:
    """Every domain of the XML corpus: the channel is there once (the one the domain had,
    or a new one), a second run changes nothing, and disable restores the input."""
    manager = PluginManager(disabled=(), load_entrypoints=False,
                            plugins=[("monitor", cb_qemu_monitor)])
    data = path.read_bytes()
    had = agent_channels(data)
    enabled = enable_xml(data, ["qga"], EditOptions(), edits=plugin_edits(manager)).after
    channels = agent_channels(enabled)
    assert len(channels) == 1
    if had:  # kept as it was
        assert etree.tostring(channels[0]).strip() == etree.tostring(had[0]).strip()
    again = enable_xml(enabled, ["qga"], EditOptions(), edits=plugin_edits(manager)).after
    assert again == enabled
    assert disable_xml(enabled, edits=plugin_edits(manager)).after == data


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[None]:
    """A second distribution whose plugin declares the protocol ``monitor`` too."""
    source = tmp_path / "twin-source"
    (source / "cb_monitor_twin").mkdir(parents=True)
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=69"]\n'
        'build-backend = "setuptools.build_meta"\n'
        '[project]\nname = "console-broker-monitor-twin"\nversion = "0.0.1"\n'
        '[project.entry-points.console_broker]\ntwin = "cb_monitor_twin"\n'
        '[tool.setuptools]\npackages = ["cb_monitor_twin"]\n'
    )
    (source / "cb_monitor_twin" / "__init__.py").write_text(
        "from broker.api import Protocol, hookimpl\n\n\n"
        "@hookimpl\ndef console_broker_protocols():\n"
        "    return [Protocol(name='monitor', title='Another monitor')]\n"
    )
    scratch = tmp_path / "twin-build"
    scratch.mkdir()
    with installed(source, "console-broker-monitor-twin", scratch):
        yield


@pytest.mark.usefixtures("twin")
def test_serve_refuses_two_distributions_claiming_the_protocol(config: Path) -> None:
    done = subprocess.run(
        [*CLI, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "protocol 'monitor' is declared by both" in done.stderr
    assert "'console-broker-qemu-monitor'" in done.stderr
    assert "'console-broker-monitor-twin'" in done.stderr


def test_the_guide_shows_the_examples_names_and_values() -> None:
    """docs/plugins.md walks through this example: what its excerpts name exists, and the
    values they show are the code's."""
    from cb_qemu_monitor import _session

    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    section = guide[guide.index("## Your first plugin"):guide.index("## Registering")]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.DOTALL))
    for name in ("MonitorSection", "TABLE", "Monitor", "PROTOCOL", "COMMAND_REFUSED",
                 "GuestAgent", "GUEST_AGENT", "QGA", "agent_channel", "command_names",
                 "console_broker_protocols", "console_broker_xml_edits",
                 "console_broker_refusals", "console_broker_config_tables"):
        assert re.search(rf"\b{name}\b", code), name
        assert hasattr(cb_qemu_monitor, name), name
    for name in ("MonitorSessions", "command_line", "command_name", "hmp"):
        assert re.search(rf"\b{name}\b", code), name
        assert hasattr(_session, name), name
    assert {"from_context", "serve", "_run", "_send"} <= set(vars(_session.MonitorSessions))
    refused = cb_qemu_monitor.COMMAND_REFUSED
    assert f'Refusal("{refused.reason}", 0, {refused.close_code},' in code
    assert f'"{refused.text}"' in code
    assert f'subprotocols=("{cb_qemu_monitor.SUBPROTOCOL}",)' in code
    assert f'QGA = "{cb_qemu_monitor.QGA}"' in code
    defaults = cb_qemu_monitor.MonitorSection()
    assert '("info",)' in code and defaults.view_only_commands == ("info",)
    assert "setting(10.0," in code and defaults.timeout == 10.0
    assert "setting(65536," in code and defaults.max_output == 65536
