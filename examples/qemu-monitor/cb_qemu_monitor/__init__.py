"""console-broker's QEMU monitor plugin: the VM's human monitor (HMP) in the browser.

A third-party plugin written against ``broker.api`` only, and the worked example of
docs/plugins.md ("Your first plugin"). It declares:

- the protocol ``monitor`` (:data:`PROTOCOL`): the client sends one HMP command line
  per text message, the broker runs it through libvirt's QEMU monitor API and answers
  with a JSON text message (the protocol is in this distribution's README and in
  :mod:`cb_qemu_monitor._session`); a view-only token may run only the commands
  ``[monitor] view_only_commands`` lists;
- its configuration table ``[monitor]`` (:data:`TABLE`);
- its refusal reason ``monitor_command_refused`` (:data:`COMMAND_REFUSED`, close code
  4301): a view-only session that sends another command is ended with it;
- its metric ``console_broker_monitor_commands_total{result}``;
- its page ``/console/monitor/`` (:mod:`cb_qemu_monitor._page`);
- the XML edit ``qga`` (:class:`GuestAgent`), which is no protocol:
  ``console-broker xml enable --consoles qga`` adds the QEMU guest agent's channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from broker.api import (
    Compare,
    ConfigTable,
    ConsoleEdit,
    Protocol,
    Refusal,
    Slot,
    XMLEdit,
    at_least,
    hookimpl,
    load_fragment,
    setting,
)

if TYPE_CHECKING:
    from lxml import etree

    from broker.api import EditOptions, Page, PluginContext, SessionHandler

#: The WebSocket subprotocol of the monitor's messages (docs: README.md).
SUBPROTOCOL = "console-broker.monitor.v1"


def command_names(value: tuple[str, ...]) -> str | None:
    """A check: each entry is one HMP command name (no blank, no ``/``)."""
    bad = [name for name in value if not name or any(c in name for c in " \t/")]
    return f"not a command name: {', '.join(map(repr, bad))}" if bad else None


@attrs.frozen
class MonitorSection:
    """The QEMU monitor console (the example plugin console-broker-qemu-monitor)."""

    view_only_commands: tuple[str, ...] = setting(
        ("info",),
        "Commands (first words) a view-only token may run; any other ends its session "
        "(monitor_command_refused). A full token runs any command.",
        command_names,
    )
    timeout: float = setting(
        10.0,
        "Seconds one command may take; then its answer is an error (the command may "
        "still take effect).",
        at_least(0.1),
    )
    max_output: int = setting(
        65536,
        "Characters of a command's output sent to the client; the rest is cut and the "
        "answer says so.",
        at_least(1),
    )


TABLE = ConfigTable(name="monitor", schema=MonitorSection)

#: A view-only session sent a command outside ``view_only_commands`` (it never ran).
COMMAND_REFUSED = Refusal(
    "monitor_command_refused", 0, 4301, "a view-only session may not run this command"
)


class Monitor(Protocol):
    """The ``monitor`` protocol: no console endpoint, libvirt's QEMU monitor API."""

    def session_handler(self, context: PluginContext) -> SessionHandler:
        from ._session import MonitorSessions

        return MonitorSessions.from_context(context).serve

    def page(self, path: str, context: PluginContext) -> Page | None:
        from ._page import page

        return page(path)


PROTOCOL = Monitor(
    name="monitor",
    title="QEMU monitor",
    description="The VM's QEMU human monitor (HMP) through libvirt: a command line in "
    "the browser; view-only tokens run the commands [monitor] allows.",
    endpoint="none",
    view_only=True,
    subprotocols=(SUBPROTOCOL,),
)

#: The guest agent's channel name, which QEMU's guest agent looks for.
AGENT_NAME = "org.qemu.guest_agent.0"
#: The ``<channel>`` children of ``<devices>`` the ``qga`` edit owns.
QGA = f"channel[target/@name='{AGENT_NAME}']"


def agent_channel(
    current: Sequence[etree._Element], devices: etree._Element
) -> list[etree._Element]:
    """Keep a guest agent channel the domain has (whatever its type); else add one on a
    UNIX socket (libvirt picks its path)."""
    del devices
    if current:
        return list(current)
    return [load_fragment(__name__, "xml/qga.xml")]


class GuestAgent(XMLEdit):
    """The ``qga`` edit: the QEMU guest agent's virtio channel."""

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        del options  # one channel, whatever the mode asked for
        return ConsoleEdit(
            mode="unix",
            slots=[
                Slot(
                    name="channel",
                    select=QGA,
                    build=agent_channel,
                    compare=Compare.COVERS,  # libvirt adds the socket's path and an address
                    guest_visible=True,
                )
            ],
        )


GUEST_AGENT = GuestAgent(
    name="qga",
    title="QEMU guest agent channel",
    description=f"A virtio channel {AGENT_NAME} on a UNIX socket, for the QEMU guest "
    "agent (no console: no token is issued for it).",
)


@hookimpl
def console_broker_protocols() -> list[Protocol]:
    return [PROTOCOL]


@hookimpl
def console_broker_xml_edits() -> list[XMLEdit]:
    return [GUEST_AGENT]


@hookimpl
def console_broker_refusals() -> list[Refusal]:
    return [COMMAND_REFUSED]


@hookimpl
def console_broker_config_tables() -> list[ConfigTable[Any]]:
    return [TABLE]
