"""Loading and validating plugins.

The host loads plugins in three steps (as pluggy's own examples and tox do):
add the hook specifications, block what ``CONSOLE_BROKER_DISABLE_PLUGINS``
names, load the ``console_broker`` entry-point group. The built-in plugins go
through that same entry-point path; nothing is registered behind its back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy
import structlog

from broker import hookspecs
from broker.config import CORE_TABLES, ConfigTable, all_tables
from broker.errors import PluginError as PluginError  # where it always was
from broker.hookspecs import (
    OPEN_FLAGS,
    OPERATOR,
    PROJECT_NAME,
    SCREENSHOT,
    Protocol,
    XMLEdit,
    XMLOption,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from broker.config import Config
    from broker.recordings import RecordingKind
    from broker.service import Refusal

#: Comma-separated plugin (entry-point) names that are not loaded.
DISABLE_ENV = "CONSOLE_BROKER_DISABLE_PLUGINS"


_Metric = TypeVar("_Metric")


class PluginContext:
    """What the core gives one plugin: its name, the broker's configuration, a logger
    named after it, and a place for its Prometheus metrics.

    The core makes one per plugin for each broker (``serve``) and for each command that
    asks a plugin something (``token``, ``xml enable``), and hands it to every method of
    the plugin's :class:`~broker.hookspecs.Protocol` objects and to
    ``console_broker_service``.
    """

    def __init__(
        self, plugin: str, config: Config, registry: CollectorRegistry | None = None
    ) -> None:
        from prometheus_client import CollectorRegistry

        #: The plugin's name (its entry point's).
        self.plugin = plugin
        #: The broker's :class:`broker.config.Config`.
        self.config = config
        #: A structlog logger named ``console_broker.plugin.NAME``.
        self.log: Any = structlog.get_logger(f"console_broker.plugin.{plugin}")
        self._registry = registry if registry is not None else CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        #: The plugin's own state for this broker, shared by its protocols' handlers and
        #: its service (the core never looks inside).
        self.state: dict[str, Any] = {}

    def metric(self, kind: type[_Metric], name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> _Metric:
        """A Prometheus metric of the plugin, exposed by the broker's ``/metrics`` as
        ``console_broker_PLUGIN_NAME`` (*kind*: ``prometheus_client.Counter``, ``Gauge``,
        ``Histogram``, ``Summary``). Asking again for the same *name* returns the same
        metric, so a session handler and the plugin's service can share it."""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise PluginError(f"plugin {self.plugin!r}: metric name {name!r} must be snake_case")
        if name not in self._metrics:
            full = f"console_broker_{self.plugin.replace('-', '_')}_{name}"
            self._metrics[name] = kind(  # type: ignore[call-arg]
                full, documentation, list(labelnames), registry=self._registry, **kwargs
            )
        metric: _Metric = self._metrics[name]
        return metric


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
        self.xml_edits = self._collect_xml_edits()
        self.refusals = self._collect_refusals()
        #: The plugins' configuration tables, in file order (load_config's *tables*).
        self.config_tables = self._collect_config_tables()
        #: The recordings the plugins write, by protocol (``console_broker_recording_kinds``).
        self.recording_kinds = self._collect_recording_kinds()

    @property
    def hook(self) -> Any:
        """pluggy's hook relay (typed loosely: pluggy's relay is dynamic)."""
        return self._pm.hook

    def _declared(self, hook: str, kind: type[Any]) -> Iterable[tuple[str, Any]]:
        """(plugin name, item) for every item of every plugin's *hook* list, checked."""
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            plugin_name = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                result = impl.function()
            except (TypeError, ValueError) as exc:  # a declaration that is not one
                raise PluginError(f"plugin {plugin_name!r}: {hook}: {exc}") from exc
            if not isinstance(result, list | tuple) or not all(
                isinstance(item, kind) for item in result
            ):
                raise PluginError(
                    f"plugin {plugin_name!r}: {hook} must return a list of "
                    f"{kind.__module__}.{kind.__qualname__}, got {result!r}"
                )
            for item in result:
                yield plugin_name, item

    def describe(self, plugin_name: str) -> str:
        """*plugin_name* and the distribution that provides it, for error messages."""
        plugin = self._pm.get_plugin(plugin_name)
        for candidate, dist in self._pm.list_plugin_distinfo():
            if candidate is plugin:
                return f"plugin {plugin_name!r} of the distribution {dist.project_name!r}"
        return f"plugin {plugin_name!r}"

    def _collect_protocols(self) -> dict[str, tuple[str, Protocol]]:
        """protocol name -> (plugin name, protocol), checking the contract."""
        found: dict[str, tuple[str, Protocol]] = {}
        for plugin_name, protocol in self._declared("console_broker_protocols", Protocol):
            if protocol.name == SCREENSHOT:
                raise PluginError(
                    f"{self.describe(plugin_name)} declares the protocol {SCREENSHOT!r}: the "
                    "name is the core's own (screenshot tokens)"
                )
            if protocol.name == OPERATOR:
                raise PluginError(
                    f"{self.describe(plugin_name)} declares the protocol {OPERATOR!r}: the "
                    "name is the core's own (operator tokens, the operator page)"
                )
            if protocol.name in found:
                raise PluginError(
                    f"protocol {protocol.name!r} is declared by both "
                    f"{self.describe(found[protocol.name][0])} and {self.describe(plugin_name)}"
                )
            found[protocol.name] = (plugin_name, protocol)
        self._check_open_options(found)
        return found

    def _check_open_options(self, protocols: Mapping[str, tuple[str, Protocol]]) -> None:
        """One owner per ``console-broker open`` flag: the command's own
        (:data:`~broker.hookspecs.OPEN_FLAGS`) or one protocol's."""
        owners: dict[str, str] = {}
        for name, (plugin_name, protocol) in sorted(protocols.items()):
            owner = f"{self.describe(plugin_name)} (protocol {name!r})"
            for option in protocol.open_options:
                if option.flag in OPEN_FLAGS or option.flag in owners:
                    other = (
                        "the open command" if option.flag in OPEN_FLAGS else owners[option.flag]
                    )
                    raise PluginError(
                        f"the open option {option.flag} of {owner} is {other}'s already"
                    )
                owners[option.flag] = owner

    def _collect_xml_edits(self) -> dict[str, tuple[str, XMLEdit]]:
        """edit name -> (plugin name, edit); a name a protocol or another edit has is an
        error."""
        found: dict[str, tuple[str, XMLEdit]] = {}
        for plugin_name, edit in self._declared("console_broker_xml_edits", XMLEdit):
            other = found.get(edit.name) or self.protocols.get(edit.name)
            if other is not None:
                raise PluginError(
                    f"the XML edit {edit.name!r} of {self.describe(plugin_name)} has the "
                    f"name of one of {self.describe(other[0])}"
                )
            found[edit.name] = (plugin_name, edit)
        return found

    def _collect_refusals(self) -> dict[str, tuple[str, Refusal]]:
        """reason -> (plugin name, refusal): codes in the plugins' range, none taken."""
        from broker.service._refusals import (
            CORE_REFUSALS,
            HTTP_REFUSALS,
            PLUGIN_CODES,
            Refusal,
        )

        core = {r.reason for r in (*CORE_REFUSALS, *HTTP_REFUSALS)}
        codes = {r.close_code: "the core" for r in CORE_REFUSALS}
        found: dict[str, tuple[str, Refusal]] = {}
        for plugin_name, refusal in self._declared("console_broker_refusals", Refusal):
            who = self.describe(plugin_name)
            if refusal.close_code not in PLUGIN_CODES:
                raise PluginError(
                    f"{who}: refusal {refusal.reason!r} has close code {refusal.close_code}, "
                    f"outside the plugins' range {PLUGIN_CODES.start}-{PLUGIN_CODES.stop - 1}"
                )
            if refusal.reason in core or refusal.reason in found:
                owner = "the core" if refusal.reason in core else self.describe(
                    found[refusal.reason][0])
                raise PluginError(f"{who}: refusal {refusal.reason!r} is {owner}'s already")
            if refusal.close_code in codes:
                raise PluginError(
                    f"{who}: close code {refusal.close_code} of {refusal.reason!r} is "
                    f"{codes[refusal.close_code]}'s already"
                )
            codes[refusal.close_code] = who
            found[refusal.reason] = (plugin_name, refusal)
        return found

    def _collect_recording_kinds(self) -> dict[str, RecordingKind]:
        """protocol -> kind: each a protocol of the declaring plugin, one kind per protocol
        and per suffix; no protocol may take the recording tokens' name."""
        from broker.recordings import RECORDING, RecordingKind

        if RECORDING in self.protocols:
            raise PluginError(
                f"{self.describe(self.protocols[RECORDING][0])} declares the protocol "
                f"{RECORDING!r}: the name is the core's own (recording tokens)"
            )
        found: dict[str, RecordingKind] = {}
        suffixes: dict[str, str] = {}
        for plugin_name, kind in self._declared("console_broker_recording_kinds", RecordingKind):
            who = self.describe(plugin_name)
            owner = self.protocols.get(kind.protocol)
            if owner is None or owner[0] != plugin_name:
                raise PluginError(
                    f"{who}: recordings of the protocol {kind.protocol!r}, which it does not "
                    "serve"
                )
            if kind.protocol in found:
                raise PluginError(f"{who}: two recording kinds of {kind.protocol!r}")
            other = next(
                (s for s in suffixes if kind.suffix.endswith(s) or s.endswith(kind.suffix)),
                None,
            )
            if other is not None:
                raise PluginError(
                    f"{who}: the recording suffix {kind.suffix!r} of {kind.protocol!r} "
                    f"clashes with {other!r} of {suffixes[other]!r}"
                )
            suffixes[kind.suffix] = kind.protocol
            found[kind.protocol] = kind
        return found

    def xml_options(self) -> list[XMLOption]:
        """The options every protocol's and XML edit's edit declares, checked: one name,
        flag or policy key per option (:class:`PluginError` naming both owners)."""
        reserved = {"--mode", "--listen", "--option", "--param", "--consoles", "--diff",
                    "--check", "--in-place", "--no-validate", "--connect"}
        owners: dict[str, str] = {}
        found: list[XMLOption] = []
        for name, (plugin, provider) in sorted(self.xml_providers().items()):
            for option in provider.xml_options:
                owner = f"{self.describe(plugin)} ({name})"
                for key in {option.name, option.key, option.flag} - {""}:
                    if key in reserved or key in owners:
                        raise PluginError(
                            f"XML option {key!r} of {owner} is "
                            f"{'the core' if key in reserved else owners[key]}'s already"
                        )
                    owners[key] = owner
                found.append(option)
        return found

    def xml_providers(self) -> dict[str, tuple[str, Protocol | XMLEdit]]:
        """Every name ``xml enable --consoles`` takes: the protocols and the XML edits,
        each with its plugin's name and the object whose ``xml_edit`` provisions it."""
        found: dict[str, tuple[str, Protocol | XMLEdit]] = dict(self.protocols)
        found.update(self.xml_edits)
        return found

    def contexts(
        self, config: Config, registry: CollectorRegistry | None = None
    ) -> dict[str, PluginContext]:
        """A :class:`PluginContext` for every loaded plugin (metrics into *registry*)."""
        return {
            name: PluginContext(name, config, registry)
            for name, plugin in self._pm.list_name_plugin()
            if plugin is not None
        }

    def services(self, contexts: Mapping[str, PluginContext]) -> list[tuple[str, Any]]:
        """(plugin name, async context manager) of every plugin's ``console_broker_service``."""
        found = []
        for impl in self._pm.hook.console_broker_service.get_hookimpls():
            name = self._pm.get_name(impl.plugin) or repr(impl.plugin)
            kwargs = {"context": contexts[name]} if "context" in impl.argnames else {}
            service = impl.function(**kwargs)
            if service is None:
                continue
            if not (hasattr(service, "__aenter__") and hasattr(service, "__aexit__")):
                raise PluginError(
                    f"{self.describe(name)}: console_broker_service must return an async "
                    f"context manager or None, got {service!r}"
                )
            found.append((name, service))
        return found

    def _collect_config_tables(self) -> tuple[ConfigTable[Any], ...]:
        """Every plugin's configuration tables, checking the contract."""
        owners = {table.name: "the core" for table in CORE_TABLES}
        found: list[ConfigTable[Any]] = []
        for plugin_name, table in self._declared("console_broker_config_tables", ConfigTable):
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
