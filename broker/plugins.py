"""Loading and validating plugins.

The host loads plugins in three steps (as pluggy's own examples and tox do):
add the hook specifications, block what ``CONSOLE_BROKER_DISABLE_PLUGINS``
names, load the ``console_broker`` entry-point group. The built-in plugins go
through that same entry-point path; nothing is registered behind its back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import pluggy

from broker import hookspecs
from broker.config import CORE_TABLES, ConfigTable, all_tables
from broker.hookspecs import PROJECT_NAME, Protocol

#: Comma-separated plugin (entry-point) names that are not loaded.
DISABLE_ENV = "CONSOLE_BROKER_DISABLE_PLUGINS"


class PluginError(Exception):
    """A plugin could not be loaded or broke the hook contract."""


@attrs.frozen
class PluginInfo:
    """What ``console-broker plugins`` shows about one loaded plugin."""

    name: str
    distribution: str
    version: str
    protocols: tuple[Protocol, ...]


def disabled_from_env(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The plugin names the disable variable lists (blanks ignored)."""
    raw = (os.environ if environ is None else environ).get(DISABLE_ENV, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


class PluginManager:
    """The project's face on :class:`pluggy.PluginManager`.

    ``hook`` is pluggy's hook relay: ``manager.hook.console_broker_protocols()``.
    """

    def __init__(
        self,
        *,
        disabled: Iterable[str] | None = None,
        load_entrypoints: bool = True,
        plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.disabled = frozenset(disabled_from_env() if disabled is None else disabled)
        for name in sorted(self.disabled):
            self._pm.set_blocked(name)
        if load_entrypoints:
            try:
                self._pm.load_setuptools_entrypoints(PROJECT_NAME)
            except pluggy.PluginValidationError as exc:
                raise PluginError(str(exc)) from exc
            except Exception as exc:
                raise PluginError(
                    f"loading the {PROJECT_NAME!r} entry points failed: {exc}"
                ) from exc
        try:
            for name, plugin in plugins:
                if name not in self.disabled:
                    self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc)) from exc
        self.protocols = self._collect_protocols()
        #: The plugins' configuration tables, in file order (load_config's *tables*).
        self.config_tables = self._collect_config_tables()

    @property
    def hook(self) -> Any:
        """pluggy's hook relay (typed loosely: pluggy's relay is dynamic)."""
        return self._pm.hook

    def _collect_protocols(self) -> dict[str, tuple[str, Protocol]]:
        """protocol name -> (plugin name, protocol), checking the contract."""
        found: dict[str, tuple[str, Protocol]] = {}
        caller = self._pm.hook.console_broker_protocols
        for impl in caller.get_hookimpls():
            plugin_name = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            result = impl.function()
            if not isinstance(result, list | tuple) or not all(
                isinstance(p, Protocol) for p in result
            ):
                raise PluginError(
                    f"plugin {plugin_name!r}: console_broker_protocols must return a list of "
                    f"broker.Protocol, got {result!r}"
                )
            for protocol in result:
                if protocol.name in found:
                    raise PluginError(
                        f"protocol {protocol.name!r} is declared by both "
                        f"{found[protocol.name][0]!r} and {plugin_name!r}"
                    )
                found[protocol.name] = (plugin_name, protocol)
        return found

    def _collect_config_tables(self) -> tuple[ConfigTable[Any], ...]:
        """Every plugin's configuration tables, checking the contract."""
        owners = {table.name: "the core" for table in CORE_TABLES}
        found: list[ConfigTable[Any]] = []
        caller = self._pm.hook.console_broker_config_tables
        for impl in caller.get_hookimpls():
            plugin_name = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                result = impl.function()
            except (TypeError, ValueError) as exc:  # a table that is not one
                raise PluginError(
                    f"plugin {plugin_name!r}: console_broker_config_tables: {exc}"
                ) from exc
            if not isinstance(result, list | tuple) or not all(
                isinstance(t, ConfigTable) for t in result
            ):
                raise PluginError(
                    f"plugin {plugin_name!r}: console_broker_config_tables must return a "
                    f"list of broker.config.ConfigTable, got {result!r}"
                )
            for table in result:
                if table.name in owners:
                    owner = owners[table.name]
                    raise PluginError(
                        f"configuration table {table.name!r} is declared by both "
                        f"{owner if owner == 'the core' else repr(owner)} and {plugin_name!r}"
                    )
                owners[table.name] = plugin_name
                found.append(table)
        return all_tables(found)[len(CORE_TABLES):]

    def plugin_infos(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution and protocols, by name."""
        dists = {id(plugin): dist for plugin, dist in self._pm.list_plugin_distinfo()}
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:  # a blocked name
                continue
            dist = dists.get(id(plugin))
            protocols = tuple(
                p for plugin_name, p in self.protocols.values() if plugin_name == name
            )
            infos.append(
                PluginInfo(
                    name=name,
                    distribution=dist.project_name if dist is not None else "(not installed)",
                    version=dist.version if dist is not None else "",
                    protocols=protocols,
                )
            )
        return sorted(infos, key=lambda info: info.name)

    def plugin_for(self, protocol: str) -> str:
        """The name of the plugin serving *protocol*, or :class:`PluginError`."""
        try:
            return self.protocols[protocol][0]
        except KeyError:
            known = ", ".join(sorted(self.protocols)) or "none"
            raise PluginError(
                f"no loaded plugin serves protocol {protocol!r} (loaded: {known})"
            ) from None
