"""The edits the loaded plugins give: what links the plugin manager to the editor.

The editor (:mod:`broker.xml._editor`) knows no plugin manager: it is handed an
:data:`~broker.xml.EditSource`. :func:`plugin_edits` is the one the commands and the
libvirt hook hand it, asking a :class:`broker.plugins.PluginManager` (which they build)
for the edit of each protocol's object (``xml_edit``) or of an XML edit that is no
protocol (``console_broker_xml_edits``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from broker.errors import PluginError
from broker.xml._errors import EditError, XmlError
from broker.xml._model import ConsoleEdit, EditOptions, EditSource

if TYPE_CHECKING:
    from broker.plugins import PluginManager


def console_edit(manager: PluginManager, protocol: str, options: EditOptions) -> ConsoleEdit:
    """*protocol*'s edit, from its own object: a protocol's ``xml_edit``, or an XML edit
    that is no protocol (``console_broker_xml_edits``)."""
    providers = manager.xml_providers()
    if protocol not in providers:
        known = ", ".join(sorted(providers)) or "none"
        raise EditError(f"unknown console protocol {protocol!r} (known: {known})")
    plugin, provider = providers[protocol]
    for option in provider.xml_options:  # the plugin's options: checked before it edits
        try:
            options.value(option)
        except ValueError as exc:
            raise EditError(str(exc)) from None
    try:
        result: object = provider.xml_edit(options)
    except (XmlError, PluginError):
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin!r} failed to give the {protocol} XML edit: {exc}"
        ) from exc
    if result is None:
        raise EditError(f"protocol {protocol!r} (plugin {plugin!r}) does not provision domain XML")
    if not isinstance(result, ConsoleEdit):
        raise PluginError(
            f"plugin {plugin!r}: the xml_edit of {protocol!r} must return a "
            f"broker.xml.ConsoleEdit or None, got {type(result).__name__}"
        )
    return result


def plugin_edits(manager: PluginManager) -> EditSource:
    """The edit source of *manager*'s plugins: :func:`console_edit` with *manager*."""
    return functools.partial(console_edit, manager)
