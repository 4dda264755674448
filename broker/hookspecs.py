"""The hooks a console-broker plugin implements.

A plugin is any importable object (usually a module) whose functions carry the
:data:`hookimpl` marker and are named after the hooks below. It is found
through the ``console_broker`` entry-point group::

    [project.entry-points.console_broker]
    myproto = "my_package.plugin"

The built-in ``vnc``, ``spice`` and ``serial`` plugins are registered exactly
this way. Every hook is called with keyword arguments; an implementation may
accept any subset of the arguments a hook documents. ``docs/plugins.md`` has
a section per hook with a worked example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import pluggy

if TYPE_CHECKING:
    from broker.xml import ConsoleEdit, EditOptions

#: The pluggy project name and the entry-point group plugins register under.
PROJECT_NAME = "console_broker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marks a function as an implementation of one of the hooks below.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


def _check_protocol_name(_instance: object, _attribute: object, value: str) -> None:
    if not value or not value.isascii() or not value.replace("-", "").isalnum() or value != value.lower():
        raise ValueError(
            f"protocol name {value!r} must be lower-case ASCII letters, digits and '-'"
        )


@attrs.frozen
class Protocol:
    """A console protocol a plugin serves.

    ``name`` is what operators type (``--consoles vnc,serial``) and what a
    token's protocol claim holds; it is unique across all loaded plugins.
    """

    name: str = attrs.field(validator=_check_protocol_name)
    #: A short human name, e.g. ``"VNC (RFB)"``.
    title: str
    #: One sentence on what a user gets: the clients it serves.
    description: str = ""


@hookspec
def console_broker_protocols() -> list[Protocol]:  # type: ignore[empty-body]
    """Declare the console protocols this plugin serves.

    Called once when the plugins are loaded. Return a list of
    :class:`Protocol` (an empty list is allowed). All results are collected;
    two plugins declaring the same protocol name is a load error.
    """


@hookspec(firstresult=True)
def console_broker_xml_edit(protocol: str, options: EditOptions) -> ConsoleEdit | None:
    """Say how to provision *protocol* in a libvirt domain XML.

    Called by ``console-broker xml enable`` (and ``enable DOMAIN``, the
    libvirt hook) once per protocol asked for, and by ``disable`` to find
    what to undo. Return None for protocols the plugin does not serve; the
    first non-None result wins.

    :param protocol: the protocol name, as declared by ``console_broker_protocols``.
    :param options: a :class:`broker.xml.EditOptions`: the mode (``fd``,
        ``tcp``, ``websocket``), listen address, TLS, USB redirection count
        and free-form ``--param NAME=VALUE`` settings.
    :return: a :class:`broker.xml.ConsoleEdit`: the mode actually provisioned,
        the :class:`broker.xml.Slot` list (each owns some children of
        ``<devices>`` and builds what they should become), the device the
        broker will open, settings to record, notes for the operator.
    """
