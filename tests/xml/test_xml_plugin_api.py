"""XML edits from plugins: a third-party edit that is no protocol, and the contract the core
enforces."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import attrs
import pytest
from lxml import etree
from xmlhelpers import SAMPLE

from broker import Protocol, hookimpl
from broker.hookspecs import XMLEdit
from broker.plugins import PluginError, PluginManager
from broker.xml import (
    Compare,
    ConsoleEdit,
    DeviceRef,
    EditError,
    EditOptions,
    Slot,
    disable_xml,
    enable_xml,
    parse_document,
    plugin_edits,
    read_consoles,
)

Build = Callable[[Sequence[etree._Element], etree._Element], Sequence[etree._Element]]


def agent_channel(
    current: Sequence[etree._Element], _devices: etree._Element
) -> list[etree._Element]:
    """A virtio channel for a guest agent, added when missing."""
    if current:
        return list(current)
    channel = etree.Element("channel", type="unix")
    etree.SubElement(channel, "target", type="virtio", name="org.example.agent.0")
    return [channel]


AGENT_CHANNEL = "channel[target/@name='org.example.agent.0']"


@attrs.frozen
class AgentEdit(XMLEdit):
    """An XML edit that is no protocol: a guest agent's channel, one slot of its own."""

    build: Build = agent_channel
    select: str = AGENT_CHANNEL

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        return ConsoleEdit(
            mode=options.params.get("agent.mode", "unix"),
            slots=[
                Slot(
                    name="channel",
                    select=self.select,
                    build=self.build,
                    compare=Compare.COVERS,
                    guest_visible=True,
                )
            ],
            devices=[DeviceRef("channel", "unix")],
            settings={"flavour": "example"},
        )


class ExamplePlugin:
    """A third-party plugin: the XML edit 'agent' (console_broker_xml_edits)."""

    def __init__(self, build: Build = agent_channel, select: str | None = None) -> None:
        self.edit = AgentEdit(name="agent", title="Example agent", build=build,
                              select=select or AGENT_CHANNEL)

    @hookimpl
    def console_broker_xml_edits(self) -> list[XMLEdit]:
        return [self.edit]


def manager_with(plugin: object) -> PluginManager:
    return PluginManager(plugins=[("example", plugin)])


def test_a_third_party_plugin_contributes_its_own_slot() -> None:
    manager = manager_with(ExamplePlugin())
    options = EditOptions(params={"agent.mode": "socket"})
    out = enable_xml(SAMPLE, ["agent", "vnc"], options, edits=plugin_edits(manager)).after
    root = parse_document(out).root
    assert root.find("devices/channel/target").get("name") == "org.example.agent.0"  # type: ignore[union-attr]
    record = read_consoles(parse_document(out))["agent"]
    assert (record.mode, record.device, record.index) == ("socket", DeviceRef("channel", "unix"), 0)
    assert record.settings == {"flavour": "example"}
    assert enable_xml(out, ["agent", "vnc"], options, edits=plugin_edits(manager)).after == out
    assert disable_xml(out, edits=plugin_edits(manager)).after == SAMPLE


def test_a_protocol_without_an_xml_edit_is_a_clear_error() -> None:
    class NoXml:
        @hookimpl
        def console_broker_protocols(self) -> list[Protocol]:
            return [Protocol(name="viewer", title="Viewer only")]

    with pytest.raises(EditError, match="does not provision domain XML"):
        enable_xml(SAMPLE, ["viewer"], EditOptions(), edits=plugin_edits(manager_with(NoXml())))


def test_disable_without_the_plugin_says_so() -> None:
    edits = plugin_edits(manager_with(ExamplePlugin()))
    out = enable_xml(SAMPLE, ["agent"], EditOptions(), edits=edits).after
    with pytest.raises(EditError, match="unknown console protocol 'agent'"):
        disable_xml(out, edits=plugin_edits(PluginManager()))


def mutating(current: Sequence[etree._Element], devices: etree._Element) -> list[etree._Element]:
    for el in current:
        el.set("mutated", "yes")
    return agent_channel(current, devices)


def attached(current: Sequence[etree._Element], devices: etree._Element) -> list[etree._Element]:
    return [devices[0]]


def not_elements(
    current: Sequence[etree._Element], devices: etree._Element
) -> list[etree._Element]:
    return ["<channel/>"]  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (ExamplePlugin(select="channel/target"), "must select child elements of <devices>"),
        (ExamplePlugin(select="memballoon"), "does not match"),
        (ExamplePlugin(build=attached), "belongs to another tree"),
        (ExamplePlugin(build=not_elements), "must return elements"),
        (ExamplePlugin(select="channel | graphics[@type='vnc']"), "claimed by both"),
    ],
)
def test_the_core_enforces_the_slot_contract(plugin: ExamplePlugin, message: str) -> None:
    edits = plugin_edits(manager_with(plugin))
    with pytest.raises(PluginError, match=message):
        enable_xml(SAMPLE, ["agent", "vnc"], EditOptions(), edits=edits)


def test_a_build_that_changes_its_input_is_refused() -> None:
    data = SAMPLE.replace(
        b"</devices>",
        b"  <channel type='unix'><target type='virtio' name='org.example.agent.0'/></channel>\n"
        b"  </devices>",
    )
    edits = plugin_edits(manager_with(ExamplePlugin(mutating)))
    with pytest.raises(PluginError, match="changed the elements it was given"):
        enable_xml(data, ["agent"], EditOptions(), edits=edits)


def test_slots_and_edits_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="not a valid XPath"):
        Slot(name="x", select="channel[", build=agent_channel)
    with pytest.raises(ValueError, match="lower-case"):
        Slot(name="Bad Name", select="channel", build=agent_channel)
    slot = Slot(name="x", select="channel", build=agent_channel)
    with pytest.raises(ValueError, match="unique"):
        ConsoleEdit(mode="m", slots=[slot, copy.copy(slot)])
