"""The plugin's declarations, loaded by the core alone (no entry point, no broker): its
protocol, refusal, table and XML edit are accepted; its table's keys are parsed and
checked; its page is served from package data; the ``qga`` edit adds the guest agent's
channel idempotently and ``disable`` gives the input back byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

import cb_qemu_monitor
import pytest
from cb_qemu_monitor import (
    COMMAND_REFUSED,
    GUEST_AGENT,
    PROTOCOL,
    QGA,
    SUBPROTOCOL,
    TABLE,
    MonitorSection,
)
from cb_qemu_monitor._page import CSP
from lxml import etree

from broker.api import (
    PLUGIN_CODES,
    Config,
    ConfigError,
    EditOptions,
    PluginContext,
    PluginManager,
    load_config,
    read_consoles,
)
from broker.service._refusals import CORE_REFUSALS
from broker.xml import disable_xml, enable_xml, parse_document, plugin_edits

#: A small domain without a guest agent channel.
DOMAIN = b"""<domain type='qemu'>
  <name>plain</name>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <video>
      <model type='vga'/>
    </video>
  </devices>
</domain>
"""
#: One whose guest agent channel is on a socket of its own (libvirt's completed form).
WITH_AGENT = b"""<domain type='qemu'>
  <name>agent</name>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <channel type='unix'>
      <source mode='bind' path='/run/agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    """The core's plugin manager with this plugin alone, as its entry point names it."""
    return PluginManager(disabled=(), load_entrypoints=False,
                         plugins=[("monitor", cb_qemu_monitor)])


def test_the_core_accepts_the_declarations(manager: PluginManager) -> None:
    assert manager.protocols == {"monitor": ("monitor", PROTOCOL)}
    assert manager.xml_edits == {"qga": ("monitor", GUEST_AGENT)}
    assert manager.refusals == {"monitor_command_refused": ("monitor", COMMAND_REFUSED)}
    assert manager.config_tables == (TABLE,)
    assert (PROTOCOL.endpoint, PROTOCOL.view_only, PROTOCOL.subprotocols) == (
        "none", True, (SUBPROTOCOL,)
    )
    assert PROTOCOL.console == "monitor"
    assert COMMAND_REFUSED.close_code in PLUGIN_CODES
    assert COMMAND_REFUSED.close_code not in {r.close_code for r in CORE_REFUSALS}


def test_the_table_is_parsed_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[monitor]\nview_only_commands = ["info", "help"]\ntimeout = 2\nmax_output = 4096\n'
    )
    section = load_config(path, [TABLE]).table(TABLE)
    assert section == MonitorSection(
        view_only_commands=("info", "help"), timeout=2.0, max_output=4096
    )
    assert load_config(None, [TABLE]).table(TABLE) == MonitorSection()
    for text, message in [
        ('view_only_commands = ["info status"]', "not a command name: 'info status'"),
        ('view_only_commands = ["x/4x"]', "not a command name: 'x/4x'"),
        ('view_only_commands = [""]', "not a command name: ''"),
        ("timeout = 0", "monitor.timeout: must be at least 0.1"),
        ("max_output = 0", "monitor.max_output: must be at least 1"),
        ("commands = []", "monitor.commands: unknown key"),
    ]:
        path.write_text(f"[monitor]\n{text}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path, [TABLE])


def page(path: str) -> tuple[int, str, dict[str, str], bytes] | None:
    found = PROTOCOL.page(path, PluginContext("monitor", Config()))
    if found is None:
        return None
    return found.status, found.content_type, dict(found.headers), found.body


def test_the_page_and_its_files() -> None:
    html = page("")
    assert html is not None
    status, kind, headers, body = html
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "default-src 'none'" in CSP
    assert b'<script src="console.js"></script>' in body
    assert b'href="console.css"' in body
    script = page("console.js")
    assert script is not None and script[1] == "text/javascript; charset=utf-8"
    assert "Content-Security-Policy" not in script[2]
    assert SUBPROTOCOL.encode() in script[3] and b"/ws/monitor?token=" in script[3]
    assert b"4301" in script[3]  # the plugin's own close code has its text
    style = page("console.css")
    assert style is not None and style[1] == "text/css; charset=utf-8"


@pytest.mark.parametrize(
    "path", ["index.html", "console.html", "static/console.js", "../__init__.py", "x/"]
)
def test_nothing_else_is_served(path: str) -> None:
    assert page(path) is None


def channels(data: bytes) -> list[etree._Element]:
    devices = parse_document(data).root.find("devices")
    assert devices is not None
    found = devices.xpath(QGA)
    assert isinstance(found, list)
    return [el for el in found if isinstance(el, etree._Element)]


def test_qga_adds_the_channel_idempotently_and_disable_restores_the_input(
    manager: PluginManager,
) -> None:
    edits = plugin_edits(manager)
    enabled = enable_xml(DOMAIN, ["qga"], EditOptions(), edits=edits).after
    (channel,) = channels(enabled)
    assert channel.get("type") == "unix"
    target = channel.find("target")
    assert target is not None
    assert (target.get("type"), target.get("name")) == ("virtio", "org.qemu.guest_agent.0")
    assert len(target.attrib) == 2
    assert set(read_consoles(parse_document(enabled))) == {"qga"}
    for mode in ("fd", "tcp", "websocket"):  # no mode changes it
        assert enable_xml(enabled, ["qga"], EditOptions(mode=mode), edits=edits).after == enabled
    assert disable_xml(enabled, edits=edits).after == DOMAIN


def test_qga_keeps_a_guest_agent_channel_the_domain_has(manager: PluginManager) -> None:
    edits = plugin_edits(manager)
    enabled = enable_xml(WITH_AGENT, ["qga"], EditOptions(), edits=edits).after
    (channel,) = channels(enabled)
    source = channel.find("source")
    assert source is not None and source.get("path") == "/run/agent.sock"
    assert disable_xml(enabled, edits=edits).after == WITH_AGENT


def test_qga_provisions_no_console_and_is_guest_visible() -> None:
    edit = GUEST_AGENT.xml_edit(EditOptions())
    assert edit.devices == ()
    (slot,) = edit.slots
    assert slot.guest_visible  # the libvirt hook never adds it behind a migration's back
