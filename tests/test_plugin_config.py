"""Plugin-owned configuration: a third-party plugin's table (``[monitor]``) is declared
through ``console_broker_config_tables``, parsed and checked like the core's, shown in
``config --defaults`` and handed back to the plugin; clashing table names are load
errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

import broker.plugins
import broker.token_cli
from broker.api import ConfigTable, at_least, hookimpl, one_of, setting
from broker.cli import main
from broker.config import (
    Config,
    ConfigError,
    key_specs,
    load_config,
    render_defaults,
    render_markdown,
)
from broker.configfile import read_config
from broker.hookspecs import ClientFile, Protocol
from broker.plugins import PluginContext, PluginError, PluginManager


@attrs.frozen
class MonitorSection:
    """The monitor plugin: the QEMU monitor socket it watches."""

    socket: str = setting("", "QEMU monitor socket to watch. Empty: none.", path=True)
    interval: float = setting(5.0, "Seconds between two polls.", at_least(0.1))
    mode: str = setting("poll", "How to watch: 'poll' or 'events'.", one_of("poll", "events"))
    alarms: tuple[str, ...] = setting((), "Events that raise an alarm.")


def monitor_checks(section: MonitorSection) -> list[str]:
    if section.alarms and not section.socket:
        return ["monitor.alarms, monitor.socket: alarms need a socket to watch"]
    return []


MONITOR = ConfigTable(name="monitor", schema=MonitorSection, check=monitor_checks)


class MonitorProtocol(Protocol):
    def client_file(self, token: str, title: str, context: PluginContext) -> ClientFile | None:
        section = context.config.table(MONITOR)
        return ClientFile(name="monitor", body=f"{section.socket} {section.interval}")


class Monitor:
    """A third-party plugin with a table of its own, reading it back in its protocol."""

    @hookimpl
    def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
        return [MONITOR]

    @hookimpl
    def console_broker_protocols(self) -> list[Protocol]:
        return [MonitorProtocol(name="monitor", title="Monitor")]


def manager(*plugins: tuple[str, object], entry_points: bool = False) -> PluginManager:
    return PluginManager(disabled=(), load_entrypoints=entry_points, plugins=plugins)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_the_table_is_collected() -> None:
    assert manager(("monitor", Monitor())).config_tables == (MONITOR,)
    assert manager().config_tables == ()
    assert "monitor" not in [table.name for table in PluginManager().config_tables]


def test_the_table_is_accepted_and_its_keys_are_effective(tmp_path: Path) -> None:
    plugins = manager(("monitor", Monitor()))
    path = write(
        tmp_path,
        '[monitor]\nsocket = "run/qmp.sock"\ninterval = 2\nalarms = ["GUEST_PANICKED"]\n'
        '[listen]\nport = 7000\n',
    )
    config = load_config(path, plugins.config_tables)
    section = config.table(MONITOR)
    assert section == MonitorSection(
        socket=str(tmp_path / "run" / "qmp.sock"),  # relative to the file
        interval=2.0,
        alarms=("GUEST_PANICKED",),
    )
    assert isinstance(section.interval, float)
    assert config.table("monitor") is section and config.listen.port == 7000
    assert config.table("listen") is config.listen
    # The plugin's protocol gets it back through its context's configuration.
    plugin, protocol = plugins.protocols["monitor"]
    found = protocol.client_file("t", "d", plugins.contexts(config)[plugin])
    assert found is not None and found.body == f"{tmp_path / 'run' / 'qmp.sock'} 2.0"


def test_the_defaults_when_the_file_has_no_such_table(tmp_path: Path) -> None:
    tables = manager(("monitor", Monitor())).config_tables
    assert load_config(write(tmp_path, "[listen]\nport = 7000\n"), tables).table(
        MONITOR
    ) == MonitorSection()
    assert load_config(None, tables).table(MONITOR) == MonitorSection()
    assert Config().table(MONITOR) == MonitorSection()  # built without the declaration
    with pytest.raises(KeyError, match="no table 'monitor'"):
        Config().table("monitor")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[monitor]\nsockett = 'x'\n",
            "monitor.sockett: unknown key (monitor has: socket, interval, mode, alarms)",
        ),
        ("[monitor]\ninterval = '5'\n", "monitor.interval: must be a number, not a string"),
        (
            "[monitor]\nalarms = [1]\n",
            "monitor.alarms: must be an array of strings, not an array of non-strings",
        ),
        ("[monitor]\ninterval = 0\n", "monitor.interval: must be at least 0.1"),
        ("[monitor]\nmode = 'push'\n", "monitor.mode: must be one of 'poll', 'events'"),
        ("monitor = 1\n", "monitor: must be a table ([monitor]), not an integer"),
        (
            "[monitor]\nalarms = ['RESET']\n",
            "monitor.alarms, monitor.socket: alarms need a socket to watch",
        ),
        (
            "[nope]\n",
            "nope: unknown key (tables: broker, listen, tls, http, libvirt, tokens, limits, "
            "proxy, logging, recordings, service, audit, monitor)",
        ),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, manager(("monitor", Monitor())).config_tables)
    assert info.value.problems == [f"{path}: {message}"]


def test_the_table_without_its_plugin_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "[monitor]\ninterval = 2\n")
    with pytest.raises(ConfigError, match=r"monitor: unknown key \(tables: broker, "):
        load_config(path, manager().config_tables)


def test_the_table_is_in_the_documented_defaults(tmp_path: Path) -> None:
    tables = manager(("monitor", Monitor())).config_tables
    text = render_defaults(tables)
    assert text.endswith(
        "# The monitor plugin: the QEMU monitor socket it watches.\n"
        "[monitor]\n"
        "# QEMU monitor socket to watch. Empty: none.\n"
        'socket = ""\n'
        "# Seconds between two polls.\n"
        "interval = 5.0\n"
        "# How to watch: 'poll' or 'events'.\n"
        'mode = "poll"\n'
        "# Events that raise an alarm.\n"
        "alarms = []\n"
    )
    assert tomllib.loads(text)["monitor"] == {
        "socket": "", "interval": 5.0, "mode": "poll", "alarms": []
    }
    assert load_config(write(tmp_path, text), tables) == load_config(None, tables)
    assert render_markdown(tables).endswith(
        "| `monitor.alarms` | array of strings | `[]` | Events that raise an alarm. |\n"
    )
    assert [spec.dotted for spec in key_specs(tables)][-4:] == [
        "monitor.socket", "monitor.interval", "monitor.mode", "monitor.alarms"
    ]


def test_plugin_tables_come_after_the_core_by_order_then_name() -> None:
    class Early:
        @hookimpl
        def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
            return [ConfigTable(name="zeta", schema=MonitorSection, order=1)]

    tables = manager(("monitor", Monitor()), ("early", Early())).config_tables
    assert [table.name for table in tables] == ["zeta", "monitor"]
    builtin = PluginManager(disabled=()).config_tables
    assert [t.name for t in builtin if t.name in ("vnc", "spice", "serial")] == [
        "vnc", "spice", "serial"
    ]


@pytest.fixture
def with_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands load the monitor plugin besides the installed ones."""

    class WithMonitor(PluginManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(plugins=[("monitor", Monitor())], **kwargs)

    monkeypatch.setattr(broker.plugins, "PluginManager", WithMonitor)
    monkeypatch.setattr(broker.token_cli, "PluginManager", WithMonitor)


@pytest.mark.usefixtures("with_monitor")
def test_the_commands_read_and_show_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--defaults"]) == 0
    out = capsys.readouterr().out
    assert "\n[vnc]\n" in out and "\n[monitor]\n" in out
    assert out.index("\n[serial]\n") < out.index("\n[monitor]\n")  # after the built-in ones
    assert main(["config", "--defaults", "--format", "markdown"]) == 0
    assert "| `monitor.interval` | number | `5.0` | Seconds between two polls. |" in (
        capsys.readouterr().out
    )
    path = write(tmp_path, "[monitor]\ninterval = 2\n[vnc]\nshared = false\n")
    assert main(["config", "--check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"
    assert read_config(path).table(MONITOR).interval == 2.0
    path.write_text("[monitor]\ninterval = 2\nbogus = 1\n")
    assert main(["config", "--check", str(path)]) == 1
    assert f"{path}: monitor.bogus: unknown key (monitor has: socket" in capsys.readouterr().err


# --- declarations that are load errors ---------------------------------------------------


def declaring(*tables: ConfigTable[Any]) -> object:
    class Declaring:
        @hookimpl
        def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
            return list(tables)

    return Declaring()


@attrs.frozen
class ListenAgain:
    """Another listen table."""

    port: int = setting(1, "A port.")


def test_two_plugins_declaring_one_table_is_a_load_error() -> None:
    with pytest.raises(
        PluginError, match="configuration table 'monitor' is declared by both 'one' and 'two'"
    ):
        manager(("one", Monitor()), ("two", declaring(MONITOR)))
    with pytest.raises(
        PluginError, match="configuration table 'vnc' is declared by both 'vnc' and 'bad'"
    ):
        manager(("bad", declaring(ConfigTable("vnc", MonitorSection))), entry_points=True)


def test_a_plugin_declaring_a_core_table_is_a_load_error() -> None:
    with pytest.raises(
        PluginError, match="configuration table 'listen' is declared by both the core and 'bad'"
    ):
        manager(("bad", declaring(ConfigTable("listen", ListenAgain))))


@attrs.frozen
class Undocumented:
    """A table with a key declared without setting()."""

    port: int = 5


@attrs.frozen
class Unsupported:
    """A table with a key of a type TOML files cannot give."""

    ports: list[int] = setting([], "Ports.")  # noqa: RUF009 - the mistake under test


class _WrongReturn:
    @hookimpl
    def console_broker_config_tables(self) -> object:
        return MONITOR


class _BadTable:
    @hookimpl
    def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
        return [ConfigTable("Monitor", MonitorSection)]


class _Undocumented:
    @hookimpl
    def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
        return [ConfigTable("monitor", Undocumented)]


class _Unsupported:
    @hookimpl
    def console_broker_config_tables(self) -> list[ConfigTable[Any]]:
        return [ConfigTable("monitor", Unsupported)]


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (_WrongReturn(), "'bad': console_broker_config_tables must return a list of"),
        (_BadTable(), "'bad': console_broker_config_tables: table name 'Monitor' must be"),
        (_Undocumented(), "key 'port': not declared with broker.config.setting()"),
        (_Unsupported(), "key 'ports': has type list\\[int\\]"),
    ],
)
def test_a_table_breaking_the_contract_is_refused(plugin: object, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        manager(("bad", plugin))
