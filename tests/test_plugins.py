"""The plugin system: entry-point loading, the disable variable, validation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from broker import Protocol, hookimpl
from broker.cli import main
from broker.hookspecs import XMLEdit
from broker.plugins import DISABLE_ENV, PluginError, PluginManager, disabled_from_env
from broker.service import Refusal
from broker.xml import EditOptions

CLI = [sys.executable, "-m", "broker.cli"]


def test_builtin_plugins_load_through_entry_points() -> None:
    manager = PluginManager(disabled=())
    infos = {info.name: info for info in manager.plugin_infos()}
    for name in ("vnc", "spice", "serial"):
        assert infos[name].distribution == "console-broker"
        assert [p.name for p in infos[name].protocols] == [name]
        assert manager.plugin_for(name) == name


def test_plugins_command_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert {"vnc", "spice", "serial"} <= set(listed)
    assert listed["spice"]["protocols"][0]["name"] == "spice"


def test_disable_variable_blocks_a_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, " spice ,, serial")
    assert disabled_from_env() == {"spice", "serial"}
    manager = PluginManager()
    # (a third-party plugin installed here may add protocols of its own)
    assert "vnc" in manager.protocols
    assert not {"spice", "serial"} & set(manager.protocols)
    with pytest.raises(PluginError, match="no loaded plugin serves protocol 'spice'"):
        manager.plugin_for("spice")


class _Duplicate:
    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [Protocol(name="vnc", title="another VNC")]


class _WrongReturn:
    @hookimpl
    def console_broker_protocols(self) -> object:
        return "vnc"


class _EditNamedLikeAProtocol:
    @hookimpl
    def console_broker_xml_edits(self) -> list[XMLEdit]:
        return [XMLEdit(name="serial", title="another serial")]


class _CoreCode:
    @hookimpl
    def console_broker_refusals(self) -> list[Refusal]:
        return [Refusal("mine", 0, 4100, "mine")]


class _CoreReason:
    @hookimpl
    def console_broker_refusals(self) -> list[Refusal]:
        return [Refusal("vm_stopped", 0, 4321, "mine")]


class _OutOfRange:
    @hookimpl
    def console_broker_refusals(self) -> list[Refusal]:
        return [Refusal("mine", 0, 4050, "mine")]


class _UnknownHook:
    @hookimpl
    def console_broker_no_such_hook(self) -> None:
        pass


class _WrongArguments:
    @hookimpl
    def console_broker_protocols(self, surprise: int) -> list[Protocol]:
        return []


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_Duplicate(), "protocol 'vnc' is declared by both plugin 'vnc' of the distribution "
                       "'console-broker' and plugin 'bad'"),
        (_WrongReturn(), "must return a list of broker.hookspecs.Protocol"),
        (_EditNamedLikeAProtocol(), "XML edit 'serial' of plugin 'bad' has the name of one of "
                                    "plugin 'serial'"),
        (_CoreCode(), "close code 4100 of 'mine' is the core's already"),
        (_CoreReason(), "refusal 'vm_stopped' is the core's already"),
        (_OutOfRange(), "outside the plugins' range 4100-4999"),
        (_UnknownHook(), "unknown hook 'console_broker_no_such_hook'"),
        (_WrongArguments(), "surprise"),
    ],
)
def test_a_plugin_breaking_the_contract_is_refused(plugin: object, message: str) -> None:
    with pytest.raises(PluginError, match=re.escape(message)):
        PluginManager(disabled=(), plugins=[("bad", plugin)])


def test_two_plugins_may_not_declare_one_refusal_or_code() -> None:
    class One:
        @hookimpl
        def console_broker_refusals(self) -> list[Refusal]:
            return [Refusal("busy_monitor", 0, 4300, "the monitor is busy")]

    class Two:
        @hookimpl
        def console_broker_refusals(self) -> list[Refusal]:
            return [Refusal("other", 0, 4300, "other")]

    with pytest.raises(PluginError, match="close code 4300 of 'other' is plugin 'one'"):
        PluginManager(disabled=(), load_entrypoints=False, plugins=[("one", One()), ("two", Two())])
    manager = PluginManager(disabled=(), load_entrypoints=False, plugins=[("one", One())])
    assert manager.refusals["busy_monitor"][0] == "one"


def test_the_spice_plugin_declares_its_channel_refusal() -> None:
    plugin, refusal = PluginManager(disabled=()).refusals["channel_refused"]
    assert (plugin, refusal.close_code) == ("spice", 4107)


def test_a_protocol_serves_only_what_it_overrides() -> None:
    """Protocol objects carry their behaviour; the base serves nothing but raw bytes."""
    from broker.config import Config
    from broker.plugins import PluginContext
    from broker.service import raw_proxy

    bare = Protocol(name="bare", title="bare")
    context = PluginContext("example", Config())
    assert bare.session_handler(context) is raw_proxy
    assert bare.page("", context) is None
    assert bare.client_file("t", "title", context) is None
    assert bare.console_tls(context) is None
    assert bare.xml_edit(EditOptions()) is None


def test_a_plugin_context_gives_a_named_logger_and_its_metrics() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from broker.config import Config
    from broker.plugins import PluginContext

    registry = CollectorRegistry()
    context = PluginContext("my-plugin", Config(), registry)
    counter = context.metric(Counter, "commands", "Commands run.", ["command"])
    assert context.metric(Counter, "commands", "Commands run.", ["command"]) is counter
    counter.labels("info").inc()
    assert b'console_broker_my_plugin_commands_total{command="info"} 1.0' in generate_latest(
        registry
    )
    with pytest.raises(PluginError, match="snake_case"):
        context.metric(Counter, "Bad-Name", "x")


@pytest.mark.parametrize("name", ["", "VNC", "v nc", "vnc/2", "vnc\u00e9"])
def test_protocol_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="protocol name"):
        Protocol(name=name, title="x")


def _plugins_json(env: dict[str, str]) -> dict[str, dict[str, object]]:
    out = subprocess.run(
        [*CLI, "plugins", "--json"], env=env, check=True, capture_output=True, text=True
    )
    return {entry["name"]: entry for entry in json.loads(out.stdout)}


def test_third_party_distribution_is_listed_called_and_disabled(example_installed: None) -> None:
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    listed = _plugins_json(env)
    assert listed["example"]["distribution"] == "console-broker-example-plugin"
    assert listed["example"]["version"] == "1.2.3"
    # The protocol list comes from calling the plugin's hook.
    assert listed["example"]["protocols"] == [
        {
            "name": "raw-vnc",
            "title": "Raw VNC bytes",
            "description": "The VNC display's bytes as they are, for scripts and tests.",
        },
        {
            "name": "raw-serial",
            "title": "Raw serial bytes",
            "description": "The serial console's bytes as they are, for scripts and tests.",
        },
    ]
    assert {"vnc", "spice", "serial"} <= set(listed)

    text = subprocess.run([*CLI, "plugins"], env=env, check=True, capture_output=True, text=True)
    assert "example" in text.stdout and "protocols: raw-vnc, raw-serial" in text.stdout

    disabled = _plugins_json({**env, DISABLE_ENV: "example"})
    assert "example" not in disabled
    assert {"vnc", "spice", "serial"} <= set(disabled)


def test_two_edits_may_not_declare_one_xml_option_or_flag() -> None:
    from broker.hookspecs import XMLOption

    class Copycat:
        @hookimpl
        def console_broker_xml_edits(self) -> list[XMLEdit]:
            flag = XMLOption("copy.tls", "TLS again", False, flag="--spice-tls")
            return [XMLEdit(name="copy", title="copy", xml_options=(flag,))]

    manager = PluginManager(disabled=(), plugins=[("copy", Copycat())])
    with pytest.raises(PluginError, match="XML option '--spice-tls' of plugin 'spice'"):
        manager.xml_options()

    class Core:
        @hookimpl
        def console_broker_xml_edits(self) -> list[XMLEdit]:
            return [XMLEdit(name="core", title="core",
                            xml_options=(XMLOption("core.mode", "x", "", flag="--mode"),))]

    core = PluginManager(disabled=(), load_entrypoints=False, plugins=[("core", Core())])
    with pytest.raises(PluginError, match=r"'--mode' of plugin 'core' .* is the core's already"):
        core.xml_options()
    with pytest.raises(ValueError, match=r"PLUGIN\.KEY"):
        XMLOption("tls", "x", False)
